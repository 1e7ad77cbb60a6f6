"""What the two training stages share after they have built their objects: fit (resuming), validate, export.

``train_sft`` and ``train_dpo`` read their config into a model, a LightningModule and a datamodule, then call
:func:`fit_and_export`, which returns a :class:`FitResult`; the stage adds what is its own (data counts, the
reference cache) to the summary it writes.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf
from torch import nn

from stllava_med.backbone import export_merged, has_bnb_layers, save_adapter
from stllava_med.schema import CheckpointSettings, ExportSettings
from stllava_med.training import BnbCpuGuard, build_trainer, close_loggers, resume_checkpoint
from stllava_med.utils.config import logger_names
from stllava_med.utils.runtime import exit_incomplete, signal_exit_code

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """One training stage's outcome: where it is, how far it got, its metrics and its exported weights."""

    stage: str
    out_dir: Path
    global_step: int
    epoch: int
    batches_per_epoch: int
    resumed_from: str | None
    fit_seconds: float
    train: dict[str, float] = field(default_factory=dict)   # train/<name> -> value (epoch aggregates)
    val: dict[str, float] = field(default_factory=dict)     # val/<name> -> value
    export: dict[str, Any] = field(default_factory=dict)    # adapter, merged (null when skipped), merged_skipped
    is_global_zero: bool = True
    trainer: Trainer | None = None

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "out_dir": str(self.out_dir), "global_step": self.global_step,
                "epoch": self.epoch, "batches_per_epoch": self.batches_per_epoch, "resumed_from": self.resumed_from,
                "fit_seconds": self.fit_seconds, "train": self.train, "val": self.val, "export": self.export}


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def split_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``prefix<name>`` entries of Lightning's callback metrics as ``{name: float}`` (epoch aggregates: the
    ``_epoch`` suffix dropped, per-step ``_step`` values left out)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            name = name[: -len("_epoch")] if name.endswith("_epoch") else name
            if name.endswith("_step"):
                continue
            out[name] = float(value)
    return dict(sorted(out.items()))


def export_weights(model: nn.Module, processor: Any, out_dir: Path, settings: ExportSettings) -> dict[str, Any]:
    """``<out_dir>/adapter`` always; ``<out_dir>/merged`` (full model + processor) when ``export.merged``. A 4-bit
    base cannot be merged here: the adapter is kept and the reason recorded."""
    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    model.eval()
    if settings.merged:
        try:
            export_merged(model, processor, merged_dir, adapter_dir=adapter_dir)
            return {"adapter": str(adapter_dir) if hasattr(model, "peft_config") else None, "merged": str(merged_dir)}
        except ValueError as err:
            log.warning("merged export skipped: %s", err)
            return {"adapter": str(adapter_dir), "merged": None, "merged_skipped": str(err)}
    save_adapter(model, processor, adapter_dir)
    return {"adapter": str(adapter_dir), "merged": None}


def fit_and_export(cfg: DictConfig, stage: str, module: LightningModule, datamodule: LightningDataModule, *,
                   model: nn.Module, processor: Any, out_dir: Path, callbacks: Iterable[Any] = (),
                   validate: bool = True, trainer_overrides: Mapping[str, Any] | None = None) -> FitResult:
    """Build the trainer from ``cfg.trainer`` / ``cfg.logger`` / ``cfg.checkpoint``, resume from the newest
    complete checkpoint a previous run of this config left (:func:`~stllava_med.training.resume_checkpoint`),
    fit, validate the final weights (``validate``), close the loggers and export (rank 0) per ``cfg.export``."""
    all_callbacks = list(callbacks)
    if has_bnb_layers(model):
        all_callbacks.insert(0, BnbCpuGuard())
    logger_cfg = plain(cfg.get("logger"))
    trainer_cfg = {**plain(cfg.trainer), **dict(trainer_overrides or {})}
    checkpoint = CheckpointSettings(**plain(cfg.get("checkpoint") or {}))
    trainer = build_trainer(trainer_cfg, out_dir, logger_cfg=logger_cfg, callbacks=all_callbacks,
                            checkpoint_every_n_steps=checkpoint.every_n_steps,
                            slurm_auto_requeue=bool(cfg.get("slurm_auto_requeue", False)), run_cfg=cfg)
    # the trainable names are fixed now, before anything (the DPO adapter-off pre-pass) toggles requires_grad
    trainable = module.trainable_names() if callable(getattr(module, "trainable_names", None)) else None
    ckpt = resume_checkpoint(out_dir, trainable)
    if ckpt:
        log.info("%s: resuming from %s", stage, ckpt)
    if ckpt and (out_dir / "metrics.json").is_file():
        # the logger is not part of the run directory's hash: logger=wandb on a finished run lands here
        names = logger_names(logger_cfg)
        log.warning("%s: %s is complete (metrics.json): training resumes at its last step, so no training "
                    "metric is logged%s; validation and the export run again. To train and log anew, give the "
                    "run another directory: out_dir=<elsewhere>", stage, out_dir,
                    f" to logger={','.join(names)}" if names else "")
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.interrupted:
        raise RuntimeError(f"{stage}: training was interrupted; rerun the same command to resume from {out_dir}")
    seconds = round(time.perf_counter() - started, 2)
    train = split_metrics(dict(trainer.callback_metrics), "train/")
    if validate:  # the final weights, after the last step (fit validates on its own schedule)
        # an explicit path: given none under SLURM, Lightning loads the newest hpc_ckpt_*.ckpt by itself (older
        # weights, or an incomplete file); last.ckpt holds the weights in memory (written when training ended)
        final = out_dir / "checkpoints" / "last.ckpt"
        results = trainer.validate(module, datamodule=datamodule, verbose=False,
                                   ckpt_path=str(final) if final.is_file() else None)
        val = split_metrics(results[0] if results else {}, "val/")
        if trainer.received_sigterm:
            # Lightning stops a validation at the next batch after SIGTERM, but not after its last one: the run
            # would export and end with status 0 although the scheduler is about to kill it
            exit_incomplete(stage, signal_exit_code(signal.SIGTERM),
                            f"stopped by SIGTERM during the final validation (training had finished; {final} holds "
                            "the final weights); nothing exported; rerun the same command to validate and export")
    else:
        val = split_metrics(dict(trainer.callback_metrics), "val/")
    close_loggers(trainer)
    export: dict[str, Any] = {}
    if trainer.is_global_zero:
        export = export_weights(model, processor, out_dir, ExportSettings(**plain(cfg.get("export") or {})))
    return FitResult(stage=stage, out_dir=out_dir, global_step=int(trainer.global_step),
                     epoch=int(trainer.current_epoch), batches_per_epoch=int(trainer.num_training_batches),
                     resumed_from=ckpt, fit_seconds=seconds, train=train, val=val, export=export,
                     is_global_zero=trainer.is_global_zero, trainer=trainer)
