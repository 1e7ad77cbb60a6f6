"""Backbones: load any Hugging Face image-text-to-text model + processor, add LoRA / QLoRA, export merged.

Everything downstream receives a :class:`Backbone` (model + processor); only the Hydra entry points turn a
``backbone`` config into one. Real models (LLaVA-1.5, LLaVA-Med, Qwen2.5-VL, SmolVLM) load by hub id or local
directory through ``AutoModelForImageTextToText`` / ``AutoProcessor``. The ``tiny`` backbone
(:mod:`stllava_med.tiny`) is built at its cache path on first use and then loads like any other directory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

from stllava_med.families import bind, family_of
from stllava_med.families.processor_loading import load_processor_components
from stllava_med.models import sq_llava as _sq_llava  # noqa: F401  (registers model_type sq_llava with the Auto classes)
from stllava_med.schema import BackboneSettings
from stllava_med.tiny import ensure_tiny_backbone, tiny_spec_from_config
from stllava_med.utils.config import check_keys
from stllava_med.utils.io import write_dir_atomically

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    """A loaded model and its processor (the processor carries the tokenizer and the chat template)."""

    model: nn.Module
    processor: Any
    name: str = "backbone"
    name_or_path: str = ""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


# --------------------------------------------------------------------------------------------------------------
# Loading any HF image-text-to-text model
# --------------------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "float64": torch.float64,  # exactness checks (benchmarks' --dtype float64)
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | str | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value) == "auto":
        return "auto"
    try:
        return _DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


# Kept in full precision under QLoRA, as in LLaVA QLoRA recipes: vision tower, projector, output layer.
# transformers matches these from the start of the module name (or as a suffix), hence the ".*" prefixes.
_QUANT_SKIP = [".*vision_tower", ".*multi_modal_projector", ".*visual", ".*vision_model", ".*connector", "lm_head"]


def quantization_config(quantization: str | None, compute_dtype: str | None = "bfloat16", quant_type: str = "nf4",
                        double_quant: bool = True) -> Any:
    """bitsandbytes config for ``4bit`` / ``8bit`` (QLoRA), or None."""
    if not quantization:
        return None

    q = str(quantization).lower()
    if q in ("4bit", "4", "nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if q == "fp4" else quant_type,
            bnb_4bit_compute_dtype=parse_dtype(compute_dtype) or torch.float32,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=_QUANT_SKIP,
        )
    if q in ("8bit", "8", "int8"):
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_skip_modules=_QUANT_SKIP,
        )
    raise ValueError(f"unknown quantization {quantization!r}; use null, '4bit' or '8bit'")


def _looks_like_a_path(name_or_path: str) -> bool:
    """A local directory rather than a hub id (``org/name``): absolute, relative with ./ or ../, ~, or more than
    one ``/``."""
    text = str(name_or_path)
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def backbone_config(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The model's config, with errors that say what is wrong with ``backbone.name_or_path``: a local directory
    that does not exist or holds no ``config.json``, or a model that is not image-text-to-text (a text-only LLM
    loads no image processor, and would fail further on with a less helpful message)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"backbone.name_or_path={name_or_path}: the directory holds no config.json (not a "
                                "saved Hugging Face model; for an adapter directory set backbone.adapter_path)")
    if not path.exists() and _looks_like_a_path(str(name_or_path)):
        raise FileNotFoundError(f"backbone.name_or_path={name_or_path}: no such directory (a local model directory; "
                                "a Hugging Face hub id has the form org/name and, offline, must be in the local cache)")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not trust_remote_code and type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise ValueError(f"backbone.name_or_path={name_or_path}: a {config.model_type!r} model ({architectures}) is "
                         "not an image-text-to-text model; the policy must be a vision-language model (LLaVA, "
                         "LLaVA-NeXT, Qwen2.5-VL, Idefics3/SmolVLM, Gemma 3, ...)")
    return config


def load_processor(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str | None = None) -> Any:
    """The model's processor with its family bound (:func:`stllava_med.families.bind`): the family's own chat
    template installed where it has one. Qwen2-VL-family processors load without torchvision (their video
    processor needs it; images use the PIL backend) — see :mod:`stllava_med.families.processor_loading`."""
    config = backbone_config(name_or_path, trust_remote_code=trust_remote_code)
    family = family_of(config)
    processor = load_processor_components(name_or_path, trust_remote_code=trust_remote_code)
    bind(processor, family, config)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:  # LLaMA-family tokenizers ship without one
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if padding_side:
        tokenizer.padding_side = padding_side
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{name_or_path}: the processor has no chat template; set one in its processor config")
    return processor


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = "sdpa",
    quantization: str | None = None,
    bnb_compute_dtype: str | None = "bfloat16",
    device_map: Any = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    qconfig = quantization_config(quantization, bnb_compute_dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = device_map or ({"": 0} if torch.cuda.is_available() else {"": "cpu"})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# LoRA / QLoRA
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """LoRA on the language model (always), on the vision tower (``vision=True``), projector fully trained.

    Target modules are regular expressions matched against full module names (peft's ``fullmatch``), so one
    setting covers a family regardless of nesting depth. Left null, each comes from the model's family
    (:mod:`stllava_med.families`): ``language_model`` / ``text_model`` projections, the family's vision
    tower (``vision_tower``, Qwen's ``visual.blocks``, Idefics3's ``vision_model``) and projector
    (``multi_modal_projector``, ``merger``, ``connector``)."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | None = None
    vision: bool = False
    vision_target_modules: str | None = None
    projector_modules: list[str] | None = None
    train_projector: bool = True

    def for_family(self, family: Any) -> LoraSettings:
        """These settings with every null module choice filled in from ``family``."""
        return dataclasses.replace(
            self,
            target_modules=self.target_modules or family.lora_targets,
            vision_target_modules=self.vision_target_modules or family.vision_lora_targets,
            projector_modules=list(self.projector_modules or family.projector_modules),
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> LoraSettings:
        values = dict(cfg or {})
        check_keys(values, cls.__dataclass_fields__, "backbone.lora")
        if values.get("projector_modules") is not None:
            values["projector_modules"] = list(values["projector_modules"])
        return cls(**values)

    def target_regex(self) -> str:
        parts = [f"(?:{self.target_modules})"]
        if self.vision:
            parts.append(f"(?:{self.vision_target_modules})")
        return "|".join(parts)


def apply_lora(model: nn.Module, settings: LoraSettings, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter. The projector, when trained, is a peft ``modules_to_save`` copy:
    it is saved with the adapter, and disabling the adapter restores the original projector — which is what
    the ``adapter_off`` DPO reference needs."""
    # peft is imported where an adapter is made or loaded: importing it imports bitsandbytes (whose CPU
    # backend logs on import), which evaluation and generation with a plain model never need.
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    family = family_of(model)
    settings = settings.for_family(family)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_regex(),
        modules_to_save=list(settings.projector_modules) if settings.train_projector else None,
        bias="none",
    )
    hint = (f"LoRA target regex {settings.target_regex()!r} matched no module; set backbone.lora.target_modules "
            "for this model family")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        if "No modules were targeted" in str(err):
            raise ValueError(hint) from err
        raise
    matched = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    if matched == 0:
        raise ValueError(hint)
    if settings.vision and not any(family.is_vision_parameter(n) and "lora_A" in n
                                   for n, _ in peft_model.named_parameters()):
        raise ValueError(f"backbone.lora.vision=true but the vision target regex {settings.vision_target_modules!r} "
                         f"matched nothing in the {family.name} vision tower")
    return peft_model


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def is_projector_parameter(name: str, projector_modules: list[str] | tuple[str, ...] = ("multi_modal_projector",)) -> bool:
    return any(m in name for m in projector_modules)


# --------------------------------------------------------------------------------------------------------------
# bitsandbytes on CPU: the repacking trap
# --------------------------------------------------------------------------------------------------------------


def unpack_bnb_cpu_weights(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference repacking of 4-bit weights; returns how many layers were restored.

    On CPUs with AVX512-BF16, a ``bnb.nn.Linear4bit`` forward in eval mode without gradients (any validation
    step or ``generate``) repacks its weight into an inference layout. From then on ``matmul_4bit`` takes a
    kernel with no autograd, so training silently stops propagating gradients through every quantised layer
    and the LoRA adapters below them stop learning. Calling this before each training step restores the
    training layout (a no-op when nothing was repacked)."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except Exception:  # bitsandbytes missing or without a CPU backend: nothing can be repacked
        return 0
    restored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            state = getattr(weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
                restored += 1
    return restored


def has_bnb_layers(model: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())


# --------------------------------------------------------------------------------------------------------------
# From config
# --------------------------------------------------------------------------------------------------------------


# Every key a ``backbone`` config may have (conf/backbone/*.yaml; stllava_med.schema.BackboneSettings); anything
# else is refused at load time.
BACKBONE_KEYS = tuple(BackboneSettings.__dataclass_fields__)


def load_backbone(cfg: Mapping[str, Any], *, with_lora: bool | None = None, padding_side: str | None = None,
                  gradient_checkpointing: bool = False) -> Backbone:
    """Build a :class:`Backbone` from a ``backbone`` config group.

    ``with_lora`` overrides ``cfg.lora.enabled``; ``adapter_path`` (optional) loads a trained LoRA adapter on
    top of the base weights for evaluation or generation."""
    settings = BackboneSettings.from_config(cfg)
    name_or_path = settings.name_or_path
    tiny = settings.tiny
    # The tiny backbone is built only at its own cache path: a mistyped name_or_path must fail to load,
    # not silently become a freshly initialised tiny model.
    if tiny and Path(str(tiny.get("path", ""))).resolve() == Path(name_or_path).resolve():
        ensure_tiny_backbone(name_or_path, tiny_spec_from_config(dict(tiny)))
    processor = load_processor(name_or_path, trust_remote_code=settings.trust_remote_code, padding_side=padding_side)
    model = load_model(
        name_or_path,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        quantization=settings.quantization,
        bnb_compute_dtype=settings.bnb_compute_dtype,
        device_map=settings.device_map,
        trust_remote_code=settings.trust_remote_code,
    )
    adapter_path = settings.adapter_path
    if adapter_path:
        from peft import PeftModel  # see apply_lora

        model = PeftModel.from_pretrained(model, str(adapter_path))
    lora = LoraSettings.from_config(settings.lora)
    if with_lora if with_lora is not None else lora.enabled:
        if adapter_path:
            raise ValueError("backbone.adapter_path and a new LoRA adapter cannot be combined; merge first")
        model = apply_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    return Backbone(model=model, processor=processor, name=settings.name, name_or_path=name_or_path)


def pick_device(name: str | None) -> torch.device:
    """The device a ``device`` config key names; ``auto`` / null: CUDA when available, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def save_adapter(model: nn.Module, processor: Any, adapter_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` of the adapter (or the whole trainable model) and the processor into ``adapter_dir``,
    atomically (:func:`~stllava_med.utils.io.write_dir_atomically`): a kill or a full disk mid-export leaves the
    previous adapter whole, and a full disk raises an error naming ``adapter_dir``."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return write_dir_atomically(adapter_dir, write, what=f"the adapter {adapter_dir}")


def export_merged(model: nn.Module, processor: Any, out_dir: str | os.PathLike, *, adapter_dir: str | os.PathLike | None = None) -> Path:
    """Save the LoRA adapter (``adapter_dir``) and a merged full model + processor at ``out_dir`` that
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` (and vLLM) load directly. The live model is left
    untouched: merging happens on a copy of the weights."""
    out_dir = Path(out_dir)
    if adapter_dir is not None and hasattr(model, "peft_config"):
        save_adapter(model, processor, adapter_dir)
    if has_bnb_layers(model):
        raise ValueError(
            "cannot merge into a 4-bit/8-bit base; the adapter was saved — merge it into the full-precision base "
            "with `python -m stllava_med.merge base=<bf16 base> adapter=<adapter dir> out=<dir>`"
        )
    merged = copy.deepcopy(model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    # built in a temp sibling (never $TMPDIR: a rename across file systems is a copy a kill can tear), fsynced,
    # renamed into place; a full disk names the directory and leaves the previous export
    write_dir_atomically(out_dir, write, what=f"the merged model {out_dir}")
    return out_dir
