"""Progress: step-bounded bars on a terminal, plain text lines in log files."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

def _under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


class _StepDescription:
    """Progress-bar mixin: on a step-bounded run (``trainer.max_steps > 0``) the training bar reads
    ``Step 123/400 · epoch 36`` instead of Lightning's ``Epoch 36/-2`` (``max_epochs=-1``)."""

    def _step_description(self, trainer: Trainer) -> str | None:
        if trainer.max_steps is None or trainer.max_steps <= 0:
            return None
        return f"Step {trainer.global_step}/{trainer.max_steps} · epoch {trainer.current_epoch}"


class StepRichProgressBar(_StepDescription, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return self._step_description(self.trainer) or super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        description = self._step_description(trainer)
        if description and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=description)


class StepTQDMProgressBar(_StepDescription, TQDMProgressBar):
    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        description = self._step_description(trainer)
        if description:
            self.train_progress_bar.set_description(description)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        description = self._step_description(trainer)
        if description and not self.train_progress_bar.disable:
            self.train_progress_bar.set_description(description, refresh=False)


def step_progress_bar() -> Callback:
    """The progress bar Lightning would pick (Rich when installed, else tqdm), with step-based descriptions."""
    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TextProgress(ProgressBar):
    """Plain progress lines for a stdout that is not a terminal (a SLURM ``.out`` file, ``nohup``), where a
    Rich / tqdm bar shows only its last frame: ``Step 40/400 (10%) · epoch 0 · 1.93 steps/s · elapsed 0:00:20 ·
    ETA 0:03:06 · loss 0.69``, every ``total / lines`` optimizer steps or every ``seconds``, whichever comes
    first, and a last line when training ends. Rank 0 only; logged through ``stllava_med.progress``."""

    def __init__(self, *, lines: int = 10, seconds: float = 30.0, every_unknown: int = 50) -> None:
        super().__init__()
        self.lines = max(1, lines)
        self.seconds = seconds
        self.every_unknown = max(1, every_unknown)
        self._enabled = True
        self._start: tuple[float, int] | None = None
        self._last_time = 0.0
        self._last_step = -1
        self.logger = logging.getLogger("stllava_med.progress")

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _total(self, trainer: Trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) and total > 0 else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        self._last_time = self._start[0]
        self._last_step = trainer.global_step

    def line(self, trainer: Trainer, pl_module: LightningModule, now: float) -> str:
        assert self._start is not None
        step, total = trainer.global_step, self._total(trainer)
        elapsed = now - self._start[0]
        rate = (step - self._start[1]) / elapsed if elapsed > 0 else 0.0
        parts = [f"Step {step}/{total} ({100 * step / total:.0f}%)" if total else f"Step {step}",
                 f"epoch {trainer.current_epoch}", f"{rate:.2f} steps/s", f"elapsed {_duration(elapsed)}"]
        if total and rate > 0:
            parts.append(f"ETA {_duration((total - step) / rate)}")
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key != "v_num" and isinstance(value, int | float):
                parts.append(f"{key} {value:.4g}")
        return " · ".join(parts)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._enabled or self._start is None or trainer.global_step == self._last_step:
            return
        now, step, total = time.monotonic(), trainer.global_step, self._total(trainer)
        every = max(1, total // self.lines) if total else self.every_unknown
        if step % every == 0 or now - self._last_time >= self.seconds or (total and step >= total):
            self.logger.info(self.line(trainer, pl_module, now))
            self._last_time, self._last_step = now, step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and self._start is not None and trainer.global_step != self._last_step:
            self.logger.info(self.line(trainer, pl_module, time.monotonic()))


def progress_callback(trainer_cfg: Mapping[str, Any]) -> Callback | None:
    """The progress display for ``trainer.enable_progress_bar``: plain lines (:class:`TextProgress`) when stdout is
    not a terminal, else a step-described Rich / tqdm bar on a step-bounded run (None: Lightning's default)."""
    import sys

    if not trainer_cfg.get("enable_progress_bar", True):
        return None
    if not sys.stdout.isatty():
        return TextProgress()
    if int(trainer_cfg.get("max_steps") or -1) > 0:
        return step_progress_bar()
    return None


