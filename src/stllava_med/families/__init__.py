"""Model families: everything that differs between backbones (see :mod:`stllava_med.families.base`).

``family_of(model_or_config)`` picks the family from a model's config; ``bind(processor, family, config)``
attaches it to the processor (and installs the family's own chat template where it has one), so code that
only holds a processor — chat rendering, datamodules, generation — asks ``processor_family(processor)``.
"""

from __future__ import annotations

import logging
from typing import Any

from stllava_med.families.base import BatchKind, Family, UnsupportedFamilyFeature
from stllava_med.families.gemma3 import GEMMA3
from stllava_med.families.idefics3 import IDEFICS3, SMOLVLM
from stllava_med.families.llava import LLAVA
from stllava_med.families.llava_mistral import LLAVA_MISTRAL
from stllava_med.families.llava_next import LLAVA_NEXT
from stllava_med.families.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from stllava_med.families.sq_llava import SQ_LLAVA, SQ_LLAVA_MISTRAL

log = logging.getLogger(__name__)

# Most specific first: LLaVA on Mistral before plain LLaVA (and so for SQ-LLaVA's cluster-projector LLaVA).
FAMILIES: tuple[Family, ...] = (SQ_LLAVA_MISTRAL, SQ_LLAVA, LLAVA_MISTRAL, LLAVA, LLAVA_NEXT, QWEN2_5_VL, QWEN2_VL,
                                IDEFICS3, SMOLVLM, GEMMA3)
BY_NAME = {f.name: f for f in FAMILIES}
# processor class -> family, for processors met without their model (a family bound at load time wins)
_BY_PROCESSOR = {"LlavaProcessor": LLAVA, "LlavaNextProcessor": LLAVA_NEXT, "Qwen2_5_VLProcessor": QWEN2_5_VL,
                 "Qwen2VLProcessor": QWEN2_VL, "Idefics3Processor": IDEFICS3, "SmolVLMProcessor": SMOLVLM,
                 "Gemma3Processor": GEMMA3}
_ATTRIBUTE = "stllava_family"

__all__ = ["FAMILIES", "BY_NAME", "BatchKind", "Family", "UnsupportedFamilyFeature", "bind", "family_of",
           "processor_family", "supported_model_types"]


def supported_model_types() -> list[str]:
    return sorted({t for f in FAMILIES for t in f.model_types})


def _config(model_or_config: Any) -> Any:
    get_base = getattr(model_or_config, "get_base_model", None)
    model = get_base() if callable(get_base) else model_or_config
    return getattr(model, "config", model)


def family_of(model_or_config: Any) -> Family:
    """The family of a model (peft-wrapped or not) or of its config; a clear error for unknown ones."""
    config = _config(model_or_config)
    for family in FAMILIES:
        if family.matches(config):
            return family
    raise UnsupportedFamilyFeature(
        f"model type {getattr(config, 'model_type', None)!r} ({type(config).__name__}) is not a supported family; "
        f"supported model types: {supported_model_types()} (see the backbone x stage matrix in the README). "
        "A new family is one module in src/stllava_med/families/ plus its test.")


def bind(processor: Any, family: Family, config: Any = None) -> Any:
    """Attach ``family`` to ``processor`` and install the family's own chat template, if it has one."""
    template = family.chat_template(config)
    if template is not None:
        processor.chat_template = template
    setattr(processor, _ATTRIBUTE, family)
    return processor


def processor_family(processor: Any) -> Family:
    family = getattr(processor, _ATTRIBUTE, None)
    if family is not None:
        return family
    name = type(processor).__name__
    if name in _BY_PROCESSOR:
        return _BY_PROCESSOR[name]
    raise UnsupportedFamilyFeature(f"{name}: no model family is bound to this processor and its class is not one "
                                   f"we know ({sorted(_BY_PROCESSOR)}); load it with stllava_med.backbone.load_backbone")
