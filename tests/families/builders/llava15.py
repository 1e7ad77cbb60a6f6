"""LLaVA-1.5 as llava-hf ships it (``llava-hf/llava-1.5-7b-hf``), tiny and random.

``LlavaForConditionalGeneration`` = CLIP vision tower + 2-layer GELU MLP projector + Llama (Vicuna-v1.5) text
model; ``LlavaProcessor`` = ``CLIPImageProcessor`` (shortest-edge resize + centre crop) + a Llama-style
tokenizer. The shape follows ``transformers/models/llava/convert_llava_weights_to_hf.py``: ``<unk> <s> </s>`` are
ids 0-2, ``<image>`` and ``<pad>`` are added after the base vocabulary (32000 / 32001 in the real model) and the
embedding matrix is padded to a multiple of 64 (32064), so it has more rows than ``len(tokenizer)``; the
tokenizer adds ``<s>`` itself (``add_bos_token``) and the chat template does not. Vision features come from the
penultimate CLIP layer (``vision_feature_layer=-2``), CLS dropped (``"default"``), as in the real config.

The helpers here (``llava_hf_tokenizer``, ``clip_vision_config``, ``finish``) are shared with the other
llava-hf families (``llava_mistral``, ``llava_next``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import seeded, train_tokenizer

# llava-hf's LLaVA-1.5 chat template (chat_template.json of llava-hf/llava-1.5-7b-hf), as published in
# huggingface/transformers tests/models/llava/test_processing_llava.py (``prepare_processor_dict``). Any role
# renders as ``ROLE.upper() + ': '`` (so a "vuser" turn becomes "VUSER: "), no end-of-turn marker after an
# assistant turn (just the text plus a space), "ASSISTANT:" as the generation prompt, no bos in the text.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE_SIZE = 56  # 4x4 patches of 14 -> 16 image tokens per image (the real model: 336 -> 576)
PATCH_SIZE = 14
VOCAB_MULTIPLE = 64  # the conversion scripts pad the embedding matrix to a multiple of 64


def llava_hf_tokenizer(*, vocab_size: int = 1000, pad_token: str = "<pad>", **kwargs: Any) -> Any:
    """A Llama/Mistral-style tokenizer as the llava-hf conversions leave it: ``<unk> <s> </s>`` first (ids 0-2),
    bos added by the tokenizer, no eos; then ``<image>`` and (when ``pad_token`` is ``"<pad>"``) ``<pad>``
    appended as special tokens after the trained vocabulary."""
    from transformers import AddedToken

    tok = train_tokenizer(
        ["<unk>", "<s>", "</s>"],
        vocab_size=vocab_size,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        **kwargs,
    )
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if pad_token == "<pad>":
        tok.add_special_tokens({"pad_token": "<pad>"})
    else:
        tok.pad_token = pad_token
    return tok


def padded_vocab(tokenizer: Any) -> int:
    return int(math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def clip_vision_config(image_size: int, patch_size: int = PATCH_SIZE) -> Any:
    """A tiny CLIP ViT (the real one: ViT-L/14-336, quick_gelu, 24 layers)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def text_kwargs(tokenizer: Any) -> dict[str, Any]:
    """Tiny decoder shape shared by the Llama and Mistral text models."""
    return dict(
        vocab_size=padded_vocab(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def finish(path: Path, model_class: Any, config: Any, processor: Any, seed: int) -> Path:
    """Seeded init, generation config from the tokenizer, saved like a hub checkpoint."""
    tokenizer = processor.tokenizer
    with seeded(seed):
        model = model_class(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build(path: Path, seed: int = 0) -> Path:
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = llava_hf_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA15_TEMPLATE,
    )
    text = LlamaConfig(
        **text_kwargs(tokenizer),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=clip_vision_config(IMAGE_SIZE),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return finish(Path(path), LlavaForConditionalGeneration, config, processor, seed)
