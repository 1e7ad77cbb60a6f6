"""Candidate generation: the policy describes each image, asks its own questions and samples K answers.

    python -m stllava_med.generate backbone=tiny data=vqa_rad_sample_train generate.question_source=self \\
        generate.questions_per_image=5 generate.answers_per_question=2 generate.max_images=100 out_dir=<dir>
    python -m stllava_med.generate backbone.name_or_path=<stage-1 export> generate.images=/data/pmc_images
    python -m stllava_med.generate data=vqa_rad_sample_train generate.question_source=dataset   # offline demo

Writes ``<out_dir>/candidates/candidates-*.jsonl`` (one :class:`~stllava_med.selftrain.records.Candidate` per
question), ``progress.jsonl`` (one line per finished image) and ``summary.json``. Rerunning the same command
resumes: images already done are skipped (raising ``generate.max_images`` extends the same run).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stllava_med.data.vqa import dataset_specs, load_vqa
from stllava_med.utils import config as _config  # noqa: F401  (registers resolvers)
from stllava_med.utils.config import stage_main
from stllava_med.utils.io import atomic_write_json
from stllava_med.utils.runtime import finish_run, print_summary, start_run

# The stage's own modules load torch, transformers and Lightning: they are imported inside the functions that
# run it, so that start-up (--help, config composition and its errors) stays light and Hydra has set up
# logging first.

log = logging.getLogger("stllava_med.generate")


def image_tasks(cfg: DictConfig, settings: Any) -> tuple[list[Any], dict[str, Any]]:
    """The images (and, for question_source=dataset, their labelled questions) to generate for."""
    from stllava_med.selftrain.generate import list_images, tasks_from_paths, tasks_from_records

    images = cfg.generate.get("images")
    if images and settings.question_source == "self":
        source = OmegaConf.to_container(images, resolve=True) if not isinstance(images, str) else images
        tasks, skipped = tasks_from_paths(list_images(source), on_bad_image=settings.on_bad_image)
        return tasks, {"source": str(images), "unreadable_skipped": len(skipped), "skip_examples": skipped[:10]}
    if images:
        raise ValueError("generate.images lists unlabelled images; generate.question_source=dataset takes its "
                         "questions and images from data=<labelled VQA set> instead")
    records, reports = [], {}
    for name, spec in dataset_specs(cfg.data.sets).items():
        loaded, report = load_vqa(spec)
        records.extend(loaded)
        reports[name] = report.to_json()
    per_image = settings.questions_per_image if settings.question_source == "dataset" else None
    tasks = tasks_from_records(records, questions_per_image=per_image)
    if settings.question_source == "self":
        for task in tasks:  # self mode: the set only lends its images
            task.questions = []
    return tasks, {"source": "data", "datasets": reports}


def run_generate(cfg: DictConfig, out_dir: Path | None = None) -> dict[str, Any]:
    """Generate candidates per ``cfg.generate`` with ``cfg.backbone``; write shards, progress and summary.

    With ``generate.num_shards = n > 1`` this process is shard ``generate.shard_index``: it writes under
    ``<out_dir>/shards/shard-<i>-of-<n>/`` and, if every other shard has finished, merges them into ``out_dir``
    (``summary["merged"]`` says whether it did). ``generate.merge_only=true`` only merges."""
    from stllava_med.schema import GeneratePrompts
    from stllava_med.selftrain.generate import PROGRESS_FILE, GenerationSettings
    from stllava_med.utils import sharding
    from stllava_med.utils.config import config_fingerprint
    from stllava_med.utils.io import stable_hash

    generate_cfg = OmegaConf.to_container(cfg.generate, resolve=True)
    assert isinstance(generate_cfg, dict)
    settings = GenerationSettings.from_config(generate_cfg, seed=int(cfg.get("seed") or 0))
    out_dir = out_dir or start_run(cfg, "generate")
    index, n = sharding.this_shard(settings, out_dir, "generate")
    tasks, input_report = image_tasks(cfg, settings)
    if not tasks:
        raise ValueError("generate: no images to generate for")
    if settings.max_images is not None:
        tasks = tasks[: settings.max_images]
    prompts = GeneratePrompts.from_config(OmegaConf.to_container(cfg.prompts, resolve=True) if cfg.get("prompts") else None)
    sharding.check_layout(out_dir, n, config_fingerprint(cfg), where="generate",
                          single_output=(out_dir / PROGRESS_FILE).is_file())
    extra = {"input": input_report, "settings": settings.to_json(), "prompts": asdict(prompts)}
    if n == 1:
        summary = _generate(cfg, settings, tasks, prompts, out_dir, (0, 1))
        summary.update({"policy": summary.pop("policy"), **extra})
        atomic_write_json(out_dir / "summary.json", summary)
    else:
        work = stable_hash({"images": [t.image_id for t in tasks], "image_batch_size": settings.image_batch_size})
        if not settings.merge_only:
            own = sharding.shard_dir(out_dir, index, n)
            summary = _generate(cfg, settings, tasks, prompts, own, (index, n))
            summary.update({"policy": summary.pop("policy"), **extra, "shard_index": index, "num_shards": n})
            atomic_write_json(own / "summary.json", summary)
            if summary["complete"]:
                sharding.mark_done(out_dir, index, n, {"work": work, "policy": summary["policy"],
                                                       "this_run": summary["this_run"]})
        summary = _merge_generated(out_dir, tasks, n, work, settings, extra, summary if not settings.merge_only else None)
    if cfg.get("print_summary", True):
        print_summary(f"generate — {out_dir}", summary_rows(summary))
    finish_run(out_dir, "generate", {"candidates": summary["candidates"], "images_done": summary["images_done"],
                                     **({"merged": summary["merged"]} if "merged" in summary else {})})
    return summary


def _generate(cfg: DictConfig, settings: Any, tasks: list[Any], prompts: Any, out_dir: Path,
              shard: tuple[int, int]) -> dict[str, Any]:
    """Load the policy and generate ``shard``'s part of ``tasks`` into ``out_dir``."""
    from stllava_med.backbone import load_backbone, pick_device
    from stllava_med.chat import ChatFormat
    from stllava_med.selftrain.generate import generate_candidates, shard_tasks
    from stllava_med.utils.sharding import shard_device

    backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), with_lora=False)
    if not cfg.backbone.get("quantization"):
        backbone.model.to(pick_device(shard_device(cfg.get("device"), shard[1])))
    fmt = ChatFormat.from_config(cfg.backbone.get("chat"))
    mine = len(shard_tasks(tasks, settings.image_batch_size, shard)) if shard[1] > 1 else len(tasks)
    where = "" if shard[1] == 1 else f" (shard {shard[0]} of {shard[1]}; {len(tasks)} in all)"
    log.info("generate: %d images%s, question_source=%s, %s questions x %d answers", mine, where,
             settings.question_source, settings.questions_per_image or "all", settings.answers_per_question)
    summary = generate_candidates(backbone, fmt, tasks, settings, out_dir, prompts, shard=shard)
    summary["policy"] = backbone.name_or_path
    return summary


def _merge_generated(out_dir: Path, tasks: list[Any], n: int, work: str, settings: Any, extra: dict[str, Any],
                     shard_summary: dict[str, Any] | None) -> dict[str, Any]:
    """Merge the shards if every one has finished ``work`` (under the run's lock: whichever finishes last);
    else the shard's own summary, ``merged: false``. ``shard_summary`` None: ``merge_only``, which must merge."""
    from stllava_med.selftrain.generate import merge_shards
    from stllava_med.utils import sharding

    with sharding.merge_lock(out_dir):
        done, missing = sharding.finished(out_dir, n, work)
        if missing:
            if shard_summary is None:
                raise RuntimeError(f"generate.merge_only: shards {missing} of {n} have not finished in {out_dir} "
                                   "(rerun them with the same command and their generate.shard_index)")
            log.info("generate: shard %d of %d done; waiting for shards %s (the last to finish merges)",
                     shard_summary["shard_index"], n, missing)
            return {**shard_summary, "merged": False, "shards_missing": missing}
        summary = merge_shards(out_dir, tasks, [sharding.shard_dir(out_dir, i, n) for i in range(n)],
                               shard_size=settings.shard_size)
        summary.update({"policy": done[0].get("policy"), **extra, "num_shards": n, "merged": True,
                        "shards": {str(i): done[i].get("this_run") for i in range(n)}})
        atomic_write_json(out_dir / "summary.json", summary)
        log.info("generate: merged %d shards into %s (%d candidates)", n, out_dir / "candidates", summary["candidates"])
        return summary


def summary_rows(summary: dict[str, Any]) -> dict[str, Any]:
    """The console summary of a generation run."""
    this_run = summary.get("this_run") or {}
    return {"policy": summary.get("policy"), "images done": f"{summary['images_done']} / {summary['images']}",
            "questions (candidates)": summary.get("candidates"), "answers": summary.get("answers"),
            "images/s this run": this_run.get("images_per_s") or None}


@stage_main("generate")
def main(cfg: DictConfig) -> None:
    run_generate(cfg)


if __name__ == "__main__":
    main()
