"""The whole method, one command: stage-1 SFT → generate → judge → pairs → DPO → evaluate (stage-1 and DPO side by side).

    python -m stllava_med.pipeline experiment=demo                      # the offline demo (make demo)
    python -m stllava_med.pipeline backbone=llava15_7b expert=openai ...  # the paper's recipe
    python -m stllava_med.pipeline -m stages.dpo.dpo.beta=0.05,0.1,0.5 stages.dpo.data.fraction=0.09,0.25,0.5,1.0

Each stage runs from its own config (``conf/<stage>.yaml``), composed with ``stages.<stage>.overrides`` (group
choices, stage experiments); the pipeline's config holds each stage's schema at ``stages.<stage>`` (so
``stages.dpo.dpo.beta=0.5`` is typed and checked when the pipeline starts), and what is set there is passed to
the stage, with the pipeline's ``backbone`` / ``expert`` / ``seed``. The stage's
directory is ``<root>/round<r>/<stage>-<hash of its config>``; its config names the upstream directories, so
the hash chains: a finished stage (``DONE.json``) is reused, a crash resumes the stage that was running, and
changing β reruns only DPO and the evaluation of the DPO model. Parallel sweep jobs share ``<root>``: a file
lock per stage makes the first job run a shared stage and the others wait for it and reuse it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from stllava_med.evaluate import run_evaluate
from stllava_med.generate import run_generate
from stllava_med.judge import run_judge
from stllava_med.schema import PIPELINE_STAGES, BackboneSettings
from stllava_med.train_dpo import run_train_dpo
from stllava_med.train_sft import run_train_sft
from stllava_med.utils import config as _config  # noqa: F401  (registers resolvers)
from stllava_med.utils.config import (
    UnknownConfigKey,
    check_against_schema,
    command_line_overrides,
    config_fingerprint,
    leaves,
    logger_names,
    project_root,
    save_config,
    stage_main,
)
from stllava_med.utils.io import atomic_write_json, atomic_write_text, file_lock
from stllava_med.utils.runtime import apply_image_limit, finish_run, objective, quiet_known_noise

log = logging.getLogger("stllava_med.pipeline")

STAGES = ("sft", "generate", "judge", "dpo", "evaluate")
CONF_DIR = Path(_config.conf_dir())


# --------------------------------------------------------------------------------------------------------------
# Composing one stage's config
# --------------------------------------------------------------------------------------------------------------


def compose_stage(name: str, overrides: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` with ``overrides``, exactly as ``python -m stllava_med.<stage>`` would compose it."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


_PIPELINE_ONLY = ("enabled", "overrides")
# Keys of a stage that the pipeline itself sets (the backbone it passes along, the upstream directories).
_PIPELINE_SET = ("backbone", "paths", "expert")


def _cli_keys(stage: str) -> set[str]:
    """Keys under ``stages.<stage>.`` that the pipeline's command line set (even to their schema default)."""
    try:
        task = [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # composed outside @hydra.main (tests)
        return set()
    prefix = f"stages.{stage}."
    keys = set()
    for override in task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(prefix):
            keys.add(key[len(prefix):])
    return keys


def stage_settings(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """What the pipeline sets in ``stage``'s config: every key of ``stages.<stage>`` whose value differs from the
    stage schema's default (an experiment's or the command line's), plus the keys the command line named.
    Unresolved, so that ``${...}`` interpolations resolve in the stage's own config."""
    node = cfg.stages[stage]
    given = OmegaConf.to_container(node, resolve=False)
    default = OmegaConf.to_container(OmegaConf.structured(PIPELINE_STAGES[stage]), resolve=False)
    assert isinstance(given, dict) and isinstance(default, dict)
    for key in (*_PIPELINE_ONLY, *_PIPELINE_SET):
        given.pop(key, None)
        default.pop(key, None)
    named = _cli_keys(stage)
    default_leaves = leaves(default)
    return {key: value for key, value in leaves(given).items()
            if key in named or any(key.startswith(f"{n}.") for n in named)
            or key not in default_leaves or default_leaves[key] != value}


# What the pipeline decides about the backbone of every stage: which weights (stage 1's export, round r's policy).
_PIPELINE_BACKBONE_KEYS = ("name_or_path", "name", "adapter_path")


def _stage_backbone(stage: str, overrides: list[str], stage_cfg: DictConfig, backbone: dict[str, Any]) -> dict:
    """The pipeline's ``backbone`` with what the stage's own overrides and experiment set under ``backbone.*``
    (LoRA rank, chat settings, dtype...: leaves where the stage composed with its overrides differs from the stage
    composed without them); the weights — name_or_path, name, adapter_path — stay the pipeline's."""
    result = OmegaConf.create(backbone)
    if not overrides:
        return backbone
    plain = OmegaConf.to_container(compose_stage(stage, []).backbone, resolve=False)
    changed = OmegaConf.to_container(stage_cfg.backbone, resolve=False)
    base_leaves = leaves(plain)
    for key, value in leaves(changed).items():
        if key.split(".", 1)[0] in _PIPELINE_BACKBONE_KEYS or base_leaves.get(key, object()) == value:
            continue
        OmegaConf.update(result, key, value, merge=True, force_add=True)
    return OmegaConf.to_container(result, resolve=False)


def stage_config(cfg: DictConfig, stage: str, *, backbone: dict[str, Any] | None = None,
                 **fields: Any) -> DictConfig:
    """The config a stage runs with inside the pipeline: ``conf/<stage>.yaml`` composed with
    ``stages.<stage>.overrides`` (exactly as ``python -m stllava_med.<stage>`` with those overrides would), then
    the keys the pipeline's config sets at ``stages.<stage>`` (typed and checked by the stage's schema when the
    pipeline composed), the pipeline's ``seed`` / ``num_threads`` and what the pipeline passes between stages."""
    overrides = [str(o) for o in (cfg.stages[stage].overrides or [])]
    settings = stage_settings(cfg, stage)
    try:  # +stages.dpo.dpo.typo=1 adds a key Hydra cannot refuse: refuse it here, before any stage runs
        check_against_schema(settings, PIPELINE_STAGES[stage], root=f"stages.{stage}")
    except UnknownConfigKey as err:
        raise UnknownConfigKey(f"stages.{stage}: {err}") from None
    stage_cfg = compose_stage(stage, overrides)  # the stage names are the primary config names
    for key, value in settings.items():
        OmegaConf.update(stage_cfg, key, value, merge=True, force_add=True)
    with open_dict(stage_cfg):
        if cfg.get("paths") is not None:  # the pipeline's paths (paths.data_dir=...) hold for every stage
            stage_cfg.paths = OmegaConf.create(_plain(cfg.paths))
        if backbone is not None:
            stage_cfg.backbone = OmegaConf.merge(OmegaConf.structured(BackboneSettings),
                                                 _stage_backbone(stage, overrides, stage_cfg, backbone))
        for key in ("seed", "num_threads"):
            if cfg.get(key) is not None:
                stage_cfg[key] = cfg[key]
        if stage == "judge":
            stage_cfg.expert = OmegaConf.create(_plain(cfg.expert))
        for key, value in fields.items():
            OmegaConf.update(stage_cfg, key, value, force_add=True)
    return stage_cfg


# --------------------------------------------------------------------------------------------------------------
# Running a stage once
# --------------------------------------------------------------------------------------------------------------




def process_rank() -> int:
    """This process's global rank in a distributed launch (0 when there is none). Lightning's subprocess launcher
    (trainer=ddp on one node) re-runs the same command in each extra rank with ``LOCAL_RANK`` / ``NODE_RANK`` set;
    torchrun sets ``RANK``; ``srun`` with several tasks sets ``SLURM_PROCID``."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit() and int(os.environ[key]) > 0:
            return int(os.environ[key])
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    return 1 if (local.isdigit() and int(local) > 0) or (node.isdigit() and int(node) > 0) else 0


# Stages whose runner joins a distributed run (trainer=ddp / fsdp): every rank runs them together.
DISTRIBUTED_STAGES = ("sft", "dpo")


def _leave_process_group() -> None:
    """End the process group a distributed stage's trainer left initialised, on every rank: rank 0's next stages
    (generation, evaluation) run alone, and their torchmetrics would otherwise wait to sync with the other ranks.
    The next distributed stage's trainer initialises a new one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _wait_for(done: Path, label: str, poll_s: float = 2.0) -> dict[str, Any]:
    """A non-zero rank waits for rank 0 to finish ``label`` (its DONE.json), then reads what rank 0 recorded."""
    waited = 0.0
    while not done.is_file():
        if waited and waited % 300 < poll_s:
            log.info("%s: rank %d waits for rank 0 (%d s)", label, process_rank(), int(waited))
        time.sleep(poll_s)
        waited += poll_s
    return json.loads(done.read_text())


def run_stage(label: str, stage_dir: Path, runner: Callable[[Path], dict[str, Any]],
              loggers: list[str] | tuple[str, ...] = (), *, distributed: bool = False) -> dict[str, Any]:
    """Run ``runner(stage_dir)`` unless ``stage_dir/DONE.json`` says it already finished; record its summary.

    Rank 0 decides: it takes the stage's lock, runs and records the stage. Other ranks of a distributed launch
    never take the lock (rank 0 holds it while it initialises the process group they must join): they run a
    ``distributed`` stage with rank 0 (its trainer joins theirs), then wait for rank 0's record, and wait for
    every other stage.

    ``loggers`` names the stage's loggers: they are not part of its directory's hash, so a finished stage is
    reused whatever they are, and the reuse says that nothing reached them."""
    done = stage_dir / "DONE.json"
    if process_rank() > 0:
        if done.is_file():
            return {**json.loads(done.read_text()), "reused": True}
        if distributed:
            stage_dir.mkdir(parents=True, exist_ok=True)
            runner(stage_dir)
            _leave_process_group()
        return {**_wait_for(done, label), "reused": False}
    with file_lock(stage_dir.parent / f".{stage_dir.name}.lock"):
        if done.is_file():
            if loggers:
                log.warning("%s: reusing the finished stage in %s; it is complete, so nothing is logged to "
                            "logger=%s. To run it again (and log), give the pipeline another root: "
                            "out_dir=<elsewhere>", label, stage_dir, ",".join(loggers))
            else:
                log.info("%s: reusing the finished stage in %s", label, stage_dir)
            return {**json.loads(done.read_text()), "reused": True}
        log.info("%s: running in %s", label, stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        summary = runner(stage_dir)
        if distributed:
            _leave_process_group()
        record = {"label": label, "dir": str(stage_dir), "summary": summary}
        atomic_write_json(done, record)
        return {**record, "reused": False}


def _stage_dir(root: Path, group: str, stage: str, stage_cfg: DictConfig) -> Path:
    return root / group / f"{stage}-{config_fingerprint(stage_cfg)}"


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------


def _policy_backbone(base: dict[str, Any], name_or_path: str, name: str) -> dict[str, Any]:
    policy = dict(base)
    policy["name_or_path"] = name_or_path
    policy["name"] = name
    policy["adapter_path"] = None
    return policy


def _merged_dir(summary: dict[str, Any], stage: str) -> str:
    inner = summary.get("summary", summary)
    merged = inner.get("merged_dir") or (inner.get("export") or {}).get("merged")
    if not merged:
        raise RuntimeError(f"{stage} produced no merged model to continue from ({inner.get('merge_error') or inner})")
    return str(merged)


def pipeline_root(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir)).expanduser().resolve()
    return project_root() / "logs" / "runs" / "pipeline" / str(cfg.run_name)


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    enabled = {s: bool(cfg.stages[s].enabled) for s in STAGES}
    # compose every enabled stage's config first: a mistyped key fails now, not after hours of SFT
    for stage in STAGES:
        if enabled[stage]:
            _refuse_shards(stage, stage_config(cfg, stage))
    quiet_known_noise()
    root = pipeline_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    base_backbone = _plain(cfg.backbone)
    stages: dict[str, Any] = {}

    def run(label: str, group: str, stage: str, stage_cfg: DictConfig, fn: Callable[[DictConfig, Path], Any]) -> dict:
        stage_dir = _stage_dir(root, group, stage, stage_cfg)

        def runner(out_dir: Path) -> dict[str, Any]:
            with open_dict(stage_cfg):
                stage_cfg.out_dir = str(out_dir)
            apply_image_limit(stage_cfg)
            return _plain(fn(stage_cfg, out_dir)) or {}

        stages[label] = run_stage(label, stage_dir, runner, logger_names(_plain(stage_cfg.get("logger"))),
                                  distributed=stage in DISTRIBUTED_STAGES)
        return stages[label]

    # ---- stage 1: visual self-questioning SFT
    policy = base_backbone
    if enabled["sft"]:
        sft_cfg = stage_config(cfg, "sft", backbone=base_backbone, print_summary=False)
        sft = run("sft", "round0", "sft", sft_cfg, lambda c, d: run_train_sft(c))
        policy = _policy_backbone(base_backbone, _merged_dir(sft, "sft"), f"{base_backbone['name']}-sft")

    evaluations: dict[str, dict[str, Any]] = {}

    def evaluate(label: str, backbone: dict[str, Any]) -> None:
        if not enabled["evaluate"]:
            return
        eval_cfg = stage_config(cfg, "evaluate", backbone=backbone, print_table=False)
        result = run(f"evaluate/{label}", "eval", f"evaluate-{label}", eval_cfg, lambda c, d: run_evaluate(c, d))
        evaluations[label] = result["summary"]

    if cfg.pipeline.get("evaluate_stage1", True):
        evaluate("stage1", policy)

    # ---- stage 2, repeated: round r generates with round r-1's policy
    dpo_summaries: dict[str, dict[str, Any]] = {}
    for round_index in range(1, int(cfg.pipeline.rounds) + 1):
        group = f"round{round_index}"
        if not enabled["generate"]:
            break
        gen_cfg = stage_config(cfg, "generate", backbone=policy, print_summary=False)
        gen = run(f"{group}/generate", group, "generate", gen_cfg, lambda c, d: run_generate(c, d))
        if not enabled["judge"]:
            break
        judge_cfg = stage_config(cfg, "judge", candidates=gen["dir"], print_summary=False)
        judged = run(f"{group}/judge", group, "judge", judge_cfg, lambda c, d: _complete_judge(run_judge(c, d)))
        if int(judged["summary"].get("pairs", 0)) == 0:
            raise RuntimeError(f"{group}: the judge produced no preference pairs (see {judged['dir']}/summary.json)")
        if not enabled["dpo"]:
            break

        dpo_cfg = stage_config(cfg, "dpo", backbone=_policy_backbone(policy, policy["name_or_path"], policy["name"]),
                               print_summary=False,
                               **{"data.path": str(Path(judged["dir"]) / "preference")})
        dpo = run(f"{group}/dpo", group, "dpo", dpo_cfg, lambda c, d: run_train_dpo(c, out_dir=d))
        dpo_summaries[group] = dpo["summary"]
        policy = _policy_backbone(base_backbone, _merged_dir(dpo, "dpo"), f"{base_backbone['name']}-dpo{round_index}")
        evaluate(f"dpo_round{round_index}", policy)

    summary = {"root": str(root), "stages": {k: {"dir": v["dir"], "reused": v["reused"]} for k, v in stages.items()},
               "evaluations": evaluations, "dpo": dpo_summaries, "final_policy": policy["name_or_path"]}
    table = comparison_table(evaluations, dpo_summaries)
    summary["table"] = table
    if process_rank() > 0:  # rank 0 writes the pipeline's files
        summary["plot"] = None
        return summary
    # this job's files under its own directory (sweep jobs share the root), then the root's combined view
    job_dir = root / "jobs" / f"{_slug(str(cfg.run_name))}-{config_fingerprint(cfg)}"
    summary["job_dir"], summary["overrides"] = str(job_dir), command_line_overrides() or []
    atomic_write_text(job_dir / "table.md", table)
    plot = comparison_plot(evaluations, job_dir / "comparison.png")
    summary["plot"] = str(plot) if plot else None
    atomic_write_json(job_dir / "pipeline_summary.json", summary)
    save_config(cfg, job_dir, name="pipeline_config.yaml")
    combine_jobs(root)
    dpo_dirs = [stages[f"{g}/dpo"]["dir"] for g in dpo_summaries]
    finish_run(root, "pipeline", {"log_dirs": dpo_dirs, "metrics": {label: {ds: {k: m.get(k) for k in _METRICS} for ds, m in ev.items()
                                                      if isinstance(m, dict)} for label, ev in evaluations.items()},
                                  "dpo": {g: {"train_reward_accuracy": reward_accuracy(s, "train"),
                                              "val_reward_accuracy": reward_accuracy(s, "val")}
                                          for g, s in dpo_summaries.items()}})
    return summary


def _refuse_shards(stage: str, stage_cfg: DictConfig) -> None:
    """The pipeline runs generation and evaluation in one process: ``num_shards`` stays 1 there (shard those
    stages as commands of their own, docs/clusters.md)."""
    section = {"generate": "generate", "evaluate": "eval"}.get(stage)
    if section and (stage_cfg[section].get("num_shards") != 1 or stage_cfg[section].get("merge_only")):
        raise ValueError(f"stages.{stage}.{section}.num_shards / merge_only: the pipeline runs {stage} in one "
                         f"process; leave them at 1 / false (run a sharded {stage} with python -m "
                         f"stllava_med.{stage} and {section}.num_shards=<n>, docs/clusters.md)")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "-" for c in text).strip("-")[:80] or "pipeline"


def combine_jobs(root: Path) -> dict[str, Any]:
    """``<root>/table.md``, ``comparison.png`` and ``pipeline_summary.json`` over every pipeline job that finished
    in ``root`` (``<root>/jobs/*/pipeline_summary.json``), rewritten under a lock by each job as it ends, so the
    last job of a sweep leaves all of them there. A stage that every job shares (the same directory: stage-1
    SFT and its evaluation in a β sweep) keeps its label; one that differs is labelled with the job's own
    overrides (those not common to every job): ``dpo_round1 [stages.dpo.dpo.beta=0.5]``."""
    with file_lock(root / ".summary.lock"):
        jobs = {p.parent.name: json.loads(p.read_text()) for p in sorted((root / "jobs").glob("*/pipeline_summary.json"))}
        common = set.intersection(*[set(j.get("overrides") or []) for j in jobs.values()]) if jobs else set()
        tags = {name: " ".join(o for o in j.get("overrides") or [] if o not in common) or name for name, j in jobs.items()}
        dirs: dict[str, set[str]] = {}
        for job in jobs.values():
            for label, stage in job["stages"].items():
                dirs.setdefault(label, set()).add(stage["dir"])

        def name(label: str, job: str) -> str:
            return label if len(dirs.get(label, ())) <= 1 else f"{label} [{tags[job]}]"

        stages: dict[str, Any] = {}
        evaluations: dict[str, Any] = {}
        dpo: dict[str, Any] = {}
        for job_name, job in jobs.items():
            for label, stage in job["stages"].items():
                stages.setdefault(name(label, job_name), stage)
            for label, result in job["evaluations"].items():
                shown = name(f"evaluate/{label}", job_name).removeprefix("evaluate/")
                evaluations.setdefault(shown, result)
                group = label.removeprefix("dpo_")
                if label.startswith("dpo_") and group in job["dpo"]:
                    dpo.setdefault(shown.removeprefix("dpo_"), job["dpo"][group])
        table = comparison_table(evaluations, dpo)
        plot = comparison_plot(evaluations, root / "comparison.png")
        combined = {"root": str(root), "jobs": {n: {"dir": j.get("job_dir"), "overrides": j.get("overrides") or [],
                                                    "final_policy": j.get("final_policy")} for n, j in jobs.items()},
                    "stages": stages, "evaluations": evaluations, "dpo": dpo, "table": table,
                    "plot": str(plot) if plot else None}
        atomic_write_text(root / "table.md", table)
        atomic_write_json(root / "pipeline_summary.json", combined)
        return combined


def _complete_judge(summary: dict[str, Any]) -> dict[str, Any]:
    """A judge run that stopped early (budget, dead expert) must not be recorded as a finished stage."""
    if not summary.get("complete", False):
        raise RuntimeError(f"judge stopped before judging every candidate ({summary.get('stopped')}); "
                           "raise the budget or fix the expert and rerun the same command to continue")
    return summary


_METRICS = ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_strict", "n_open", "n_closed")


def reward_accuracy(summary: dict[str, Any], split: str) -> float | None:
    """A DPO run's reward accuracy on ``split``: ``rewards/accuracies`` (TRL's name, ours since), or the
    ``rewards/accuracy`` of a run finished before the rename (a reused stage)."""
    metrics = summary.get(split) or {}
    return metrics.get("rewards/accuracies", metrics.get("rewards/accuracy"))


def comparison_table(evaluations: dict[str, dict[str, Any]], dpo: dict[str, dict[str, Any]]) -> str:
    """Stage-1 vs DPO models, per dataset: the four VQA metrics and the DPO reward accuracy (train / val)."""
    lines = ["| model | dataset | open recall | open F1 | closed acc. | closed acc. (strict) | n open | n closed | "
             "DPO reward acc. (train / val) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, per_dataset in evaluations.items():
        group = label.replace("dpo_", "") if label.startswith("dpo_") else None
        reward = "—"
        if group and group in dpo:
            train_acc, val_acc = reward_accuracy(dpo[group], "train"), reward_accuracy(dpo[group], "val")
            reward = " / ".join("—" if v is None else f"{v:.2f}" for v in (train_acc, val_acc))
        for dataset, m in per_dataset.items():
            if not isinstance(m, dict) or "open_recall" not in m:
                continue
            lines.append(f"| {label} | {dataset} | {m['open_recall']:.2f} | {m['open_f1']:.2f} | "
                         f"{m['closed_accuracy']:.2f} | {m['closed_accuracy_strict']:.2f} | {m['n_open']} | "
                         f"{m['n_closed']} | {reward} |")
    return "\n".join(lines) + "\n"


def comparison_plot(evaluations: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: each VQA metric, one bar per model, for the first dataset."""
    if not evaluations:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(evaluations)
    dataset = next((d for d, m in evaluations[labels[0]].items() if isinstance(m, dict) and "open_recall" in m), None)
    if dataset is None:
        return None
    metrics = _METRICS[:4]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        m = evaluations[label].get(dataset, {})
        values = [float(m.get(k, 0.0)) for k in metrics]
        bars = ax.bar([x + i * width for x in range(len(metrics))], values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(metrics))])
    ax.set_xticklabels(["open recall", "open F1", "closed acc.", "closed strict"])
    ax.set_ylabel("score (×100)")
    ax.set_title(f"zero-shot VQA on {dataset}: stage-1 vs DPO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def objective_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``objective=`` can name: the bare metrics of the last evaluated model (the final DPO policy) on
    the first dataset (``closed_accuracy``), ``<model>/<dataset>/<metric>`` for every evaluation
    (``stage1/vqa_rad_sample/open_recall``) and ``dpo/<round>/<train|val>/<metric>``."""
    flat: dict[str, Any] = {}
    evaluations = summary.get("evaluations") or {}
    for label, per_dataset in evaluations.items():
        for dataset, metrics in per_dataset.items():
            if isinstance(metrics, dict):
                flat.update({f"{label}/{dataset}/{k}": v for k, v in metrics.items()})
    if evaluations:
        final = list(evaluations.values())[-1]
        first = next((m for m in final.values() if isinstance(m, dict)), {})
        flat.update(first)
    for group, dpo in (summary.get("dpo") or {}).items():
        for split in ("train", "val"):
            flat.update({f"dpo/{group}/{split}/{k}": v for k, v in (dpo.get(split) or {}).items()})
    return flat


@stage_main("pipeline")
def main(cfg: DictConfig) -> float | None:
    summary = run_pipeline(cfg)
    if process_rank() > 0:  # the other ranks of a distributed launch followed rank 0, which reports
        return None
    print(f"\nSTLLaVA-Med pipeline — {summary['root']}\n\n{summary['table']}")
    reused = [k for k, v in summary["stages"].items() if v["reused"]]
    if reused:
        print(f"reused finished stages: {', '.join(reused)}")
    if summary.get("plot"):
        print(f"plot: {summary['plot']}")
    return objective(cfg, "pipeline", objective_metrics(summary))


if __name__ == "__main__":
    main()
