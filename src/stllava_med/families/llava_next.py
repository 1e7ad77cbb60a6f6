"""LLaVA-NeXT (LLaVA-1.6): anyres tiles, a learned image-newline vector, Mistral or Vicuna text models.

Each image becomes a variable number of tiles (its best grid from ``image_grid_pinpoints`` plus the base
view); per example the processor returns ``(1, tiles, C, H, W)``, padded with zero tiles in a batch — the
model keeps only the tiles ``image_sizes`` implies. ``image_newline`` (one learned vector, a bare parameter
rather than a module) is not part of the projector: peft's ``modules_to_save`` copies modules only, so under
LoRA it stays at its base value — which keeps the adapter self-contained and the ``adapter_off`` reference
exact; ``sft.finetune=full`` trains it with the language model.
"""

from stllava_med.families.base import Family

LLAVA_NEXT = Family(
    name="llava_next",
    description="LLaVA-NeXT (LlavaNextForConditionalGeneration, anyres tiles)",
    model_types=("llava_next",),
    vision_pattern=r"(^|\.)vision_tower\.",
    projector_pattern=r"(^|\.)multi_modal_projector\.",
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    vision_lora_targets=r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    projector_modules=("multi_modal_projector",),
    batch_keys={"pixel_values": "tiles", "image_sizes": "concat"},
    templates_by_text_model={"mistral": "llava_mistral.jinja"},
    questioner_stop="[/INST]",
    prefix_sharing=True,
    shared_prefix_sampling=True,
)
