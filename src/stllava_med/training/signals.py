"""Honest endings: SIGTERM / SIGUSR1 / submitit's SIGUSR2 stop a fit at the next optimizer step with a checkpoint (and requeue on SLURM)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stllava_med.training.checkpoints import save_checkpoint_atomically
from stllava_med.utils.runtime import StageStopped, signal_exit_code

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

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


