"""``DPOModule``: the policy (LoRA, optionally on a 4-bit/8-bit base) trained by DPO against a frozen reference.

It receives built objects — the policy model, a :mod:`reference <stllava_med.dpo.reference>` object, loss
and optimizer settings — and never reads configs or paths. One training step:

1. the vision tower runs once per pair (and, when it is frozen, its output is shared with the reference);
   with a vision cache (``dpo.vision_cache_dir``) a frozen tower's output is read from disk instead, filled
   once per sweep before training (:mod:`stllava_med.dpo.vision_cache`);
2. policy log-probs of chosen and rejected answers (:class:`stllava_med.dpo.logps.LogProbs`: prefix sharing,
   output layer on answer tokens only);
3. reference log-probs (adapter off / copy / precomputed cache), without gradients;
4. :func:`stllava_med.dpo.losses.dpo_loss` (+ optional NLL on the chosen answer), averaged over the batch's
   real pairs (zero-weight pairs only pad the DDP slots).

Logged (torchmetrics ``MeanMetric``, synced across ranks at epoch end; ``train/`` and ``val/``): loss, rewards
chosen / rejected / accuracies / margins, log-probs chosen / rejected (sum and per-token mean), padding ratio;
``train/pairs_per_s`` and ``train/tokens_per_s`` (all ranks together). Where a quantity is one TRL's
``DPOTrainer`` logs, it has TRL's name (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``), so dashboards and comparisons line up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric

from stllava_med.dpo.logps import LogProbs
from stllava_med.dpo.losses import chosen_nll_loss, dpo_loss
from stllava_med.schema import DPOSettings, OptimSettings
from stllava_med.sft.losses import window_normalised_loss
from stllava_med.training import TrainableOnlyCheckpoints, configure_adamw

__all__ = ["DPOModule", "DPOSettings", "METRIC_NAMES"]

METRIC_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token", "padding_ratio",
)


PROGRESS_NAMES = ("loss", "rewards/accuracies")  # on the progress bar / line: logged every training step


def _metric_key(stage: str, name: str) -> str:
    return f"{stage}__{name.replace('/', '__')}"  # ModuleDict keys cannot contain dots or slashes


class DPOModule(TrainableOnlyCheckpoints, LightningModule):
    def __init__(self, policy: nn.Module, reference: Any, settings: DPOSettings, optim: Mapping[str, Any], *,
                 projector_modules: Sequence[str] | None = None, vision_cache: Any = None) -> None:
        super().__init__()
        self.policy = policy
        self.reference = reference
        self.settings = settings
        self.optim = optim if isinstance(optim, OptimSettings) else OptimSettings.from_config(optim)
        self.projector_modules = tuple(projector_modules) if projector_modules else None
        self.logprobs = LogProbs(policy, prefix_sharing=settings.prefix_sharing)
        # the frozen tower's output cached on disk (stllava_med.dpo.vision_cache.CachedVision), or None
        self.vision_cache = vision_cache
        if vision_cache is not None and hasattr(reference, "vision"):  # a precomputed reference's pass reads it too
            reference.vision = self._vision_features
        names = list(METRIC_NAMES) + (["nll"] if settings.nll_weight else [])
        self.metrics = nn.ModuleDict({_metric_key(stage, name): MeanMetric()
                                      for stage in ("train", "val") for name in names})
        self._metric_names = names
        self._logged_keys: set[str] = set()  # "<stage>/<name>" given to self.log in the current epoch
        self._last_step_time: float | None = None

    # ---- the step --------------------------------------------------------------------------------------

    def compute(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-pair losses, rewards and log-probs of one batch (the core of training and validation)."""
        pixel_values = batch.get("pixel_values")
        vision = None
        image_features = None
        if self.logprobs.split_vision and (pixel_values is not None or batch.get("vision_keys") is not None):
            vision = self._vision_features(batch)
            image_features = list(self.logprobs.project(vision))
        policy = self.logprobs(batch, image_features=image_features)
        shared = vision if getattr(self.reference, "shares_vision", False) else None
        ref_chosen, ref_rejected = self.reference.logps(batch, vision_features=shared)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy.chosen, policy.rejected, ref_chosen.to(policy.chosen.dtype), ref_rejected.to(policy.chosen.dtype),
            beta=self.settings.beta, loss_type=self.settings.loss_type,
            label_smoothing=self.settings.label_smoothing,
            chosen_lengths=policy.chosen_tokens, rejected_lengths=policy.rejected_tokens,
        )
        out = {"losses": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
               "rewards/margins": chosen_rewards - rejected_rewards,
               "logps/chosen": policy.chosen.detach(), "logps/rejected": policy.rejected.detach(),
               "logps/chosen_per_token": policy.chosen.detach() / policy.chosen_tokens.clamp(min=1),
               "logps/rejected_per_token": policy.rejected.detach() / policy.rejected_tokens.clamp(min=1),
               "padding_ratio": torch.full_like(losses, policy.padding_ratio).detach(),
               "tokens": torch.tensor(float(policy.real_positions), device=losses.device)}
        if self.settings.nll_weight:
            nll = chosen_nll_loss(policy.chosen, policy.chosen_tokens)
            out["losses"] = losses + self.settings.nll_weight * nll
            out["nll"] = nll.detach()
        return out

    def _vision_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The tower's output for the batch's images: from the vision cache when there is one (the pixels may
        have been skipped), else computed."""
        if self.vision_cache is not None:
            return self.vision_cache.features(batch, self.logprobs)
        return self.logprobs.vision_features(batch["pixel_values"])

    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        out = self.compute(batch)
        weight = batch["weight"].to(out["losses"].device, out["losses"].dtype)
        real = weight.sum()
        # Zero-weight pairs (DDP slot padding) keep the graph and the step count but change nothing.
        loss = (out["losses"] * weight).sum() / real.clamp(min=1.0)
        if real > 0:
            writes_step = stage == "train" and self._writes_step_logs()
            for name in self._metric_names:
                values = loss.detach().expand(1) if name == "loss" else out[name]
                metric = self.metrics[_metric_key(stage, name)]
                key = f"{stage}/{name}"
                weights = real.expand(1) if name == "loss" else weight
                # Every batch updates the epoch means; a step's value goes through Lightning's logging (about a
                # millisecond a call, a tenth of a small step for these ten) only where it is written: the
                # progress line's two every step, the rest on the steps the loggers write (log_every_n_steps),
                # and each once an epoch so that its epoch mean is computed and logged.
                if key in self._logged_keys and not writes_step and not (stage == "train" and name in PROGRESS_NAMES):
                    metric.update(values.float(), weights)
                    continue
                metric(values.float(), weights)
                self._logged_keys.add(key)
                self.log(key, metric, on_step=stage == "train", on_epoch=True, prog_bar=name in PROGRESS_NAMES,
                         batch_size=int(real))
        if stage == "train":
            self._log_throughput(real, out["tokens"])
            if "window_pairs" in batch:  # the mean over the real pairs of the whole window, on every rank
                return self._window_loss((out["losses"] * weight).sum(), batch["window_pairs"])
        return loss

    def _window_loss(self, summed: torch.Tensor, window_pairs: torch.Tensor) -> torch.Tensor:
        """``summed`` normalised so that an optimizer step follows the mean over all real pairs of its
        accumulation window and ranks (``window_pairs``, this rank's, summed over ranks here), however the
        window is split into micro-batches: see :func:`stllava_med.sft.losses.window_normalised_loss`."""
        trainer = self._trainer
        world = int(trainer.world_size) if trainer is not None else 1
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        count = window_pairs.to(summed.device, torch.float64).reshape(1)
        if world > 1:
            count = trainer.strategy.reduce(count, reduce_op="sum")
        return window_normalised_loss(summed, count[0], accumulate=accumulate, world_size=world)

    def _log_throughput(self, real_pairs: torch.Tensor, tokens: torch.Tensor) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            elapsed = max(now - self._last_step_time, 1e-9)
            # every rank runs the same number of steps at the same pace: this rank's rate x ranks (the
            # cross-rank mean only smooths it)
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log("train/pairs_per_s", float(real_pairs) * world / elapsed, on_step=True, on_epoch=True,
                     batch_size=1, sync_dist=True)
            self.log("train/tokens_per_s", float(tokens) * world / elapsed, on_step=True, on_epoch=True,
                     batch_size=1, sync_dist=True)
        self._last_step_time = now

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def _writes_step_logs(self) -> bool:
        """Whether Lightning writes this training step's logged values to the loggers (every
        ``trainer.log_every_n_steps``, and when the run stops); true where that cannot be told."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None
        self._logged_keys = {k for k in self._logged_keys if not k.startswith("train/")}

    def on_validation_epoch_start(self) -> None:
        self._logged_keys = {k for k in self._logged_keys if not k.startswith("val/")}

    def on_validation_end(self) -> None:
        self._last_step_time = None  # a validation pass is not training time

    # ---- reference placement and pre-computation --------------------------------------------------------

    def _place_reference(self) -> None:
        mover = getattr(self.reference, "to", None)
        if callable(mover):
            mover(self.device)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode modules: train mode for the policy, with its dropout off unless
        # dpo.disable_dropout=false (the references run in eval mode: see stllava_med.dpo.reference)
        self.policy.train()
        if self.settings.disable_dropout:
            for module in self.policy.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        self._place_reference()
        trainer = self.trainer
        vision = self.vision_cache
        if vision is not None and not vision.ready:  # before the reference pass, which reads it
            vision.prepare(self.logprobs, self.device, rank=trainer.global_rank, world_size=trainer.world_size,
                           barrier=trainer.strategy.barrier, move=lambda batch: move_data_to_device(batch, self.device))
        prepare = getattr(self.reference, "prepare", None)
        if callable(prepare) and getattr(self.reference, "table", True) is None:
            prepare(self.device, rank=trainer.global_rank, world_size=trainer.world_size,
                    barrier=trainer.strategy.barrier,
                    move=lambda batch: move_data_to_device(batch, self.device))

    def on_validation_start(self) -> None:
        self._place_reference()
        if getattr(self.reference, "table", True) is None and not self.trainer.training:
            self.on_fit_start()

    # ---- optimisation ----------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, self.policy, self.optim, projector_modules=self.projector_modules)
