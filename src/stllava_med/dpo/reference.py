"""The frozen reference of DPO, in three modes (``dpo.reference=``):

- ``adapter_off``: the policy's base model with the LoRA adapter disabled (peft ``disable_adapter``; the
  projector, a ``modules_to_save`` copy, falls back to its original too). No second model in memory; the
  vision tower's output is shared with the policy's pass when the tower is frozen.
- ``copy``: a separate frozen model, for a policy that does not start from the reference's weights (e.g.
  when it starts from a merged stage-1 checkpoint that the reference is not).
- ``precomputed``: one pass before training (``adapter_off`` or ``copy`` as its source, images included)
  writes every pair's reference log-probs to a cache on disk; training then runs no reference forward.
  The cache is keyed by (data fingerprint, reference weights hash, processor and template, max_length), so
  the jobs of a sweep over β, loss type, seed or data fraction share one cache; entries are per pair id and
  content digest, each written once: a process (any rank of any job) claims a chunk of the missing pairs under
  the cache's lock, computes and appends it, and processes that find every missing pair claimed wait for the
  claims to finish, then read (:meth:`ReferenceCache.claim`).

Reference passes never build an autograd graph and never switch the policy to eval mode: on CPU,
bitsandbytes repacks 4-bit weights after an eval-mode forward without gradients (the QLoRA trap).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub import snapshot_download
from torch import nn
from tqdm.auto import tqdm

from stllava_med.dpo.logps import LogProbs
from stllava_med.utils.io import append_whole_to, atomic_write_json, file_lock, sha256_file, stable_hash

log = logging.getLogger(__name__)

# A process claims at most this many batches of missing pairs at a time (fewer when the ranks of its job would
# otherwise not all get a share); processes that find nothing left to claim poll the cache every CLAIM_POLL_S.
CLAIM_BATCHES = 8
CLAIM_POLL_S = 1.0
CLAIM_WAIT_LOG_S = 60.0

REFERENCE_MODES = ("adapter_off", "copy", "precomputed")


class Reference(Protocol):
    """What the DPO module needs from a reference: summed answer log-probs of a batch, without gradients."""

    shares_vision: bool

    def logps(self, batch: Mapping[str, Any], *, vision_features: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]: ...


class AdapterOffReference:
    """The policy with its LoRA adapter (and trained projector copy) disabled."""

    def __init__(self, policy: nn.Module, *, prefix_sharing: bool = True) -> None:
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("dpo.reference=adapter_off needs a peft (LoRA) policy; use copy or precomputed")
        self.policy = policy
        self.logprobs = LogProbs(policy, prefix_sharing=prefix_sharing)
        # Sharing the vision tower's output is only valid when the adapter does not touch the tower.
        self.shares_vision = self.logprobs.split_vision and not self.logprobs.vision_trainable

    @torch.no_grad()
    def logps(self, batch: Mapping[str, Any], *, vision_features: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.policy.training
        self.policy.eval()  # the reference is deterministic whatever the policy's dropout
        try:
            with self.policy.disable_adapter():
                features = None
                if self.logprobs.fast:
                    features = self.logprobs.image_features(batch, vision_features if self.shares_vision else None)
                out = self.logprobs(batch, image_features=features)
        finally:
            self.policy.train(was_training)
        return out.chosen.detach(), out.rejected.detach()

    def to(self, device: torch.device) -> AdapterOffReference:
        return self  # lives inside the policy


class CopyReference:
    """A separate, frozen model (eval mode, no gradients, never in the optimizer)."""

    def __init__(self, model: nn.Module, *, prefix_sharing: bool = True) -> None:
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.logprobs = LogProbs(model, prefix_sharing=prefix_sharing)
        self.shares_vision = False

    @torch.no_grad()
    def logps(self, batch: Mapping[str, Any], *, vision_features: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.logprobs(batch)
        return out.chosen.detach(), out.rejected.detach()

    def to(self, device: torch.device) -> CopyReference:
        if not (getattr(self.model, "is_loaded_in_4bit", False) or getattr(self.model, "is_loaded_in_8bit", False)):
            self.model.to(device)
        return self


# --------------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _local_model_dir(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:  # a hub id already in the local cache (we run offline)
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:
        return None


def _file_hashes(directory: Path, memo_path: Path | None) -> dict[str, str]:
    """sha256 of the weight files, memoised by (path, size, mtime) so sweep jobs do not re-read 14 GB."""
    memo: dict[str, str] = {}
    if memo_path is not None and memo_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            memo = json.loads(memo_path.read_text())
    hashes: dict[str, str] = {}
    changed = False
    for file in sorted(directory.iterdir()):
        if not file.is_file() or not file.name.endswith(_WEIGHT_SUFFIXES):
            continue
        stat = file.stat()
        memo_key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = sha256_file(file)
            changed = True
        hashes[file.name] = memo[memo_key]
    if changed and memo_path is not None:
        atomic_write_json(memo_path, memo)
    return hashes


def tensor_fingerprint(model: nn.Module) -> str:
    """Hash of a model's parameters and buffers (when its weights do not come from local files)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str(data.dtype).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def reference_fingerprint(name_or_path: str, *, settings: Mapping[str, Any], model: nn.Module | None = None,
                          memo_path: Path | None = None) -> dict[str, Any]:
    """What determines the reference's numbers: its weight files (or tensors) and how they are loaded."""
    directory = _local_model_dir(name_or_path)
    if directory is not None:
        files = _file_hashes(directory, memo_path)
        if files:
            return {"weights": stable_hash(files), "load": dict(settings)}
    if model is None:
        raise ValueError(f"cannot fingerprint the reference {name_or_path!r}: no local weight files and no model")
    return {"weights": tensor_fingerprint(model), "load": dict(settings)}


# --------------------------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------------------------


class ReferenceCacheError(ValueError):
    """A reference cache entry is unusable (non-finite, malformed or missing); the message names it."""




class CacheClaim:
    """``<cache>/claims/<host>-<pid>-<uid>.json``: the pair ids one process is computing. The process holds an
    exclusive ``flock`` on the file while it works; a claim whose lock can be taken belongs to a process that
    died (the kernel released its lock), and the next reader removes it, so its pairs become claimable again."""

    def __init__(self, path: Path, ids: list[str]) -> None:
        self.path = path
        self.ids = ids
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "ids": ids}) + "\n").encode())
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the claim (call under the cache lock, after its entries were appended)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    @staticmethod
    def live_ids(path: Path) -> set[str] | None:
        """The ids of a live claim; None (and the file removed) when its owner is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its owner is computing
                with open(path, encoding="utf-8") as fh:
                    try:
                        return set(json.load(fh)["ids"])
                    except (ValueError, KeyError, TypeError):
                        return set()
            log.warning("removing the stale reference cache claim %s (its process is gone)", path)
            path.unlink(missing_ok=True)
            return None
        finally:
            os.close(fd)



def claim_missing(lock: Path, claims_dir: Path, missing: Callable[[], set[str]], *, max_ids: int, share: int = 1,
                  before: Callable[[], None] | None = None) -> tuple[CacheClaim | None, int, int]:
    """The claim protocol of an on-disk cache (the reference log-probs, the vision features): under ``lock``,
    ``missing()`` and a claim (``claims_dir``) on up to ``max_ids`` of the missing keys no live process has
    claimed, at most ``1/share`` of them. Returns ``(claim or None, missing, claimed by others)``."""
    with file_lock(lock):
        if before is not None:
            before()
        absent = missing()
        if not absent:
            return None, 0, 0
        taken: set[str] = set()
        if claims_dir.is_dir():
            for path in sorted(claims_dir.glob("*.json")):
                ids = CacheClaim.live_ids(path)
                if ids:
                    taken |= ids
        free = sorted(absent - taken)
        busy = len(absent & taken)
        if not free:
            return None, len(absent), busy
        size = max(1, min(max_ids, math.ceil(len(free) / max(1, share))))
        claims_dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        return CacheClaim(claims_dir / name, free[:size]), len(absent), busy


def fill_missing(claim: Callable[[], tuple[CacheClaim | None, int, int]], release: Callable[[CacheClaim], None],
                 compute: Callable[[list[str], Any], None], *, what: str, where: Any, progress: bool = True) -> None:
    """Fill a cache together with every other process that needs it: claim a chunk of the missing, unclaimed
    keys, ``compute(ids, bar)`` it (computing appends the entries), release the claim; when every missing key
    is claimed by others, wait for them (a dead claimant's claim is reclaimed); return when nothing is
    missing."""
    bar = None
    waited = last_log = 0.0
    try:
        while True:
            held, missing, busy = claim()
            if held is None and not missing:
                return
            if held is not None:
                if bar is None:
                    log.info("precomputing %s (%d missing) into %s", what, missing, where)
                    bar = tqdm(desc=what, unit="item", total=missing, disable=not progress)
                try:
                    compute(held.ids, bar)
                finally:
                    release(held)
                continue
            if waited - last_log >= CLAIM_WAIT_LOG_S or not waited:
                log.info("waiting for %d %s that other processes are computing (%s)", busy, what, where)
                last_log = waited
            time.sleep(CLAIM_POLL_S)
            waited += CLAIM_POLL_S
    finally:
        if bar is not None:
            bar.close()


class ReferenceCache:
    """``<root>/<key>/logps.jsonl``: one line per pair ``{"id", "digest", "ref_chosen_logps",
    "ref_rejected_logps"}``, appended under a file lock; ``meta.json`` records what the key was made of;
    ``claims/`` holds the claims of the processes filling it (:meth:`claim`)."""

    def __init__(self, root: str | os.PathLike, *, data_fingerprint: str, reference: Mapping[str, Any],
                 processor: str, max_length: int | None) -> None:
        self.key_parts = {"data": data_fingerprint, "reference": dict(reference), "processor": processor,
                          "max_length": max_length}
        self.key = stable_hash(self.key_parts, n=20)
        self.dir = Path(root) / self.key
        self.path = self.dir / "logps.jsonl"
        self.lock = self.dir / ".lock"
        self.claims_dir = self.dir / "claims"

    def _ensure_meta(self) -> None:
        meta = self.dir / "meta.json"
        if not meta.is_file():
            atomic_write_json(meta, {"key": self.key, **self.key_parts})

    def read(self) -> dict[str, tuple[str, float, float]]:
        """id -> (digest, ref_chosen_logps, ref_rejected_logps); a non-finite or malformed entry is an error."""
        table: dict[str, tuple[str, float, float]] = {}
        if not self.path.is_file():
            return table
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.readlines()
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                row = json.loads(line)
                pair_id, digest = str(row["id"]), str(row["digest"])
                chosen, rejected = float(row["ref_chosen_logps"]), float(row["ref_rejected_logps"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                if lineno == len(lines) and not line.endswith("\n"):
                    log.warning("%s: ignoring a truncated last line (a killed writer)", where)
                    continue
                raise ReferenceCacheError(f"{where}: malformed reference cache entry ({err})") from err
            if not (math.isfinite(chosen) and math.isfinite(rejected)):
                raise ReferenceCacheError(
                    f"{where}: pair {pair_id!r} has non-finite cached reference log-probs "
                    f"(chosen {chosen}, rejected {rejected}); delete {self.dir} to recompute the cache")
            table[pair_id] = (digest, chosen, rejected)
        return table

    def missing(self, needed: Mapping[str, str]) -> set[str]:
        table = self.read()
        return {i for i, digest in needed.items() if i not in table or table[i][0] != digest}

    def claim(self, needed: Mapping[str, str], *, max_ids: int, share: int = 1
              ) -> tuple[CacheClaim | None, int, int]:
        """Under the cache lock: what of ``needed`` is missing, and a claim on up to ``max_ids`` of the missing
        pairs that no live process has claimed (at most ``1/share`` of them, so the ranks of a job all get
        work). Returns ``(claim or None, missing, claimed by others)``; the "what is missing" check and the
        claim are one critical section, so no pair is ever computed by two processes."""
        return claim_missing(self.lock, self.claims_dir, lambda: self.missing(needed), max_ids=max_ids,
                             share=share, before=self._ensure_meta)

    def release(self, claim: CacheClaim) -> None:
        with file_lock(self.lock):
            claim.release()

    def append(self, ids: Iterable[str], digests: Mapping[str, str], chosen: torch.Tensor,
               rejected: torch.Tensor) -> None:
        ids = list(ids)
        chosen_values = chosen.detach().double().cpu().tolist()  # lossless for any dtype
        rejected_values = rejected.detach().double().cpu().tolist()
        bad = [i for i, c, r in zip(ids, chosen_values, rejected_values) if not (math.isfinite(c) and math.isfinite(r))]
        if bad:
            raise ReferenceCacheError(f"the reference produced non-finite log-probs for pairs {bad[:5]}; "
                                      "check the reference weights and dtype")
        lines = "".join(json.dumps({"id": i, "digest": digests[i], "ref_chosen_logps": c, "ref_rejected_logps": r})
                        + "\n" for i, c, r in zip(ids, chosen_values, rejected_values))
        with file_lock(self.lock):
            self._ensure_meta()
            # whole lines or none (a full disk: DiskFull naming the cache file, the file as it was)
            append_whole_to(self.path, lines.encode("utf-8"))


class PrecomputedReference:
    """Reference log-probs looked up by pair id; filled by :meth:`prepare` before training starts.

    ``batches(ids, rank, world_size)`` yields collated batches of the given pairs (this rank's share);
    ``source`` computes their reference log-probs once. With several ranks each computes its share, then all
    wait at ``barrier`` and read the complete cache."""

    shares_vision = False

    def __init__(self, cache: ReferenceCache, source: Any, needed: Mapping[str, str],
                 batches: Callable[[set[str], int, int], Iterable[Mapping[str, Any]]], *,
                 batch_size: int = 1, progress: bool = True) -> None:
        self.cache = cache
        self.source = source
        self.needed = dict(needed)
        self.batches = batches
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.table: dict[str, tuple[float, float]] | None = None
        self.computed = 0
        # batch -> the vision tower's output from the vision feature cache (dpo.vision_cache_dir), for a source
        # that shares the tower's output (adapter_off); None: the source encodes the batch's pixels itself
        self.vision: Callable[[Mapping[str, Any]], torch.Tensor] | None = None

    def prepare(self, device: torch.device, *, rank: int = 0, world_size: int = 1,
                barrier: Callable[[], None] | None = None, move: Callable[[Any], Any] | None = None) -> None:
        """Fill the cache's missing entries together with every other process that needs them, then read it.

        Each process (every rank of every sweep job) loops: claim a chunk of the missing, unclaimed pairs
        (:meth:`ReferenceCache.claim`), compute and append it, release the claim. When every missing pair is
        claimed by others it waits for them (a dead claimant's claim is reclaimed); when nothing is missing it
        reads the cache. Every entry is written exactly once."""
        barrier = barrier or (lambda: None)
        max_ids = self.batch_size * CLAIM_BATCHES
        fill_missing(lambda: self.cache.claim(self.needed, max_ids=max_ids, share=world_size), self.cache.release,
                     lambda ids, bar: self._compute(ids, rank, move, bar), what="reference log-probs",
                     where=self.cache.dir, progress=self.progress and rank == 0)
        barrier()  # the ranks leave together
        table = self.cache.read()
        absent = [i for i in self.needed if i not in table or table[i][0] != self.needed[i]]
        if absent:
            raise ReferenceCacheError(f"{self.cache.path}: {len(absent)} pairs have no reference log-probs, "
                                      f"e.g. {absent[:3]}")
        self.table = {i: (table[i][1], table[i][2]) for i in self.needed}
        self.source = None  # a copy reference is no longer needed in memory

    def _compute(self, ids: list[str], rank: int, move: Callable[[Any], Any] | None, bar: Any = None) -> None:
        if not ids:
            return
        if self.source is None:
            raise ReferenceCacheError(f"{len(ids)} pairs lack cached reference log-probs and there is no source model")

        model = getattr(self.source, "model", None) or getattr(self.source, "policy", None)
        was_training = bool(model.training) if model is not None else False
        if model is not None:
            model.eval()  # no dropout; the 4-bit repacking this causes on CPU is undone by BnbCpuGuard
        try:
            for batch in self.batches(set(ids), 0, 1):
                if move is not None:
                    batch = move(batch)
                with torch.no_grad():
                    features = (self.vision(batch) if self.vision is not None
                                and getattr(self.source, "shares_vision", False) else None)
                    chosen, rejected = self.source.logps(batch, vision_features=features)
                self.cache.append(batch["ids"], self.needed, chosen, rejected)
                self.computed += len(batch["ids"])
                if bar is not None:
                    bar.update(len(batch["ids"]))
        finally:
            if model is not None:
                model.train(was_training)

    def logps(self, batch: Mapping[str, Any], *, vision_features: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is None:
            raise RuntimeError("PrecomputedReference.prepare() has not run")
        try:
            values = [self.table[i] for i in batch["ids"]]
        except KeyError as err:
            raise ReferenceCacheError(f"pair {err.args[0]!r} has no precomputed reference log-probs") from None
        device = batch["chosen_input_ids"].device
        # float64 (lossless; the step casts to the policy's dtype), float32 where the device has no float64 (MPS)
        tensor = torch.tensor(values, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        return tensor[:, 0], tensor[:, 1]

    def to(self, device: torch.device) -> PrecomputedReference:
        if self.source is not None:
            self.source.to(device)
        return self
