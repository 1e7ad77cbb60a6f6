"""LLaVA on a Mistral text model: the LLaVA-Med v1.5 HF conversion (``[INST] ... [/INST]`` template).

Mistral's published template accepts only user and assistant roles, so this family owns a template
(``templates/llava_mistral.jinja``) that renders user and assistant turns token-identically to the published
one (tested) and adds the questioner in the template's own idiom: the model writes the next instruction,
``[INST] {question} [/INST]``, so the question and its closing ``[/INST]`` are the targets and generation
in the questioner role starts right after ``[INST]`` and stops at ``[/INST]``.
"""

from stllava_med.families.base import Family
from stllava_med.families.llava import LLAVA_KEYS

LLAVA_MISTRAL = Family(
    name="llava_mistral",
    description="LLaVA-Med v1.5 HF shape (LlavaForConditionalGeneration, Mistral text model, [INST] template)",
    model_types=("llava",),
    text_model_types=("mistral",),
    vision_pattern=r"(^|\.)vision_tower\.",
    projector_pattern=r"(^|\.)multi_modal_projector\.",
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    vision_lora_targets=r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    projector_modules=("multi_modal_projector",),
    batch_keys=LLAVA_KEYS,
    template="llava_mistral.jinja",
    questioner_stop="[/INST]",
    prefix_sharing=True,
    shared_vision_features=True,
    shared_prefix_sampling=True,
)
