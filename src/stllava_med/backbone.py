"""Backbones: load any Hugging Face image-text-to-text model + processor, add LoRA / QLoRA, build the tiny one.

Everything downstream receives a :class:`Backbone` (model + processor); only the Hydra entry points turn a
``backbone`` config into one. Real models (LLaVA-1.5, LLaVA-Med, Qwen2.5-VL, SmolVLM) load by hub id or local
directory through ``AutoModelForImageTextToText`` / ``AutoProcessor``. The ``tiny`` backbone is a genuine
LLaVA (CLIP vision tower, MLP projector, Llama text model) with a byte-level BPE tokenizer trained offline on
the bundled VQA-RAD question/answer text; it is built deterministically from a seed on first use and cached as
a normal HF directory, so every stage runs offline on a laptop CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Roles of the tiny template. ``vuser`` is the questioner (the official code's third role, "VUSER").
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|vuser|>"]

# A LLaVA-style template: role headers are single special tokens, every turn ends with </s> (the end-of-turn
# target), the image placeholder precedes the text of the turn that carries it. Any role name renders, so the
# questioner role needs no special casing.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '</s>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

# Text the tokenizer must cover besides the QA corpus: prompts this project itself writes.
TINY_EXTRA_TEXT = [
    "Describe the image in detail.",
    "Ask a question about this medical image.",
    "What is shown in this image? Is there an abnormality? Where is the lesion located?",
    "yes no left right upper lower axial coronal sagittal CT MRI X-ray ultrasound",
    "0 1 2 3 4 5 6 7 8 9 10 . , ? ! : ; ( ) - / %",
]


@dataclass
class TinySpec:
    """Shape of the tiny LLaVA. Defaults are the project's embedded backbone; benchmarks pass larger ones."""

    seed: int = 0
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_size: int = 2048
    max_positions: int = 1024
    corpus: list[str] = field(default_factory=list)  # JSON files with question/answer records

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


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
# The tiny backbone
# --------------------------------------------------------------------------------------------------------------


def _corpus_lines(files: list[str]) -> list[str]:
    lines: list[str] = list(TINY_EXTRA_TEXT)
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"tiny backbone: tokenizer corpus file {path} does not exist")
        with open(path, encoding="utf-8") as fh:
            records = json.load(fh)
        for record in records:
            for key in ("question", "answer", "question_rephrase"):
                value = record.get(key)
                if value not in (None, "NULL"):
                    lines.append(str(value))
    return lines


def _train_tiny_tokenizer(spec: TinySpec) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(spec.corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=spec.max_positions,
    )


def build_tiny_backbone(path: str | os.PathLike, spec: TinySpec) -> Path:
    """Build the tiny LLaVA deterministically from ``spec`` and save it as an HF directory at ``path``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tokenizer = _train_tiny_tokenizer(spec)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=TINY_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "tiny_spec.json").write_text(json.dumps(_spec_record(spec), indent=2) + "\n")
    return path


def _spec_record(spec: TinySpec) -> dict[str, Any]:
    """The build recipe, with the tokenizer corpus identified by content (not path), for cache validation."""
    from stllava_med.utils.io import sha256_file

    record: dict[str, Any] = {k: v for k, v in spec.__dict__.items() if k != "corpus"}
    record["corpus_sha256"] = [sha256_file(c) for c in spec.corpus]
    return record


def _cache_is_current(path: Path, spec: TinySpec) -> bool:
    recipe = path / "tiny_spec.json"
    if not (path / "config.json").is_file() or not recipe.is_file():
        return False
    try:
        return json.loads(recipe.read_text()) == _spec_record(spec)
    except (json.JSONDecodeError, OSError):
        return False




def ensure_tiny_backbone(path: str | os.PathLike, spec: TinySpec) -> Path:
    """Return ``path``, building the tiny backbone there first if it is absent or stale.

    The cache records its recipe (shape, seed, SHA-256 of the tokenizer corpus); a different recipe rebuilds.
    Safe under concurrent sweep jobs: a file lock serialises builders and the directory appears atomically
    (built in a temporary sibling, then renamed)."""
    path = Path(path)
    if _cache_is_current(path, spec):
        return path
    from stllava_med.utils.io import file_lock

    with file_lock(path.parent / f".{path.name}.lock"):
        if _cache_is_current(path, spec):
            return path
        if path.exists():
            log.warning("the tiny backbone at %s was built from another recipe or corpus; rebuilding", path)
        log.info("building the tiny backbone at %s (seed %d)", path, spec.seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            build_tiny_backbone(tmp, spec)
            if path.exists():  # a half-written directory from an older crash
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


# --------------------------------------------------------------------------------------------------------------
# Loading any HF image-text-to-text model
# --------------------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
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
    from transformers import BitsAndBytesConfig

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


def load_processor(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str | None = None) -> Any:
    """The model's processor with its family bound (:func:`stllava_med.families.bind`): the family's own chat
    template installed where it has one. Qwen2-VL-family processors load without torchvision (their video
    processor needs it; images use the PIL backend) — see :mod:`stllava_med.families.processor_loading`."""
    from transformers import AutoConfig

    from stllava_med.families import bind, family_of
    from stllava_med.families.processor_loading import load_processor_components

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
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
    from transformers import AutoModelForImageTextToText

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
        import dataclasses

        return dataclasses.replace(
            self,
            target_modules=self.target_modules or family.lora_targets,
            vision_target_modules=self.vision_target_modules or family.vision_lora_targets,
            projector_modules=list(self.projector_modules or family.projector_modules),
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> LoraSettings:
        if not cfg:
            return cls()
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in dict(cfg).items() if k in known}
        if "projector_modules" in values and values["projector_modules"] is not None:
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
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from stllava_med.families import family_of

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
        raise ValueError(
            f"LoRA target regex {settings.target_regex()!r} matched no module; set backbone.lora.target_modules "
            "for this model family"
        )
    if settings.vision and not any(family.is_vision_parameter(n) and "lora_A" in n
                                   for n, _ in peft_model.named_parameters()):
        raise ValueError(f"backbone.lora.vision=true but the vision target regex {settings.vision_target_modules!r} "
                         f"matched nothing in the {family.name} vision tower")
    return peft_model


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def is_projector_parameter(name: str, projector_modules: list[str] | tuple[str, ...] = ("multi_modal_projector",)) -> bool:
    return any(m in name for m in projector_modules)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


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


def tiny_spec_from_config(cfg: Mapping[str, Any]) -> TinySpec:
    known = {f for f in TinySpec.__dataclass_fields__}
    values = {k: v for k, v in dict(cfg).items() if k in known}
    if "corpus" in values:
        values["corpus"] = [str(c) for c in values["corpus"]]
    return TinySpec(**values)


def load_backbone(cfg: Mapping[str, Any], *, with_lora: bool | None = None, padding_side: str | None = None,
                  gradient_checkpointing: bool = False) -> Backbone:
    """Build a :class:`Backbone` from a ``backbone`` config group.

    ``with_lora`` overrides ``cfg.lora.enabled``; ``adapter_path`` (optional) loads a trained LoRA adapter on
    top of the base weights for evaluation or generation."""
    cfg = dict(cfg)
    name_or_path = str(cfg["name_or_path"])
    tiny = cfg.get("tiny")
    # The tiny backbone is built only at its own cache path: a mistyped name_or_path must fail to load,
    # not silently become a freshly initialised tiny model.
    if tiny and Path(str(tiny.get("path", ""))).resolve() == Path(name_or_path).resolve():
        ensure_tiny_backbone(name_or_path, tiny_spec_from_config(dict(tiny)))
    trust = bool(cfg.get("trust_remote_code", False))
    processor = load_processor(name_or_path, trust_remote_code=trust, padding_side=padding_side)
    model = load_model(
        name_or_path,
        dtype=cfg.get("dtype", "float32"),
        attn_implementation=cfg.get("attn_implementation"),
        quantization=cfg.get("quantization"),
        bnb_compute_dtype=cfg.get("bnb_compute_dtype", "bfloat16"),
        device_map=cfg.get("device_map"),
        trust_remote_code=trust,
    )
    adapter_path = cfg.get("adapter_path")
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    lora = LoraSettings.from_config(cfg.get("lora"))
    if with_lora if with_lora is not None else lora.enabled:
        if adapter_path:
            raise ValueError("backbone.adapter_path and a new LoRA adapter cannot be combined; merge first")
        model = apply_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    return Backbone(model=model, processor=processor, name=str(cfg.get("name", "backbone")), name_or_path=name_or_path)


def export_merged(model: nn.Module, processor: Any, out_dir: str | os.PathLike, *, adapter_dir: str | os.PathLike | None = None) -> Path:
    """Save the LoRA adapter (``adapter_dir``) and a merged full model + processor at ``out_dir`` that
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` (and vLLM) load directly. The live model is left
    untouched: merging happens on a copy of the weights."""
    import copy

    out_dir = Path(out_dir)
    if adapter_dir is not None and hasattr(model, "peft_config"):
        model.save_pretrained(adapter_dir)
        processor.save_pretrained(adapter_dir)
    if has_bnb_layers(model):
        raise ValueError(
            "cannot merge into a 4-bit/8-bit base; the adapter was saved — merge it into the full-precision base "
            "with `python -m stllava_med.merge base=<bf16 base> adapter=<adapter dir> out=<dir>`"
        )
    merged = copy.deepcopy(model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
