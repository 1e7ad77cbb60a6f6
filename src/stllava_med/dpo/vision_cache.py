"""The frozen vision tower's output, computed once per sweep (``dpo.vision_cache_dir``).

When the vision tower is frozen (the paper's DPO: LoRA on the language model, projector trained), its output
for an image never changes during training, across epochs or across the jobs of a sweep over β, loss type,
seed or data fraction. This cache keeps it on disk, per image:

- **keyed** by (vision tower weights — a hash of the tower's tensors —, feature layer and selection, the
  tower's dtype and attention implementation; the image processing — image processor config, class, patch
  size, ``image_aspect_ratio`` —; the storage dtype). A changed tower weight or processor is a new key, so a
  stale entry is never read. Entries are per image content (sha256 of the file's bytes, not its path);
- **compact**: ``.npy`` shards (one per claimed chunk), memory-mapped for reading, in ``dpo.vision_cache_dtype``:
  ``auto`` (default) is the tower's own dtype — bf16 / fp16 in GPU runs, so nothing is lost and training is
  exactly the same with and without the cache —; ``float16`` / ``bfloat16`` compact a float32 run (the
  features are then rounded the same way whether an image was just computed or read, so a job's numbers do
  not depend on which job filled the cache);
- **filled once**, before training, with the claim protocol of the reference cache
  (:func:`stllava_med.dpo.reference.claim_missing`): every process (any rank of any job) claims a chunk of the
  missing images under the cache's lock, computes and writes it, and processes that find every missing image
  claimed wait for the claims to finish;
- **validated**: a shard is written to a temporary file, fsynced and renamed before its index line is
  appended (under the lock), and the index line records its size and sha256. A shard whose size does not
  match (torn, truncated, missing) is treated as absent (and recomputed); one whose checksum does not match
  when a process first maps it is an error naming the file. Non-finite features (e.g. a float16 overflow)
  are refused at write time.

With the features cached, the collator skips the image work (decode, pad, processor) of every batch whose
images are all cached (:class:`stllava_med.data.pairs.collate.PairCollator`), and the DPO step skips the
tower: only the projector and what follows it run, and they train as before (their gradients are those of
the uncached run: ``tests/integration/test_vision_cache.py``).

Only for families whose projector is a separate module after the tower (LLaVA: ``shared_vision_features``);
elsewhere, or when any vision parameter trains (vision LoRA), the stage runs without it (logged).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from stllava_med.dpo.logps import LogProbs, unwrap_model
from stllava_med.dpo.reference import (
    CLAIM_BATCHES,
    CacheClaim,
    claim_missing,
    fill_missing,
    tensor_fingerprint,
)
from stllava_med.utils.io import (
    append_whole_to,
    atomic_write_bytes,
    atomic_write_json,
    file_lock,
    sha256_file,
    stable_hash,
)
from stllava_med.utils.runtime import settle_dataloader, worker_ignores_sigterm

log = logging.getLogger(__name__)

VISION_CACHE_VERSION = 1
VISION_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Free space left on the cache's filesystem after a fill; a fill that would not leave it is not started.
DISK_MARGIN_BYTES = 1 << 30

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}  # float64: `auto` for a float64 tower (exactness checks)


class VisionCacheError(ValueError):
    """A vision cache entry is unusable (checksum, shape, non-finite or missing); the message names it."""


# --------------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------------


def image_processing_fingerprint(processor: Any, image_aspect_ratio: str = "keep") -> str:
    """What turns an image file into pixels: the image processor (class and config), the processor's patch
    size and ``image_aspect_ratio`` (the tokenizer and chat template do not change the tower's output)."""
    image_processor = getattr(processor, "image_processor", None)
    return stable_hash({
        "class": type(image_processor).__name__,
        "config": image_processor.to_dict() if image_processor is not None else None,
        "patch_size": getattr(processor, "patch_size", None),
        "image_aspect_ratio": image_aspect_ratio,
    }, n=16)


def vision_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What determines a LLaVA tower's selected states: its tensors, the feature layer and selection, its dtype
    and attention implementation."""
    inner = unwrap_model(model)
    tower = inner.model.vision_tower
    config = inner.config
    layer = config.vision_feature_layer
    return {"weights": tensor_fingerprint(tower), "feature_layer": layer if isinstance(layer, int) else list(layer),
            "select_strategy": config.vision_feature_select_strategy,
            "dtype": str(next(tower.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": getattr(tower.config, "_attn_implementation", None)}


def storage_dtype(name: str, tower_dtype: torch.dtype) -> torch.dtype:
    """``dpo.vision_cache_dtype``: ``auto`` is the tower's own dtype (lossless)."""
    if name not in VISION_CACHE_DTYPES:
        raise ValueError(f"dpo.vision_cache_dtype must be one of {VISION_CACHE_DTYPES}, not {name!r}")
    if name == "auto":
        return tower_dtype if tower_dtype in _DTYPES.values() else torch.float32
    return _DTYPES[name]


def image_digest(path: str | os.PathLike) -> str:
    """Content hash of an image file (the one :func:`stllava_med.data.pairs.scan.pair_digest` uses)."""
    return sha256_file(path)[:16]


# --------------------------------------------------------------------------------------------------------------
# The index (also read by the collators, in dataloader workers)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionEntry:
    shard: str
    row: int
    pixel_shape: tuple[int, ...]  # what the processor made of the image (one image's pixel_values shape)


class VisionIndex:
    """``<cache>/index.jsonl``, read incrementally (only the lines appended since the last read): one line per
    shard ``{"shard", "bytes", "sha256", "dtype", "shape", "images", "pixel_shapes"}``. Picklable (collators
    carry it into dataloader workers). A line whose shard file is missing or has another size is skipped
    (its images count as absent); an unterminated last line is a write in progress and waits."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "index.jsonl"
        self.entries: dict[str, VisionEntry] = {}
        self.shards: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self._warned: set[str] = set()

    def refresh(self) -> VisionIndex:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self
        if size < self._offset:  # rewritten (deleted and refilled): read it again
            self.entries, self.shards, self._offset = {}, {}, 0
        if size == self._offset:
            return self
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                self._add(line)
        self._offset += end
        return self

    def _add(self, line: bytes) -> None:
        try:
            row = json.loads(line)
            name, size, images, shapes = str(row["shard"]), int(row["bytes"]), list(row["images"]), row["pixel_shapes"]
            if len(images) != len(shapes) or len(images) != int(row["shape"][0]):
                raise ValueError("images, pixel_shapes and shape disagree")
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise VisionCacheError(f"{self.path}: malformed vision cache index line ({err}); delete {self.dir} "
                                   "to recompute the cache") from err
        shard = self.dir / name
        actual = shard.stat().st_size if shard.is_file() else None
        if actual != size:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("vision cache: %s is %s (the index says %d bytes): its %d images count as absent",
                            shard, "missing" if actual is None else f"{actual} bytes", size, len(images))
            return
        self.shards[name] = row
        for index, (digest, shape) in enumerate(zip(images, shapes)):
            self.entries[str(digest)] = VisionEntry(name, index, tuple(int(x) for x in shape))

    def get(self, digest: str) -> VisionEntry | None:
        return self.entries.get(digest)

    def __contains__(self, digest: object) -> bool:
        return digest in self.entries


# --------------------------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------------------------


class VisionCache:
    """``<root>/<key>/``: ``meta.json`` (what the key was made of), ``index.jsonl``, ``features-*.npy`` shards
    and ``claims/`` (the claims of the processes filling it)."""

    def __init__(self, root: str | os.PathLike, *, vision: Mapping[str, Any], images: str,
                 dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.key_parts = {"version": VISION_CACHE_VERSION, "vision": dict(vision), "images": images,
                          "dtype": str(dtype).removeprefix("torch.")}
        self.key = stable_hash(self.key_parts, n=20)
        self.root = Path(root)
        self.dir = self.root / self.key
        self.lock = self.dir / ".lock"
        self.claims_dir = self.dir / "claims"
        self.index = VisionIndex(self.dir)
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memory maps stay in the process that opened them
        return state

    def _ensure_meta(self) -> None:
        meta = self.dir / "meta.json"
        if not meta.is_file():
            atomic_write_json(meta, {"key": self.key, **self.key_parts})

    def missing(self, needed: Iterable[str]) -> set[str]:
        self.index.refresh()
        return {d for d in needed if d not in self.index}

    def claim(self, needed: Iterable[str], *, max_ids: int, share: int = 1) -> tuple[CacheClaim | None, int, int]:
        needed = list(needed)
        return claim_missing(self.lock, self.claims_dir, lambda: self.missing(needed), max_ids=max_ids, share=share,
                             before=self._ensure_meta)

    def release(self, claim: CacheClaim) -> None:
        with file_lock(self.lock):
            claim.release()

    def round(self, features: torch.Tensor) -> torch.Tensor:
        """Features as the cache stores them (an identity for the lossless ``auto``)."""
        return features if features.dtype == self.dtype else features.to(self.dtype).to(features.dtype)

    def append(self, digests: list[str], features: torch.Tensor, pixel_shapes: list[list[int]]) -> None:
        """Write one shard (atomically), then its index line (under the lock)."""
        if features.shape[0] != len(digests) or len(pixel_shapes) != len(digests):
            raise ValueError(f"{len(digests)} images, {features.shape[0]} feature rows, {len(pixel_shapes)} shapes")
        stored = features.detach().to("cpu", self.dtype).contiguous()
        if not bool(torch.isfinite(stored).all()):
            bad = [d for d, ok in zip(digests, torch.isfinite(stored).flatten(1).all(1).tolist()) if not ok]
            raise VisionCacheError(f"the vision tower's output for images {bad[:5]} is not finite in "
                                   f"{self.key_parts['dtype']}; use dpo.vision_cache_dtype=bfloat16 or float32")
        array = stored.view(torch.uint16).numpy() if self.dtype == torch.bfloat16 else stored.numpy()
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        name = f"features-{uuid.uuid4().hex[:16]}.npy"
        # temp file beside it, fsynced, renamed; a full disk removes it and names the shard (DiskFull)
        atomic_write_bytes(self.dir / name, data)
        line = json.dumps({"shard": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "dtype": self.key_parts["dtype"], "shape": list(stored.shape), "images": list(digests),
                           "pixel_shapes": [list(map(int, s)) for s in pixel_shapes]}) + "\n"
        with file_lock(self.lock):
            self._ensure_meta()
            append_whole_to(self.index.path, line.encode("utf-8"))  # a full disk: none of it, DiskFull naming it

    def _array(self, name: str) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None:
            info = self.index.shards[name]
            path = self.dir / name
            digest = sha256_file(path)
            if digest != info["sha256"]:
                raise VisionCacheError(f"{path}: checksum mismatch (the file changed after it was written); delete "
                                       f"it and the images it holds are recomputed")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            expected = np.uint16 if info["dtype"] == "bfloat16" else np.dtype(info["dtype"])
            if list(array.shape) != list(info["shape"]) or array.dtype != expected:
                raise VisionCacheError(f"{path}: {array.dtype}{list(array.shape)}, the index says "
                                       f"{info['dtype']}{info['shape']}")
            self._arrays[name] = array
        return array

    def load(self, digests: list[str], *, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The cached features of ``digests`` as one (images, tokens, hidden) tensor."""
        self.index.refresh()
        rows = []
        for digest in digests:
            entry = self.index.get(digest)
            if entry is None:
                raise VisionCacheError(f"image {digest} has no cached vision features in {self.dir}")
            rows.append(torch.from_numpy(np.array(self._array(entry.shard)[entry.row])))
        stacked = torch.stack(rows)
        if self.dtype == torch.bfloat16:
            stacked = stacked.view(torch.bfloat16)
        return stacked.to(device=device, dtype=dtype, non_blocking=True)


# --------------------------------------------------------------------------------------------------------------
# What the DPO module uses
# --------------------------------------------------------------------------------------------------------------


class CachedVision:
    """The vision features of a run's batches: filled into the cache before training (:meth:`prepare`), then
    read for batches whose pixels the collator skipped, and computed (and rounded like the cache) for others.

    ``items`` maps each image digest of the run to one pair item that uses it; ``pixels(items)`` returns the
    batch of their pixel values and each image's pixel shape (the collator's own processing)."""

    def __init__(self, cache: VisionCache, items: Mapping[str, Any],
                 pixels: Callable[[list[Any]], tuple[torch.Tensor, list[list[int]]]], *, batch_size: int = 8,
                 progress: bool = True, lossless: bool = True, workers: int = 0) -> None:
        self.cache = cache
        self.items = dict(items)
        self.pixels = pixels
        self.batch_size = max(1, batch_size)
        self.workers = max(0, workers)  # processes decoding the images of a fill (data.num_workers)
        self.progress = progress
        self.lossless = lossless
        self.ready = False
        self.filling = True
        self.computed = 0

    def prepare(self, logprobs: LogProbs, device: torch.device, *, rank: int = 0, world_size: int = 1,
                barrier: Callable[[], None] | None = None, move: Callable[[Any], Any] | None = None) -> None:
        """Fill the cache's missing images together with every other process that needs them."""
        barrier = barrier or (lambda: None)
        model = logprobs.model
        was_training = model.training
        model.eval()
        try:
            fill_missing(lambda: self.cache.claim(self.items, max_ids=self.batch_size * CLAIM_BATCHES,
                                                  share=world_size) if self.filling else (None, 0, 0),
                         self.cache.release, lambda ids, bar: self._compute(ids, logprobs, move, bar),
                         what="vision features", where=self.cache.dir, progress=self.progress and rank == 0)
        finally:
            model.train(was_training)
        barrier()
        if self.filling:
            absent = self.cache.missing(self.items)
            if absent:
                raise VisionCacheError(f"{self.cache.dir}: {len(absent)} images have no vision features after the "
                                       f"fill, e.g. {sorted(absent)[:3]}")
        self.ready = True

    def _compute(self, ids: list[str], logprobs: LogProbs, move: Callable[[Any], Any] | None, bar: Any) -> None:
        if not self.filling:
            return
        features: list[torch.Tensor] = []
        shapes: list[list[int]] = []
        chunks = [ids[start:start + self.batch_size] for start in range(0, len(ids), self.batch_size)]
        for chunk, (pixel_values, chunk_shapes) in zip(chunks, self._pixel_batches(chunks)):
            if move is not None:
                pixel_values = move(pixel_values)
            with torch.no_grad():
                out = logprobs.vision_features(pixel_values)
            if not features and not self._room_for(out[0]):
                self.filling = False
                return
            features.append(out.detach().to("cpu", self.cache.dtype))
            shapes.extend(chunk_shapes)
            if bar is not None:
                bar.update(len(chunk))
        self.cache.append(ids, torch.cat(features), shapes)
        self.computed += len(ids)

    def _pixel_batches(self, chunks: list[list[str]]) -> Iterator[tuple[torch.Tensor, list[list[int]]]]:
        """The pixels of each chunk of images, in order: decoded and processed by ``workers`` dataloader processes
        while this one runs the tower (the same function on the same images: the same pixels), or here."""
        items = [[self.items[i] for i in chunk] for chunk in chunks]
        if self.workers == 0 or len(items) < 2:
            yield from (self.pixels(chunk) for chunk in items)
            return
        loader = DataLoader(items, batch_size=None, shuffle=False, num_workers=min(self.workers, len(items)),
                            collate_fn=self.pixels, worker_init_fn=worker_ignores_sigterm)
        batches = iter(loader)
        try:
            yield from batches
        finally:  # training's loader forks its workers next: no thread of this one may still be exiting then
            settle_dataloader(batches)

    def _room_for(self, one: torch.Tensor) -> bool:
        """Whether the fill fits on the cache's filesystem (checked once, on its first image)."""
        if self.computed:
            return True
        per_image = one.numel() * torch.empty((), dtype=self.cache.dtype).element_size()
        needed = per_image * len(self.cache.missing(self.items))
        self.cache.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache.dir).free
        if needed + DISK_MARGIN_BYTES > free:
            log.warning("vision cache: not caching (%.1f GB needed, %.1f GB free on %s); the tower runs every step",
                        needed / 2**30, free / 2**30, self.cache.dir)
            return False
        log.info("vision cache: %.1f MB for %d images in %s", needed / 2**20, needed // max(1, per_image),
                 self.cache.dir)
        return True

    def features(self, batch: Mapping[str, Any], logprobs: LogProbs) -> torch.Tensor:
        """The tower's output for the batch: cached (pixels skipped) or computed and rounded like the cache."""
        keys = batch.get("vision_keys")
        dtype = next(logprobs.core.vision_tower.parameters()).dtype
        if keys is not None:
            return self.cache.load(list(keys), device=batch["chosen_input_ids"].device, dtype=dtype)
        pixel_values = batch.get("pixel_values")
        if pixel_values is None:
            raise VisionCacheError("a batch with neither pixel values nor cached vision features")
        return self.cache.round(logprobs.vision_features(pixel_values))


def build_cached_vision(root: str | os.PathLike, model: torch.nn.Module, datamodule: Any, *, dtype: str = "auto",
                        skip_pixels: bool = True, batch_size: int = 8, progress: bool = True) -> CachedVision | None:
    """The vision feature cache of a DPO run (``dpo.vision_cache_dir``), or None (logged) where it does not
    apply: a family without a separate projector, or a trainable vision parameter. ``skip_pixels``: let the
    collator drop the image work of cached batches (off when a reference needs the pixels: ``copy``; the
    policy still reads its features from the cache)."""
    logprobs = LogProbs(model)
    if not logprobs.split_vision:
        log.info("vision cache: off (%s shares no tower output: its projector is not a separate module)",
                 type(logprobs.inner).__name__)
        return None
    if logprobs.vision_trainable:
        log.info("vision cache: off (vision parameters train in this run)")
        return None
    tower_dtype = next(logprobs.core.vision_tower.parameters()).dtype
    stored = storage_dtype(dtype, tower_dtype)
    collator = datamodule.collator
    cache = VisionCache(root, vision=vision_fingerprint(model),
                        images=image_processing_fingerprint(datamodule.processor,
                                                            datamodule.settings.image_aspect_ratio),
                        dtype=stored)
    items = datamodule.vision_items()
    collator.vision_lookup = VisionIndex(cache.dir)
    collator.vision_keep_pixels = not skip_pixels
    return CachedVision(cache, items, collator.pixel_batch, batch_size=batch_size, progress=progress,
                        lossless=stored == tower_dtype, workers=datamodule.settings.num_workers)
