"""What differs between model families, in one place.

A :class:`Family` is a small, explicit record: which modules are the vision tower, the projector and the
language model (LoRA targets, freezing, learning-rate groups), how each processor output batches, which
chat template renders our three roles and what ends a model turn, how images are passed to the processor,
and which fast paths the family supports. Stages, datamodules, losses and log-prob code ask the family;
none of them tests ``model_type``. A new family is one module in this package plus its test
(``tests/families``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

# How one processor output of a single encoded example joins a batch:
#   token  - per-token, shape (1, L) or (L,): right-padded along the sequence with ``pad_values[key]`` (0)
#   concat - per-image rows, (n_i, ...): concatenated along dim 0 (Qwen's patches, image_grid_thw, Gemma's
#            pixel_values, LLaVA's pixel_values)
#   tiles  - per-example tiles, (1, T_i, ...): padded with zeros along the tile axis to the batch's largest T
#            and stacked (LLaVA-NeXT's anyres tiles, Idefics3's image splits; the models skip all-zero tiles)
BatchKind = Literal["token", "concat", "tiles"]


class UnsupportedFamilyFeature(ValueError):
    """A stage asked for something this family cannot do; the message names the family and the reason."""


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_types: tuple[str, ...]
    # module layout: regular expressions searched in full parameter / module names (peft prefixes included)
    vision_pattern: str
    projector_pattern: str
    lora_targets: str
    vision_lora_targets: str
    # names peft keeps as full trainable copies (``modules_to_save``): the projector
    projector_modules: tuple[str, ...]
    batch_keys: Mapping[str, BatchKind] = field(default_factory=dict)
    # the text of a config's ``text_config.model_type`` this family requires (LLaVA on Mistral), if any
    text_model_types: tuple[str, ...] = ()
    # a template of ours (file in families/templates) replacing the published one; None keeps the published
    template: str | None = None
    # per text model type (``text_config.model_type``), a template of ours overriding ``template``
    templates_by_text_model: Mapping[str, str] = field(default_factory=dict)
    # a questioner turn that ends in text rather than a token (Mistral's ``[/INST]``): generation stops there
    questioner_stop: str | None = None
    # what ends a model (assistant / questioner) turn; None: the tokenizer's EOS, appended when the template
    # writes no end-of-turn marker (llava-hf's LLaVA-1.5)
    end_of_turn: str | None = None
    # the processor wants one list of images per prompt (Gemma 3)
    nested_images: bool = False
    prefix_sharing: bool = False
    # the vision tower's states (before a separate projector module) can be shared with the reference
    shared_vision_features: bool = False
    shared_prefix_sampling: bool = False
    # 3-D rotary positions (Qwen2-VL family): the fast paths must take positions from the model's rope index
    rope_index: bool = False
    notes: str = ""

    # ---- selection --------------------------------------------------------------------------------------

    def matches(self, config: Any) -> bool:
        if getattr(config, "model_type", None) not in self.model_types:
            return False
        if self.text_model_types:
            text = getattr(config, "text_config", None)
            return getattr(text, "model_type", None) in self.text_model_types
        return True

    # ---- modules ----------------------------------------------------------------------------------------

    def is_vision_parameter(self, name: str) -> bool:
        return re.search(self.vision_pattern, name) is not None and not self.is_projector_parameter(name)

    def is_projector_parameter(self, name: str) -> bool:
        return re.search(self.projector_pattern, name) is not None

    # ---- chat -------------------------------------------------------------------------------------------

    def template_name(self, config: Any = None) -> str | None:
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        return self.templates_by_text_model.get(text_type, self.template) if text_type else self.template

    def chat_template(self, config: Any = None) -> str | None:
        """Our template for this family (see ``templates/``), or None to keep the published one."""
        name = self.template_name(config)
        if name is None:
            return None
        return resources.files("stllava_med.families").joinpath("templates", name).read_text("utf-8")

    def end_of_turn_text(self, processor: Any) -> str:
        return self.end_of_turn or (processor.tokenizer.eos_token or "")

    def stop_token_ids(self, processor: Any, model: Any = None) -> list[int]:
        """Every token that ends generation: the generation config's EOS ids (Gemma's ``<end_of_turn>``), the
        tokenizer's EOS and the family's end-of-turn marker."""
        ids: list[int] = []
        generation_config = getattr(model, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        if configured is not None:
            ids.extend(configured if isinstance(configured, list | tuple) else [configured])
        tokenizer = processor.tokenizer
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        if self.end_of_turn:
            token_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                ids.append(int(token_id))
        return list(dict.fromkeys(int(i) for i in ids))

    def processor_images(self, images: Sequence[Any] | None) -> Any:
        if not images:
            return None
        return [[image] for image in images] if self.nested_images else list(images)

    # ---- batching ---------------------------------------------------------------------------------------

    def batch_kind(self, key: str) -> BatchKind:
        try:
            return self.batch_keys[key]
        except KeyError:
            raise UnsupportedFamilyFeature(
                f"family {self.name!r}: the processor returned {key!r}, which this family does not know how to "
                f"batch (known: {sorted(self.batch_keys)}); add it to families/{self.name}.py") from None

    def collate(self, per_example: Sequence[Mapping[str, torch.Tensor]], *, length: int | None = None,
                keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Join the processor outputs (other than input_ids / attention_mask) of single examples into batch
        tensors, each by its real shape. ``length`` is the padded sequence length for per-token outputs."""
        keys = list(keys if keys is not None else dict.fromkeys(k for e in per_example for k in e))
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [e[key] for e in per_example if key in e]
            if len(values) != len(per_example):
                raise ValueError(f"family {self.name!r}: {key!r} present in {len(values)} of {len(per_example)} "
                                 "examples of a batch (a batch mixes examples with and without images?)")
            out[key] = _join(self.batch_kind(key), values, length, key)
        return out

    # ---- fast paths -------------------------------------------------------------------------------------

    def position_ids(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Position ids of right- or left-padded full sequences as the model's own forward computes them:
        (B, L) from the mask, or (3, B, L) for 3-D rope families."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _as_row(value: torch.Tensor) -> torch.Tensor:
    return value[0] if value.dim() >= 2 and value.shape[0] == 1 else value


def _join(kind: BatchKind, values: Sequence[torch.Tensor], length: int | None, key: str) -> torch.Tensor:
    if kind == "concat":
        return torch.cat(list(values), dim=0)
    if kind == "token":
        rows = [_as_row(v) for v in values]
        longest = length if length is not None else max(int(r.shape[-1]) for r in rows)
        out = torch.zeros((len(rows), longest), dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            out[i, : row.shape[-1]] = row
        return out
    if kind == "tiles":
        tiles = [v if v.dim() >= 2 else v.unsqueeze(0) for v in values]
        most = max(int(t.shape[1]) for t in tiles)
        shape = tiles[0].shape[2:]
        if any(t.shape[2:] != shape or t.shape[0] != 1 for t in tiles):
            raise ValueError(f"{key!r}: tiles of one example must share a shape, got {[tuple(t.shape) for t in tiles]}")
        out = torch.zeros((len(tiles), most, *shape), dtype=tiles[0].dtype)
        for i, t in enumerate(tiles):
            out[i, : t.shape[1]] = t[0]
        return out
    raise ValueError(f"unknown batch kind {kind!r} for {key!r}")


PositionFn = Callable[[Any, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
