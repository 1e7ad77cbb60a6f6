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
    """Generate candidates per ``cfg.generate`` with ``cfg.backbone``; write shards, progress and summary."""
    from stllava_med.backbone import load_backbone, pick_device
    from stllava_med.chat import ChatFormat
    from stllava_med.schema import GeneratePrompts
    from stllava_med.selftrain.generate import GenerationSettings, generate_candidates

    generate_cfg = OmegaConf.to_container(cfg.generate, resolve=True)
    assert isinstance(generate_cfg, dict)
    settings = GenerationSettings.from_config(generate_cfg, seed=int(cfg.get("seed") or 0))
    out_dir = out_dir or start_run(cfg, "generate")
    tasks, input_report = image_tasks(cfg, settings)
    if not tasks:
        raise ValueError("generate: no images to generate for")
    backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), with_lora=False)
    if not cfg.backbone.get("quantization"):
        backbone.model.to(pick_device(cfg.get("device")))
    fmt = ChatFormat.from_config(cfg.backbone.get("chat"))
    prompts = GeneratePrompts.from_config(OmegaConf.to_container(cfg.prompts, resolve=True) if cfg.get("prompts") else None)
    log.info("generate: %d images (%s), question_source=%s, %s questions x %d answers", len(tasks),
             input_report["source"], settings.question_source,
             settings.questions_per_image or "all", settings.answers_per_question)
    summary = generate_candidates(backbone, fmt, tasks, settings, out_dir, prompts)
    summary.update({"policy": backbone.name_or_path, "input": input_report, "settings": settings.to_json(),
                    "prompts": asdict(prompts)})
    atomic_write_json(out_dir / "summary.json", summary)
    if cfg.get("print_summary", True):
        print_summary(f"generate — {out_dir}", summary_rows(summary))
    finish_run(out_dir, "generate", {"candidates": summary["candidates"], "images_done": summary["images_done"]})
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
