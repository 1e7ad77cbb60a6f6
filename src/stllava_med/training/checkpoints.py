"""Checkpoints: trainable-only state, atomic saves, the callbacks that write ``last.ckpt``, and which checkpoint a rerun resumes from."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from weakref import proxy

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from stllava_med.utils.io import fsync_dir, raise_if_disk_full

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Writing a checkpoint file
# --------------------------------------------------------------------------------------------------------------


def temp_name(path: Path) -> Path:
    """``last.ckpt`` -> ``.last.ckpt.tmp``: where a checkpoint is written before it is renamed (its own
    directory, so the rename never crosses a file system)."""
    return path.with_name(f".{path.name}.tmp")


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _raise_if_disk_full(err: BaseException, path: Path) -> None:
    """Raise :class:`DiskFull` naming the checkpoint ``path`` if ``err`` is a full disk (from ``err``)."""
    raise_if_disk_full(err, path, what=f"checkpoint {path} (the checkpoints already on disk are intact: free "
                                       "space and rerun the same command to resume from the newest)")


class LocalCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO without its detour through ``$TMPDIR``.

    Lightning (2.6) saves a local checkpoint through an fsspec transaction, whose local file is a
    ``tempfile.mkstemp()`` in ``$TMPDIR`` moved onto the destination when the transaction commits: with
    ``$TMPDIR`` on another file system (a node-local ``/tmp`` or ``/dev/shm``, ``out_dir`` on NFS / Lustre) that
    move is a copy, so a kill mid-copy leaves a torn file, the temp file stays in ``$TMPDIR`` and a small
    ``/tmp`` fails the save. Here the bytes go to ``.<name>.tmp`` in the destination's directory, are fsynced
    and renamed over it (a path that is already such a temp name is written as it is: the caller renames it).
    A full disk removes the temp file and raises :class:`~stllava_med.utils.io.DiskFull` naming the file.
    Remote URLs (``s3://``) keep Lightning's path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = Path(path)
        buffer = io.BytesIO()  # serialised first, as Lightning does: a failing pickle touches no file
        torch.save(checkpoint, buffer)
        path.parent.mkdir(parents=True, exist_ok=True)
        target = path if _is_temp(path) else temp_name(path)
        try:
            with open(target, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            if target != path:
                os.replace(target, path)
                fsync_dir(path.parent)
        except BaseException as err:
            target.unlink(missing_ok=True)
            _raise_if_disk_full(err, path)
            raise

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
# Trainer
# --------------------------------------------------------------------------------------------------------------


def save_checkpoint_atomically(trainer: Trainer, path: Path) -> Path:
    """``trainer.save_checkpoint`` with the full training state (optimizer, loops, callbacks: what resuming
    needs), written beside ``path`` (``.<name>.tmp``: the same file system, whatever ``$TMPDIR`` is; see
    :class:`LocalCheckpointIO`), fsynced and renamed over it: a job killed mid-write (SIGKILL after the
    scheduler's grace period) leaves the previous checkpoint, never a torn one. A write that fails (a full
    disk: :class:`~stllava_med.utils.io.DiskFull`, naming ``path``) removes the temp file and leaves the
    checkpoints on disk as they were. Collective under DDP, like Lightning's."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:  # only rank 0 writes (Lightning's checkpoint IO); save_checkpoint ends in a barrier
            with open(tmp, "rb") as fh:  # on disk before it replaces anything (a node that dies loses no checkpoint)
                os.fsync(fh.fileno())
            # the checkpoint it replaces stays as <name>.prev.ckpt (resume_checkpoint's fallback), unless it is this
            # process's own save of the same step (LastCheckpoint and StepCheckpoint both write last.ckpt at some
            # steps)
            if path.is_file() and _WRITTEN.get(str(path)) != trainer.global_step:
                _keep_previous(path)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            _WRITTEN[str(path)] = trainer.global_step
    except BaseException as err:
        if trainer.is_global_zero:
            tmp.unlink(missing_ok=True)
        _raise_if_disk_full(err, path)
        raise
    return path


_WRITTEN: dict[str, int] = {}  # checkpoint path -> the global step this process last wrote there


def previous_path(path: Path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    prev, link = previous_path(path), path.with_name(f".{path.name}.prev.tmp")
    link.unlink(missing_ok=True)
    try:
        try:
            os.link(path, link)  # a second name for the same file: ``path`` exists at every moment
        except OSError:  # a file system without hard links: copy it
            shutil.copyfile(path, link)
        os.replace(link, prev)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def remove_temp_debris(out_dir: Path) -> list[Path]:
    """Remove what a killed writer left in a run directory: ``checkpoints/.<name>.tmp`` (a checkpoint being
    written, or the second name of the one it replaced) and ``.<name>-*.tmp`` beside the exports and summaries
    (an export or a whole-file write being built). Only the process
    holding the run directory's lock calls this (a training stage resuming), so no writer is live. Returns the
    removed paths."""
    out_dir = Path(out_dir)
    folder = out_dir / "checkpoints"
    removed = []
    debris = [*sorted(folder.glob(".*.tmp"))] if folder.is_dir() else []
    if out_dir.is_dir():  # an export or a whole-file write (metrics.json) a kill interrupted
        debris += sorted(out_dir.glob(".*.tmp"))
    for path in debris:
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    if removed:
        log.warning("removed %d temp file(s) a killed write left: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


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
    remove_temp_debris(out_dir)
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


