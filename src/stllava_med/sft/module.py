"""SFTModule: visual self-questioning instruction tuning of a LoRA-wrapped vision-language model.

The module receives a built model (peft LoRA on the language model; projector trained as ``modules_to_save``;
optionally LoRA on the vision tower) and optimisation settings. Unlike the official STLLaVA-Med code, the
vision tower runs with autograd, so vision LoRA weights, when enabled, actually train.

Logged metrics (``train/`` per step and per epoch, ``val/`` per validation run): ``loss``, ``answer_acc`` and
``question_acc`` (next-token accuracy on answer and on questioner targets), ``tokens_per_s`` (non-padding
tokens through forward + backward + optimizer step per second, per device), ``questioner_turns`` and
``dropped_pairs`` (pairs cut to fit ``max_length``).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from stllava_med.schema import OptimSettings
from stllava_med.sft.losses import TokenStats, sft_token_stats, window_normalised_loss
from stllava_med.training import TrainableOnlyCheckpoints, configure_adamw

# Batch entries that are not model inputs.
_NON_MODEL_KEYS = ("labels", "target_role", "uids", "questioner_turns", "dropped_pairs", "window_targets",
                   "window_index")


SFTOptimSettings = OptimSettings  # the SFT stage's optim.* (defaults: stllava_med.schema.SFTStage)


def _metric_group() -> nn.ModuleDict:
    return nn.ModuleDict({
        "loss": MeanMetric(),
        "answer_acc": MeanMetric(),
        "question_acc": MeanMetric(),
        "tokens_per_s": MeanMetric(),
        "questioner_turns": SumMetric(),
        "dropped_pairs": SumMetric(),
    })


class SFTModule(TrainableOnlyCheckpoints, LightningModule):
    def __init__(self, model: nn.Module, optim: OptimSettings | None = None) -> None:
        super().__init__()
        self.model = model
        self.optim = optim or OptimSettings()
        self.save_hyperparameters({"optim": asdict(self.optim)})
        self.train_metrics = _metric_group()
        self.val_metrics = _metric_group()
        self._batch_started: float | None = None
        self._batch_tokens = 0
        self._window_seen: torch.Tensor | None = None  # (summed loss, target tokens) of this window so far

    # ------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------

    def _float_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self._float_dtype())
        return self.model(**inputs, use_cache=False).logits

    def compute_stats(self, batch: dict[str, Any]) -> TokenStats:
        return sft_token_stats(self(batch), batch["labels"], batch["target_role"])

    # ------------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------------

    def _update_and_log(self, stage: str, stats: TokenStats, batch: dict[str, Any],
                        step_loss: torch.Tensor | None = None) -> None:
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        on_step = stage == "train"
        size = int(batch["input_ids"].shape[0])
        loss = stats.loss.detach()
        # weighted by target tokens: the epoch value is the token mean over the epoch (and over the ranks)
        metrics["loss"].update(loss, weight=stats.n_targets.clamp(min=1))
        self.log(f"{stage}/loss", metrics["loss"], on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=size)
        if on_step:
            self.log("train/loss_step", loss if step_loss is None else step_loss, on_step=True, on_epoch=False,
                     prog_bar=True, batch_size=size)
        for name, correct, total in (("answer_acc", stats.answer_correct, stats.answer_total),
                                     ("question_acc", stats.question_correct, stats.question_total)):
            if int(total) == 0:
                continue  # a batch without questioner turns says nothing about asking
            value = correct.float() / total
            metrics[name].update(value, weight=total)
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True, batch_size=size)
            if on_step:
                self.log(f"train/{name}_step", value, on_step=True, on_epoch=False, batch_size=size)
        for name in ("questioner_turns", "dropped_pairs"):
            metrics[name].update(batch[name].to(self.device, torch.float32))
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True, batch_size=size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        stats = self.compute_stats(batch)
        loss, window_mean = self._window_loss(stats, batch)
        self._update_and_log("train", stats, batch, step_loss=window_mean)
        return loss

    def _window_loss(self, stats: TokenStats, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to back-propagate, the token-mean loss of the accumulation window so far).

        The training loader annotates each batch with its window's target tokens (``window_targets``, this
        rank) and its place in the window (``window_index``); summed over ranks, the count normalises the
        summed token loss so that one optimizer step follows the window's token mean exactly
        (:func:`~stllava_med.sft.losses.window_normalised_loss`), however the window is split into
        micro-batches and ranks. The logged value is the token mean over the window's batches so far, all
        ranks together: at the optimizer step, when Lightning logs it, the whole window's. A batch without
        the annotation (another loader) is normalised on its own, per micro-batch."""
        if "window_targets" not in batch:
            return stats.loss, stats.loss.detach()
        trainer = self._trainer
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        world = int(trainer.world_size) if trainer is not None else 1
        if int(batch["window_index"]) == 0 or self._window_seen is None:
            self._window_seen = torch.zeros(2, dtype=torch.float64, device=stats.loss_sum.device)
        seen = self._window_seen + torch.stack([stats.loss_sum.detach(), stats.n_targets]).to(torch.float64)
        self._window_seen = seen
        totals = torch.cat([batch["window_targets"].to(seen).reshape(1), seen])
        if world > 1:  # one collective: the window's targets and the running sums of every rank
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        loss = window_normalised_loss(stats.loss_sum, totals[0], accumulate=accumulate, world_size=world)
        return loss, (totals[1] / totals[2].clamp(min=1)).to(stats.loss.dtype)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        stats = self.compute_stats(batch)
        self._update_and_log("val", stats, batch)

    # Throughput: wall time from batch start to the end of its optimizer step, so backward is included.
    def _start_clock(self, batch: dict[str, Any]) -> None:
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._batch_started = time.perf_counter()
        self._batch_tokens = int(batch["attention_mask"].sum())

    def _stop_clock(self, stage: str, batch: dict[str, Any]) -> None:
        if self._batch_started is None:
            return
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._batch_started, 1e-9)
        self._batch_started = None
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        rate = torch.tensor(self._batch_tokens / elapsed, device=self.device)
        # weighted by time, the epoch value is total tokens / total seconds
        metrics["tokens_per_s"].update(rate, weight=torch.tensor(elapsed, device=self.device))
        size = int(batch["input_ids"].shape[0])
        self.log(f"{stage}/tokens_per_s", metrics["tokens_per_s"], on_step=False, on_epoch=True, batch_size=size)
        if stage == "train":
            self.log("train/tokens_per_s_step", rate, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._start_clock(batch)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        self._stop_clock("train", batch)

    def on_validation_batch_start(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start_clock(batch)

    def on_validation_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._stop_clock("val", batch)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode modules; dropout in LoRA / the LM must be active while training
        self.model.train()

    # ------------------------------------------------------------------------------------------------------
    # optimisation
    # ------------------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, self.model, self.optim)
