"""Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle connector, Llama text model, image splitting.

An image becomes a grid of tiles plus a global view; the text expansion of ``<image>`` ends with
``<fake_token_around_image>`` (targets are located through the processor's replacement offsets, never by
assuming the expansion ends with an image token). Per example ``pixel_values`` is ``(1, tiles, C, H, W)``
and ``pixel_attention_mask`` ``(1, tiles, H, W)``: padded with zero tiles in a batch, which the model drops.
The published template renders roles with ``capitalize`` (the questioner is ``Vuser:``) and ends every turn
with ``<end_of_utterance>``.
"""

from stllava_med.families.base import Family

_FIELDS = dict(
    vision_pattern=r"(^|\.)vision_model\.",
    projector_pattern=r"(^|\.)connector\.",
    lora_targets=r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    vision_lora_targets=r".*vision_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    projector_modules=("connector",),
    batch_keys={"pixel_values": "tiles", "pixel_attention_mask": "tiles", "mm_token_type_ids": "token"},
    end_of_turn="<end_of_utterance>",
    notes="no prefix sharing / shared-prefix sampling yet (image splitting into the text model's embeddings "
          "is not wired into the fast paths): the plain paths run",
)

IDEFICS3 = Family(name="idefics3", description="SmolVLM / Idefics3 (Idefics3ForConditionalGeneration)",
                  model_types=("idefics3",), **_FIELDS)
SMOLVLM = Family(name="smolvlm", description="SmolVLM2 (SmolVLMForConditionalGeneration)",
                 model_types=("smolvlm",), **_FIELDS)
