"""Zero-shot medical VQA evaluation.

    python -m stllava_med.evaluate backbone=tiny data=vqa_rad_sample
    python -m stllava_med.evaluate backbone=llava15_7b 'data=[vqa_rad,slake]' eval.batch_size=16
    python -m stllava_med.evaluate backbone.name_or_path=<exported dir> data=pathvqa

Writes, per dataset, ``<out_dir>/<dataset>/{predictions.jsonl, metrics.json, table.md}`` and, for the run,
``<out_dir>/metrics.json`` and ``<out_dir>/table.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stllava_med.data.vqa import dataset_specs, load_vqa
from stllava_med.schema import EvalSettings, StagePrompts
from stllava_med.utils import config as _config  # noqa: F401  (registers resolvers)
from stllava_med.utils.config import stage_main
from stllava_med.utils.io import atomic_write_json, atomic_write_text
from stllava_med.utils.runtime import finish_run, objective, print_summary, start_run

# The stage's own modules load torch, transformers and Lightning: they are imported inside the functions that
# run it, so that start-up (--help, config composition and its errors) stays light and Hydra has set up
# logging first.

log = logging.getLogger("stllava_med.evaluate")


def run_evaluate(cfg: DictConfig, out_dir: Path | None = None) -> dict[str, Any]:
    from stllava_med.backbone import load_backbone, pick_device
    from stllava_med.chat import ChatFormat
    from stllava_med.eval.vqa import evaluate_dataset, markdown_table
    from stllava_med.prompts import with_system

    out_dir = out_dir or start_run(cfg, "evaluate")
    specs = dataset_specs(cfg.data.sets)
    settings = EvalSettings.from_config(OmegaConf.to_container(cfg.eval, resolve=True))
    loaded = {}
    for name, spec in specs.items():  # load (and validate) every dataset before spending time on a model
        records, report = load_vqa(spec)
        loaded[name] = (records, report)
        log.info("%s: %d questions (%s)", name, len(records), report.to_json()["skipped"] or "none skipped")
    backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), with_lora=False)
    if not cfg.backbone.get("quantization"):
        backbone.model.to(pick_device(cfg.get("device")))
    prompts = StagePrompts.from_config(OmegaConf.to_container(cfg.prompts, resolve=True) if cfg.get("prompts") else None)
    fmt = with_system(ChatFormat.from_config(cfg.backbone.get("chat")), prompts.system)
    results: dict[str, dict[str, Any]] = {}
    for name, (records, report) in loaded.items():
        results[name] = evaluate_dataset(
            backbone, records, fmt, out_dir / name, name=name,
            batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
            on_bad_image=settings.on_bad_image, progress=settings.progress,
            image_aspect_ratio=settings.image_aspect_ratio,
            extra={"load_report": report.to_json(), "backbone": backbone.name_or_path},
        )
    atomic_write_json(out_dir / "metrics.json", results)
    table = markdown_table(results)
    atomic_write_text(out_dir / "table.md", table)
    if cfg.get("print_table", True):
        print(f"\nZero-shot VQA — {backbone.name_or_path}\n\n{table}")
        print_summary(f"evaluate — {out_dir}", summary_rows(results, backbone.name_or_path))
    finish_run(out_dir, "evaluate", {"metrics": results})
    return results


HEADLINE = ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno", "closed_accuracy_strict", "n_open",
            "n_closed")


def summary_rows(results: dict[str, dict[str, Any]], backbone: str) -> dict[str, Any]:
    """The console summary of an evaluation: per dataset, the LLaVA-Med metrics."""
    rows: dict[str, Any] = {"backbone": backbone}
    for name, metrics in results.items():
        for key in (*HEADLINE, "questions_per_s"):
            rows[f"{name}/{key}"] = metrics.get(key)
    return rows


def objective_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``objective=`` can name: ``<dataset>/<metric>`` for every dataset, and the bare ``<metric>`` of the
    first dataset (``objective=closed_accuracy``)."""
    flat: dict[str, Any] = {}
    for index, (name, metrics) in enumerate(results.items()):
        for key, value in metrics.items():
            flat[f"{name}/{key}"] = value
            if index == 0:
                flat[key] = value
    return flat


@stage_main("evaluate")
def main(cfg: DictConfig) -> float | None:
    results = run_evaluate(cfg)
    return objective(cfg, "evaluate", objective_metrics(results))


if __name__ == "__main__":
    main()
