"""Tiny Qwen2.5-VL (``model_type: qwen2_5_vl``, as Qwen/Qwen2.5-VL-*-Instruct ship).

Real classes throughout: ``Qwen2_5_VLForConditionalGeneration`` (windowed-attention ViT ``visual`` with its
``visual.merger`` patch merger, Qwen2 text model ``model.language_model`` with 3-D mrope positions) and
``Qwen2_5_VLProcessor`` with the PIL Qwen2-VL image processor. Shapes are tiny but keep the family's mechanics:
dynamic resolution (``smart_resize`` to multiples of ``PATCH * MERGE`` = 28 px within
``MIN_PIXELS``..``MAX_PIXELS``, so a 56x56 image is 4 ``<|image_pad|>`` tokens, a 112x112 one 16, and images of
other sizes or aspect ratios get other grids), 2x2 patch merging, window attention in vision block 0
(``WINDOW`` px windows) and full attention in block 1 (``fullatt_block_indexes``), and ``mrope_section``
splitting the text head dim (16) as Qwen2.5-VL splits its 128 ([16, 24, 24] -> [2, 3, 3]).

Tokenizer: Qwen2.5-VL's 22 added tokens, in the published order (ids 151643..151664 there): ``<|endoftext|>``
(pad; the model's bos), ``<|im_start|>``, ``<|im_end|>`` (eos of the Instruct tokenizer), the
object/box/quad reference tokens, ``<|vision_start|>``, ``<|vision_end|>``, ``<|vision_pad|>``,
``<|image_pad|>``, ``<|video_pad|>``, ``<tool_call>``, ``</tool_call>`` and the FIM / repo tokens; like
Qwen's, it adds no BOS: the chat template writes ``<|im_start|>``.

Chat template: Qwen2-VL / Qwen2.5-VL-Instruct's published one, verbatim from huggingface/transformers
``tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py`` (``prepare_processor_dict``; the same string is the
``chat_template`` in the Instruct checkpoints' ``chat_template.json``). It adds the default system turn when
the conversation has none, renders any role as ``<|im_start|>{role}\\n`` (``vuser`` -> ``<|im_start|>vuser``),
and ends every turn with ``<|im_end|>\\n``.

No torchvision here (see ``stllava_med.families.processor_loading``): the processor is saved without a video
processor object, but with a ``video_processor`` config in ``processor_config.json``, so the directory loads
with ``load_processor_components`` here and with plain ``AutoProcessor`` where torchvision exists.
"""

from __future__ import annotations

from pathlib import Path

from .common import seeded, train_tokenizer

# Source: huggingface/transformers tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py, prepare_processor_dict()
# (= Qwen/Qwen2.5-VL-7B-Instruct chat_template.json; Qwen2-VL-Instruct ships the same template).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

PATCH = 14  # the ViT's patch size (as published)
MERGE = 2  # spatial_merge_size: 2x2 patches -> one <|image_pad|> token (as published)
TEMPORAL_PATCH = 2  # temporal_patch_size (as published; an image is repeated to fill it)
MIN_PIXELS = 56 * 56  # as published (3136): at least 4x4 patches -> 4 image tokens
MAX_PIXELS = 112 * 112  # published: 12845056; here at most 8x8 patches -> 16 image tokens
WINDOW = 56  # vision window_size in px (published 112): 2x2 merged tokens per attention window
TEXT_HIDDEN = 64
TEXT_HEADS = 4
MROPE_SECTION = [2, 3, 3]  # sums to head_dim // 2 = 64 // 4 // 2 = 8, the published [16, 24, 24] scaled

# What save_pretrained writes as the video processor (Qwen2VLVideoProcessor fills in the rest from its defaults).
VIDEO_PROCESSOR_CONFIG = {
    "video_processor_type": "Qwen2VLVideoProcessor",
    "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    "patch_size": PATCH,
    "temporal_patch_size": TEMPORAL_PATCH,
    "merge_size": MERGE,
}


def build(path: Path, seed: int = 0) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    from stllava_med.families.processor_loading import build_processor

    path = Path(path)
    tokenizer = train_tokenizer(
        SPECIAL_TOKENS,
        vocab_size=1024,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
    )
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        video = {k: v for k, v in VIDEO_PROCESSOR_CONFIG.items() if k != "video_processor_type"}
        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(**video), chat_template=CHAT_TEMPLATE)
    else:
        processor = build_processor(Qwen2_5_VLProcessor, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE,
                                    absent_configs={"video_processor": VIDEO_PROCESSOR_CONFIG})

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        hidden_act="silu",
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        window_size=WINDOW,
        out_hidden_size=TEXT_HIDDEN,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    # As the Instruct checkpoints' generation_config.json (sampling settings left at greedy defaults).
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
