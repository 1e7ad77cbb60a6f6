"""Expert judging of generated candidates, and preference pairs from the verdicts.

    python -m stllava_med.judge candidates=<dir|file|glob> expert=openai expert.model=gpt-4o out_dir=<dir>
    python -m stllava_med.judge candidates=... expert=openai expert.base_url=http://node:8000/v1 \\
        expert.model=Qwen/Qwen2.5-VL-72B-Instruct expert.concurrency=32
    python -m stllava_med.judge candidates=... expert=reference          # offline, against ground truth

Writes into the run directory: ``judgements.sqlite`` (the resumable store), ``preference/pairs-*.jsonl`` (the
DPO stage's input) and ``summary.json``. Rerunning the same command resumes: judgements already stored are
never asked again. The API key comes only from the environment variable ``expert.api_key_env`` names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stllava_med.schema import JudgeRunSettings
from stllava_med.selftrain.judge import JudgeSettings, judge_candidates
from stllava_med.selftrain.pairs import PairSettings, build_pairs, write_shards
from stllava_med.selftrain.records import load_candidates, unfinished_generation
from stllava_med.selftrain.store import JudgementStore
from stllava_med.utils import config as _config  # noqa: F401  (registers resolvers)
from stllava_med.utils.config import resolve_out_dir, save_config, stage_main
from stllava_med.utils.io import atomic_write_json
from stllava_med.utils.run_identity import claim_run_dir
from stllava_med.utils.runtime import (
    JUDGE_EXIT_BUDGET,
    JUDGE_EXIT_EXPERT,
    apply_image_limit,
    exit_incomplete,
    finish_run,
    print_summary,
    quiet_known_noise,
)

# The experts are imported by kind in build_expert: the OpenAI client only for expert=openai, torch only for
# reference / hf_local, so that judging through an API starts without either.

log = logging.getLogger("stllava_med.judge")

EXPERT_KINDS = ("openai", "reference", "hf_local")


def _forbid_inline_secrets(expert_cfg: Mapping[str, Any]) -> None:
    for name in expert_cfg:
        if str(name).lower() in ("api_key", "key", "token", "secret", "password"):
            raise ValueError(
                f"expert.{name} must not be set in a config or on the command line (Hydra saves both): put the "
                f"key in the environment variable that expert.api_key_env names (default OPENAI_API_KEY)"
            )


def build_expert(expert_cfg: Mapping[str, Any], *, seed: int = 0) -> Any:
    """The expert object for an ``expert`` config group entry (the one place config becomes an expert)."""
    cfg = dict(expert_cfg)
    _forbid_inline_secrets(cfg)
    kind = str(cfg.get("kind", cfg.get("name")))

    def need(key: str) -> Any:  # conf/expert/<kind>.yaml is where an expert's defaults live
        if key not in cfg:
            raise ValueError(f"expert.{key} is missing: expert=<kind> configs (conf/expert/{kind}.yaml) set it")
        return cfg[key]
    if kind == "openai":
        from stllava_med.selftrain.experts.openai_expert import OpenAIExpert

        env = str(cfg.get("api_key_env") or "OPENAI_API_KEY")
        api_key = os.environ.get(env)
        if not api_key:
            if not cfg.get("base_url"):
                raise ValueError(
                    f"expert=openai needs an API key in the environment variable {env} (or point "
                    "expert.base_url at an OpenAI-compatible server that needs none)"
                )
            log.info("judge: %s is not set; sending a placeholder key to %s", env, cfg["base_url"])
            api_key = "EMPTY"  # vLLM / SGLang / Ollama without --api-key accept any key
        return OpenAIExpert(
            model=str(need("model")), api_key=api_key, base_url=cfg.get("base_url"),
            temperature=float(need("temperature")), max_tokens=int(need("max_tokens")),
            timeout_s=float(need("timeout_s")), response_format=str(need("response_format")),
            image_detail=cfg.get("image_detail"), max_image_side=cfg.get("max_image_side"),
            image_tokens_estimate=int(need("image_tokens_estimate")), seed=seed,
        )
    if kind == "reference":
        from stllava_med.selftrain.experts.reference import ReferenceExpert

        return ReferenceExpert(closed_match=str(need("closed_match")))
    if kind == "hf_local":
        from stllava_med.backbone import load_backbone, pick_device
        from stllava_med.chat import ChatFormat
        from stllava_med.selftrain.experts.hf_local import HFLocalExpert

        backbone_cfg = cfg.get("backbone")
        if not backbone_cfg:
            raise ValueError("expert=hf_local needs expert.backbone (a backbone config, e.g. expert/backbone=...)")
        backbone = load_backbone(dict(backbone_cfg), with_lora=False)
        if not backbone_cfg.get("quantization"):
            backbone.model.to(pick_device(cfg.get("device")))
        return HFLocalExpert(backbone, ChatFormat.from_config(backbone_cfg.get("chat")),
                             max_new_tokens=int(need("max_tokens")),
                             retry_temperature=float(need("retry_temperature")), seed=seed)
    raise ValueError(f"unknown expert kind {kind!r}; expected one of {EXPERT_KINDS}")


def _start(cfg: DictConfig) -> Path:
    # Like utils.runtime.start_run, minus seeding through Lightning: judging through an API needs neither torch
    # nor Lightning, and importing them would triple the start-up time of every (resumed) judge job.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()
    apply_image_limit(cfg)
    # the config's own directory (utils/run_identity.py); no lock: judges on one store share its work
    out_dir = claim_run_dir(cfg, resolve_out_dir(cfg, "judge"), "judge", lock=False)
    save_config(cfg, out_dir)
    log.info("judge: run directory %s", out_dir)
    return out_dir


def run_judge(cfg: DictConfig, out_dir: Path | None = None) -> dict[str, Any]:
    """Judge ``cfg.candidates`` with ``cfg.expert``, build pairs, write the store, shards and ``summary.json``."""
    if not cfg.get("candidates"):
        raise ValueError("judge: set candidates=<file, directory of shards, or glob> (a generation run's output)")
    expert_cfg = OmegaConf.to_container(cfg.expert, resolve=True)
    assert isinstance(expert_cfg, dict)
    _forbid_inline_secrets(expert_cfg)
    run_settings = JudgeRunSettings.from_config(OmegaConf.to_container(cfg.judge, resolve=True))
    settings = JudgeSettings.from_config(expert_cfg, seed=int(cfg.get("seed") or 0),
                                         retry_failed=run_settings.retry_failed, progress=run_settings.progress)
    pair_settings = PairSettings.from_config(cfg.get("pairs"))
    started = time.perf_counter()
    # everything that can fail on bad input fails before the run directory exists
    unfinished = unfinished_generation(str(cfg.candidates))
    if unfinished and not run_settings.allow_partial:
        raise ValueError(f"judge: {unfinished}. Its pairs would come from part of the images: let it finish (rerun "
                         "the same generate command), or set judge.allow_partial=true to judge what is there")
    if unfinished:
        log.warning("judge: judging a partial generation (judge.allow_partial=true): %s", unfinished)
    candidates = load_candidates(str(cfg.candidates))
    if run_settings.limit:
        candidates = candidates[: int(run_settings.limit)]
    if not candidates:
        raise ValueError(f"judge: no candidates in {cfg.candidates}")
    if expert_cfg.get("kind") == "reference" and all(c.reference_answer is None for c in candidates):
        raise ValueError("expert=reference needs candidates with ground-truth answers; none of these has one "
                         "(generate them with generate.question_source=dataset)")
    expert = build_expert(expert_cfg, seed=int(cfg.get("seed") or 0))
    out_dir = out_dir or _start(cfg)
    log.info("judge: %d candidates from %s", len(candidates), cfg.candidates)
    store_path = out_dir / "judgements.sqlite"
    stats, keys = judge_candidates(candidates, expert, store_path, settings,
                                   synchronous=run_settings.store_synchronous)

    with JudgementStore(store_path) as store:
        by_key = {j.key: j for j in store.judgements(set(keys.values()))}
        judgements = {cid: by_key[key] for cid, key in keys.items() if key in by_key}
        usage = store.usage()
        outcomes = store.request_outcomes()
    pairs, pair_stats = build_pairs(candidates, judgements, pair_settings)
    shards = write_shards(pairs, out_dir / "preference", shard_size=pair_settings.shard_size)
    summary = {
        **pair_stats.to_json(),
        "complete": pair_stats.unjudged == 0,
        "stopped": stats.stopped,
        "expert": expert.identity,
        "prompt_version": expert.prompt_version,
        "candidates_path": str(cfg.candidates),
        "store": str(store_path),
        "preference_shards": [str(p) for p in shards],
        "this_run": stats.to_json(),
        "all_runs": {"requests": usage.requests, "prompt_tokens": usage.prompt_tokens,
                     "completion_tokens": usage.completion_tokens, "cost_usd": round(usage.cost_usd, 6),
                     "request_outcomes": outcomes},
        "pairs_settings": {"min_margin": pair_settings.min_margin, "max_per_image": pair_settings.max_per_image,
                           "max_pairs": pair_settings.max_pairs},
        "seconds": round(time.perf_counter() - started, 3),
    }
    summary["exit_code"] = exit_code(summary)  # what `python -m stllava_med.judge` exits with
    atomic_write_json(out_dir / "summary.json", summary)
    log.info("judge: %d judged, %d failed, %d unjudged → %d pairs (%d ties, %d under margin, %d capped per image, "
             "%d over max_pairs)%s", pair_stats.judged, pair_stats.failed, pair_stats.unjudged, pair_stats.pairs,
             pair_stats.ties_dropped, pair_stats.low_margin_dropped, pair_stats.capped, pair_stats.capped_total,
             f"; stopped: {stats.stopped}" if stats.stopped else "")
    if cfg.get("print_summary", True):
        print_summary(f"judge — {out_dir}", summary_rows(summary))
    finish_run(out_dir, "judge", {"pairs": pair_stats.pairs, "judged": pair_stats.judged, "stopped": stats.stopped})
    return summary


def summary_rows(summary: dict[str, Any]) -> dict[str, Any]:
    """The console summary of a judging run."""
    this_run, all_runs = summary.get("this_run") or {}, summary.get("all_runs") or {}
    return {"expert": summary.get("expert"), "judged": summary.get("judged"), "failed": summary.get("failed"),
            "unjudged": summary.get("unjudged"), "pairs": summary.get("pairs"),
            "ties dropped": summary.get("ties_dropped"), "under margin": summary.get("low_margin_dropped"),
            "capped (per image / total)": f"{summary.get('capped')} / {summary.get('capped_total')}",
            "requests this run": this_run.get("requests"),
            "cost (all runs, USD)": all_runs.get("cost_usd"), "stopped": summary.get("stopped") or None,
            "preference shards": str(Path(summary["store"]).parent / "preference")}


def exit_code(summary: Mapping[str, Any]) -> int:
    """0 when the run judged every candidate without stopping; 3 when a budget (``expert.max_requests`` /
    ``max_cost_usd``) stopped it first; 4 when the expert did (unavailable, unreachable, a fatal HTTP error such as
    401 / 404) — even when every candidate then has a judgement, since the last ones are stored failures that a
    rerun asks again. Documented in ``--help`` (conf/hydra/help/judge.yaml) and docs/stages.md."""
    if summary.get("complete", False) and not summary.get("stopped"):
        return 0
    return JUDGE_EXIT_BUDGET if str(summary.get("stopped") or "").startswith("budget") else JUDGE_EXIT_EXPERT


@stage_main("judge")
def main(cfg: DictConfig) -> None:
    summary = run_judge(cfg)
    code = exit_code(summary)
    if code:
        what = "budget" if code == JUDGE_EXIT_BUDGET else "expert"
        exit_incomplete("judge", code, f"stopped ({what}) with {summary.get('unjudged')} of "
                        f"{summary.get('questions')} candidates unjudged, {summary.get('failed')} failed — "
                        f"{summary.get('stopped') or 'no reason'}; "
                        f"{'raise the budget' if what == 'budget' else 'fix the expert'} and rerun the same command "
                        "to continue (nothing judged is asked again)")


if __name__ == "__main__":
    main()
