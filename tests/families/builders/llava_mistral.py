"""LLaVA-Med v1.5 in its HF shape (as ``chaoyinshe/llava-med-v1.5-mistral-7b-hf`` converts
``microsoft/llava-med-v1.5-mistral-7b``), tiny and random.

``LlavaForConditionalGeneration`` with a ``MistralConfig`` text model (Mistral-7B-Instruct-v0.2: no sliding
window, rope theta 1e6), CLIP vision tower, 2-layer MLP projector, ``LlavaProcessor`` + ``CLIPImageProcessor``
(one fixed-size crop per image, no anyres). Tokenizer as llava-hf's conversions leave a Mistral tokenizer:
``<unk> <s> </s>`` ids 0-2, bos added by the tokenizer, ``<image>`` and ``<pad>`` appended, embedding rows padded
to a multiple of 64 (32064 in the real checkpoint).

Chat template: llava-hf's Mistral LLaVA template, the ``chat_template.json`` of
``llava-hf/llava-v1.6-mistral-7b-hf`` (the current revision, with the ``<<SYS>>`` system branch added in the
hub discussion llava-hf/llava-v1.6-mistral-7b-hf#31 and ``</s>`` after assistant turns; an older revision wrote
``<\\s>``). Recorded verbatim in huggingface/optimum-intel ``optimum/exporters/openvino/utils.py``
(``COMPLEX_CHAT_TEMPLATES``, entry "# llava-next"). Roles other than system/user/assistant raise
``Only user and assistant roles are supported!``; no bos in the text, no generation-prompt branch (a prompt ends
with `` [/INST]``), every assistant turn ends with ``</s> ``.
"""

from __future__ import annotations

from pathlib import Path

from .llava15 import PATCH_SIZE, clip_vision_config, finish, llava_hf_tokenizer, text_kwargs

MISTRAL_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

IMAGE_SIZE = 56  # 16 image tokens per image (the real model: 336 -> 576)


def mistral_text_config(tokenizer):
    from transformers import MistralConfig

    return MistralConfig(
        **text_kwargs(tokenizer),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def build(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

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
        num_additional_image_tokens=1,
        chat_template=MISTRAL_LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=clip_vision_config(IMAGE_SIZE),
        text_config=mistral_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return finish(Path(path), LlavaForConditionalGeneration, config, processor, seed)
