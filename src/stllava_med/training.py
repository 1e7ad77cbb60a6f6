"""Training plumbing shared by the SFT and DPO stages: optimizer groups, schedule, trainer, checkpoints.

Kept free of stage logic: LightningModules call :func:`param_groups` / :func:`cosine_with_warmup` from
``configure_optimizers``; entry points call :func:`build_trainer` and :func:`resume_checkpoint`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from omegaconf import DictConfig
from torch import nn

from stllava_med.backbone import is_lora_parameter, is_projector_parameter, unpack_bnb_cpu_weights
from stllava_med.families import family_of
from stllava_med.schema import OptimSettings
from stllava_med.utils.config import flat_config, run_group, run_label
from stllava_med.utils.runtime import StageStopped, signal_exit_code, single_console

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, *, lr: float, projector_lr: float | None = None, weight_decay: float = 0.0,
                 projector_modules: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: LoRA / other with and without weight decay, and the
    projector at its own learning rate (the paper: LoRA 2e-4 or 5e-6, projector 2e-5).

    Biases and norm weights get no weight decay (the usual convention)."""
    if projector_modules:
        def projector(name: str) -> bool:
            return is_projector_parameter(name, tuple(projector_modules))
    else:  # the family knows its projector (LLaVA's multi_modal_projector, Qwen's visual.merger, ...)
        projector = family_of(model).is_projector_parameter
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_proj = projector(name)
        no_decay = param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        key = ("projector" if is_proj else "lora" if is_lora_parameter(name) else "other") + ("_nd" if no_decay else "")
        if key not in groups:
            group_lr = projector_lr if (is_proj and projector_lr is not None) else lr
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": 0.0 if no_decay else weight_decay,
                           "name": key}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter (is LoRA enabled?)")
    return list(groups.values())


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio * total_steps`` optimizer steps, then cosine decay to
    ``min_lr_ratio`` (HF's ``get_cosine_schedule_with_warmup`` shape, per parameter group)."""
    total_steps = max(1, int(total_steps))
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure_adamw(module: LightningModule, model: nn.Module, settings: OptimSettings | Mapping[str, Any],
                    projector_modules: Sequence[str] | None = None) -> dict[str, Any]:
    """AdamW over :func:`param_groups` plus a per-step cosine schedule sized from the trainer's plan."""
    optim = settings if isinstance(settings, OptimSettings) else OptimSettings.from_config(settings)
    groups = param_groups(model, lr=float(optim.lr), projector_lr=optim.projector_lr,
                          weight_decay=float(optim.weight_decay),
                          projector_modules=projector_modules or optim.projector_modules)
    optimizer = torch.optim.AdamW(groups, betas=tuple(float(b) for b in optim.betas), eps=float(optim.eps))
    total = int(module.trainer.estimated_stepping_batches) if module._trainer is not None else 1
    if total <= 0 or total == math.inf:
        total = 1
    scheduler = cosine_with_warmup(optimizer, total, float(optim.warmup_ratio), float(optim.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


# --------------------------------------------------------------------------------------------------------------
# Checkpoints that hold only what trains
# --------------------------------------------------------------------------------------------------------------


class TrainableOnlyCheckpoints:
    """Mixin for LightningModules over a big frozen base: checkpoints hold the trainable tensors only
    (LoRA, projector), so a 7B run writes megabytes, not 14 GB, every few hundred steps. The base weights
    come from ``name_or_path`` when the run resumes."""

    strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}  # type: ignore[attr-defined]
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}  # type: ignore[attr-defined]
        missing = trainable - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")


# --------------------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------------------


class BnbCpuGuard(Callback):
    """Restores bitsandbytes' training layout before every training step (see
    :func:`stllava_med.backbone.unpack_bnb_cpu_weights`): without it, a validation pass or a ``generate`` call
    on CPU makes QLoRA silently stop learning."""

    def __init__(self) -> None:
        self.restored = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        count = unpack_bnb_cpu_weights(pl_module)
        if count:
            self.restored += count
            log.debug("restored the training layout of %d 4-bit layers", count)


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


def save_checkpoint_atomically(trainer: Trainer, path: Path) -> Path:
    """``trainer.save_checkpoint`` with the full training state (optimizer, loops, callbacks: what resuming
    needs), written beside ``path`` and renamed over it: a job killed mid-write (SIGKILL after the scheduler's
    grace period) leaves the previous checkpoint, never a torn one. Collective under DDP, like Lightning's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:  # only rank 0 writes (Lightning's checkpoint IO); save_checkpoint ends in a barrier
        os.replace(tmp, path)
    return path


class CountResumedEpoch(Callback):
    """Counts an epoch as started when Lightning (2.6) forgot to.

    Resumed from a checkpoint written at the end of an epoch's last batch (every ``last.ckpt`` at an epoch end,
    and a step checkpoint that falls there), the fit loop runs the next epoch without incrementing its
    ``epoch_progress`` ready / started counters (it stays in its restarted-mid-epoch state, which also skips
    ``on_train_epoch_start``). A checkpoint written later in that epoch then reads as an epoch boundary, and
    with ``trainer.max_epochs`` set a run resumed from it restarts the epoch's batch count at 0 while the loader
    goes on where it was: batch indices, accumulation windows and the epoch's last optimizer step are off. At
    the epoch's first batch this puts the counters where a fresh epoch has them."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        progress = trainer.fit_loop.epoch_progress
        if progress.current.ready == progress.current.processed:  # in an epoch that was never counted
            progress.increment_ready()
            progress.increment_started()


class StepCheckpoint(ModelCheckpoint):
    """Lightning's step checkpoints, minus a save at the first batch of a resumed run: a fresh ModelCheckpoint
    has saved no step yet, so it would write the checkpoint's own step again after that batch, which under
    gradient accumulation is inside a window (its gradient is in no checkpoint) and which a run killed before
    its next step would resume from."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # that step is on disk (or step 0: nothing to save)


class LastCheckpoint(Callback):
    """Writes ``last.ckpt`` after the last batch of each epoch and when training ends."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._saved_step = -1

    def _save(self, trainer: Trainer) -> None:
        if trainer.global_step != self._saved_step and not trainer.sanity_checking:
            save_checkpoint_atomically(trainer, self.path)
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)


class StopOnSignal(Callback):
    """SIGTERM (what SLURM, Kubernetes and most schedulers send before killing a job) or SIGUSR1 during training:
    finish the current optimizer step, write ``last.ckpt`` (the checkpoint :func:`resume_checkpoint` resumes
    from, atomically), log where it is and exit with ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1) —
    without exporting, writing ``metrics.json`` or the pipeline's ``DONE.json``. Rerunning the same command
    resumes at that step, on the batches the uninterrupted run would have used.

    The stop happens at ``on_train_batch_end`` of a batch that stepped the optimizer (the same point as every
    other ``last.ckpt``, which Lightning restores exactly); under DDP the ranks agree on it first, so they stop at
    the same step. Who owns a signal is respected: SIGUSR1 is left alone when another handler has it (submitit's
    requeue) or when Lightning's SLURM auto-requeue will take it (``slurm_auto_requeue=true`` under SLURM).
    SIGTERM is always ours, composed with Lightning's notifier and with a handler that was there before.
    A signal outside training (export, the final validation) ends the process as the handler before ours would
    have: by default, killed by the signal (status 143 / 138 too). A stop Lightning raises itself
    (``SIGTERMException`` — in the middle of a gradient accumulation or of a validation pass) gets the same
    checkpoint, log line and exit status."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.received: str | None = None  # name of the first signal received during training
        self.stopped_at: int | None = None  # global step of the stop checkpoint
        self._previous: dict[int, Any] = {}
        self._active = False
        self._pid = os.getpid()
        self._step_at_batch_start = -1

    # -- handlers -------------------------------------------------------------------------------------------------

    @staticmethod
    def _requeue_signal(trainer: Trainer) -> int | None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return int(environment.requeue_signal or signal.SIGUSR1)
        return None

    def _install(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (Lightning skips them too)
        requeue = self._requeue_signal(trainer)
        self._pid = os.getpid()
        owned: list[str] = []
        for name in self.SIGNALS:
            signum = int(getattr(signal, name))
            current = signal.getsignal(signum)
            if name != "SIGTERM":
                if signum == requeue:
                    log.debug("%s is Lightning's SLURM requeue signal: left to Lightning", name)
                    continue
                if current not in (signal.SIG_DFL, None):
                    log.debug("%s already has a handler (%r): left to it", name, current)
                    continue
            if current != self._handle:  # a second fit with this callback: keep the handler from before ours
                self._previous[signum] = current
            signal.signal(signum, self._handle)
            owned.append(f"{name} → exit {signal_exit_code(signum)}")
        self._active = True
        if owned:
            log.info("on %s: a checkpoint at the next optimizer step (%s), then stop", ", ".join(owned), self.path)

    def _restore(self) -> None:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        # _previous stays: after a failed fit Lightning re-installs the handlers it found, ours among them

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            # a DataLoader worker forked during training inherits this handler: a scheduler signals the whole
            # process group, and the worker must keep serving batches until the main process stops at the step
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if not self._active:
            # outside training (Lightning re-installs its captured handlers, ours among them, after a failed fit):
            # behave as the handler before ours
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.received is None:
            self.received = name
            log.warning("received %s: stopping after the current optimizer step, with a checkpoint in %s "
                        "(exit %d)", name, self.path, signal_exit_code(signum))
        else:
            log.warning("received %s: already stopping (on %s)", name, self.received)
        if callable(previous):  # a handler that was there before (e.g. submitit's SIGTERM logger)
            previous(signum, frame)

    # -- the stop -------------------------------------------------------------------------------------------------

    def _exit_code(self) -> int:
        return signal_exit_code(getattr(signal, self.received or "SIGTERM"))

    def _message(self, trainer: Trainer, where: str = "") -> str:
        total = f" of {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        return (f"stopped by {self.received or 'SIGTERM'} at step {trainer.global_step}{total}{where}; checkpoint "
                f"{self.path}; rerun the same command to resume")

    def _stop(self, trainer: Trainer, *, save: bool = True, where: str = "") -> StageStopped:
        if save:
            save_checkpoint_atomically(trainer, self.path)
        self.stopped_at = trainer.global_step
        message = self._message(trainer, where)
        log.warning("%s (exit %d)", message, self._exit_code())
        return StageStopped(self._exit_code(), message)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before Lightning registers its own handlers (trainer._run): it composes its SIGTERM notifier with ours,
        # and registers its SLURM requeue handler only on a signal that has none
        self.received = None
        self.stopped_at = None
        self._install(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: not a step boundary
        requested = self.received is not None
        if trainer.world_size > 1:  # every rank stops at the same step, or the collective save would hang
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
            if requested and self.received is None:
                self.received = "SIGTERM"  # another rank got it; the exit status follows the usual signal
        if requested:
            self._active = False
            raise self._stop(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._active = False
        if isinstance(exception, SIGTERMException) and not isinstance(exception, StageStopped):
            # Lightning's own stop (SystemExit with no status: exit 0): make it as honest as ours
            if self.received is None:
                self.received = "SIGTERM"
            fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
            stop = self._stop(trainer, save=fitting,
                              where="" if fitting else " (training had finished; during validation)")
            exception.code = stop.code
            exception.args = (stop.code,)
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()


def resume_checkpoint(out_dir: Path) -> str | None:
    """``<out_dir>/checkpoints/last.ckpt`` if a previous run of this config left one."""
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


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


def _is_wandb(entry: Mapping[str, Any]) -> bool:
    return str(entry.get("_target_", "")).endswith("WandbLogger")


def build_loggers(logger_cfg: Mapping[str, Any] | None, out_dir: Path,
                  run_cfg: DictConfig | Mapping[str, Any] | None = None) -> list[Any]:
    """Instantiate every entry of the ``logger`` group (``logger=[csv,tensorboard]``) into ``out_dir``.

    With ``run_cfg`` (the run's config), a W&B run left without ``name`` / ``group`` is named after the run and
    the keys its sweep set (:func:`~stllava_med.utils.config.run_label`) and grouped by sweep
    (:func:`~stllava_med.utils.config.run_group`)."""
    loggers = []
    for name, entry in dict(logger_cfg or {}).items():
        if entry is None or "_target_" not in entry:
            continue
        extra: dict[str, Any] = {}
        if run_cfg is not None and _is_wandb(entry):
            if not entry.get("name"):
                extra["name"] = run_label(run_cfg)
            if not entry.get("group"):
                extra["group"] = run_group(run_cfg)
        loggers.append(instantiate(entry, save_dir=str(out_dir / "logs"), **extra))
        log.debug("logger %s enabled", name)
    return loggers


def log_run_config(loggers: Iterable[Any], run_cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Every logger records the run's resolved config, flattened (``dpo.beta``), secrets redacted: TensorBoard's
    ``hparams.yaml`` and HParams tab, the CSV logger's ``hparams.yaml``, the W&B run config."""
    hparams = flat_config(run_cfg)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return hparams


def close_loggers(trainer: Trainer) -> None:
    """End the W&B run of each WandbLogger (Lightning leaves it open): its files are written now, and the next
    job of an in-process sweep gets a run of its own instead of Lightning reattaching it to this one."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def build_trainer(trainer_cfg: Mapping[str, Any], out_dir: Path, *, logger_cfg: Mapping[str, Any] | None = None,
                  callbacks: Iterable[Callback] = (), checkpoint_every_n_steps: int | None = None,
                  slurm_auto_requeue: bool = False, run_cfg: DictConfig | Mapping[str, Any] | None = None) -> Trainer:
    """A Lightning Trainer whose checkpoints live in ``<out_dir>/checkpoints`` (``last.ckpt`` for resume).

    ``run_cfg`` (the run's whole config) is logged as hyperparameters by every logger (:func:`log_run_config`).

    Requeueing has one owner: under submitit (our Hydra launcher) Lightning's SLURM plugin must not requeue
    too, so ``slurm_auto_requeue`` is off by default; ``scripts/slurm/*.sbatch`` turns it on for plain sbatch."""
    # last.ckpt after the last batch of every epoch, at the end of training and, when asked, every N optimizer
    # steps. Every save happens at a batch end: Lightning resumes mid-epoch state exactly from those, whereas
    # its epoch-end checkpoints resume into a confused epoch counter.
    last = out_dir / "checkpoints" / "last.ckpt"
    all_callbacks: list[Callback] = [CountResumedEpoch(), LastCheckpoint(last), StopOnSignal(last)]
    if checkpoint_every_n_steps:
        all_callbacks.append(StepCheckpoint(
            dirpath=out_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
            # top_k=1 without a monitor keeps the newest file; Lightning writes last.ckpt only on steps where
            # a top-k file was saved, so top_k=0 would never write it
            save_last=True, save_top_k=1, enable_version_counter=False,
            every_n_train_steps=int(checkpoint_every_n_steps)))
    all_callbacks.extend(callbacks)
    cfg = dict(trainer_cfg)
    progress = progress_callback(cfg)
    if progress is not None:
        all_callbacks.append(progress)
    single_console()  # Lightning is imported by now: its records go through the root logger only
    loggers = build_loggers(logger_cfg, out_dir, run_cfg)
    if loggers:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs: dict[str, Any] = {"default_root_dir": str(out_dir), "callbacks": all_callbacks,
                              "logger": loggers if loggers else False}
    if _under_slurm():
        kwargs["plugins"] = [SLURMEnvironment(auto_requeue=slurm_auto_requeue)]
    cfg.setdefault("_target_", "lightning.pytorch.Trainer")
    trainer = instantiate(cfg, **kwargs)
    if run_cfg is not None and trainer.loggers:
        log_run_config(trainer.loggers, run_cfg)
    return trainer
