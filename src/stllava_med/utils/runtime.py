"""What every Hydra entry point does first: threads, seed, run directory; and the record it leaves at the end.

Torch-free, so that entry points import it at start-up (torch and Lightning load inside :func:`start_run`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from stllava_med.utils.config import hydra_output_dir, resolve_out_dir, save_config, setup_torch_threads
from stllava_med.utils.io import atomic_write_json

log = logging.getLogger("stllava_med")


def start_run(cfg: DictConfig, stage: str) -> Path:
    """Resolve and create the run directory, save the resolved config, seed, cap threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_torch_threads(cfg.get("num_threads"))
    out_dir = resolve_out_dir(cfg, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    seed = cfg.get("seed")
    if seed is not None:
        from lightning.pytorch import seed_everything

        seed_everything(int(seed), workers=True, verbose=False)
    log.info("%s: run directory %s", stage, out_dir)
    return out_dir


def finish_run(out_dir: Path, stage: str, summary: dict[str, Any]) -> None:
    """Record where the run went and its headline numbers in the Hydra job directory too, so that a
    multirun directory can be reported on without knowing each job's run directory."""
    job_dir = hydra_output_dir()
    info = {"stage": stage, "out_dir": str(out_dir), **summary}
    if job_dir is not None and job_dir.resolve() != out_dir.resolve():
        atomic_write_json(job_dir / "run_info.json", info)
