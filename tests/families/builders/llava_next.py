"""LLaVA-NeXT (LLaVA-1.6) as llava-hf ships ``llava-hf/llava-v1.6-mistral-7b-hf``, tiny and random.

``LlavaNextForConditionalGeneration`` (CLIP tower, MLP projector, learned ``image_newline``, Mistral text model)
+ ``LlavaNextProcessor`` with a ``LlavaNextImageProcessor`` doing real anyres: each image is resized/padded to the
best of ``IMAGE_GRID_PINPOINTS`` and cut into ``IMAGE_SIZE`` tiles plus one downscaled base tile, so images of
different aspect ratios give different tile counts and different numbers of ``<image>`` tokens (the real model:
336 tiles, pinpoints up to 672x672 / 1008x336). Shape as ``convert_llava_next_weights_to_hf.py`` leaves it:
``<image>`` and ``<pad>`` appended to the Mistral vocabulary, embedding rows padded to a multiple of 64.

Text model and template: Mistral, with llava-v1.6-mistral's ``[INST] ... [/INST]`` chat template (the same
published template as ``llava_mistral``; source named there).
"""

from __future__ import annotations

from pathlib import Path

from .llava15 import PATCH_SIZE, clip_vision_config, finish, llava_hf_tokenizer
from .llava_mistral import MISTRAL_LLAVA_TEMPLATE, mistral_text_config

IMAGE_SIZE = 28  # one tile = 2x2 patches of 14
IMAGE_GRID_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]  # (height, width), multiples of IMAGE_SIZE


def build(path: Path, seed: int = 0) -> Path:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = llava_hf_tokenizer()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS,
        do_pad=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MISTRAL_LLAVA_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=clip_vision_config(IMAGE_SIZE),
        text_config=mistral_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return finish(Path(path), LlavaNextForConditionalGeneration, config, processor, seed)
