"""Tiny Gemma 3 (``model_type: gemma3``, as google/gemma-3-4b-it ships).

Real classes throughout: ``Gemma3ForConditionalGeneration`` (SigLIP vision tower, ``Gemma3MultiModalProjector``
average-pooling the patch grid to ``mm_tokens_per_image`` soft tokens, Gemma 3 text model with alternating
sliding-window / full attention) and ``Gemma3Processor`` with the PIL Gemma 3 image processor. Tiny shapes:
28 px images, patch 14 (a 2x2 grid, pooled with kernel 1 to 4 soft tokens per image), text hidden 64, 2 layers
(one sliding, one full), head_dim 16.

Tokenizer: Gemma's special tokens in Gemma's id order (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3), then
``<start_of_turn>`` / ``<end_of_turn>`` and the image tokens ``<start_of_image>`` (boi, the placeholder the chat
template writes), ``<end_of_image>`` (eoi), ``<image_soft_token>`` (what the processor expands the placeholder
to); the processor reads them as ``tokenizer.boi_token`` / ``eoi_token`` / ``image_token``
(``extra_special_tokens``). Like Gemma's tokenizer it adds ``<bos>`` when encoding with special tokens, and
the chat template also writes ``{{ bos_token }}`` itself. The generation config stops on ``<eos>`` and
``<end_of_turn>``, as google/gemma-3-*-it's does.

Chat template: Gemma 3's published one (the ``chat_template`` of google/gemma-3-4b-it / -12b-it / -1b-it),
verbatim as the Hub serves it; reproduced in the GGUF metadata of ggml-org/gemma-3-12b-it-GGUF and in
unslothai/unsloth ``unsloth/chat_templates.py`` (``gemma3_template``, "Obtained via
print(tokenizer.chat_template ...)"). huggingface/transformers ``tests/models/gemma3/test_processing_gemma3.py``
(``prepare_processor_dict``) carries the same template minus the string-system-content branch. It raises
"Conversation roles must alternate user/assistant/user/assistant/..." on any other role order (so a third
``vuser`` role does not render), maps ``assistant`` to ``model``, and ends every turn with ``<end_of_turn>\\n``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import seeded, train_tokenizer

# Source: google/gemma-3-4b-it chat_template (Hugging Face Hub), byte for byte; see the module docstring.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

IMAGE_SIZE = 28
PATCH = 14
MM_TOKENS_PER_IMAGE = 4  # a 2x2 patch grid pooled with kernel 1 (sqrt(tokens) must divide the grid side)


def build(path: Path, seed: int = 0) -> Path:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    path = Path(path)
    tokenizer = train_tokenizer(
        SPECIAL_TOKENS,
        vocab_size=1024,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        model_max_length=4096,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    ids = tokenizer.convert_tokens_to_ids
    eos_ids = [tokenizer.eos_token_id, ids("<end_of_turn>")]
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        tie_word_embeddings=True,
    )
    config.eos_token_id = eos_ids  # as google/gemma-3-4b-it's config.json: [<eos>, <end_of_turn>]
    with seeded(seed):
        model = Gemma3ForConditionalGeneration(config)
        # transformers starts the projector's input projection at zeros (a pretrained checkpoint overwrites
        # it); a random tiny model needs it random, or images carry no information and no vision gradient
        with torch.no_grad():
            weight = model.model.multi_modal_projector.mm_input_projection_weight
            weight.normal_(0.0, weight.shape[0] ** -0.5)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
