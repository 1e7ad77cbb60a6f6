"""Summed answer log-probabilities of chosen and rejected answers, computed the cheap way.

A DPO step needs ``log π(y|x)`` for two answers that share one image and one prompt. Done naively (what
TRL's ``DPOTrainer`` does) that is two full multimodal forwards per pair — the vision tower runs twice, the
image and prompt tokens (576 of them for LLaVA-1.5, against a 10–100 token answer) are processed twice, and
the output layer runs over every position. Here, for families with a fast path (LLaVA-1.5, LLaVA on Mistral,
LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL; see :mod:`stllava_med.families`):

- **the image is encoded once per pair**, and its features are written into both sequences; the vision
  tower's output (before the projector) is also shared with the reference when the tower is frozen (LLaVA,
  whose projector is a separate module; elsewhere the model's own ``get_image_features`` runs once per model);
- **prefix sharing** (default): the image and prompt run once, and the two answers continue from its KV
  cache, with gradients flowing through the cache into the shared prefix. Exact, not an approximation:
  positions (Qwen's 3-D rope index included) and masks are those of the full sequences, taken from the
  family's own position computation (``tests/integration/test_dpo_logps.py``, ``tests/families``);
- **the output layer runs on answer positions only**, in float32 for the log-softmax.

Other families (Idefics3 / SmolVLM, Gemma 3) go through the generic path, logged once: the model's own forward
over the concatenated chosen + rejected batch (images encoded per sequence, each sequence with its own
per-token extras), which is correct for every family and is the reference the fast paths are tested
against.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stllava_med.chat import IGNORE_INDEX
from stllava_med.families import UnsupportedFamilyFeature, family_of

log = logging.getLogger(__name__)

@dataclass
class SequenceLogps:
    """Per-pair sums of answer log-probabilities and answer token counts (float, for divisions)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    positions: int = 0  # sequence positions run through the language model (padding included)
    real_positions: int = 0  # of which real tokens

    @property
    def padding_ratio(self) -> float:
        return 0.0 if not self.positions else 1.0 - self.real_positions / self.positions


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (LoRA layers stay injected, so it still runs the adapter)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits up to float32 for the log-softmax; float32 and float64 stay as they are."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (N, H); the output layer runs on these rows only."""
    logits = _at_least_float32(lm_head(hidden))
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _sum_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


class LogProbs:
    """Computes :class:`SequenceLogps` for collated preference batches with one model.

    The model may be a peft model: calls go to the injected modules, so the adapter is active unless the
    caller is inside ``model.disable_adapter()`` (which is how the ``adapter_off`` reference is computed)."""

    _logged_fallbacks: set[str] = set()

    def __init__(self, model: nn.Module, *, prefix_sharing: bool = True) -> None:
        self.model = model
        self.inner = unwrap_model(model)
        try:
            self.family = family_of(self.inner)
        except UnsupportedFamilyFeature:
            self.family = None
        core = getattr(self.inner, "model", None)
        self.fast = bool(
            self.family is not None and self.family.prefix_sharing
            and hasattr(self.inner, "lm_head") and hasattr(core, "language_model")
            and callable(getattr(core, "get_image_features", None))
        )
        # LLaVA: the projector is a module after the tower, so tower states can be shared with the reference
        self.split_vision = self.fast and self.family.shared_vision_features
        self._prefix_sharing = prefix_sharing
        self._warned_gc = False
        if not self.fast:
            name = self.family.name if self.family is not None else getattr(self.inner.config, "model_type", None)
            if name not in LogProbs._logged_fallbacks:
                LogProbs._logged_fallbacks.add(str(name))
                log.info("%s (%s): no fast DPO path for this family; using the model's own forward over chosen + "
                         "rejected (prefix sharing off)", type(self.inner).__name__, name)

    # ---- pieces of the fast path ------------------------------------------------------------------------

    @property
    def core(self) -> nn.Module:
        return self.inner.model

    @property
    def image_token_id(self) -> int:
        config = self.inner.config
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    @property
    def vision_module(self) -> nn.Module:
        core = self.core
        return getattr(core, "vision_tower", None) or getattr(core, "visual", None) or core

    @property
    def vision_trainable(self) -> bool:
        family = self.family
        return any(p.requires_grad for n, p in self.inner.named_parameters()
                   if family is not None and family.is_vision_parameter(n))

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.core.language_model, "gradient_checkpointing", False))

    @property
    def prefix_sharing(self) -> bool:
        """Prefix sharing needs the KV cache, which gradient checkpointing drops in a training forward that
        builds a graph: then the plain path runs (reference passes, without gradients, keep sharing)."""
        if not (self._prefix_sharing and self.fast):
            return False
        if self.gradient_checkpointing and self.inner.training and torch.is_grad_enabled():
            if not self._warned_gc:
                log.warning("gradient checkpointing drops the KV cache: prefix sharing is off for this run")
                self._warned_gc = True
            return False
        return True

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """LLaVA: selected vision-tower states (before the projector), one row of tokens per image.

        Computed without autograd when the tower is frozen (nothing upstream needs a gradient), which also
        makes them shareable between policy and reference."""
        config = self.inner.config
        layer = config.vision_feature_layer
        strategy = config.vision_feature_select_strategy
        tower = self.core.vision_tower
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trainable):
            outputs = tower(pixel_values.to(dtype=next(tower.parameters()).dtype), output_hidden_states=True,
                            return_dict=True)
        layers = [layer] if isinstance(layer, int) else list(layer)
        selected = [outputs.hidden_states[i] for i in layers]
        if strategy == "default":  # drop CLIP's CLS token
            selected = [s[:, 1:] for s in selected]
        return torch.cat(selected, dim=-1)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """Image features as the language model sees them (the projector follows the adapter state)."""
        return self.core.multi_modal_projector(vision_features)

    def image_features(self, batch: Mapping[str, Any], vision_features: torch.Tensor | None = None
                       ) -> list[torch.Tensor] | None:
        """The language-model inputs of each image of the batch (one tensor of rows per image, in order)."""
        pixel_values = batch.get("pixel_values")
        if pixel_values is None and (vision_features is None or not self.split_vision):
            return None  # (a batch whose pixels the vision feature cache replaced comes with vision_features)
        if self.split_vision:
            if vision_features is None:
                vision_features = self.vision_features(pixel_values)
            return list(self.project(vision_features))
        extras = dict(batch.get("image_extra") or {})
        dtype = next(self.vision_module.parameters()).dtype
        out = self.core.get_image_features(pixel_values=pixel_values.to(dtype), **extras, return_dict=True)
        pooled = getattr(out, "pooler_output", out)
        if isinstance(pooled, torch.Tensor):
            pooled = list(pooled)
        return [p.reshape(-1, p.shape[-1]) for p in pooled]

    def _embed(self, input_ids: torch.Tensor, image_features: list[torch.Tensor] | None) -> torch.Tensor:
        embeds = self.core.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        n_tokens = int(image_mask.sum())
        if image_features is None:
            if n_tokens:
                raise ValueError("the batch has image tokens but no pixel values")
            return embeds
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in image_features]) if image_features else None
        if flat is None or n_tokens != flat.shape[0]:
            raise ValueError(f"{n_tokens} image tokens in the batch but {0 if flat is None else flat.shape[0]} "
                             f"image feature rows from {len(image_features)} images")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), flat.to(embeds.dtype))

    def _positions(self, batch: Mapping[str, Any], side: str) -> torch.Tensor:
        """Positions of one side's full sequences as the model's own forward would compute them."""
        extras = {**(batch.get("image_extra") or {}), **(batch.get(f"{side}_extra") or {})}
        return self.family.position_ids(self.inner, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                                        extras)

    # ---- the three paths --------------------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, Any], *, image_features: list[torch.Tensor] | None = None,
                 prefix_sharing: bool | None = None) -> SequenceLogps:
        if not self.fast:
            return self.generic(batch)
        if image_features is None:
            image_features = self.image_features(batch)
        use_prefix = self.prefix_sharing if prefix_sharing is None else (prefix_sharing and self.fast)
        if use_prefix:
            return self.shared_prefix(batch, image_features)
        return self.concatenated(batch, image_features)

    def concatenated(self, batch: Mapping[str, Any], image_features: list[torch.Tensor] | None) -> SequenceLogps:
        """Chosen and rejected as one batch of 2B full sequences; each image encoded once, used twice."""
        n_pairs = batch["chosen_input_ids"].shape[0]
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        positions = torch.cat([self._positions(batch, "chosen"), self._positions(batch, "rejected")], dim=-2)
        features = None if image_features is None else [*image_features, *image_features]
        embeds = self._embed(input_ids, features)
        hidden = self.core.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                          use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        target_mask = targets != IGNORE_INDEX
        rows = target_mask.nonzero()[:, 0]
        token_logps = _token_logps(hidden[:, :-1][target_mask], targets[target_mask], self.inner.lm_head)
        sums = _sum_per_row(token_logps, rows, 2 * n_pairs)
        counts = target_mask.sum(-1).to(sums.dtype)
        return SequenceLogps(chosen=sums[:n_pairs], rejected=sums[n_pairs:], chosen_tokens=counts[:n_pairs],
                             rejected_tokens=counts[n_pairs:], positions=int(input_ids.numel()),
                             real_positions=int(attention_mask.sum()))

    def shared_prefix(self, batch: Mapping[str, Any], image_features: list[torch.Tensor] | None) -> SequenceLogps:
        """Image + prompt once (B rows), then both answers (2B rows) continue from its KV cache.

        The prefix is right-padded (so no query row is fully masked) and the answer rows carry the positions
        their tokens have in the full sequences (1-D, or Qwen's 3-D rope index); the mask hides the prefix
        padding from the answers. The first answer token of both rows is predicted from the same last prefix
        state."""
        chosen_ids = batch["chosen_input_ids"]
        device = chosen_ids.device
        n_pairs = chosen_ids.shape[0]
        prompt_lengths = batch["prompt_lengths"].to(device)
        longest_prompt = int(prompt_lengths.max())
        columns = torch.arange(longest_prompt, device=device)
        prefix_mask = (columns.unsqueeze(0) < prompt_lengths.unsqueeze(1)).long()
        prefix_ids = chosen_ids[:, :longest_prompt].masked_fill(prefix_mask == 0, 0)
        full_positions = {side: self._positions(batch, side) for side in ("chosen", "rejected")}
        prefix_positions = full_positions["chosen"][..., :longest_prompt]
        # No padding mask for the prefix: it is right-padded, so under the causal mask alone every real position
        # already sees real positions only (the padding's own states are never read: the answers' mask hides
        # them). Without a mask the attention runs causal (is_causal): flash kernels on a GPU, masked blocks
        # skipped on a CPU, grouped-query attention without repeating the key/value heads.
        prefix = self.core.language_model(inputs_embeds=self._embed(prefix_ids, image_features),
                                          attention_mask=None, position_ids=prefix_positions, use_cache=True)
        cache = prefix.cache

        # Answers (everything after the shared prefix), interleaved chosen / rejected per pair.
        spans = []  # (side, pair, start, end) per answer row
        for i in range(n_pairs):
            for side in ("chosen", "rejected"):
                length = int(batch[f"{side}_attention_mask"][i].sum())
                spans.append((side, i, int(prompt_lengths[i]), length))
        longest_tail = max(end - start for _, _, start, end in spans)
        tail_ids = torch.zeros(2 * n_pairs, longest_tail, dtype=chosen_ids.dtype, device=device)
        tail_targets = torch.full_like(tail_ids, IGNORE_INDEX)
        tail_mask = torch.zeros_like(tail_ids)
        lead = full_positions["chosen"].shape[:-2]  # () for 1-D positions, (3,) for 3-D rope
        tail_positions = torch.zeros(*lead, 2 * n_pairs, longest_tail, dtype=full_positions["chosen"].dtype,
                                     device=device)
        for row, (side, i, start, end) in enumerate(spans):
            n = end - start
            tail_ids[row, :n] = batch[f"{side}_input_ids"][i, start:end]
            tail_targets[row, :n] = batch[f"{side}_labels"][i, start:end]
            tail_mask[row, :n] = 1
            tail_positions[..., row, :n] = full_positions[side][..., i, start:end]
            if n < longest_tail:  # padding columns continue the count (masked, never attended to)
                last = full_positions[side][..., i, end - 1:end] if n else full_positions[side][..., i, start - 1:start]
                tail_positions[..., row, n:] = last + torch.arange(1, longest_tail - n + 1, device=device)

        cache.batch_repeat_interleave(2)
        full_mask = torch.cat([prefix_mask.repeat_interleave(2, dim=0), tail_mask], dim=1)
        tail_hidden = self.core.language_model(
            inputs_embeds=self.core.get_input_embeddings()(tail_ids), attention_mask=full_mask,
            position_ids=tail_positions, cache=cache, use_cache=True,
        ).last_hidden_state

        last_prefix = prefix.last_hidden_state[torch.arange(n_pairs, device=device), prompt_lengths - 1]
        predictors = torch.cat([last_prefix.repeat_interleave(2, dim=0).unsqueeze(1), tail_hidden[:, :-1]], dim=1)
        target_mask = tail_targets != IGNORE_INDEX
        rows = target_mask.nonzero()[:, 0]
        token_logps = _token_logps(predictors[target_mask], tail_targets[target_mask], self.inner.lm_head)
        sums = _sum_per_row(token_logps, rows, 2 * n_pairs).view(n_pairs, 2)
        counts = target_mask.sum(-1).to(sums.dtype).view(n_pairs, 2)
        return SequenceLogps(chosen=sums[:, 0], rejected=sums[:, 1], chosen_tokens=counts[:, 0],
                             rejected_tokens=counts[:, 1],
                             positions=int(prefix_mask.numel() + tail_mask.numel()),
                             real_positions=int(prefix_mask.sum() + tail_mask.sum()))

    def generic(self, batch: Mapping[str, Any]) -> SequenceLogps:
        """The model's own forward over 2B full sequences (images encoded per sequence, logits everywhere);
        per-token extras (Qwen's mm_token_type_ids, Gemma's token_type_ids) are each sequence's own."""
        n_pairs = batch["chosen_input_ids"].shape[0]
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        kwargs: dict[str, Any] = {}
        if batch.get("pixel_values") is not None:
            kwargs["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"]])
        for key, value in (batch.get("image_extra") or {}).items():
            kwargs[key] = torch.cat([value, value])
        for key, value in (batch.get("chosen_extra") or {}).items():
            kwargs[key] = torch.cat([value, batch["rejected_extra"][key]])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        targets = labels[:, 1:]
        target_mask = targets != IGNORE_INDEX
        logps = torch.log_softmax(_at_least_float32(logits[:, :-1]), dim=-1)
        token_logps = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * target_mask
        sums = token_logps.sum(-1)
        counts = target_mask.sum(-1).to(sums.dtype)
        return SequenceLogps(chosen=sums[:n_pairs], rejected=sums[n_pairs:], chosen_tokens=counts[:n_pairs],
                             rejected_tokens=counts[n_pairs:], positions=int(input_ids.numel()),
                             real_positions=int(attention_mask.sum()))
