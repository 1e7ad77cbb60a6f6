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
    """Evaluate ``cfg.backbone`` on every dataset of ``cfg.data``; the metrics per dataset.

    With ``eval.num_shards = n > 1`` this process is shard ``eval.shard_index``: it writes its predictions under
    ``<out_dir>/shards/shard-<i>-of-<n>/<dataset>/`` and, if every other shard has finished, merges and scores
    them into ``out_dir``; until then it returns ``{}``. ``eval.merge_only=true`` only merges."""
    from stllava_med.eval.vqa import markdown_table
    from stllava_med.utils import sharding
    from stllava_med.utils.config import config_fingerprint
    from stllava_med.utils.io import stable_hash

    out_dir = out_dir or start_run(cfg, "evaluate")
    specs = dataset_specs(cfg.data.sets)
    settings = EvalSettings.from_config(OmegaConf.to_container(cfg.eval, resolve=True))
    index, n = sharding.this_shard(settings, out_dir, "eval")
    loaded = {}
    for name, spec in specs.items():  # load (and validate) every dataset before spending time on a model
        records, report = load_vqa(spec)
        loaded[name] = (records, report)
        log.info("%s: %d questions (%s)", name, len(records), report.to_json()["skipped"] or "none skipped")
    sharding.check_layout(out_dir, n, config_fingerprint(cfg), where="eval",
                          single_output=any((out_dir / name / "predictions.jsonl").is_file() for name in loaded))
    if n == 1:
        results = _predict(cfg, settings, loaded, out_dir, (0, 1))
    else:
        work = stable_hash({"batch_size": settings.batch_size,
                            "datasets": {name: [r.id for r in records] for name, (records, _) in loaded.items()}})
        if not settings.merge_only:
            stats = _predict(cfg, settings, loaded, sharding.shard_dir(out_dir, index, n), (index, n))
            sharding.mark_done(out_dir, index, n, {"work": work, "datasets": stats})
        results = _merge_evaluated(out_dir, loaded, n, work, must=settings.merge_only)
        if results is None:
            finish_run(out_dir, "evaluate", {"shard_index": index, "num_shards": n, "merged": False})
            return {}
    atomic_write_json(out_dir / "metrics.json", results)
    table = markdown_table(results)
    atomic_write_text(out_dir / "table.md", table)
    model = str(next(iter(results.values()), {}).get("backbone"))
    if cfg.get("print_table", True):
        print(f"\nZero-shot VQA — {model}\n\n{table}")
        print_summary(f"evaluate — {out_dir}", summary_rows(results, model))
    finish_run(out_dir, "evaluate", {"metrics": results})
    return results


def _predict(cfg: DictConfig, settings: EvalSettings, loaded: dict[str, Any], out_dir: Path,
             shard: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """Load the model and answer ``shard``'s batches of every dataset under ``out_dir/<dataset>/``: the metrics
    per dataset (one process), or each dataset's run statistics (a shard, which scores nothing)."""
    from stllava_med.backbone import load_backbone, pick_device
    from stllava_med.chat import ChatFormat
    from stllava_med.eval.vqa import predict, write_dataset_results
    from stllava_med.prompts import with_system
    from stllava_med.utils.sharding import shard_device

    backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), with_lora=False)
    if not cfg.backbone.get("quantization"):
        backbone.model.to(pick_device(shard_device(cfg.get("device"), shard[1])))
    prompts = StagePrompts.from_config(OmegaConf.to_container(cfg.prompts, resolve=True) if cfg.get("prompts") else None)
    fmt = with_system(ChatFormat.from_config(cfg.backbone.get("chat")), prompts.system)
    results: dict[str, dict[str, Any]] = {}
    for name, (records, report) in loaded.items():
        rows, stats = predict(backbone, records, fmt, out_dir / name / "predictions.jsonl",
                              batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                              on_bad_image=settings.on_bad_image, progress=settings.progress,
                              desc=f"evaluate {name}" + (f" [shard {shard[0]}/{shard[1]}]" if shard[1] > 1 else ""),
                              image_aspect_ratio=settings.image_aspect_ratio, shard=shard)
        extra = {"load_report": report.to_json(), "backbone": backbone.name_or_path}
        if shard[1] == 1:
            results[name] = write_dataset_results(rows, stats, records, out_dir / name, name=name, extra=extra)
        else:
            results[name] = {**stats, "n_predicted": len(rows), **extra}
    return results


def _merge_evaluated(out_dir: Path, loaded: dict[str, Any], n: int, work: str, *,
                     must: bool) -> dict[str, dict[str, Any]] | None:
    """Merge and score the shards' predictions if every shard has finished ``work`` (under the run's lock:
    whichever finishes last); None when some have not (``must``: ``merge_only``, which raises instead)."""
    from stllava_med.eval.vqa import merge_predictions, write_dataset_results
    from stllava_med.utils import sharding

    with sharding.merge_lock(out_dir):
        done, missing = sharding.finished(out_dir, n, work)
        if missing:
            if must:
                raise RuntimeError(f"eval.merge_only: shards {missing} of {n} have not finished in {out_dir} "
                                   "(rerun them with the same command and their eval.shard_index)")
            log.info("evaluate: shard done; waiting for shards %s of %d (the last to finish merges)", missing, n)
            return None
        results: dict[str, dict[str, Any]] = {}
        for name, (records, _) in loaded.items():
            rows = merge_predictions(records, [sharding.shard_dir(out_dir, i, n) / name / "predictions.jsonl"
                                               for i in range(n)])
            per_shard = [done[i]["datasets"][name] for i in range(n)]
            skipped = [e for s in per_shard for e in s.get("skipped_examples") or []]
            rates = [s.get("questions_per_s") for s in per_shard if s.get("questions_per_s")]
            stats = {"generated": sum(int(s.get("generated") or 0) for s in per_shard),
                     "seconds": max(float(s.get("seconds") or 0.0) for s in per_shard),
                     "questions_per_s": round(sum(rates), 3) if rates else None,  # the shards side by side
                     "skipped_images": sum(int(s.get("skipped_images") or 0) for s in per_shard),
                     "skipped_examples": skipped[:10], "num_shards": n}
            extra = {"load_report": per_shard[0].get("load_report"), "backbone": per_shard[0].get("backbone")}
            results[name] = write_dataset_results(rows, stats, records, out_dir / name, name=name, extra=extra,
                                                  write_predictions=True)
        log.info("evaluate: merged %d shards into %s", n, out_dir)
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
    if not results:  # a shard that left the merge (and the objective) to the last one
        return None
    return objective(cfg, "evaluate", objective_metrics(results))


if __name__ == "__main__":
    main()
