"""Gemma 3: SigLIP tower, pooled projector, Gemma 3 text model with bidirectional attention over images.

Gemma's published template insists that roles alternate user / model and writes ``<bos>`` itself, so this
family owns a template (``templates/gemma3.jinja``) that renders user and assistant turns token-identically
to the published one (tested) and adds the questioner as ``<start_of_turn>vuser`` in the same idiom; every
turn ends with ``<end_of_turn>``, which — not the tokenizer's ``<eos>`` — is the end-of-turn target and a
stop token. The processor wants one list of images per prompt; ``token_type_ids`` are per token.
"""

from stllava_med.families.base import Family

GEMMA3 = Family(
    name="gemma3",
    description="Gemma 3 (Gemma3ForConditionalGeneration)",
    model_types=("gemma3",),
    vision_pattern=r"(^|\.)vision_tower\.",
    projector_pattern=r"(^|\.)multi_modal_projector\.",
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    vision_lora_targets=r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    projector_modules=("multi_modal_projector",),
    batch_keys={"pixel_values": "concat", "token_type_ids": "token", "mm_token_type_ids": "token"},
    template="gemma3.jinja",
    end_of_turn="<end_of_turn>",
    nested_images=True,
    notes="no prefix sharing / shared-prefix sampling (image tokens attend bidirectionally through "
          "token_type_ids, which the cached continuation would have to reproduce): the plain paths run",
)
