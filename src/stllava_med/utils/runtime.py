"""What every Hydra entry point does first: threads, seed, run directory, a readable console; and what it does
last: the record in the Hydra job directory, the summary table, the objective a sweeper optimises.

Torch-free, so that entry points import it at start-up (torch and Lightning load inside :func:`start_run`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, open_dict

from stllava_med.utils.config import hydra_output_dir, resolve_out_dir, save_config, setup_torch_threads
from stllava_med.utils.io import atomic_write_json, load_json
from stllava_med.utils.run_identity import claim_run_dir

log = logging.getLogger("stllava_med")


# --------------------------------------------------------------------------------------------------------------
# A console a researcher reads
# --------------------------------------------------------------------------------------------------------------

# Library warnings known to be harmless here, silenced at their source by exact message (nothing else from
# these libraries is hidden). Each entry: (category, message regex, why it is harmless).
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema",
     "our conf/hydra/launcher/submitit_*.yaml extend the plugin's schema of the same name, as its docs show; "
     "Hydra 1.3 still matches them and only warns"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft reads the deprecated transformers property; nothing of ours calls it"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning's pytree helper against torch 2.13; fixed upstream, no effect on results"),
    (UserWarning, r"Your `IterableDataset` has `__len__` defined",
     "our preference IterableDataset's __len__ is exact under multi-worker loading (equal disjoint slots)"),
)

# Library log records known to be noise, by logger name and message regex (logging, not warnings).
KNOWN_LOG_NOISE: tuple[tuple[str, str, str], ...] = (
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to `\w+Pil`",
     "the project has no torchvision on purpose (families/processor_loading.py); the Pil classes are used"),
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
     "the optional `kernels` package only speeds up 4-bit matmuls on CPU; bitsandbytes falls back"),
    ("lightning.pytorch.utilities.rank_zero", r"^💡 Tip: For seamless cloud logging",
     "an advertisement Lightning prints for every Trainer"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_known_noise() -> None:
    """Silence the library warnings and log lines listed in :data:`KNOWN_WARNINGS` / :data:`KNOWN_LOG_NOISE`
    (idempotent; called by :func:`start_run` and the pipeline, before any library is imported)."""
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    by_logger: dict[str, list[str]] = {}
    for name, message, _why in KNOWN_LOG_NOISE:
        by_logger.setdefault(name, []).append(message)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))


def single_console() -> None:
    """Every log line once. Lightning gives its ``lightning`` logger a console handler of its own (``INFO: ...``)
    and lets records propagate to the root logger too, where Hydra's handler prints them a second time. Where the
    root logger has handlers (Hydra's job logging, pytest), Lightning's own console handlers go and its records
    reach the console, and the job's log file, through the root logger only."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
                logger.removeHandler(handler)
        logger.propagate = True


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.6g}"
    return str(value)


def summary_table(title: str, rows: Mapping[str, Any]) -> str:
    """``title`` and an aligned two-column ``key | value`` table (None values left out)."""
    items = [(str(k), _format_value(v)) for k, v in rows.items() if v is not None]
    if not items:
        return title
    width = max(len("key"), *(len(k) for k, _ in items))
    value_width = max(len("value"), *(len(v) for _, v in items))
    lines = [title, f"  {'key':<{width}} | value", f"  {'-' * width}-+-{'-' * value_width}"]
    lines += [f"  {k:<{width}} | {v}" for k, v in items]
    return "\n".join(lines)


def print_summary(title: str, rows: Mapping[str, Any]) -> None:
    """Print :func:`summary_table` to stdout (after the stage's log lines, flushed first)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(f"\n{summary_table(title, rows)}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Start and finish
# --------------------------------------------------------------------------------------------------------------


def apply_image_limit(cfg: DictConfig | Mapping[str, Any]) -> None:
    """The stage's ``max_image_pixels`` for every image this process opens from now on."""
    from stllava_med.data.vqa import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

    set_max_image_pixels(cfg.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))  # null: no limit


def start_run(cfg: DictConfig, stage: str) -> Path:
    """Resolve and create the run directory, save the resolved config, seed, cap threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()
    setup_torch_threads(cfg.get("num_threads"))
    apply_image_limit(cfg)
    out_dir = claim_run_dir(cfg, resolve_out_dir(cfg, stage), stage)  # this config's, and this process's
    if cfg.get("out_dir") and Path(str(cfg.out_dir)).expanduser().resolve() != out_dir:  # run_dir_mismatch=new
        with open_dict(cfg):
            cfg.out_dir = str(out_dir)
    save_config(cfg, out_dir)
    seed = cfg.get("seed")
    if seed is not None:
        from lightning.pytorch import seed_everything

        seed_everything(int(seed), workers=True, verbose=False)
    single_console()
    log.info("%s: run directory %s", stage, out_dir)
    return out_dir


def finish_run(out_dir: Path, stage: str, summary: dict[str, Any]) -> None:
    """Record where the run went and its headline numbers in the Hydra job directory too, so that a
    multirun directory can be reported on without knowing each job's run directory."""
    job_dir = hydra_output_dir()
    info = {"stage": stage, "out_dir": str(out_dir), **summary}
    if job_dir is not None and job_dir.resolve() != out_dir.resolve():
        atomic_write_json(job_dir / "run_info.json", info)


# --------------------------------------------------------------------------------------------------------------
# The objective (what an entry point returns to Hydra's sweeper)
# --------------------------------------------------------------------------------------------------------------


class MissingObjective(KeyError):
    """``objective`` names a metric this run does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _sweeper_direction() -> str | None:
    """``minimize`` / ``maximize`` when the sweeper has a single direction (Optuna), else None."""
    try:
        direction = HydraConfig.get().sweeper.get("direction")
    except ValueError:  # not under @hydra.main
        return None
    if direction is None or isinstance(direction, ListConfig | list):
        return None
    return str(direction).rsplit(".", 1)[-1]  # Direction.maximize -> maximize


def _single_run() -> bool:
    """True in a plain ``@hydra.main`` run (not a multirun, whose sweeper needs the objective)."""
    try:
        return HydraConfig.get().mode == RunMode.RUN
    except ValueError:  # not under @hydra.main: a caller that asked for the value
        return False


def objective(cfg: DictConfig, stage: str, metrics: Mapping[str, Any]) -> float | None:
    """The value of ``cfg.objective`` among ``metrics`` (flat ``{"val/loss": 0.5, ...}``), the float an entry
    point returns so that a Hydra sweeper (``hydra/sweeper=optuna``) can optimise it; None when
    ``objective: null``. Also written into the job's ``run_info.json``.

    A name this run lacks raises :class:`MissingObjective` listing the names it has (in a sweep, or called
    outside Hydra); a plain single run only warns, since nothing reads the value. Optuna's direction lives
    in the sweeper config (``hydra.sweeper.direction=maximize``); a sweep whose direction disagrees with
    ``objective_direction`` gets a warning."""
    key = cfg.get("objective")
    if key is None:
        return None
    key = str(key)
    numbers = {str(k): v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if key not in numbers and _single_run():
        # a plain run (no sweeper reads the value) has done its work: say so, do not fail it
        log.warning("%s: objective=%r is not a metric of this run (e.g. no validation split); nothing is returned. "
                    "Available: %s", stage, key, ", ".join(sorted(numbers)) or "none")
        return None
    if key not in numbers:
        raise MissingObjective(
            f"{stage}: objective={key!r} is not a metric of this run (its results are written; only the "
            f"objective is missing). Available: {', '.join(sorted(numbers)) or 'none'}. Set objective=<one of "
            "them>, or objective=null to return nothing.")
    value = float(numbers[key])
    wanted = str(cfg.get("objective_direction") or "")
    direction = _sweeper_direction()
    if wanted and direction and direction != wanted:
        log.warning("%s: the sweeper will %s %s, but objective_direction is %s: pass "
                    "hydra.sweeper.direction=%s", stage, direction, key, wanted, wanted)
    log.info("%s: objective %s = %.6g%s", stage, key, value, f" ({wanted})" if wanted else "")
    job_dir = hydra_output_dir()
    info_path = job_dir / "run_info.json" if job_dir is not None else None
    if info_path is not None and info_path.is_file():
        atomic_write_json(info_path, {**load_json(info_path),
                                      "objective": {"key": key, "value": value, "direction": wanted or None}})
    return value


# --------------------------------------------------------------------------------------------------------------
# Honest endings: a stage that stops before it finished exits non-zero
# --------------------------------------------------------------------------------------------------------------

# Exit statuses of a stage that stopped before finishing (docs/stages.md, "Exit status"). A stage stopped by a
# signal exits 128 + the signal's number, the status a shell reports for a process the signal killed: 143 for
# SIGTERM (15), 138 for SIGUSR1 (10). The judge exits 3 when a budget stopped it and 4 when the expert did.
JUDGE_EXIT_BUDGET = 3
JUDGE_EXIT_EXPERT = 4


def signal_exit_code(signum: int) -> int:
    """``128 + signum``: 143 for SIGTERM, 138 for SIGUSR1."""
    return 128 + int(signum)


class StageStopped(SystemExit):
    """A stage stopped before it finished, resumably (a signal, a budget, a dead expert): the process exits with
    ``code``. A SystemExit, so that Lightning (which re-raises it after its teardown), Hydra (which records only
    ``Exception`` s as failed jobs) and the pipeline (which writes ``DONE.json`` only after a stage returns) pass
    it on untouched, and the exit status reaches the scheduler."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StageIncomplete(RuntimeError):
    """Inside a Hydra multirun, a stage that stopped early fails its job instead of exiting: the sweep runs its
    other jobs and Hydra exits non-zero at the end."""


def _in_multirun() -> bool:
    try:
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under @hydra.main
        return False


def exit_incomplete(stage: str, code: int, message: str) -> None:
    """End a stage that stopped before finishing: ``message`` is the job's last log line, then the process exits
    with ``code`` (a single run), or the job fails with :class:`StageIncomplete` (a multirun: the other jobs
    still run and Hydra exits non-zero after them)."""
    log.error("%s: %s (exit %d)", stage, message, code)
    if _in_multirun():
        raise StageIncomplete(f"{stage}: {message}")
    raise StageStopped(code, f"{stage}: {message}")


def settle_dataloader(iterator: Any) -> None:
    """End a DataLoader iterator's worker processes and wait for its queue feeder threads to exit.

    CPython 3.11 can deadlock a child forked while another thread of the parent is exiting (the child waits
    forever on the interpreter's thread-list lock in ``PyOS_AfterFork_Child``). A multi-process DataLoader that
    finishes leaves its index queues' feeder threads exiting for a moment after it shuts down; the next loader to
    fork its workers then (the training loader right after the vision cache fill's, under DDP) hung a run. Our
    loaders settle theirs when they end, so that the next fork finds no thread on its way out. A no-op for an
    iterator without workers."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    for queue in getattr(iterator, "_index_queues", None) or []:
        thread = getattr(queue, "_thread", None)  # multiprocessing.Queue's feeder, started by its first put
        if thread is not None:
            thread.join(timeout=10)


def worker_ignores_sigterm(worker_id: int) -> None:
    """``worker_init_fn`` of our DataLoaders: a worker ignores SIGTERM. SLURM (and ``kill -- -PGID``) signals every
    process of a job; a worker killed by it fails the step before the main process, which handles the signal,
    can write its checkpoint. The main process ends its workers itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
