"""Training plumbing shared by the SFT and DPO stages: optimizer groups, schedule, trainer, checkpoints.

One module per concern — :mod:`.optim`, :mod:`.checkpoints` (what a checkpoint holds, atomic saves, which one a
rerun resumes from), :mod:`.signals` (stopping on SIGTERM / SIGUSR1 / SIGUSR2 with a checkpoint, requeue),
:mod:`.progress` — and here what builds a Trainer from them (loggers, callbacks, the SLURM plugin).

Kept free of stage logic: LightningModules call :func:`param_groups` / :func:`cosine_with_warmup` from
``configure_optimizers``; entry points call :func:`build_trainer` and :func:`resume_checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from stllava_med.backbone import unpack_bnb_cpu_weights
from stllava_med.training.checkpoints import (
    CountResumedEpoch,
    LastCheckpoint,
    LocalCheckpointIO,
    StepCheckpoint,
    TrainableOnlyCheckpoints,
    checkpoint_candidates,
    checkpoint_problem,
    previous_path,
    remove_temp_debris,
    resume_checkpoint,
    save_checkpoint_atomically,
)
from stllava_med.training.optim import configure_adamw, cosine_with_warmup, param_groups
from stllava_med.training.progress import TextProgress, _under_slurm, progress_callback, step_progress_bar
from stllava_med.training.signals import StopOnSignal, slurm_requeue, stop_if_requested
from stllava_med.utils.config import flat_config, run_group, run_label
from stllava_med.utils.runtime import single_console

__all__ = [
    "BnbCpuGuard", "CountResumedEpoch", "LastCheckpoint", "LocalCheckpointIO", "StepCheckpoint", "StopOnSignal", "TextProgress",
    "TrainableOnlyCheckpoints", "build_loggers", "build_trainer", "checkpoint_candidates", "checkpoint_problem",
    "close_loggers", "configure_adamw", "cosine_with_warmup", "log_run_config", "param_groups", "previous_path",
    "progress_callback", "remove_temp_debris", "resume_checkpoint", "save_checkpoint_atomically", "slurm_requeue", "step_progress_bar",
    "stop_if_requested",
]

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

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
    # checkpoints are written in their own directory, never through $TMPDIR (LocalCheckpointIO)
    plugins: list[Any] = [LocalCheckpointIO()]
    if _under_slurm():
        plugins.append(SLURMEnvironment(auto_requeue=slurm_auto_requeue))
    kwargs["plugins"] = plugins
    cfg.setdefault("_target_", "lightning.pytorch.Trainer")
    trainer = instantiate(cfg, **kwargs)
    if run_cfg is not None and trainer.loggers:
        log_run_config(trainer.loggers, run_cfg)
    return trainer
