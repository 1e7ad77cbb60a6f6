"""Stage 1: visual self-questioning instruction tuning.

    python -m stllava_med.train_sft                                   # tiny backbone, bundled VQA-RAD sample
    python -m stllava_med.train_sft 'data=[vqa_rad_train,slake_train]' data.fraction=0.25 seed=1
    python -m stllava_med.train_sft experiment=stllava_med_paper_stage1 data.sets.llava_med_instruct.path=...

Writes into the run directory: ``selected_ids.txt`` / ``val_ids.txt`` (which conversations trained and
validated), ``data_report.json``, ``checkpoints/`` (trainable tensors only; ``last.ckpt`` resumes),
``logs/`` (CSV / TensorBoard), ``adapter/`` (peft LoRA adapter + processor), ``merged/`` (full HF model +
processor that ``evaluate``, ``generate`` and ``train_dpo`` load by path) and ``metrics.json``. Rerunning the
same command resumes an interrupted run, or returns the summary of a finished one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stllava_med.data.vqa import dataset_specs
from stllava_med.schema import OptimSettings, SFTData, SFTSettings, StagePrompts
from stllava_med.utils import config as _config  # noqa: F401  (registers resolvers)
from stllava_med.utils.config import logger_names, stage_main
from stllava_med.utils.io import atomic_write_json, load_json
from stllava_med.utils.runtime import finish_run, objective, print_summary, start_run

# The stage's own modules load torch, transformers and Lightning: they are imported inside the functions that
# run it, so that start-up (--help, config composition and its errors) stays light and Hydra has set up
# logging first.

log = logging.getLogger("stllava_med.train_sft")

STAGE = "sft"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _finished_summary(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "metrics.json"
    if not path.is_file():
        return None
    summary = load_json(path)
    if summary.get("status") != "complete":
        return None
    merged = (summary.get("export") or {}).get("merged")
    if merged and not (Path(merged) / "config.json").is_file():
        return None  # the export went missing: run the (already trained) export again
    return summary


def load_sft_records(data: SFTData) -> tuple[list[Any], dict[str, Any]]:
    """Every selected dataset (``data.sets``) as conversations, plus the loaders' reports."""
    from stllava_med.data.instruct import check_unique, load_conversations

    records: list[Any] = []
    reports: dict[str, Any] = {}
    for name, spec in dataset_specs(data.sets).items():
        if data.on_bad_image == "skip":
            spec = {"on_missing_image": "skip", **spec}  # unless the set says otherwise
        conversations, report = load_conversations(
            name, spec, vqa_grouping=data.vqa_grouping, max_qa_per_conversation=data.max_qa_per_conversation)
        if data.on_bad_image == "skip":
            conversations = _drop_unreadable(conversations, report)
        reports[name] = {**report.to_json(), "conversations": len(conversations),
                         "pairs": sum(c.n_pairs for c in conversations)}
        log.info("%s: %d conversations, %d question/answer pairs", name, len(conversations),
                 reports[name]["pairs"])
        records.extend(conversations)
    check_unique(records)
    return records, reports


def _drop_unreadable(conversations: list[Any], report: Any) -> list[Any]:
    """``data.on_bad_image=skip``: decode every image once now, so that one corrupt file is a counted skip
    rather than a crash at its batch hours into training; a conversation whose image fails is dropped."""
    from stllava_med.data.vqa import ImageError, load_image

    bad: dict[str, str] = {}
    for image in dict.fromkeys(c.image for c in conversations):
        try:
            load_image(image)
        except ImageError as err:
            bad[image] = str(err)
    kept = []
    for conversation in conversations:
        if conversation.image in bad:
            report.skip("bad_image", f"{conversation.id}: {bad[conversation.image]}")
        else:
            kept.append(conversation)
    if bad:
        log.warning("%s: data.on_bad_image=skip: %d unreadable image(s), %d conversation(s) skipped (e.g. %s)",
                    report.source, len(bad), len(conversations) - len(kept), next(iter(bad.values())))
    return kept


def unfreeze_for_full_finetune(model: Any, *, train_vision: bool = False) -> int:
    """Full fine-tuning: every weight trains except the vision tower (unless ``train_vision``). For backbones
    whose base was never pretrained — the tiny one is randomly initialised — low-rank adapters cannot teach
    the model a vocabulary; pretrained backbones use LoRA as the paper does."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("sft.finetune=full cannot train a 4-bit/8-bit base; use sft.finetune=lora (QLoRA)")
    from stllava_med.families import family_of

    family = family_of(model)
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad = train_vision or not family.is_vision_parameter(name)
        count += param.numel() if param.requires_grad else 0
    return count


def run_train_sft(cfg: DictConfig, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train stage 1 from ``cfg`` (composed ``conf/sft.yaml``) and export; returns the run summary.

    ``callbacks`` are extra Lightning callbacks (tests use one to interrupt a run)."""
    from stllava_med.backbone import load_backbone
    from stllava_med.chat import ChatFormat
    from stllava_med.data.sft_datamodule import (
        SFTDataModule,
        SFTDataSettings,
        split_and_select,
        write_selection,
    )
    from stllava_med.prompts import with_system
    from stllava_med.sft.module import SFTModule
    from stllava_med.stage import fit_and_export

    out_dir = start_run(cfg, STAGE)
    finished = _finished_summary(out_dir)
    if finished is not None:
        loggers = logger_names(_plain(cfg.get("logger")))
        # the logger is not part of the run directory's hash: logger=wandb on a finished run lands here
        log.warning("sft: %s is complete: returning its results; nothing was trained%s. To train (and log) "
                    "again, give the run another directory: out_dir=<elsewhere> (or delete metrics.json there to "
                    "export again)", out_dir,
                    f" and nothing was logged to logger={','.join(loggers)}" if loggers else "")
        finish_run(out_dir, STAGE, finished)
        if cfg.get("print_summary", True):
            print_summary(f"train_sft — {out_dir} (finished before)", summary_rows(finished))
        return finished

    sft = SFTSettings.from_config(_plain(cfg.sft))
    optim = OptimSettings.from_config(_plain(cfg.optim))
    data = SFTDataSettings.from_config(_plain(cfg.data), sq_ratio=sft.sq_ratio, seed=int(cfg.get("seed") or 0))
    records, reports = load_sft_records(data)
    train, val = split_and_select(records, fraction=data.fraction, fraction_seed=data.fraction_seed,
                                  val_fraction=data.val_fraction, val_seed=data.fraction_seed)
    selection = write_selection(out_dir, train, val)
    atomic_write_json(out_dir / "data_report.json", {
        "datasets": reports, "loaded": len(records), "train": len(train), "val": len(val),
        "fraction": data.fraction, "train_pairs": sum(r.n_pairs for r in train), **selection})
    log.info("sft: %d training / %d validation conversations (fraction %s)", len(train), len(val), data.fraction)

    backbone = load_backbone(_plain(cfg.backbone), with_lora=sft.finetune == "lora",
                             gradient_checkpointing=sft.gradient_checkpointing)
    if sft.finetune == "full":
        unfreeze_for_full_finetune(backbone.model, train_vision=bool((cfg.backbone.get("lora") or {}).get("vision")))
    prompts = StagePrompts.from_config(_plain(cfg.get("prompts")))
    fmt = with_system(ChatFormat.from_config(_plain(cfg.backbone.get("chat"))), prompts.system)
    datamodule = SFTDataModule(train, val, backbone.processor, fmt, data)
    module = SFTModule(backbone.model, optim)
    result = fit_and_export(cfg, STAGE, module, datamodule, model=module.model, processor=backbone.processor,
                            out_dir=out_dir, callbacks=callbacks, validate=False,
                            trainer_overrides=None if val else {"limit_val_batches": 0})
    trainer = result.trainer
    assert trainer is not None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
    summary: dict[str, Any] = {
        "status": "complete", "stage": STAGE, "out_dir": str(out_dir), "backbone": backbone.name_or_path,
        "global_step": result.global_step, "epoch": result.epoch, "resumed_from": result.resumed_from,
        "train_conversations": len(train), "val_conversations": len(val), "sq_ratio": data.sq_ratio,
        "fraction": data.fraction, "fit_seconds": result.fit_seconds, "metrics": metrics,
        "train": result.train, "val": result.val, "export": result.export,
    }
    if result.is_global_zero:
        atomic_write_json(out_dir / "metrics.json", summary)
        log.info("sft: done in %.1fs, step %d, train loss %s -> %s", result.fit_seconds, result.global_step,
                 _short(metrics.get("train/loss")), result.export.get("merged") or result.export.get("adapter"))
    finish_run(out_dir, STAGE, summary)
    if result.is_global_zero and cfg.get("print_summary", True):
        print_summary(f"train_sft — {out_dir}", summary_rows(summary))
    return summary


def _short(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def summary_rows(summary: dict[str, Any]) -> dict[str, Any]:
    """The console summary of an SFT run."""
    rows: dict[str, Any] = {
        "backbone": summary.get("backbone"), "global step": summary.get("global_step"),
        "epoch (trainer.current_epoch)": summary.get("epoch"),
        "conversations (train / val)": f"{summary.get('train_conversations')} / {summary.get('val_conversations')}",
        "fit seconds": summary.get("fit_seconds"),
    }
    for key, value in sorted((summary.get("metrics") or {}).items()):
        if key.startswith(("train/", "val/")) and not key.endswith("_epoch"):
            rows[key] = value
    export = summary.get("export") or {}
    rows["adapter"] = export.get("adapter")
    rows["merged"] = export.get("merged") or export.get("merged_skipped")
    return rows


@stage_main("sft")
def main(cfg: DictConfig) -> float | None:
    summary = run_train_sft(cfg)
    return objective(cfg, STAGE, summary.get("metrics") or {})


if __name__ == "__main__":
    main()
