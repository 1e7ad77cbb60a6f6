"""Run identity: a run directory belongs to the config that made it, and to one process at a time.

The first process that starts a stage in a directory records ``run_identity.json`` there: the stage, the config's
fingerprint (as :func:`stllava_med.utils.config.config_fingerprint`: keys in ``run_dir_ignore`` left out, and
the judge's budget and pacing, :data:`RESUMABLE`) and the fingerprinted keys themselves. A later start in the
same directory compares its own config with that record:

* the same fingerprint resumes (or reuses) the run, as before; keys in ``run_dir_ignore`` (progress bars, worker
  counts, checkpoint intervals, shard indices...) may differ;
* another fingerprint is refused (:class:`RunDirMismatch`, naming each differing key ``old → new``), unless
  ``run_dir_mismatch=new``: the run then goes to the sub-directory ``<out_dir>/run-<fingerprint>`` (itself checked
  the same way, so rerunning that command resumes it).

A directory started before this record existed is judged by its ``config.yaml``.

While a stage runs, its process holds an exclusive lock on ``<run dir>/.run.lock`` (a shard of generate / evaluate:
``.run-shard-<i>-of-<n>.lock``); a second process that starts the same run is refused at once
(:class:`RunDirBusy`, naming the holder's pid and host) instead of training beside it. Ranks other than 0 of a
distributed launch do not take the lock (they belong to rank 0's run). The judge takes no lock: several judges may
share one store, which hands each judgement to one of them (:mod:`stllava_med.selftrain.store`).

Torch-free.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

from stllava_med.utils.io import atomic_write_json, file_lock, load_json

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
LOCK_FILE = ".run.lock"
MISMATCH_POLICIES = ("error", "new")

# Keys a rerun may change in the same directory although they are part of the directory's hash: they change how a
# run proceeds, not what it produces. The judge's budget and pacing (raising expert.max_requests and rerunning the
# same command is how a stopped judge continues; judgements are keyed by the expert model, prompt, image and
# answers, not by these).
RESUMABLE: dict[str, tuple[str, ...]] = {
    "judge": ("expert.max_requests", "expert.max_cost_usd", "expert.concurrency", "expert.requests_per_minute",
              "expert.tokens_per_minute", "expert.burst_s", "expert.max_retries", "expert.max_invalid_retries",
              "expert.backoff_base_s", "expert.backoff_max_s", "expert.max_consecutive_failures", "expert.timeout_s",
              "expert.price_input_per_mtok", "expert.price_output_per_mtok", "judge.retry_failed",
              "judge.store_synchronous", "judge.limit"),
}

# Locks this process holds, by path: held until the process ends (a stage that returns, or fails, leaves the
# directory to the next process then); a second claim from the same process (the pipeline, tests) is a no-op.
_HELD: dict[str, IO[str]] = {}


class RunDirMismatch(ValueError):
    """The run directory was made by another config."""


class RunDirBusy(RuntimeError):
    """Another process runs in this run directory now."""


def _mismatch_policy(cfg: DictConfig | Mapping[str, Any]) -> str:
    from stllava_med.schema import _Stage  # the key's default lives in the schema only

    value = cfg.get("run_dir_mismatch") if "run_dir_mismatch" in cfg else None
    policy = str(value if value is not None else _Stage.run_dir_mismatch)
    if policy not in MISMATCH_POLICIES:
        raise ValueError(f"run_dir_mismatch must be one of {MISMATCH_POLICIES}, not {policy!r}")
    return policy


def _identity_container(cfg: DictConfig | Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The config the identity is made of: resolved, secrets redacted, ignored (and :data:`RESUMABLE`) keys dropped."""
    from stllava_med.utils.config import fingerprinted_config, redact

    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    else:
        container = dict(cfg)
    assert isinstance(container, dict)
    return fingerprinted_config(redact(container), RESUMABLE.get(stage, ()))


def identity(cfg: DictConfig | Mapping[str, Any], stage: str) -> dict[str, Any]:
    """What ``run_identity.json`` holds for ``cfg``."""
    from stllava_med.utils.io import stable_hash

    container = _identity_container(cfg, stage)
    from stllava_med.utils.config import leaves  # utils.config imports this module

    return {"stage": stage, "fingerprint": stable_hash(container, n=10), "config": leaves(container)}


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old → new`` for every fingerprinted key whose value differs (``<unset>`` where one side lacks it)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            lines.append(f"{key}: {_show(a)} → {_show(b)}")
    return lines


def schema_defaults(stage: str) -> dict[str, Any]:
    """Every key of ``stage``'s schema with its declared default (flattened, dotted; interpolations unresolved)."""
    from stllava_med.schema import STAGE_SCHEMAS
    from stllava_med.utils.config import leaves

    schema = STAGE_SCHEMAS.get(stage)
    if schema is None:
        return {}
    container = OmegaConf.to_container(OmegaConf.structured(schema), resolve=False, throw_on_missing=False)
    assert isinstance(container, dict)
    return leaves(container)


def keys_added_at_default(old: Mapping[str, Any], new: Mapping[str, Any], stage: str) -> set[str]:
    """Keys ``new`` has and the recorded ``old`` lacks whose value is the schema's default: keys a later version
    added, which change nothing where they keep their default (a new key's default is the old behaviour)."""
    defaults = schema_defaults(stage)
    return {key for key in set(new) - set(old)
            if key in defaults and json.dumps(new[key], default=str) == json.dumps(defaults[key], default=str)}


def recorded_identity(run_dir: Path, stage: str) -> tuple[dict[str, Any] | None, Path | None]:
    """The identity a directory was made with (``run_identity.json``, else one computed from its ``config.yaml``),
    and the file it comes from; (None, None) for a directory no stage has started in."""
    path = run_dir / IDENTITY_FILE
    if path.is_file():
        return load_json(path), path
    legacy = run_dir / "config.yaml"
    if legacy.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(legacy), resolve=False)
        assert isinstance(saved, dict)
        return identity(saved, stage), legacy
    return None, None


def check_identity(cfg: DictConfig | Mapping[str, Any], run_dir: Path, stage: str) -> Path:
    """The run directory this config may use: ``run_dir`` itself (recording its identity on first use), or, under
    ``run_dir_mismatch=new``, ``<run_dir>/run-<fingerprint>`` when ``run_dir`` belongs to another config."""
    policy = _mismatch_policy(cfg)
    mine = identity(cfg, stage)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / ".identity.lock"):  # two processes starting at once: one records, the other compares
        recorded, source = recorded_identity(run_dir, stage)
        if recorded is None:
            atomic_write_json(run_dir / IDENTITY_FILE, {**mine, "created": time.time()})
            return run_dir
        if recorded.get("fingerprint") == mine["fingerprint"]:
            if source is not None and source.name != IDENTITY_FILE:  # a directory from before the record
                atomic_write_json(run_dir / IDENTITY_FILE, {**mine, "created": time.time()})
            return run_dir
        old_config = recorded.get("config") or {}
        added = keys_added_at_default(old_config, mine["config"], stage)
        if added and not differing_keys(old_config, {k: v for k, v in mine["config"].items() if k not in added}):
            # the directory was made before these keys existed; their defaults are what that code did
            log.info("%s: %s was recorded before %s existed; at their defaults this is the same config",
                     stage, run_dir, ", ".join(sorted(added)))
            atomic_write_json(run_dir / IDENTITY_FILE, {**mine, "created": recorded.get("created", time.time()),
                                                        "previous_fingerprint": recorded.get("fingerprint")})
            return run_dir
    if policy == "new":
        return check_identity(cfg, run_dir / f"run-{mine['fingerprint']}", stage)
    diff = differing_keys(recorded.get("config") or {}, mine["config"])
    shown = "; ".join(diff[:20]) + (f"; and {len(diff) - 20} more" if len(diff) > 20 else "")
    raise RunDirMismatch(
        f"{stage}: {run_dir} was made by another config (fingerprint {recorded.get('fingerprint')}, recorded in "
        f"{source}; this config: {mine['fingerprint']}). Differing keys (old → new): {shown or 'none shown'}. "
        "Continuing would mix two configs in one run. Use another out_dir, or run_dir_mismatch=new to start a "
        f"fresh run in {run_dir / ('run-' + mine['fingerprint'])}")


def _process_rank() -> int:
    """This process's global rank in a distributed launch (0 outside one)."""
    for name in ("RANK", "SLURM_PROCID" if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 else ""):
        value = os.environ.get(name, "") if name else ""
        if value.isdigit():
            return int(value)
    # Lightning's subprocess launcher gives the processes it starts LOCAL_RANK / NODE_RANK
    return int(os.environ.get("LOCAL_RANK", "0") or 0) + int(os.environ.get("NODE_RANK", "0") or 0)


def hold_lock(run_dir: Path, stage: str, name: str = LOCK_FILE) -> Path | None:
    """Take ``<run_dir>/<name>`` for the rest of this process, or raise :class:`RunDirBusy` naming the process that
    holds it. Ranks > 0 of a distributed launch take nothing (None)."""
    if name == LOCK_FILE and _process_rank() > 0:
        return None
    path = (Path(run_dir) / name).resolve()
    if str(path) in _HELD:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held open for the process's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirBusy(
            f"{stage}: {run_dir} is in use by another process ({holder}; lock {path}). Two processes in one run "
            "directory would write the same checkpoints and outputs: wait for it to end (rerunning the same "
            "command then resumes), or give this run another out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _HELD[str(path)] = handle
    return path


def release(run_dir: Path, name: str = LOCK_FILE) -> None:
    """Give up a lock this process holds (tests; a process's locks otherwise go when it ends)."""
    handle = _HELD.pop(str((Path(run_dir) / name).resolve()), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def shard_lock_name(cfg: DictConfig | Mapping[str, Any], stage: str) -> str | None:
    """The lock a process of ``stage`` takes: ``.run.lock``, one per shard for a sharded generate / evaluate
    (``.run-shard-<i>-of-<n>.lock``), none for a merge-only run (the merge has its own lock)."""
    section = {"generate": "generate", "evaluate": "eval"}.get(stage)
    node = cfg.get(section) if section and section in cfg else None
    if node is None or "num_shards" not in node:
        return LOCK_FILE
    if node.get("merge_only"):
        return None
    from stllava_med.utils.sharding import resolve_shard

    index, n = resolve_shard(node.get("shard_index"), node.get("num_shards"), section)
    return LOCK_FILE if n == 1 else f".run-shard-{index:05d}-of-{n:05d}.lock"


def claim_run_dir(cfg: DictConfig, run_dir: Path, stage: str, *, lock: bool = True) -> Path:
    """Check ``run_dir`` against ``cfg`` (:func:`check_identity`) and, with ``lock``, hold its lock
    (:func:`hold_lock`). Returns the directory the run uses (a ``run-<fingerprint>`` sub-directory under
    ``run_dir_mismatch=new``)."""
    run_dir = check_identity(cfg, run_dir, stage)
    name = shard_lock_name(cfg, stage) if lock else None
    if name is not None:
        hold_lock(run_dir, stage, name)
    return run_dir
