"""SQ-LLaVA / STLLaVA-Med as ``python -m stllava_med.convert_checkpoint`` writes it, tiny and random.

``SQLlavaForConditionalGeneration`` (``stllava_med.models.sq_llava``, ``model_type: sq_llava``) = CLIP vision tower
+ SQ-LLaVA's cluster projector (prototype extractor with learnable alpha / beta, then a 2-layer QuickGELU MLP) +
Llama (Vicuna-v1.5) text model; the processor is the LLaVA-1.5 one (``LlavaProcessor``: CLIP image processor + a
Llama-style tokenizer with ``<image>`` and ``<pad>`` added) and the chat template is the one the converter writes:
the official LLaVA / SQ-LLaVA conversation format (``SYSTEM USER: <image>\\nQ ASSISTANT: A</s>VUSER: Q</s> ...``,
``vicuna_template`` in ``stllava_med.convert_checkpoint``). Fewer image tokens (16) than the official 256 centres,
which the projector handles (one output row per image token)."""

from __future__ import annotations

from pathlib import Path

from stllava_med.convert_checkpoint import vicuna_template

from .llava15 import IMAGE_SIZE, PATCH_SIZE, clip_vision_config, finish, llava_hf_tokenizer, text_kwargs

# The template convert_checkpoint writes for --conv-mode v1_sq (the official SQ-LLaVA conversation format).
SQ_LLAVA_TEMPLATE = vicuna_template("v1_sq")


def build(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaProcessor

    from stllava_med.models.sq_llava import SQLlavaConfig, SQLlavaForConditionalGeneration

    tokenizer = llava_hf_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=SQ_LLAVA_TEMPLATE)
    text = LlamaConfig(**text_kwargs(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-5)
    config = SQLlavaConfig(
        vision_config=clip_vision_config(IMAGE_SIZE),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return finish(Path(path), SQLlavaForConditionalGeneration, config, processor, seed)
