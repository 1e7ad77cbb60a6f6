"""Convert original-layout LLaVA checkpoints (LLaVA-1.5, LLaVA-Med v1.5, SQ-LLaVA, STLLaVA-Med) into Hugging Face
directories that ``AutoModelForImageTextToText`` / ``AutoProcessor`` (and so every stage here) load.

    # LLaVA-1.5 (Vicuna, LlavaLlamaForCausalLM): the CLIP tower is not in its weights, so name it
    python -m stllava_med.convert_checkpoint /ckpt/llava-v1.5-7b --vision-tower /ckpt/clip-vit-large-patch14-336 \\
        --out /models/llava-v1.5-7b-hf
    # LLaVA-Med v1.5 (LlavaMistralForCausalLM)
    python -m stllava_med.convert_checkpoint /ckpt/llava-med-v1.5-mistral-7b \\
        --vision-tower /ckpt/clip-vit-large-patch14-336 --out /models/llava-med-v1.5-mistral-7b-hf
    # STLLaVA-Med as released in parts: the LLM, the fine-tuned ViT and the projector (prototype extractor)
    python -m stllava_med.convert_checkpoint /ckpt/stllava-med-7b-llm --vision-tower /ckpt/stllava-med-7b-vit \\
        --projector /ckpt/stllava-med-projector --out /models/stllava-med-7b-hf

Input: a directory with the official ``config.json`` (``mm_vision_tower``, ``mm_hidden_size``,
``mm_vision_select_layer``, ``mm_vision_select_feature``, ``mm_projector_type``, ``image_aspect_ratio``; where the
LLM part has none of them the projector's weights decide its type and LLaVA-1.5's -2 / ``patch`` apply),
weights in the official key layout (``model.layers.*``, ``model.embed_tokens``, ``model.norm``, ``lm_head``,
``model.mm_projector.*``, optionally ``model.vision_tower.vision_tower.vision_model.*``) as safetensors or
``.bin`` files, sharded with an index or not, and its tokenizer (or ``--tokenizer``). The vision tower comes from
the checkpoint's own weights when they are there, else from ``--vision-tower`` (a ``CLIPVisionModel`` or
``CLIPModel`` directory; its ``preprocessor_config.json`` is the image processor), else from ``mm_vision_tower``
when that is a local directory.

Output: ``mm_projector_type: mlp2x_gelu`` becomes a llava-hf ``LlavaForConditionalGeneration``;
``cluster`` (SQ-LLaVA's prototype extractor + MLP) becomes
:class:`stllava_med.models.sq_llava.SQLlavaForConditionalGeneration` (``model_type: sq_llava``, registered
with the Auto classes when ``stllava_med.backbone`` is imported). The processor is a ``LlavaProcessor``:
``CLIPImageProcessor`` + the LLM tokenizer with ``<image>`` added (and ``<pad>`` where it has no pad token, as
llava-hf's conversions do); the embedding and output matrices grow by the new rows, padded to a multiple of 64,
each new row the mean of the original rows. Its chat template renders the official conversation format
(``--conv-mode``; Mistral text models get the ``llava_mistral`` family's ``[INST]`` template, which the family
installs on load in any case). Weights are written tensor by tensor into safetensors shards with an index, so
memory stays near one shard. ``conversion.json`` records the source, the choices made and every source key that
was not carried over.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stllava_med.prompts import SYSTEM_PRESETS
from stllava_med.utils.io import write_dir_atomically

log = logging.getLogger("stllava_med.convert_checkpoint")

# The official conversation templates' system texts by conv mode: stllava_med.prompts' presets ("none": no text).
SYSTEM_PROMPTS: dict[str, str] = {name: text or "" for name, text in SYSTEM_PRESETS.items()}

# The official SeparatorStyle.TWO rendering (sep " ", sep2 "</s>"): "{system} USER: <image>\n{q} ASSISTANT: {a}</s>",
# and SQ-LLaVA's questioner turn "VUSER: {q}</s> " (the question plus sep2, then the human slot's sep). A system
# message replaces the default system text; the generation prompt is "ASSISTANT:" as in the official prompts.
_VICUNA_TEMPLATE = """{#- The official LLaVA / SQ-LLaVA conversation format (SeparatorStyle.TWO, sep ' ', sep2 '</s>'),
    written by stllava_med.convert_checkpoint (conv mode %(mode)s). -#}
{%%- set default_system = %(system)s -%%}
{%%- if messages and messages[0]['role'] == 'system' -%%}
    {%%- set system = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%%}
    {%%- set turns = messages[1:] -%%}
{%%- else -%%}
    {%%- set system = default_system -%%}
    {%%- set turns = messages -%%}
{%%- endif -%%}
{%%- if system -%%}{{- system + ' ' -}}{%%- endif -%%}
{%%- for message in turns -%%}
    {%%- if message['content'] is string -%%}
        {%%- set text = message['content'] -%%}{%%- set images = 0 -%%}
    {%%- else -%%}
        {%%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%%}
        {%%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%%}
    {%%- endif -%%}
    {%%- if message['role'] == 'user' -%%}
        {{- 'USER: ' + '<image>\\n' * images + text + ' ' -}}
    {%%- elif message['role'] == 'assistant' -%%}
        {{- 'ASSISTANT: ' + text + '</s>' -}}
    {%%- elif message['role'] == 'vuser' -%%}
        {{- 'VUSER: ' + '<image>\\n' * images + text + '</s> ' -}}
    {%%- else -%%}
        {{- raise_exception('Only system, user, assistant and vuser (questioner) roles are supported!') -}}
    {%%- endif -%%}
{%%- endfor -%%}
{%%- if add_generation_prompt -%%}{{- 'ASSISTANT:' -}}{%%- endif -%%}
"""

# Key suffixes of buffers some old checkpoints carry; the HF modules recompute them.
_BUFFERS = (".rotary_emb.inv_freq", "embeddings.position_ids")
# Training-only files that sit beside the weights and are not weights.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
VOCAB_MULTIPLE = 64
# SQ-LLaVA's Clustering(mm_hidden_size, hidden_size, 256, 2): centres and iterations are fixed in its builder.
CLUSTER_CENTERS = 256
CLUSTER_ITERATIONS = 2
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32}


class ConversionError(ValueError):
    """The checkpoint cannot be converted as it is; the message says what is missing or unexpected."""


def vicuna_template(conv_mode: str = "llava_v1", system: str | None = None) -> str:
    """The chat template rendering the official LLaVA / SQ-LLaVA (Vicuna v1) conversation format."""
    if system is None:
        if conv_mode not in SYSTEM_PROMPTS:
            raise ConversionError(f"unknown conv mode {conv_mode!r}; one of {sorted(SYSTEM_PROMPTS)}")
        system = SYSTEM_PROMPTS[conv_mode]
    # a JSON string is a valid Jinja string literal
    return _VICUNA_TEMPLATE % {"mode": conv_mode, "system": json.dumps(system)}


# --------------------------------------------------------------------------------------------------------------
# Reading original checkpoints
# --------------------------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory (from its index when it has one), or ``path`` itself."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{index}: shards listed but absent: {missing}")
            return files
    files = sorted(p for p in path.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in path.glob("*.bin") if p.name not in _NOT_WEIGHTS)
    if not files:
        raise ConversionError(f"{path}: no weights (*.safetensors, *.bin or an index json)")
    return files


class TensorReader:
    """Lazy access to the tensors of several weight files (safetensors opened, ``.bin`` memory-mapped)."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, Any] = {}
        self._handles: list[Any] = []
        for file in files:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                handle = safe_open(str(file), framework="pt", device="cpu")
                self._handles.append(handle)
                for key in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    self._where[key] = handle
            else:
                state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(state, Mapping):
                    raise ConversionError(f"{file}: not a state dict")
                self._handles.append(state)
                for key in state:
                    self._where[key] = state

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        source = self._where[key]
        return source.get_tensor(key) if hasattr(source, "get_tensor") else source[key]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --------------------------------------------------------------------------------------------------------------
# The key layout
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SourceKeys:
    """Original keys sorted by what they belong to (each value: the original full key)."""

    language: dict[str, str] = field(default_factory=dict)   # target name -> source key
    projector: dict[str, str] = field(default_factory=dict)  # name inside mm_projector -> source key
    vision: dict[str, str] = field(default_factory=dict)     # name inside the CLIP vision model -> source key
    dropped: list[str] = field(default_factory=list)


def _strip_wrappers(key: str) -> str:
    # non_lora_trainables / peft-saved state dicts prefix "base_model.model."
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key


def sort_keys(keys: list[str], *, where: str) -> SourceKeys:
    out = SourceKeys()
    unknown: list[str] = []
    for original in keys:
        key = _strip_wrappers(original)
        if key.endswith(_BUFFERS):
            out.dropped.append(original)
        elif "mm_projector." in key:
            out.projector[key.split("mm_projector.", 1)[1]] = original
        elif key.startswith("model.vision_tower."):
            inner = key[len("model.vision_tower."):]
            out.vision[inner[len("vision_tower."):] if inner.startswith("vision_tower.") else inner] = original
        elif key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
            out.language["model.language_model." + key[len("model."):]] = original
        elif key == "lm_head.weight":
            out.language["lm_head.weight"] = original
        else:
            unknown.append(original)
    if unknown:
        raise ConversionError(f"{where}: keys of no known LLaVA part: {unknown[:10]}"
                              f"{' ...' if len(unknown) > 10 else ''}")
    return out


def projector_type_of(names: set[str]) -> str:
    """The official ``mm_projector_type`` that a projector's parameter names belong to."""
    if {"c.weight", "v.weight", "f.weight", "mlp.0.weight", "mlp.2.weight"} <= names:
        return "cluster"
    linears = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"(\d+)\.weight", n)))
    if linears and linears == list(range(0, 2 * len(linears), 2)):
        return f"mlp{len(linears)}x_gelu"
    if names == {"weight", "bias"}:
        return "linear"
    raise ConversionError(f"projector parameters of no known type: {sorted(names)}")


def projector_target(projector_type: str, name: str) -> str | None:
    """The HF name (inside ``multi_modal_projector``) of an official projector parameter; None: not carried."""
    if projector_type == "mlp2x_gelu":
        mapped = {"0": "linear_1", "2": "linear_2"}
        head, _, tail = name.partition(".")
        return f"{mapped[head]}.{tail}" if head in mapped else None
    if projector_type == "cluster":
        if name.startswith("ln_1."):
            return None  # constructed but never used in the official forward
        if name.startswith("mlp.0."):
            return "linear_1." + name[len("mlp.0."):]
        if name.startswith("mlp.2."):
            return "linear_2." + name[len("mlp.2."):]
        return name
    raise ConversionError(f"mm_projector_type {projector_type!r} has no Hugging Face model here (supported: "
                          "mlp2x_gelu -> LlavaForConditionalGeneration, cluster -> SQLlavaForConditionalGeneration)")


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------

# Fields of the official LLaVA configs that describe the multimodal wrapper or training, not the text model.
_WRAPPER_FIELDS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "auto_map",
    "freeze_mm_mlp_adapter", "image_aspect_ratio", "image_grid_pinpoints", "mm_hidden_size", "mm_patch_merge_type",
    "mm_projector_lr", "mm_projector_type", "mm_resampler_type", "mm_use_im_patch_token", "mm_use_im_start_end",
    "mm_vision_select_feature", "mm_vision_select_layer", "mm_vision_tower", "mm_vision_tower_lr",
    "tokenizer_model_max_length", "tokenizer_padding_side", "tune_mm_mlp_adapter", "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower", "use_mm_proj", "num_latents", "qav_loss", "loss_alpha", "vit_lora_enable",
    "data_aug", "mm_vision_lora", "version",
}


def text_model_type(raw: Mapping[str, Any]) -> str:
    model_type = str(raw.get("model_type", ""))
    architectures = " ".join(raw.get("architectures") or [])
    return "mistral" if "mistral" in model_type.lower() or "Mistral" in architectures else "llama"


def text_config_of(raw: Mapping[str, Any], *, vocab_size: int, pad_token_id: int | None, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, MistralConfig

    kind = text_model_type(raw)
    values = {k: v for k, v in raw.items() if k not in _WRAPPER_FIELDS and not k.startswith("mm_")}
    values.pop("torch_dtype", None)
    if values.get("rope_scaling") is None:
        values.pop("rope_scaling", None)  # null in the LLaVA configs; transformers 5 reads rope_parameters
    values.pop("dtype", None)
    values.update(vocab_size=vocab_size, pad_token_id=pad_token_id, dtype=dtype)
    cls = MistralConfig if kind == "mistral" else LlamaConfig
    return cls(**values)


KNOWN_TOWERS = {
    # CLIP ViT-L/14-336 (LLaVA-1.5, LLaVA-Med v1.5, SQ-LLaVA, STLLaVA-Med): LlavaConfig's default vision config
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14,
                                              projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


def vision_source(args_tower: Path | None, raw: Mapping[str, Any]) -> Path | None:
    if args_tower is not None:
        if not (args_tower / "config.json").is_file():
            raise ConversionError(f"--vision-tower {args_tower}: no config.json (a CLIPVisionModel or CLIPModel dir)")
        return args_tower
    named = raw.get("mm_vision_tower")
    if named and (Path(str(named)) / "config.json").is_file():
        return Path(str(named))
    return None


def vision_config_of(tower_dir: Path | None, raw: Mapping[str, Any]) -> Any:
    from transformers import CLIPVisionConfig

    if tower_dir is not None:
        return CLIPVisionConfig.from_pretrained(str(tower_dir))
    named = str(raw.get("mm_vision_tower") or "")
    if named in KNOWN_TOWERS:
        return CLIPVisionConfig(**KNOWN_TOWERS[named])
    raise ConversionError(f"mm_vision_tower {named!r} is not a local directory: pass --vision-tower DIR (the CLIP "
                          "model the checkpoint was trained with, e.g. a local openai/clip-vit-large-patch14-336)")


def image_processor_of(tower_dir: Path | None, image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    if tower_dir is not None and (tower_dir / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(tower_dir))
    # openai/clip-vit-large-patch14-336's preprocessing: shortest edge, centre crop, CLIP mean / std, bicubic
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def parse_size(value: str | int) -> int:
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(value).upper())
    if not match:
        raise ConversionError(f"shard size {value!r}: use e.g. 5GB, 500MB or a byte count")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * scale)


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Stream ``(name, tensor)`` into safetensors shards of at most ``max_shard_bytes`` (one tensor per shard at
    least), named and indexed as ``save_pretrained`` names them; returns the file names."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size = 0
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            path = out_dir / f".shard-{len(written):05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            written.append((path, list(shard)))
            shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        final = ["model.safetensors"]
    else:
        final = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map: dict[str, str] = {}
    for (path, names), name in zip(written, final):
        os.replace(path, out_dir / name)
        weight_map.update(dict.fromkeys(names, name))
    if len(final) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return final


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    out_dir: Path
    model_type: str
    projector_type: str
    report: dict[str, Any]


def _grow_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """``matrix`` with new rows (each the mean of the existing ones) up to ``rows``: llava-hf's conversion
    samples them from a normal distribution around that mean with 1e-5 of the rows' covariance."""
    if rows == matrix.shape[0]:
        return matrix
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)], dim=0)


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, *, vision_tower: str | os.PathLike | None = None,
            projector: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
            dtype: str = "auto", conv_mode: str = "llava_v1", system_prompt: str | None = None,
            max_shard_size: str | int = "5GB", overwrite: bool = False) -> ConversionResult:
    """Convert one original-layout checkpoint (see the module docstring) into ``out_dir``."""
    from transformers import (
        AddedToken,
        AutoTokenizer,
        CLIPVisionModel,
        GenerationConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    from stllava_med.families import family_of
    from stllava_med.models.sq_llava import SQLlavaConfig, SQLlavaForConditionalGeneration

    source = Path(source)
    out_dir = Path(out_dir)
    tower_arg = Path(vision_tower) if vision_tower is not None else None
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    raw = _read_json(source / "config.json")
    if not raw:
        raise ConversionError(f"{source}: no config.json")
    if raw.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end=true (image start / end tokens around the image) has no "
                              "llava-hf equivalent; LLaVA-1.5-style checkpoints have it false")

    # ---- weights: language model (+ projector, + vision tower when saved with it) ----
    reader = TensorReader(weight_files(source))
    keys = sort_keys(reader.keys(), where=str(source))
    readers: dict[str, TensorReader] = {"source": reader}
    projector_reader = reader
    projector_keys = keys.projector
    if projector is not None:
        projector_reader = TensorReader(weight_files(Path(projector)))
        from_file = sort_keys(projector_reader.keys(), where=str(projector))
        if from_file.language or from_file.vision:
            log.info("%s: using only its mm_projector weights", projector)
        if keys.projector:
            log.info("--projector %s replaces the projector weights in %s", projector, source)
        projector_keys = from_file.projector
        readers["projector"] = projector_reader
        raw = {**_read_json(Path(projector) / "config.json"), **raw} if Path(projector).is_dir() else raw
    if not projector_keys:
        raise ConversionError(f"{source}: no mm_projector weights (pass --projector FILE_OR_DIR)")
    projector_type = projector_type_of(set(projector_keys))
    declared = raw.get("mm_projector_type")
    if declared and declared != projector_type:
        raise ConversionError(f"config says mm_projector_type={declared!r} but the projector weights are "
                              f"{projector_type!r} ({sorted(projector_keys)})")
    if "mm_projector_type" not in raw:
        log.info("no mm_projector_type in %s/config.json: %s (from the projector's weights)", source, projector_type)
    projector_target(projector_type, next(iter(projector_keys)))  # unsupported types fail before any work
    select_layer = int(raw.get("mm_vision_select_layer", -2))
    select_feature = str(raw.get("mm_vision_select_feature", "patch"))
    if select_feature not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {select_feature!r}: expected patch or cls_patch")

    # ---- vision tower ----
    tower_dir = vision_source(tower_arg, raw)
    vision_config = vision_config_of(tower_dir, raw)
    if keys.vision:
        vision_from = f"{source} (model.vision_tower.*)"
        if tower_dir is not None:
            log.info("the checkpoint carries its vision tower: %s gives only its config and image processor",
                     tower_dir)
    elif tower_dir is not None:
        vision_from = str(tower_dir)
    else:
        raise ConversionError(f"{source} has no vision tower weights and mm_vision_tower "
                              f"{raw.get('mm_vision_tower')!r} is not a local directory: pass --vision-tower DIR")
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision_config.hidden_size:
        raise ConversionError(f"mm_hidden_size={mm_hidden} but the vision tower's hidden size is "
                              f"{vision_config.hidden_size}")

    # ---- tokenizer: <image> (and <pad>) added, as llava-hf's conversions do ----
    with warnings.catch_warnings():
        # AutoTokenizer reads the source config.json too, which transformers parses as its own "llava" type
        # (LLaVA-1.5's model_type) and warns about the legacy rope_scaling: null in it
        warnings.simplefilter("ignore", FutureWarning)
        tok = AutoTokenizer.from_pretrained(str(tokenizer or source))
    original_tokens = len(tok)
    added = []
    if "<image>" not in tok.get_vocab():
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        added.append("<image>")
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
        added.append("<pad>")
    image_token_id = int(tok.convert_tokens_to_ids("<image>"))

    embed_key = keys.language.get("model.language_model.embed_tokens.weight")
    if embed_key is None:
        raise ConversionError(f"{source}: no model.embed_tokens.weight")
    embed_shape = reader.get(embed_key).shape
    vocab_rows = int(math.ceil(max(int(embed_shape[0]), len(tok)) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    if original_tokens > int(embed_shape[0]):
        raise ConversionError(f"the tokenizer has {original_tokens} tokens but the embedding only {embed_shape[0]} rows")

    # ---- target config ----
    source_dtype = _DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or "float32"), torch.float32)
    target_dtype = source_dtype if dtype == "auto" else _DTYPES[dtype]
    text_config = text_config_of(raw, vocab_size=vocab_rows, pad_token_id=tok.pad_token_id, dtype=target_dtype)
    text_config.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else text_config.bos_token_id
    text_config.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else text_config.eos_token_id
    tokens_per_image = (vision_config.image_size // vision_config.patch_size) ** 2 + (select_feature == "cls_patch")
    common = dict(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                  image_seq_length=tokens_per_image, vision_feature_layer=select_layer,
                  vision_feature_select_strategy="default" if select_feature == "patch" else "full",
                  multimodal_projector_bias=True, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    if projector_type == "cluster":
        config = SQLlavaConfig(**common, projector_hidden_act="quick_gelu", cluster_num_centers=CLUSTER_CENTERS,
                               cluster_iterations=CLUSTER_ITERATIONS)
        model_class: Any = SQLlavaForConditionalGeneration
    else:
        from transformers import LlavaForConditionalGeneration

        config = LlavaConfig(**common, projector_hidden_act="gelu")
        model_class = LlavaForConditionalGeneration
    config.architectures = [model_class.__name__]
    config.dtype = target_dtype
    with torch.device("meta"):
        skeleton = model_class(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    del skeleton

    # ---- the mapping target name -> loader ----
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    dropped = list(keys.dropped)
    for target, key in keys.language.items():
        if target == "lm_head.weight" and config.tie_word_embeddings:
            dropped.append(key)
            continue
        if target in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            loaders[target] = (lambda k=key: _grow_rows(reader.get(k), vocab_rows))
        else:
            loaders[target] = (lambda k=key: reader.get(k))
    for name, key in projector_keys.items():
        target = projector_target(projector_type, name)
        if target is None:
            dropped.append(key)
            continue
        loaders["model.multi_modal_projector." + target] = (lambda k=key: projector_reader.get(k))
    vision_prefix = "model.vision_tower."
    vision_names = {n[len(vision_prefix):] for n in expected if n.startswith(vision_prefix)}
    if keys.vision:
        for name, key in keys.vision.items():
            candidates = [name, name.removeprefix("vision_model."), "vision_model." + name]
            target = next((c for c in candidates if c in vision_names), None)
            if target is None:
                raise ConversionError(f"{key}: no such parameter in the HF CLIP vision model")
            loaders[vision_prefix + target] = (lambda k=key: reader.get(k))
    else:
        from transformers.utils import logging as hf_logging

        # a full CLIPModel directory (openai/clip-vit-large-patch14-336) also holds the text tower: its keys are
        # reported as unexpected, which is what is wanted here
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tower = CLIPVisionModel.from_pretrained(str(tower_dir), dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        tower_state = tower.state_dict()
        for name in vision_names:
            if name not in tower_state:
                raise ConversionError(f"{tower_dir}: the vision model has no {name!r}")
            loaders[vision_prefix + name] = (lambda n=name: tower_state[n])
    missing = sorted(set(expected) - set(loaders))
    unexpected = sorted(set(loaders) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"the converted weights do not match {model_class.__name__}: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(loaders):
            tensor = loaders[name]()
            if tuple(tensor.shape) != expected[name]:
                raise ConversionError(f"{name}: shape {tuple(tensor.shape)} in the checkpoint, "
                                      f"{expected[name]} in {model_class.__name__}")
            yield name, tensor.to(target_dtype).contiguous().clone()

    # ---- processor, chat template ----
    family = family_of(config)
    template = family.chat_template(config) or vicuna_template(conv_mode, system_prompt)
    processor = LlavaProcessor(
        image_processor=image_processor_of(tower_dir, vision_config.image_size),
        tokenizer=tok,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token (dropped by the "default" strategy)
        chat_template=template,
    )
    generation = GenerationConfig.from_pretrained(str(source)) if (source / "generation_config.json").is_file() \
        else GenerationConfig()
    generation.bos_token_id = tok.bos_token_id
    generation.eos_token_id = tok.eos_token_id
    generation.pad_token_id = tok.pad_token_id

    # ---- write atomically ----
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        files = write_shards(tensors(), tmp, parse_size(max_shard_size))
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        report.update({
            "source": str(source.resolve()),
            "projector_source": str(Path(projector).resolve()) if projector is not None else None,
            "vision_tower_source": vision_from,
            "model_type": config.model_type,
            "architecture": model_class.__name__,
            "family": family.name,
            "mm_projector_type": projector_type,
            "text_model_type": text_model_type(raw),
            "vision_feature_layer": select_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "image_aspect_ratio": raw.get("image_aspect_ratio"),
            "image_tokens": tokens_per_image,
            "dtype": str(target_dtype).removeprefix("torch."),
            "added_tokens": added,
            "vocab_rows": {"source": int(embed_shape[0]), "converted": vocab_rows,
                           "new_rows": "mean of the source rows"},
            "chat_template": "family" if family.chat_template(config) else f"official ({conv_mode})",
            "not_carried": sorted(dropped),
            "files": files,
        })
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    write_dir_atomically(out_dir, write, what=f"the converted model {out_dir}")
    log.info("%s -> %s (%s, %s projector, %d shard(s))", source, out_dir, model_class.__name__, projector_type,
             len(report["files"]))
    return ConversionResult(out_dir=out_dir, model_type=config.model_type, projector_type=projector_type,
                            report=report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stllava_med.convert_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the original checkpoint directory (config.json + weights)")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face directory to write")
    parser.add_argument("--vision-tower", type=Path, default=None,
                        help="CLIP directory: the vision weights when the checkpoint has none (LLaVA-1.5, the "
                             "STLLaVA-Med ViT part), and the image processor")
    parser.add_argument("--projector", type=Path, default=None,
                        help="projector weights (a file such as mm_projector.bin, or a directory) replacing or "
                             "completing the checkpoint's: the STLLaVA-Med projector part")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the source)")
    parser.add_argument("--dtype", choices=["auto", *sorted(_DTYPES)], default="auto",
                        help="dtype of the written weights (auto: the source config's torch_dtype)")
    parser.add_argument("--conv-mode", choices=sorted(SYSTEM_PROMPTS), default="llava_v1",
                        help="official conversation whose system text the chat template uses when a conversation "
                             "has no system message (llava_v1: evaluation; v1: DPO; v1_sq: self-questioning)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert(args.source, args.out, vision_tower=args.vision_tower, projector=args.projector,
                         tokenizer=args.tokenizer, dtype=args.dtype, conv_mode=args.conv_mode,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except ConversionError as err:
        parser.exit(2, f"convert_checkpoint: error: {err}\n")
    print(json.dumps({"out_dir": str(result.out_dir), "model_type": result.model_type,
                      "projector_type": result.projector_type, "files": result.report["files"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
