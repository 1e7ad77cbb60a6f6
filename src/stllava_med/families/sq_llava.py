"""SQ-LLaVA / STLLaVA-Med: LLaVA with the prototype-extractor ("cluster") projector
(:class:`stllava_med.models.sq_llava.SQLlavaForConditionalGeneration`, ``model_type: sq_llava``).

Everything but the projector is LLaVA-1.5's — CLIP tower, Llama / Vicuna (or Mistral) text model, one image
token per vision token, ``LlavaProcessor`` — so the records are LLaVA's with the model type changed. The cluster
module (``c``, ``v``, ``f``, ``sim_alpha``, ``sim_beta``) and the MLP after it are one ``multi_modal_projector``
module, so the projector pattern, peft's ``modules_to_save`` copy and the projector learning rate cover both,
and the DPO fast path (vision-tower states shared, then ``multi_modal_projector``) applies unchanged. The chat
template is the converted directory's own (the official conversation format, written by
``python -m stllava_med.convert_checkpoint``); on a Mistral text model it is the ``llava_mistral`` family's.
"""

import dataclasses

from stllava_med.families.llava import LLAVA
from stllava_med.families.llava_mistral import LLAVA_MISTRAL

SQ_LLAVA = dataclasses.replace(
    LLAVA,
    name="sq_llava",
    description="SQ-LLaVA / STLLaVA-Med (SQLlavaForConditionalGeneration: LLaVA + cluster projector, Llama / "
                "Vicuna text model)",
    model_types=("sq_llava",),
)

SQ_LLAVA_MISTRAL = dataclasses.replace(
    LLAVA_MISTRAL,
    name="sq_llava_mistral",
    description="SQ-LLaVA / STLLaVA-Med on a Mistral text model (cluster projector, [INST] template)",
    model_types=("sq_llava",),
)
