"""DPO of the policy LVLM on preference pairs against a frozen reference (STLLaVA-Med stage 2b).

    python -m stllava_med.train_dpo                                   # tiny backbone, bundled VQA-RAD pairs
    python -m stllava_med.train_dpo experiment=stllava_med_paper backbone=llava15_7b \\
        backbone.name_or_path=<stage-1 export> data.path='data/pairs/round0/*.jsonl' trainer=gpu
    python -m stllava_med.train_dpo -m dpo.beta=0.05,0.1,0.5 data.fraction=0.09,0.25,0.5,1.0 dpo.reference=precomputed

The run directory is a function of the config (``logs/runs/dpo/<run_name>-<hash>`` or ``out_dir=``):
rerunning a command resumes from its ``checkpoints/last.ckpt``. It ends with ``adapter/`` (the LoRA adapter,
``save_pretrained``), ``merged/`` (full model + processor for ``AutoModelForImageTextToText`` /
``AutoProcessor`` / vLLM), ``metrics.json``, ``selected_ids.txt``, ``val_ids.txt``, ``data_summary.json`` and the
logger output under ``logs/``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stllava_med.schema import DPOSettings, OptimSettings, PreferenceDataSettings, StagePrompts
from stllava_med.utils import config as _config  # noqa: F401  (registers resolvers)
from stllava_med.utils.config import stage_main
from stllava_med.utils.io import atomic_write_json
from stllava_med.utils.runtime import finish_run, objective, print_summary, start_run

# The stage's own modules load torch, transformers and Lightning: they are imported inside the functions that
# run it, so that start-up (--help, config composition and its errors) stays light and Hydra has set up
# logging first.

log = logging.getLogger("stllava_med.train_dpo")


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def build_vision_cache(cfg: DictConfig, backbone: Any, datamodule: Any) -> Any:
    """The vision feature cache (``dpo.vision_cache_dir``; :mod:`stllava_med.dpo.vision_cache`), or None."""
    dpo = DPOSettings.from_config(_container(cfg.dpo))
    if not dpo.vision_cache_dir:
        return None
    from stllava_med.dpo.vision_cache import build_cached_vision

    # a copy reference (or a precomputed one computed by a copy) encodes the pixels itself: they stay in the batch
    copy_source = dpo.reference == "copy" or (dpo.reference == "precomputed" and dpo.precompute_source == "copy")
    batch_size = int(dpo.precompute_batch_size or datamodule.settings.val_batch_size or datamodule.settings.batch_size)
    return build_cached_vision(str(dpo.vision_cache_dir), backbone.model, datamodule, dtype=dpo.vision_cache_dtype,
                               skip_pixels=not copy_source, batch_size=batch_size,
                               progress=datamodule.settings.progress)


def build_reference(cfg: DictConfig, backbone: Any, datamodule: Any, vision: Any = None) -> Any:
    """The reference object for ``dpo.reference`` (see :mod:`stllava_med.dpo.reference`); ``vision``: the vision
    feature cache, whose rounding (when it is lossy) the precomputed reference's key records."""
    from stllava_med.backbone import load_backbone
    from stllava_med.data.pairs.scan import processor_fingerprint
    from stllava_med.dpo.reference import (
        REFERENCE_MODES,
        AdapterOffReference,
        CopyReference,
        PrecomputedReference,
        ReferenceCache,
        reference_fingerprint,
    )

    dpo = DPOSettings.from_config(_container(cfg.dpo))
    mode = dpo.reference
    if mode not in REFERENCE_MODES:
        raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, not {mode!r}")
    prefix_sharing = dpo.prefix_sharing
    backbone_cfg = _container(cfg.backbone)
    reference_path = str(dpo.reference_path or backbone_cfg["name_or_path"])

    def copy_reference() -> CopyReference:
        ref_cfg = {**backbone_cfg, "name_or_path": reference_path, "adapter_path": None}
        ref_cfg["lora"] = {**dict(ref_cfg.get("lora") or {}), "enabled": False}
        return CopyReference(load_backbone(ref_cfg, with_lora=False).model, prefix_sharing=prefix_sharing)

    if mode == "adapter_off":
        if dpo.reference_path:
            raise ValueError("dpo.reference_path is for copy / precomputed (source=copy); adapter_off uses the base")
        return AdapterOffReference(backbone.model, prefix_sharing=prefix_sharing)
    if mode == "copy":
        return copy_reference()

    source_mode = dpo.precompute_source
    if source_mode == "adapter_off":
        source: Any = AdapterOffReference(backbone.model, prefix_sharing=prefix_sharing)
        weights_path = str(backbone_cfg["name_or_path"])
    elif source_mode == "copy":
        source = copy_reference()
        weights_path = reference_path
    else:
        raise ValueError(f"dpo.precompute_source must be adapter_off or copy, not {source_mode!r}")
    if not dpo.reference_cache_dir:
        raise ValueError("dpo.reference=precomputed needs dpo.reference_cache_dir (where the log-probs are cached)")
    root = Path(str(dpo.reference_cache_dir))
    load_settings = {k: backbone_cfg.get(k) for k in ("dtype", "quantization", "bnb_compute_dtype", "attn_implementation")}
    if vision is not None and not vision.lossless and source_mode == "adapter_off":  # it reads the rounded features
        load_settings["vision_features"] = vision.cache.key_parts["dtype"]
    fingerprint = reference_fingerprint(weights_path, settings=load_settings,
                                        model=getattr(source, "model", None) or backbone.model,
                                        memo_path=root / "weight_hashes.json")
    cache = ReferenceCache(root, data_fingerprint=datamodule.data_fingerprint, reference=fingerprint,
                           processor=processor_fingerprint(datamodule.processor, datamodule.fmt,
                                                           datamodule.settings.image_aspect_ratio),
                           max_length=datamodule.settings.max_length)
    batch_size = int(dpo.precompute_batch_size or datamodule.settings.val_batch_size
                     or datamodule.settings.batch_size)
    return PrecomputedReference(
        cache, source, datamodule.digests,
        lambda ids, rank, world: datamodule.reference_batches(ids, rank=rank, world_size=world, batch_size=batch_size),
        batch_size=batch_size, progress=datamodule.settings.progress,
    )


def run_train_dpo(cfg: DictConfig, *, callbacks: Iterable[Any] = (), out_dir: Path | None = None) -> dict[str, Any]:
    """Train, validate, export. Returns (and writes to ``<out_dir>/metrics.json``) the final metrics.

    ``callbacks`` are extra Lightning callbacks (tests use one to simulate a crash)."""
    from stllava_med.backbone import load_backbone
    from stllava_med.chat import ChatFormat
    from stllava_med.data.pairs.datamodule import PreferenceDataModule
    from stllava_med.dpo.module import DPOModule
    from stllava_med.prompts import with_system
    from stllava_med.stage import fit_and_export

    out_dir = out_dir or start_run(cfg, "dpo")
    settings = DPOSettings.from_config(_container(cfg.dpo))
    optim = OptimSettings.from_config(_container(cfg.optim))
    data_settings = PreferenceDataSettings.from_config(_container(cfg.data))
    backbone_cfg = _container(cfg.backbone)
    backbone = load_backbone(backbone_cfg, with_lora=True, gradient_checkpointing=settings.gradient_checkpointing)
    prompts = StagePrompts.from_config(_container(cfg.get("prompts")))
    fmt = with_system(ChatFormat.from_config(backbone_cfg.get("chat")), prompts.system)
    datamodule = PreferenceDataModule(data_settings, backbone.processor, fmt, out_dir=out_dir)
    datamodule.setup("fit")  # the scan decides the pairs, and the precomputed reference is keyed by them
    vision = build_vision_cache(cfg, backbone, datamodule)
    reference = build_reference(cfg, backbone, datamodule, vision)
    module = DPOModule(backbone.model, reference, settings, optim, projector_modules=optim.projector_modules,
                       vision_cache=vision)
    result = fit_and_export(cfg, "dpo", module, datamodule, model=backbone.model, processor=backbone.processor,
                            out_dir=out_dir, callbacks=callbacks, validate=bool(datamodule.val_entries))
    summary = {
        "train": result.train, "val": result.val, "global_step": result.global_step,
        "batches_per_epoch": result.batches_per_epoch, "reference": settings.reference,
        "pairs": {"train": len(datamodule.train_entries), "val": len(datamodule.val_entries),
                  "skipped": datamodule.summary["scan"]["skipped"]},
        "export": result.export, "fit_seconds": result.fit_seconds, "resumed_from": result.resumed_from,
    }
    if getattr(reference, "computed", None) is not None:
        summary["reference_cache"] = {"dir": str(reference.cache.dir), "computed_now": reference.computed}
    if vision is not None:
        summary["vision_cache"] = {"dir": str(vision.cache.dir), "images": len(vision.items),
                                   "computed_now": vision.computed, "dtype": vision.cache.key_parts["dtype"]}
    if result.is_global_zero:
        atomic_write_json(out_dir / "metrics.json", summary)
        finish_run(out_dir, "dpo", {"metrics": summary})
        log.info("dpo: done, step %d, %s", result.global_step, _headline(result.val or result.train,
                                                                         "val" if result.val else "train"))
        if cfg.get("print_summary", True):
            print_summary(f"train_dpo — {out_dir}", summary_rows(summary))
    return summary


# Metrics shown in the console summary (all of them are in metrics.json); substrings of the logged names.
_HEADLINE = ("loss", "rewards/acc", "rewards/margin", "logps/chosen_per_token", "pairs_per_s")


def _headline(metrics: dict[str, float], prefix: str) -> str:
    shown = [(k, v) for k, v in metrics.items() if any(h in k for h in _HEADLINE[:3])]
    return ", ".join(f"{prefix}/{k} {v:.4g}" for k, v in shown) or "no metrics"


def summary_rows(summary: dict[str, Any]) -> dict[str, Any]:
    """The console summary of a DPO run: where it is, what it trained on, its headline metrics."""
    rows: dict[str, Any] = {"global step": summary["global_step"], "reference": summary["reference"],
                            "pairs (train / val)": f"{summary['pairs']['train']} / {summary['pairs']['val']}"}
    for split in ("train", "val"):
        for key, value in summary[split].items():
            if any(h in key for h in _HEADLINE):
                rows[f"{split}/{key}"] = value
    export = summary.get("export") or {}
    rows["adapter"] = export.get("adapter")
    rows["merged"] = export.get("merged") or export.get("merged_skipped")
    return rows


def objective_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``train/<name>`` and ``val/<name>``: what ``objective=`` can name."""
    return {f"{split}/{k}": v for split in ("train", "val") for k, v in (summary.get(split) or {}).items()}


@stage_main("dpo")
def main(cfg: DictConfig) -> float | None:
    summary = run_train_dpo(cfg)
    return objective(cfg, "dpo", objective_metrics(summary))


if __name__ == "__main__":
    main()
