"""Work split into shards for generation and evaluation: one run directory, one sub-directory per shard.

A stage with ``<stage>.num_shards = n > 1`` cuts its work into the batches one process would run (batch ``b`` of
the full, ordered list) and runs batch ``b`` in shard ``b % n``. Each batch keeps its composition and, for
generation, its seed, so every sample is the one a single process draws. Shard ``i`` writes only under
``<run>/shards/shard-<i>-of-<n>/`` (its own progress and output files, resumable alone) and, once its work is
done, ``shard_done.json`` there. The shard that finds every ``shard_done.json`` present (under a lock, whichever
shard finishes last) merges the shards into the single-process layout of the run directory; ``merge_only=true``
does the same without a model.

``<run>/shards/sharding.json`` records ``n`` and the config's fingerprint when the first shard starts: a shard
launched with another ``num_shards`` (or another config, or a single-process run) in the same directory is
refused, as is a sharded run in a directory a single process wrote.

``shard_index`` / ``num_shards`` set to null take the rank from the launcher: ``RANK`` / ``WORLD_SIZE``
(torchrun), else ``SLURM_PROCID`` / ``SLURM_NTASKS`` (srun), else 0 / 1.

Torch-free.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stllava_med.utils.io import atomic_write_json, file_lock, load_json

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
LAYOUT_FILE = "sharding.json"
DONE_FILE = "shard_done.json"


class ShardingError(ValueError):
    """Shards that do not belong together: another ``num_shards`` or config in the same run directory."""


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def resolve_shard(shard_index: int | None, num_shards: int | None, where: str) -> tuple[int, int]:
    """``(index, n)``: the configured values, or the launcher's rank / world size where they are null."""
    if num_shards is None:
        num_shards = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    if shard_index is None:
        shard_index = _env_int("RANK", "SLURM_PROCID") or 0
    num_shards, shard_index = int(num_shards), int(shard_index)
    if num_shards < 1:
        raise ValueError(f"{where}.num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"{where}.shard_index must be in [0, {num_shards}) for {where}.num_shards={num_shards}, "
                         f"got {shard_index}")
    return shard_index, num_shards


def this_shard(settings: Any, run_dir: Path, where: str) -> tuple[int, int]:
    """``(index, n)`` of this process for a stage's ``<where>.*`` settings (``merge_only``, ``shard_index``,
    ``num_shards``): a merge-only run takes the layout recorded in ``run_dir`` (index 0)."""
    if settings.merge_only:
        layout = recorded_layout(run_dir)
        if layout is None:
            raise ValueError(f"{where}.merge_only: {run_dir} holds no sharded run ({SHARDS_DIR}/{LAYOUT_FILE} is "
                             "missing)")
        return 0, int(layout["num_shards"])
    return resolve_shard(settings.shard_index, settings.num_shards, where)


def shard_device(name: str | None, num_shards: int) -> str | None:
    """The device of a shard: ``auto`` under torchrun / srun with several GPUs visible picks the local rank's
    GPU (``LOCAL_RANK`` / ``SLURM_LOCALID``); anything else is left as it is."""
    if num_shards <= 1 or name not in (None, "auto"):
        return name
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if local is None:
        return name
    import torch

    if not torch.cuda.is_available():
        return name
    return f"cuda:{local % torch.cuda.device_count()}"


def owns_batch(batch_index: int, shard: tuple[int, int]) -> bool:
    index, n = shard
    return batch_index % n == index


def shards_root(run_dir: Path) -> Path:
    return Path(run_dir) / SHARDS_DIR


def shard_dir(run_dir: Path, index: int, num_shards: int) -> Path:
    return shards_root(run_dir) / f"shard-{index:05d}-of-{num_shards:05d}"


@contextlib.contextmanager
def merge_lock(run_dir: Path) -> Iterator[None]:
    with file_lock(shards_root(run_dir) / ".merge.lock"):
        yield


def recorded_layout(run_dir: Path) -> dict[str, Any] | None:
    path = shards_root(run_dir) / LAYOUT_FILE
    return load_json(path) if path.is_file() else None


def check_layout(run_dir: Path, num_shards: int, fingerprint: str, *, where: str, single_output: bool) -> None:
    """Refuse to mix layouts in ``run_dir``; record the sharded one on first use.

    ``single_output``: whether ``run_dir`` already holds a single process's output (its progress or predictions).
    """
    if recorded_layout(run_dir) is None:
        if num_shards == 1:
            return  # the single-process layout: nothing to record (no shards/ folder)
        if single_output:
            raise ShardingError(
                f"{where}: {run_dir} holds the output of a single-process run ({where}.num_shards=1); a sharded "
                f"run ({where}.num_shards={num_shards}) cannot continue it. Rerun with num_shards=1, or give "
                "the sharded run another out_dir")
    with merge_lock(run_dir):
        layout = recorded_layout(run_dir)
        if layout is None:
            atomic_write_json(shards_root(run_dir) / LAYOUT_FILE, {"num_shards": num_shards, "config": fingerprint})
            return
        if int(layout["num_shards"]) != num_shards:
            raise ShardingError(
                f"{where}: {run_dir} was started with {where}.num_shards={layout['num_shards']} "
                f"({shards_root(run_dir) / LAYOUT_FILE}); this process has num_shards={num_shards}. Every shard of "
                "a run needs the same num_shards (a different split would sample other batches): rerun with "
                f"{where}.num_shards={layout['num_shards']}, or use another out_dir")
        if layout.get("config") != fingerprint:
            raise ShardingError(
                f"{where}: the shards in {run_dir} were started with another config (fingerprint "
                f"{layout.get('config')}, this process: {fingerprint}); every shard of a run needs the same "
                "settings. Use the same overrides (shard_index aside), or another out_dir")


def mark_done(run_dir: Path, index: int, num_shards: int, record: dict[str, Any]) -> None:
    atomic_write_json(shard_dir(run_dir, index, num_shards) / DONE_FILE,
                      {"shard_index": index, "num_shards": num_shards, **record})


def finished(run_dir: Path, num_shards: int, work: str) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The done records of shards that finished ``work`` (a hash of the full work list) and the indices still
    missing (not finished, or finished a different list: another ``max_images`` / dataset ``limit``)."""
    done: dict[int, dict[str, Any]] = {}
    missing: list[int] = []
    for index in range(num_shards):
        path = shard_dir(run_dir, index, num_shards) / DONE_FILE
        record = load_json(path) if path.is_file() else None
        if record is not None and record.get("work") == work:
            done[index] = record
        else:
            missing.append(index)
    return done, missing
