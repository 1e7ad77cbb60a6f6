"""Training plumbing shared by the SFT and DPO stages: optimizer groups, schedule, trainer, checkpoints.

Kept free of stage logic: LightningModules call :func:`param_groups` / :func:`cosine_with_warmup` from
``configure_optimizers``; entry points call :func:`build_trainer` and :func:`resume_checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from weakref import proxy

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

    def trainable_names(self) -> frozenset[str]:
        """The names of the trainable parameters, fixed the first time they are asked for (by
        :func:`~stllava_med.stage.fit_and_export` before fitting and by :class:`LastCheckpoint` at fit start).
        ``requires_grad`` at save time cannot be trusted: peft's ``disable_adapter`` (the DPO adapter-off
        reference, its pre-pass included) turns it off on every adapter tensor for the length of a pass, and a
        checkpoint saved then held no tensor at all."""
        names = getattr(self, "_trainable_names", None)
        if names is None:
            names = frozenset(n for n, p in self.named_parameters() if p.requires_grad)  # type: ignore[attr-defined]
            self._trainable_names = names
        return names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_names()
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        missing = trainable - set(state)
        if missing:  # never write a checkpoint that cannot be resumed
            raise RuntimeError(f"refusing to save a checkpoint without {len(missing)} of the {len(trainable)} "
                               f"trainable tensors, e.g. {sorted(missing)[:3]}")
        checkpoint["state_dict"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trainable_names() - set(checkpoint["state_dict"])
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
        with open(tmp, "rb") as fh:  # on disk before it replaces anything (a node that dies loses no checkpoint)
            os.fsync(fh.fileno())
        # the checkpoint it replaces stays as <name>.prev.ckpt (resume_checkpoint's fallback), unless it is this
        # process's own save of the same step (LastCheckpoint and StepCheckpoint both write last.ckpt at some steps)
        if path.is_file() and _WRITTEN.get(str(path)) != trainer.global_step:
            _keep_previous(path)
        os.replace(tmp, path)
        _WRITTEN[str(path)] = trainer.global_step
    return path


_WRITTEN: dict[str, int] = {}  # checkpoint path -> the global step this process last wrote there


def previous_path(path: Path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    prev, link = previous_path(path), path.with_name(f".{path.name}.prev.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)  # a second name for the same file: ``path`` exists at every moment
    except OSError:  # a file system without hard links: copy it
        import shutil

        shutil.copyfile(path, link)
    os.replace(link, prev)


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

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # Lightning's ModelCheckpoint writes in place: a job killed mid-write would leave a torn last.ckpt
        save_checkpoint_atomically(trainer, Path(filepath))
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class LastCheckpoint(Callback):
    """Writes ``last.ckpt`` after the last batch of each epoch and when training ends."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._saved_step = -1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before the module's own on_fit_start (the DPO reference pre-pass switches adapters off)
        record = getattr(pl_module, "trainable_names", None)
        if callable(record):
            record()

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
    the same step. SIGTERM is always ours, composed with Lightning's notifier and with a handler that was there
    before; SIGUSR1 is left alone when another handler has it.

    **Requeue signals** (docs/clusters.md, "Preemption and requeue") are taken too, so that the checkpoint comes
    first and the requeue second: Lightning's SLURM requeue signal (``slurm_auto_requeue=true`` under SLURM; its
    own handler would save ``hpc_ckpt_*.ckpt`` from inside the signal handler, mid-step) — we save ``last.ckpt``
    at the step and run ``scontrol requeue <job>`` (rank 0); and submitit's (SIGUSR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL``), whose handler requeues and exits at once — it is called after our checkpoint.
    During the DPO reference pre-pass (before any step) the stop comes at the next batch of the pre-pass
    (:func:`stop_if_requested`), writes no checkpoint (the cache keeps what it computed) and requeues the same way.
    A signal outside training (export, the final validation) ends the process as the handler before ours would
    have: by default, killed by the signal (status 143 / 138 too). A stop Lightning raises itself
    (``SIGTERMException`` — in the middle of a gradient accumulation or of a validation pass) gets the same
    checkpoint, log line and exit status."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    current: StopOnSignal | None = None  # the instance of the fit in progress (for stop_if_requested)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.received: str | None = None  # name of the first signal received during training
        self.stopped_at: int | None = None  # global step of the stop checkpoint
        self._previous: dict[int, Any] = {}
        self._active = False
        self._pid = os.getpid()
        self._step_at_batch_start = -1
        self._requeue: dict[int, str] = {}  # signum -> "scontrol" (ours, for Lightning's SLURM env) | "submitit"
        self._received_signum: int | None = None
        self._trainer: Trainer | None = None
        self._before_training = False  # from fit start to the first training batch

    # -- handlers -------------------------------------------------------------------------------------------------

    @staticmethod
    def _requeue_signal(trainer: Trainer) -> int | None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return int(environment.requeue_signal or signal.SIGUSR1)
        return None

    @staticmethod
    def _is_submitit_requeue(handler: Any) -> bool:
        """submitit's ``SignalHandler.checkpoint_and_try_requeue`` (what a submitit job has on its preemption
        signal): it dumps the job's resubmission, requeues and exits at once."""
        owner = getattr(handler, "__self__", None)
        return (getattr(handler, "__name__", "") == "checkpoint_and_try_requeue"
                and type(owner).__module__.startswith("submitit."))

    def _install(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (Lightning skips them too)
        requeue = self._requeue_signal(trainer)
        self._pid = os.getpid()
        self._requeue = {}
        owned: list[str] = []
        signums = [int(getattr(signal, name)) for name in (*self.SIGNALS, "SIGUSR2")]
        if requeue is not None and requeue not in signums:
            signums.append(requeue)
        for signum in signums:
            name = signal.Signals(signum).name
            current = signal.getsignal(signum)
            previous = self._previous.get(signum, current) if current == self._handle else current
            if signum != signal.SIGTERM:
                if self._is_submitit_requeue(previous):
                    self._requeue[signum] = "submitit"
                elif signum == requeue:
                    self._requeue[signum] = "scontrol"  # instead of Lightning's handler (it saves mid-step)
                elif current not in (signal.SIG_DFL, None) and current != self._handle:
                    log.debug("%s already has a handler (%r): left to it", name, current)
                    continue
                elif name not in self.SIGNALS:
                    continue
            if current != self._handle:  # a second fit with this callback: keep the handler from before ours
                self._previous[signum] = current
            signal.signal(signum, self._handle)
            then = {"submitit": ", then submitit's requeue", "scontrol": ", then scontrol requeue"}.get(
                self._requeue.get(signum, ""), "")
            owned.append(f"{name} → exit {signal_exit_code(signum)}{then}")
        self._active = True
        self._trainer = trainer
        StopOnSignal.current = self
        if owned:
            log.info("on %s: a checkpoint at the next optimizer step (%s), then stop", "; ".join(owned), self.path)

    def _restore(self) -> None:
        self._active = False
        self._trainer = None
        if StopOnSignal.current is self:
            StopOnSignal.current = None
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
            self._received_signum = signum
            log.warning("received %s: stopping after the current optimizer step, with a checkpoint in %s "
                        "(exit %d)%s", name, self.path, signal_exit_code(signum),
                        ", then requeueing" if signum in self._requeue else "")
        else:
            log.warning("received %s: already stopping (on %s)", name, self.received)
            if signum in self._requeue and self._received_signum not in self._requeue:
                self._received_signum = signum  # a requeue signal after a SIGTERM: still requeue
        if callable(previous) and signum not in self._requeue:
            previous(signum, frame)  # a handler that was there before (e.g. submitit's SIGTERM logger)
        if self._before_training and signum in self._requeue and self._trainer is not None:
            # the job ends soon (SLURM's --signal lead time): a pre-pass (DPO reference / vision cache) may not
            # reach a training step before it does. Nothing is lost by stopping here: no step has run, the loop
            # state is not restored yet (no checkpoint to write; those on disk stay) and the pre-pass caches keep
            # every entry appended so far (an append is one write; the claims are released on the way out).
            self._active = False
            raise self._stop(self._trainer, save=False, where=" (before the first training step: a pre-pass, "
                                                              "restoring or the sanity check)")

    # -- the stop -------------------------------------------------------------------------------------------------

    def _exit_code(self) -> int:
        return signal_exit_code(getattr(signal, self.received or "SIGTERM"))

    def _message(self, trainer: Trainer, where: str = "", saved: bool = True) -> str:
        total = f" of {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        at = "" if self._before_training else f" at step {trainer.global_step}{total}"
        written = f"checkpoint {self.path}" if saved else "no checkpoint written (those on disk stay)"
        return f"stopped by {self.received or 'SIGTERM'}{at}{where}; {written}; rerun the same command to resume"

    def _stop(self, trainer: Trainer, *, save: bool = True, where: str = "") -> StageStopped:
        if save:
            save_checkpoint_atomically(trainer, self.path)
        self.stopped_at = trainer.global_step
        message = self._message(trainer, where, saved=save)
        log.warning("%s (exit %d)", message, self._exit_code())
        self._hand_over_requeue(trainer)
        return StageStopped(self._exit_code(), message)

    def _hand_over_requeue(self, trainer: Trainer) -> None:
        """After the checkpoint: requeue when the signal was a requeue signal."""
        signum = self._received_signum
        how = self._requeue.get(signum) if signum is not None else None
        if how == "scontrol":
            if trainer.is_global_zero:
                slurm_requeue()
        elif how == "submitit":
            handler = self._previous.get(signum)
            log.info("handing over to submitit's requeue handler")
            handler(signum, None)  # rank 0: dumps the resubmission, requeues, exits (SystemExit); others return

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before Lightning registers its own handlers (trainer._run): it composes its SIGTERM notifier with ours,
        # and registers its SLURM requeue handler only on a signal that has none
        self.received = None
        self.stopped_at = None
        self._received_signum = None
        self._before_training = True
        self._install(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._before_training = False

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
            if requested and self._requeue:  # rank 0 requeues if any rank got a requeue signal
                wanted = trainer.strategy.reduce_boolean_decision(self._received_signum in self._requeue, all=False)
                if wanted and self._received_signum not in self._requeue:
                    self._received_signum = next(iter(self._requeue))
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


def stop_if_requested(where: str) -> None:
    """For work a fit does before its first training step (the DPO reference pre-pass, between two of its
    batches): when the fit in progress got a stop signal, stop now — no checkpoint (the loop state is not even
    restored yet; what is on disk stays), the requeue if it was a requeue signal, and the stop's exit status
    (:class:`StopOnSignal`). Nothing happens outside a fit or before a signal."""
    callback = StopOnSignal.current
    trainer = callback._trainer if callback is not None else None
    if callback is None or trainer is None or callback.received is None or not callback._active:
        return
    callback._active = False
    raise callback._stop(trainer, save=False, where=where)


def slurm_requeue() -> int:
    """``scontrol requeue <job>`` for this SLURM job (``<array job>_<task>`` in an array), as Lightning's SLURM
    plugin does; its status (a failure is logged, not raised: the job still stops, resumable by hand)."""
    import subprocess

    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID", "")
    if not job:
        log.error("no SLURM_JOB_ID: cannot requeue; resubmit the same command to resume")
        return 1
    try:
        status = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        log.error("scontrol is not on PATH: SLURM job %s not requeued; resubmit the same command to resume", job)
        return 127
    if status == 0:
        log.warning("requeued SLURM job %s: it resumes from its newest complete checkpoint", job)
    else:
        log.error("scontrol requeue %s failed (status %d): resubmit the same command to resume", job, status)
    return status


# --------------------------------------------------------------------------------------------------------------
# Which checkpoint a rerun resumes from
# --------------------------------------------------------------------------------------------------------------

_RESUMABLE_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step", "epoch")


def checkpoint_candidates(out_dir: Path) -> list[Path]:
    """The checkpoints a run directory can hold: ``checkpoints/last.ckpt`` and the one it replaced
    (``last.prev.ckpt``), the step checkpoints, and Lightning's ``hpc_ckpt_<n>.ckpt`` (its SLURM auto-requeue
    checkpoints, in the run directory itself)."""
    out_dir = Path(out_dir)
    folder = out_dir / "checkpoints"
    paths = [folder / "last.ckpt", folder / "last.prev.ckpt", *sorted(folder.glob("step*.ckpt")),
             *sorted(out_dir.glob("hpc_ckpt_*.ckpt"))]
    return [p for p in paths if p.is_file()]


def checkpoint_problem(path: Path, trainable: Iterable[str] | None = None) -> tuple[str | None, int]:
    """Why ``path`` cannot be resumed from (None: it can) and its global step (-1 when unreadable). Complete
    means: a readable file (a truncated one is not), the training state (optimizer, schedulers, loops, step)
    and, with ``trainable``, every trainable tensor."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a torn zip, a truncated pickle, an empty file
        return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", -1
    if not isinstance(checkpoint, dict):
        return "not a Lightning checkpoint", -1
    step = int(checkpoint.get("global_step", -1)) if isinstance(checkpoint.get("global_step"), int) else -1
    absent = [key for key in _RESUMABLE_KEYS if key not in checkpoint]
    if absent:
        return f"no {', '.join(absent)} (weights only?)", step
    loops = checkpoint["loops"] or {}
    if "fit_loop" not in loops or not checkpoint["optimizer_states"]:
        return "no loop or optimizer state", step
    if trainable is not None:
        names = set(trainable)
        missing = names - set(checkpoint["state_dict"] or {})
        if missing:
            return f"lacks {len(missing)} of the {len(names)} trainable tensors, e.g. {sorted(missing)[:2]}", step
    return None, step


def resume_checkpoint(out_dir: Path, trainable: Iterable[str] | None = None) -> str | None:
    """The newest complete checkpoint a previous run of this config left (:func:`checkpoint_candidates`,
    newest by global step, then by modification time), or None. Incomplete ones (:func:`checkpoint_problem`)
    are skipped with a warning, so a torn or empty ``last.ckpt`` falls back to ``last.prev.ckpt`` or a step
    checkpoint. Lightning resumes from an ``hpc_ckpt_*.ckpt`` by itself whenever it is given no path under SLURM:
    when none is complete and this returns None, the incomplete ones are renamed ``hpc-ckpt-<n>.incomplete.ckpt``
    so that it cannot."""
    names = frozenset(trainable) if trainable is not None else None
    complete: list[tuple[int, float, Path]] = []
    for path in checkpoint_candidates(out_dir):
        problem, step = checkpoint_problem(path, names)
        if problem is None:
            complete.append((step, path.stat().st_mtime, path))
        else:
            log.warning("not resuming from %s (step %s): %s", path, step if step >= 0 else "?", problem)
    if not complete:
        for path in Path(out_dir).glob("hpc_ckpt_*.ckpt"):
            aside = path.with_name(path.name.replace("hpc_ckpt_", "hpc-ckpt-").replace(".ckpt", ".incomplete.ckpt"))
            with contextlib.suppress(FileNotFoundError):  # another rank did it
                os.replace(path, aside)
                log.warning("renamed the incomplete %s to %s (Lightning would load it by itself)", path, aside)
        return None
    step, _, best = max(complete, key=lambda item: (item[0], item[1]))
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    if best != last and last.is_file():
        log.warning("resuming from %s (step %d), the newest complete checkpoint, not %s", best, step, last)
    return str(best)


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
