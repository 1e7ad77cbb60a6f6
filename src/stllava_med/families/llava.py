"""LLaVA-1.5 (llava-hf) and the embedded tiny backbone: CLIP tower, MLP projector, Llama / Vicuna text model.

llava-hf's published template renders any role as ``ROLE.upper() + ': '``, so the questioner appears as
``VUSER: ...`` — the official STLLaVA-Med (v1_sq) role name — and needs no template of ours. It writes no
end-of-turn marker after a model turn, so ``</s>`` is appended as the turn's target (the official format
ends ``ASSISTANT`` and ``VUSER`` turns with ``</s>``).
"""

from stllava_med.families.base import Family

LLAVA_KEYS = {"pixel_values": "concat", "image_sizes": "concat"}

LLAVA = Family(
    name="llava",
    description="LLaVA-1.5 / tiny (LlavaForConditionalGeneration, Llama or Vicuna text model)",
    model_types=("llava",),
    vision_pattern=r"(^|\.)vision_tower\.",
    projector_pattern=r"(^|\.)multi_modal_projector\.",
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    vision_lora_targets=r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    projector_modules=("multi_modal_projector",),
    batch_keys=LLAVA_KEYS,
    prefix_sharing=True,
    shared_vision_features=True,
    shared_prefix_sampling=True,
)
