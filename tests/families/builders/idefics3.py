"""Tiny SmolVLM / Idefics3 (``model_type: idefics3``, as HuggingFaceTB/SmolVLM-Instruct ships).

Real classes throughout: ``Idefics3ForConditionalGeneration`` (SigLIP-style ``Idefics3VisionConfig`` vision
model, pixel-shuffle connector, Llama text model) and ``Idefics3Processor`` with the PIL Idefics3 image
processor. Shapes are tiny but keep the family's mechanics: images are resized so their longest edge is
``2 * TILE`` and split into ``TILE`` x ``TILE`` tiles plus a global view, so images of different aspect ratios
give different numbers of tiles (square: 2x2 + global = 5; landscape or portrait 2:1: 1x2 / 2x1 + global = 3),
and ``image_seq_len`` = (TILE / PATCH)^2 / SCALE^2 image tokens per tile, as the model computes it.

Tokenizer: SmolVLM-Instruct's special tokens (SmolLM2's ``<|endoftext|>`` (unk) / ``<|im_start|>`` (bos) /
``<|im_end|>`` (pad), then ``<fake_token_around_image>``, ``<image>``, ``<end_of_utterance>`` (eos),
``<global-img>`` and ``<row_i_col_j>`` for i, j in 1..6); like SmolVLM's, it adds no BOS itself: the chat
template writes ``<|im_start|>``.

Chat template: SmolVLM-Instruct's published one, verbatim from huggingface/transformers
``tests/models/smolvlm/test_processing_smolvlm.py`` (``prepare_processor_dict``; the same string is
SmolVLM-Instruct's ``chat_template`` and, with the extra ``video`` branch, ``DEFAULT_CHAT_TEMPLATE`` in
``transformers/models/smolvlm/processing_smolvlm.py``). Every turn is ``Role: text<end_of_utterance>\\n``
(``Role:`` with no space when the turn starts with an image); any role name renders (``vuser`` -> ``Vuser:``).
"""

from __future__ import annotations

from pathlib import Path

from .common import seeded, train_tokenizer

# Source: huggingface/transformers tests/models/smolvlm/test_processing_smolvlm.py, prepare_processor_dict()
# (= HuggingFaceTB/SmolVLM-Instruct chat_template).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *ROW_COL_TOKENS,
]

TILE = 56  # vision image_size = the image processor's max_image_size (one tile)
PATCH = 14  # SigLIP's patch size
SCALE = 2  # pixel-shuffle scale factor of the connector
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE**2  # 4 <image> tokens per tile


def build(path: Path, seed: int = 0) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    path = Path(path)
    tokenizer = train_tokenizer(
        SPECIAL_TOKENS,
        vocab_size=1024,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        model_max_length=4096,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": 2 * TILE},
        max_image_size={"longest_edge": TILE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with seeded(seed):
        model = Idefics3ForConditionalGeneration(config)
    assert model.model.image_seq_len == IMAGE_SEQ_LEN, (model.model.image_seq_len, IMAGE_SEQ_LEN)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
