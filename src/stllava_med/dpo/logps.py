"""Summed answer log-probabilities of chosen and rejected answers, computed the cheap way.

A DPO step needs ``log π(y|x)`` for two answers that share one image and one prompt. Done naively (what
TRL's ``DPOTrainer`` does) that is two full multimodal forwards per pair — the vision tower runs twice, the
image and prompt tokens (576 of them for LLaVA-1.5, against a 10–100 token answer) are processed twice, and
the output layer runs over every position. Here, for LLaVA-architecture models:

- **the image is encoded once per pair**, and its features are written into both sequences; the vision
  tower's output (before the projector) is also shared with the reference when the tower is frozen;
- **prefix sharing** (default): the image and prompt run once, and the two answers continue from its KV
  cache, with gradients flowing through the cache into the shared prefix. Exact, not an approximation:
  positions and masks are those of the full sequences (``tests/integration/test_dpo_logps.py``);
- **the output layer runs on answer positions only**, in float32 for the log-softmax.

Any other image-text-to-text model goes through the generic path: the model's own forward over the
concatenated chosen + rejected batch (images encoded per sequence), which is correct for every family
(Qwen2.5-VL's 3-D rotary positions included) and is also the reference the fast paths are tested against.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stllava_med.chat import IGNORE_INDEX

log = logging.getLogger(__name__)

# Model types whose language model takes plain 1-D positions and whose image features are the projected
# vision-tower states written over the image placeholder tokens, in order.
FAST_PATH_MODEL_TYPES = ("llava",)


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


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (N, H); the output layer runs on these rows only."""
    logits = lm_head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _sum_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


class LogProbs:
    """Computes :class:`SequenceLogps` for collated preference batches with one model.

    The model may be a peft model: calls go to the injected modules, so the adapter is active unless the
    caller is inside ``model.disable_adapter()`` (which is how the ``adapter_off`` reference is computed)."""

    def __init__(self, model: nn.Module, *, prefix_sharing: bool = True) -> None:
        self.model = model
        self.inner = unwrap_model(model)
        config = getattr(self.inner, "config", None)
        self.fast = (
            getattr(config, "model_type", None) in FAST_PATH_MODEL_TYPES
            and hasattr(self.inner, "model") and hasattr(self.inner, "lm_head")
            and hasattr(self.inner.model, "vision_tower") and hasattr(self.inner.model, "language_model")
        )
        self._prefix_sharing = prefix_sharing
        self._warned_gc = False
        if not self.fast:
            log.info("%s: no fast path for model type %r; using the model's own forward",
                     type(self.inner).__name__, getattr(config, "model_type", None))

    # ---- pieces of the fast path ------------------------------------------------------------------------

    @property
    def core(self) -> nn.Module:
        return self.inner.model

    @property
    def image_token_id(self) -> int:
        return int(self.inner.config.image_token_id)

    @property
    def vision_trainable(self) -> bool:
        return any(p.requires_grad for p in self.core.vision_tower.parameters())

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
        """Selected vision-tower states (before the projector), one row of tokens per image.

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

    def image_features(self, pixel_values: torch.Tensor | None, vision_features: torch.Tensor | None = None) -> torch.Tensor | None:
        if pixel_values is None:
            return None
        if vision_features is None:
            vision_features = self.vision_features(pixel_values)
        return self.project(vision_features)

    def _embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        embeds = self.core.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        n_tokens = int(image_mask.sum())
        if image_features is None:
            if n_tokens:
                raise ValueError("the batch has image tokens but no pixel values")
            return embeds
        if n_tokens != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(f"{n_tokens} image tokens in the batch but {image_features.shape[0]} images x "
                             f"{image_features.shape[1]} features")
        flat = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), flat)

    # ---- the three paths --------------------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, Any], *, image_features: torch.Tensor | None = None,
                 prefix_sharing: bool | None = None) -> SequenceLogps:
        if not self.fast:
            return self.generic(batch)
        if image_features is None:
            image_features = self.image_features(batch.get("pixel_values"))
        use_prefix = self.prefix_sharing if prefix_sharing is None else (prefix_sharing and self.fast)
        if use_prefix:
            return self.shared_prefix(batch, image_features)
        return self.concatenated(batch, image_features)

    def concatenated(self, batch: Mapping[str, Any], image_features: torch.Tensor | None) -> SequenceLogps:
        """Chosen and rejected as one batch of 2B full sequences; each image encoded once, used twice."""
        n_pairs = batch["chosen_input_ids"].shape[0]
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        features = None if image_features is None else torch.cat([image_features, image_features])
        embeds = self._embed(input_ids, features)
        hidden = self.core.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
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

    def shared_prefix(self, batch: Mapping[str, Any], image_features: torch.Tensor | None) -> SequenceLogps:
        """Image + prompt once (B rows), then both answers (2B rows) continue from its KV cache.

        The prefix is right-padded (so no query row is fully masked) and the answer rows carry explicit
        positions ``prompt_length + j``; the mask hides the prefix padding from the answers. The first answer
        token of both rows is predicted from the same last prefix state."""
        chosen_ids = batch["chosen_input_ids"]
        device = chosen_ids.device
        n_pairs = chosen_ids.shape[0]
        prompt_lengths = batch["prompt_lengths"].to(device)
        longest_prompt = int(prompt_lengths.max())
        columns = torch.arange(longest_prompt, device=device)
        prefix_mask = (columns.unsqueeze(0) < prompt_lengths.unsqueeze(1)).long()
        prefix_ids = chosen_ids[:, :longest_prompt].masked_fill(prefix_mask == 0, 0)
        prefix = self.core.language_model(inputs_embeds=self._embed(prefix_ids, image_features),
                                          attention_mask=prefix_mask, use_cache=True)
        cache = prefix.cache

        # Answers (everything after the shared prefix), interleaved chosen / rejected per pair.
        tails, tail_labels = [], []
        for side in ("chosen", "rejected"):
            ids, labels, mask = batch[f"{side}_input_ids"], batch[f"{side}_labels"], batch[f"{side}_attention_mask"]
            lengths = mask.sum(-1)
            tails.append([ids[i, int(prompt_lengths[i]):int(lengths[i])] for i in range(n_pairs)])
            tail_labels.append([labels[i, int(prompt_lengths[i]):int(lengths[i])] for i in range(n_pairs)])
        rows_ids = [t for pair in zip(*tails) for t in pair]
        rows_labels = [t for pair in zip(*tail_labels) for t in pair]
        longest_tail = max(int(t.shape[0]) for t in rows_ids)
        tail_ids = torch.zeros(2 * n_pairs, longest_tail, dtype=chosen_ids.dtype, device=device)
        tail_targets = torch.full_like(tail_ids, IGNORE_INDEX)
        tail_mask = torch.zeros_like(tail_ids)
        for row, (ids, labels) in enumerate(zip(rows_ids, rows_labels)):
            tail_ids[row, : ids.shape[0]] = ids
            tail_targets[row, : labels.shape[0]] = labels
            tail_mask[row, : ids.shape[0]] = 1

        cache.batch_repeat_interleave(2)
        row_prompt = prompt_lengths.repeat_interleave(2)
        positions = row_prompt.unsqueeze(1) + torch.arange(longest_tail, device=device).unsqueeze(0)
        full_mask = torch.cat([prefix_mask.repeat_interleave(2, dim=0), tail_mask], dim=1)
        tail_hidden = self.core.language_model(
            inputs_embeds=self.core.get_input_embeddings()(tail_ids), attention_mask=full_mask,
            position_ids=positions, cache=cache, use_cache=True,
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
        """The model's own forward over 2B full sequences (images encoded per sequence, logits everywhere)."""
        n_pairs = batch["chosen_input_ids"].shape[0]
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        kwargs: dict[str, Any] = {}
        if batch.get("pixel_values") is not None:
            kwargs["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"]])
        for key, value in (batch.get("image_extra") or {}).items():
            kwargs[key] = torch.cat([value, value])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        targets = labels[:, 1:]
        target_mask = targets != IGNORE_INDEX
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logps = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * target_mask
        sums = token_logps.sum(-1)
        counts = target_mask.sum(-1).to(sums.dtype)
        return SequenceLogps(chosen=sums[:n_pairs], rejected=sums[n_pairs:], chosen_tokens=counts[:n_pairs],
                             rejected_tokens=counts[n_pairs:], positions=int(input_ids.numel()),
                             real_positions=int(attention_mask.sum()))
