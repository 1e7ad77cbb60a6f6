"""``PreferenceDataModule``: streams preference shards into collated DPO batches.

What it guarantees:

- **Streaming.** Pairs are read line by line from the shards; what is held in memory is the list of
  (shard, line) positions of usable pairs, never the pairs or their images.
- **A scan before training** checks every pair (bad pairs: a clear error or a counted skip, as
  ``on_bad_pair`` says), tokenises it through the chat template with its image, and drops — counted — the
  pairs that exceed ``max_length`` (``too_long``) or whose image + prompt alone would (``prompt_too_long``:
  truncation would cut image tokens, so we never truncate). The scan is cached on disk by (shards' content,
  processor and template, max_length) so sweep jobs share it.
- **Held-out validation** (``val_ratio`` of the pairs by a seeded hash of their ids, or ``val_path``) and a
  **nested training fraction** (``fraction``; the 9% subset lies inside 25%, inside 50%); the selected ids
  are written to the run directory.
- **Exactly once per epoch across DDP ranks x dataloader workers.** In each epoch's order (shards shuffled
  with the seed and the epoch), the k-th usable pair goes to slot ``k mod (world x workers)``; every slot is
  padded to the same length with zero-weight repeats, so all ranks run the same number of steps and the
  padding changes no loss or metric. A seeded shuffle buffer, different every epoch, mixes each slot.
- **Resumable mid-epoch.** The train loader has ``state_dict``/``load_state_dict`` (Lightning stores them in
  ``last.ckpt``): a resumed run skips the batches it already trained on, without loading their images.
- **Collation** renders the question with the processor's chat template; labels only on answer tokens (+ end
  of turn); chosen and rejected share the image (processed once) and the prompt, whose token length is
  passed on (``prompt_lengths``) so the DPO step can run it once.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stllava_med.chat import (
    IGNORE_INDEX,
    ChatFormat,
    Encoded,
    encode,
    pad_sequences,
    render_with_spans,
    vqa_turns,
)
from stllava_med.data.fraction import fraction_score, in_fraction, write_selected_ids
from stllava_med.data.preference import (
    BadPairError,
    PreferencePair,
    SkipReport,
    handle_bad,
    iter_lines,
    pair_problem,
    parse_pair_line,
    resolve_image,
    resolve_shards,
)
from stllava_med.data.vqa import ImageError, load_image
from stllava_med.families import processor_family
from stllava_med.utils.io import atomic_write_json, load_json, sha256_file, stable_hash

log = logging.getLogger(__name__)

SCAN_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceDataSettings:
    path: str | list[str] = ""
    val_path: str | list[str] | None = None
    val_ratio: float = 0.05
    fraction: float = 1.0
    fraction_seed: int = 0
    seed: int = 0  # shuffle
    batch_size: int = 4
    val_batch_size: int | None = None
    max_length: int | None = 2048
    num_workers: int = 0
    shuffle_buffer: int = 1000
    image_root: str | None = None
    on_bad_pair: str = "error"
    scan_cache_dir: str | None = None
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **overrides: Any) -> PreferenceDataSettings:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in dict(cfg or {}).items() if k in known}
        for key in ("path", "val_path"):
            if isinstance(values.get(key), list | tuple):
                values[key] = [str(p) for p in values[key]]
        values.update(overrides)
        settings = cls(**values)
        if not settings.path:
            raise ValueError("data.path is required: JSONL preference shards (a file, a directory or a glob)")
        if settings.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {settings.batch_size}")
        if not 0.0 <= settings.val_ratio < 1.0:
            raise ValueError(f"data.val_ratio must be in [0, 1), got {settings.val_ratio}")
        return settings


# --------------------------------------------------------------------------------------------------------------
# Encoding one pair
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    prompt_length: int  # tokens shared by both sequences before the first answer token

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


def _first_target(labels: torch.Tensor) -> int:
    positions = (labels != IGNORE_INDEX).nonzero()
    return int(positions[0, 0]) if positions.numel() else int(labels.shape[0])


class _OnceImageProcessor:
    """Stands in for a processor's image processor and remembers its last result, so that the chosen and the
    rejected conversation of a pair (the same image object, encoded one after the other) process the image
    once. Everything else is delegated."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._key: Any = None
        self._value: Any = None

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        flat = images if isinstance(images, list | tuple) else [images]
        key = (tuple(id(i) for i in flat), args, repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key != self._key:
            self._value = self.inner(images, *args, **kwargs)
            self._key = key
        # a fresh mapping each time: processors pop keys from the result (Idefics3 drops rows / cols)
        return copy.copy(self._value)

    def forget(self) -> None:
        self._key = self._value = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _once_processor(processor: Any) -> tuple[Any, _OnceImageProcessor | None]:
    inner = getattr(processor, "image_processor", None)
    if inner is None:
        return processor, None
    proxy = copy.copy(processor)
    once = _OnceImageProcessor(inner)
    proxy.image_processor = once
    return proxy, once


def encode_pair(processor: Any, fmt: ChatFormat, pair: PreferencePair, image: Any | None) -> EncodedPair:
    """Tokenise both conversations (image placeholders expanded by the processor, targets on the answer).

    ``processor`` may be the proxy of :func:`_once_processor`, which processes the shared image once."""
    try:
        chosen = encode(processor, vqa_turns(pair.prompt, pair.chosen), fmt, image)
        rejected = encode(processor, vqa_turns(pair.prompt, pair.rejected), fmt, image)
    finally:
        forget = getattr(getattr(processor, "image_processor", None), "forget", None)
        if callable(forget):
            forget()  # never let a later image with a recycled id() hit the cache
    bound = min(_first_target(chosen.labels), _first_target(rejected.labels))
    same = chosen.input_ids[:bound] == rejected.input_ids[:bound]
    prompt_length = bound if bool(same.all()) else int((~same).nonzero()[0, 0])
    if prompt_length == 0:
        raise ValueError(f"pair {pair.id!r}: chosen and rejected share no prompt tokens")
    return EncodedPair(chosen=chosen, rejected=rejected, prompt_length=prompt_length)


@dataclass(frozen=True)
class PairLengths:
    prompt_tokens: int
    chosen_tokens: int  # answer targets
    rejected_tokens: int
    length: int  # longest of the two sequences

    @classmethod
    def of(cls, encoded: EncodedPair) -> PairLengths:
        return cls(encoded.prompt_length, int((encoded.chosen.labels != IGNORE_INDEX).sum()),
                   int((encoded.rejected.labels != IGNORE_INDEX).sum()), encoded.length)


class PairMeasurer:
    """Token lengths of a pair without processing its image, for the pre-training scan.

    The text is tokenised with its single image placeholder, and the placeholder is counted as the number
    of tokens the processor reports for an image of that size (``_get_num_multimodal_tokens``; LLaVA-style
    processors repeat one image token). Whether that holds for this processor is checked against a full
    encode on the first pair each process measures (and every ``check_every`` pairs); on a mismatch, or for
    processors without that method, every pair is fully encoded instead."""

    def __init__(self, processor: Any, fmt: ChatFormat, *, check_every: int = 200) -> None:
        self.processor = processor
        self.fmt = fmt
        self.check_every = check_every
        self.count = 0
        placeholder = getattr(processor, "image_token", None)
        self.placeholder_id = processor.tokenizer.convert_tokens_to_ids(placeholder) if placeholder else None
        self.fast = callable(getattr(processor, "_get_num_multimodal_tokens", None)) and self.placeholder_id is not None
        self.full, _ = _once_processor(processor)

    def _image_tokens(self, size: tuple[int, int]) -> int:
        data = self.processor._get_num_multimodal_tokens(image_sizes=[[size[1], size[0]]])
        return int(data["num_image_tokens"][0] if isinstance(data, Mapping) else data.num_image_tokens[0])

    def _text_lengths(self, turns: list[Any], n_image_tokens: int | None) -> tuple[int, int, int]:
        """(length, first target index, target count) of one conversation."""
        text, spans = render_with_spans(self.processor, turns, self.fmt, image=n_image_tokens is not None)
        batch = self.processor.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = batch["input_ids"], batch["offset_mapping"]
        extra = 0
        if n_image_tokens is not None:
            placeholders = sum(1 for i in ids if i == self.placeholder_id)
            if placeholders != 1:
                raise _MeasureMismatch(f"{placeholders} image placeholders in the text")
            extra = n_image_tokens - 1
        first, count = len(ids), 0
        for index, (start, end) in enumerate(offsets):
            if end > start and any(span.start <= start < span.end for span in spans):
                first = min(first, index)
                count += 1
        return len(ids) + extra, first + extra, count

    def measure(self, pair: PreferencePair, images: Sequence[Path]) -> PairLengths:
        self.count += 1
        check = not self.fast or self.count == 1 or self.count % self.check_every == 0
        if self.fast:
            try:
                n_tokens = None
                if images:
                    with Image.open(images[0]) as img:  # the header only: no decoding
                        n_tokens = self._image_tokens(img.size)
                c_len, c_first, c_count = self._text_lengths(vqa_turns(pair.prompt, pair.chosen), n_tokens)
                r_len, r_first, r_count = self._text_lengths(vqa_turns(pair.prompt, pair.rejected), n_tokens)
                measured = PairLengths(min(c_first, r_first), c_count, r_count, max(c_len, r_len))
            except _MeasureMismatch as err:
                log.info("fast length measurement does not fit this processor (%s): encoding fully", err)
                self.fast, check = False, True
        if not check:
            return measured
        image = load_image(images[0], record_id=pair.id) if images else None
        exact = PairLengths.of(encode_pair(self.full, self.fmt, pair, image))
        if self.fast and exact != measured:
            log.info("fast length measurement differs from the processor (%s vs %s): encoding fully",
                     measured, exact)
            self.fast = False
        return exact


class _MeasureMismatch(ValueError):
    pass


def _image_digest(path: Path) -> str:
    return sha256_file(path)[:16]


def pair_digest(pair: PreferencePair, image_paths: Sequence[Path]) -> str:
    """Content hash of a pair as trained on: texts and the image bytes (not the paths)."""
    payload = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
               "images": [_image_digest(p) for p in image_paths]}
    return stable_hash(payload, n=16)


# --------------------------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ScanEntry:
    shard: int
    line: int
    id: str
    digest: str
    prompt_tokens: int
    chosen_tokens: int  # answer targets
    rejected_tokens: int
    length: int  # longest of the two sequences


@dataclass
class ScanResult:
    shards: list[str]
    entries: list[ScanEntry]
    report: dict[str, Any]
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": SCAN_VERSION, "key": self.key, "shards": self.shards, "report": self.report,
                "entries": [list(asdict(e).values()) for e in self.entries]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ScanResult:
        names = list(ScanEntry.__dataclass_fields__)
        return cls(shards=list(obj["shards"]), entries=[ScanEntry(**dict(zip(names, e))) for e in obj["entries"]],
                   report=dict(obj["report"]), key=str(obj.get("key", "")))

    @property
    def fingerprint(self) -> str:
        """The usable data: ids and content digests (order-free), used to key the reference cache."""
        return stable_hash(sorted((e.id, e.digest) for e in self.entries), n=16)


def processor_fingerprint(processor: Any, fmt: ChatFormat) -> str:
    """Hash of what turns a pair into tokens and pixels: tokenizer, chat template, image processing, roles."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else stable_hash(sorted(tokenizer.get_vocab().items()))
    image_processor = getattr(processor, "image_processor", None)
    payload = {
        "class": type(processor).__name__,
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16],
        "chat_template": getattr(processor, "chat_template", None),
        "image_processor": image_processor.to_dict() if image_processor is not None else None,
        "patch_size": getattr(processor, "patch_size", None),
        "format": asdict(fmt),
    }
    return stable_hash(payload, n=16)


class _ScanLines(IterableDataset):
    """Worker-sharded scan: each worker checks and measures every ``num_workers``-th line."""

    def __init__(self, shards: Sequence[Path], processor: Any, fmt: ChatFormat, settings: PreferenceDataSettings):
        self.shards = list(shards)
        self.processor = processor
        self.fmt = fmt
        self.settings = settings

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        measurer = PairMeasurer(self.processor, self.fmt)
        index = -1
        for shard_index, shard in enumerate(self.shards):
            for lineno, line in iter_lines(shard):
                index += 1
                if index % workers != worker:
                    continue
                yield scan_one(line, shard_index, shard, lineno, measurer, self.settings)


def scan_one(line: str, shard_index: int, shard: Path, lineno: int, measurer: PairMeasurer,
             settings: PreferenceDataSettings) -> dict[str, Any]:
    """Check and measure one line: ``{"entry": ScanEntry}`` or ``{"skip": (reason, message)}``; raises for
    bad pairs when ``on_bad_pair`` is ``error``."""
    where = f"{shard}:{lineno}"
    report = SkipReport()
    pair = parse_pair_line(line, where)
    where = f"{where} (pair {pair.id!r})"
    images = [resolve_image(i, shard, settings.image_root) for i in pair.images]
    problem = pair_problem(pair, images)
    if problem:
        handle_bad(report, settings.on_bad_pair, problem, where, ", ".join(map(str, images)) if problem == "missing_image" else "")
        return {"skip": (problem, report.examples[0])}
    try:
        lengths = measurer.measure(pair, images)
    except (ImageError, OSError) as err:  # PIL's UnidentifiedImageError is an OSError
        handle_bad(report, settings.on_bad_pair, "bad_image", where, str(err))
        return {"skip": ("bad_image", report.examples[0])}
    if settings.max_length is not None:
        if lengths.prompt_tokens >= settings.max_length:
            return {"skip": ("prompt_too_long", f"{where}: image + prompt take {lengths.prompt_tokens} tokens, "
                                                f"max_length is {settings.max_length}")}
        if lengths.length > settings.max_length:
            return {"skip": ("too_long", f"{where}: {lengths.length} tokens > max_length {settings.max_length}")}
    entry = ScanEntry(shard=shard_index, line=lineno, id=pair.id, digest=pair_digest(pair, images),
                      prompt_tokens=lengths.prompt_tokens, chosen_tokens=lengths.chosen_tokens,
                      rejected_tokens=lengths.rejected_tokens, length=lengths.length)
    return {"entry": entry}


def _count_lines(path: Path) -> int:
    """Non-empty lines, counted from raw bytes (for the scan's progress bar)."""
    count = 0
    with open(path, "rb") as fh:
        for line in fh:
            count += bool(line.strip())
    return count


def scan_key(shards: Sequence[Path], processor: Any, fmt: ChatFormat, settings: PreferenceDataSettings) -> str:
    return stable_hash({
        "version": SCAN_VERSION,
        "shards": [(str(s), sha256_file(s)) for s in shards],
        "processor": processor_fingerprint(processor, fmt),
        "max_length": settings.max_length,
        "image_root": settings.image_root,
        "on_bad_pair": settings.on_bad_pair,
    }, n=20)


def scan_pairs(shards: Sequence[Path], processor: Any, fmt: ChatFormat, settings: PreferenceDataSettings,
               *, cache_dir: str | os.PathLike | None = None, desc: str = "scan") -> ScanResult:
    """Check, tokenise and measure every pair of ``shards`` (cached in ``cache_dir`` when given)."""
    key = scan_key(shards, processor, fmt, settings)
    cache_path = Path(cache_dir) / f"{key}.json" if cache_dir else None
    if cache_path is not None and cache_path.is_file():
        result = ScanResult.from_json(load_json(cache_path))
        log.info("%s: reusing the scan of %d pairs at %s", desc, len(result.entries), cache_path)
        return result
    from tqdm.auto import tqdm

    entries: list[ScanEntry] = []
    report = SkipReport()
    loader = DataLoader(_ScanLines(shards, processor, fmt, settings), batch_size=None,
                        num_workers=settings.num_workers, collate_fn=_identity)
    total = sum(_count_lines(shard) for shard in shards) if settings.progress else None
    for result in tqdm(loader, desc=desc, unit="pair", total=total, disable=not settings.progress, mininterval=2.0):
        report.read += 1
        if "skip" in result:
            reason, message = result["skip"]
            report.skip(reason, message)
        else:
            entries.append(result["entry"])
    entries.sort(key=lambda e: (e.shard, e.line))
    counts = Counter(e.id for e in entries)
    duplicated = {i for i, n in counts.items() if n > 1}
    if duplicated:
        kept: list[ScanEntry] = []
        seen: set[str] = set()
        for entry in entries:
            if entry.id in seen:
                where = f"{shards[entry.shard]}:{entry.line} (pair {entry.id!r})"
                handle_bad(report, settings.on_bad_pair, "duplicate_id", where, "the id was used by an earlier pair")
                continue
            seen.add(entry.id)
            kept.append(entry)
        entries = kept
    report.kept = len(entries)
    if report.skipped:
        log.warning("%s: skipped %s of %d pairs", desc, dict(report.skipped), report.read)
    result = ScanResult(shards=[str(s) for s in shards], entries=entries, report=report.to_json(), key=key)
    if cache_path is not None:
        atomic_write_json(cache_path, result.to_json(), indent=None)
    return result


# --------------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PairItem:
    pair: PreferencePair
    shard: Path
    weight: float = 1.0  # 0 for the repeats that pad a slot to the common length


class PairCollator:
    """Loads images and tokenises pairs into one batch dict (see the module docstring for the fields)."""

    def __init__(self, processor: Any, fmt: ChatFormat, *, image_root: str | None = None) -> None:
        self.processor = processor
        self.fmt = fmt
        self.image_root = image_root
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self.family = processor_family(processor)
        self._once, _ = _once_processor(processor)

    def encode(self, item: PairItem) -> EncodedPair:
        pair = item.pair
        images = [resolve_image(i, item.shard, self.image_root) for i in pair.images]
        image = load_image(images[0], record_id=pair.id) if images else None
        return encode_pair(self._once, self.fmt, pair, image)

    def __call__(self, items: Sequence[PairItem]) -> dict[str, Any]:
        encoded = [self.encode(item) for item in items]
        sequences = [e.chosen for e in encoded] + [e.rejected for e in encoded]
        input_ids = pad_sequences([s.input_ids for s in sequences], self.pad_id)
        labels = pad_sequences([s.labels for s in sequences], IGNORE_INDEX)
        attention_mask = pad_sequences([torch.ones_like(s.input_ids) for s in sequences], 0)
        n = len(items)
        length = int(input_ids.shape[1])
        # Per-image outputs (pixels, tiles, grids, sizes) are the same for both answers of a pair: joined once.
        # Per-token outputs (Qwen's mm_token_type_ids, Gemma's token_type_ids) belong to each sequence.
        family = self.family
        with_images = [e for e in encoded if e.chosen.pixel_values is not None]
        if with_images and len(with_images) != n:
            raise ValueError("a batch mixes pairs with and without an image")
        keys = sorted({k for e in encoded for k in e.chosen.extra})
        token_keys = [k for k in keys if family.batch_kind(k) == "token"]
        image_keys = [k for k in keys if k not in token_keys]
        images = family.collate([{"pixel_values": e.chosen.pixel_values} | {k: e.chosen.extra[k] for k in image_keys}
                                 for e in with_images]) if with_images else {}
        batch: dict[str, Any] = {
            "ids": [item.pair.id for item in items],
            "weight": torch.tensor([item.weight for item in items], dtype=torch.float32),
            "chosen_input_ids": input_ids[:n], "rejected_input_ids": input_ids[n:],
            "chosen_labels": labels[:n], "rejected_labels": labels[n:],
            "chosen_attention_mask": attention_mask[:n], "rejected_attention_mask": attention_mask[n:],
            "prompt_lengths": torch.tensor([e.prompt_length for e in encoded], dtype=torch.long),
            "pixel_values": images.pop("pixel_values", None),
            "image_extra": images,
            "chosen_extra": family.collate([{k: e.chosen.extra[k] for k in token_keys} for e in encoded],
                                           length=length, keys=token_keys),
            "rejected_extra": family.collate([{k: e.rejected.extra[k] for k in token_keys} for e in encoded],
                                             length=length, keys=token_keys),
        }
        return batch


# --------------------------------------------------------------------------------------------------------------
# The streaming dataset
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StreamPlan:
    """Which lines of which shards a split streams (sorted line numbers per shard)."""

    shards: list[Path]
    lines: list[list[int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(lines) for lines in self.lines)


class PreferenceBatches(IterableDataset):
    """Yields collated batches for one (rank, worker) slot; see the module docstring for the guarantees.

    ``rank`` / ``world_size`` are injectable (tests simulate DDP without a process group)."""

    def __init__(self, plan: StreamPlan, collator: PairCollator, *, batch_size: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1000, pad_slots: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.plan = plan
        self.collator = collator
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.pad_slots = pad_slots
        self.epoch = 0
        self.skip_batches = 0

    @property
    def slots(self) -> int:
        return self.world_size * self.num_workers

    def check_every_slot_has_pairs(self, what: str) -> None:
        """A rank without a single real pair would never log a metric, and the others would wait for it at
        the end of the epoch: refuse such a split up front."""
        if 0 < self.plan.size < self.slots:
            raise ValueError(f"{what}: {self.plan.size} pairs cannot feed {self.world_size} ranks x "
                             f"{self.num_workers} dataloader workers; lower data.num_workers or use more pairs")

    @property
    def items_per_slot(self) -> int:
        return math.ceil(self.plan.size / self.slots) if self.plan.size else 0

    def batches_per_worker(self) -> int:
        return math.ceil(self.items_per_slot / self.batch_size) if self.pad_slots else -1

    def __len__(self) -> int:
        """Batches this rank yields per epoch (all its workers together)."""
        if not self.pad_slots:
            raise TypeError("an unpadded stream has no fixed length")
        return self.num_workers * self.batches_per_worker()

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.plan.shards)))
        if self.shuffle:
            random.Random(hash_seed(self.seed, self.epoch, "shards")).shuffle(order)
        return order

    def slot_items(self, slot: int) -> Iterator[tuple[int, int, bool]]:
        """(shard index, line, real?) of one slot in this epoch, before shuffling and batching."""
        total = self.plan.size
        mine: list[tuple[int, int]] = []
        k = 0
        for shard_index in self._shard_order():
            for line in self.plan.lines[shard_index]:
                if k % self.slots == slot:
                    mine.append((shard_index, line))
                k += 1
        for shard_index, line in mine:
            yield shard_index, line, True
        if self.pad_slots and total:
            padding = self.items_per_slot - len(mine)
            source = mine or [self._global_item(slot % total)]
            for j in range(padding):
                shard_index, line = source[j % len(source)]
                yield shard_index, line, False

    def _global_item(self, k: int) -> tuple[int, int]:
        for shard_index in self._shard_order():
            lines = self.plan.lines[shard_index]
            if k < len(lines):
                return shard_index, lines[k]
            k -= len(lines)
        raise IndexError(k)

    def _read(self, positions: Sequence[tuple[int, int]]) -> Iterator[tuple[int, PreferencePair]]:
        """Parse the pairs at ``positions`` (grouped by shard, lines ascending), streaming each shard once."""
        start = 0
        while start < len(positions):
            shard_index = positions[start][0]
            end = start
            while end < len(positions) and positions[end][0] == shard_index:
                end += 1
            wanted = [line for _, line in positions[start:end]]
            shard = self.plan.shards[shard_index]
            found = 0
            lines = iter_lines(shard)
            for target in wanted:
                for lineno, text in lines:
                    if lineno == target:
                        yield shard_index, parse_pair_line(text, f"{shard}:{lineno}")
                        found += 1
                        break
            if found != len(wanted):
                raise BadPairError(f"{shard}: {len(wanted) - found} scanned lines vanished (was the shard changed?)")
            start = end

    def slot_stream(self, slot: int) -> Iterator[PairItem]:
        """The items of one slot in this epoch's order: its real pairs through the shuffle buffer (at most
        ``shuffle_buffer`` parsed pairs in memory), then its zero-weight padding."""
        real = [(s, ln) for s, ln, is_real in self.slot_items(slot) if is_real]
        padding = [(s, ln) for s, ln, is_real in self.slot_items(slot) if not is_real]
        rng = random.Random(hash_seed(self.seed, self.epoch, slot))
        buffer: list[PairItem] = []
        for shard_index, pair in self._read(real):
            item = PairItem(pair, self.plan.shards[shard_index], 1.0)
            if not self.shuffle:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
        for s, ln in padding:
            for shard_index, pair in self._read([(s, ln)]):
                yield PairItem(pair, self.plan.shards[shard_index], 0.0)

    def slot_batches(self, slot: int) -> Iterator[list[PairItem]]:
        batch: list[PairItem] = []
        for item in self.slot_stream(slot):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"PreferenceBatches was built for {self.num_workers} workers but runs in {workers}")
        # The DataLoader takes batches from its workers in turn, starting with worker 0, and all slots have
        # equally many: after ``skip_batches`` global batches the next one is slot ``skip mod workers``'s, so a
        # resumed worker takes over the slot that keeps the original order, minus that slot's
        # ceil((skip - role) / workers) batches already trained on. Skipped batches are read (the shuffle
        # buffer needs them) but their images are never loaded.
        role = (worker + self.skip_batches) % workers
        slot = self.rank * self.num_workers + role
        skip = max(0, math.ceil((self.skip_batches - role) / workers))
        for index, items in enumerate(self.slot_batches(slot)):
            if index >= skip:
                yield self.collator(items)


def _identity(batch: Any) -> Any:
    return batch


def hash_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


class PreferenceLoader(DataLoader):
    """A DataLoader over :class:`PreferenceBatches` that knows its epoch and how far it got.

    Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict()`` before iterating a resumed
    run, so the interrupted epoch continues with the same order, minus the batches already trained on."""

    def __init__(self, dataset: PreferenceBatches, *, num_workers: int, pin_memory: bool = False) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         collate_fn=_identity)
        self._next_epoch = 0
        self._epoch = 0
        self._consumed = 0
        self._skip = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        dataset: PreferenceBatches = self.dataset  # type: ignore[assignment]
        self._epoch = self._next_epoch
        self._next_epoch += 1
        dataset.epoch = self._epoch
        dataset.skip_batches = self._skip
        self._consumed = self._skip
        self._skip = 0
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self):
            self._next_epoch, self._skip = epoch + 1, 0
        else:
            self._next_epoch, self._skip = epoch, consumed


# --------------------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------------------


class PreferenceDataModule(LightningDataModule):
    """Train / validation streams of preference pairs for :class:`stllava_med.dpo.module.DPOModule`."""

    def __init__(self, settings: PreferenceDataSettings, processor: Any, fmt: ChatFormat, *,
                 out_dir: str | os.PathLike | None = None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.processor = processor
        self.fmt = fmt
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._rank = rank
        self._world_size = world_size
        self.collator = PairCollator(processor, fmt, image_root=settings.image_root)
        self.train_scan: ScanResult | None = None
        self.val_scan: ScanResult | None = None
        self.train_entries: list[ScanEntry] = []
        self.val_entries: list[ScanEntry] = []
        self.summary: dict[str, Any] = {}
        self._train_loader: PreferenceLoader | None = None
        self._loader_state: dict[str, int] | None = None

    # ---- rank / world ------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        trainer = self._trainer_or_none()
        return int(trainer.global_rank) if trainer is not None else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        trainer = self._trainer_or_none()
        return int(trainer.world_size) if trainer is not None else 1

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    # ---- scanning and splitting ------------------------------------------------------------------------

    def _scan(self) -> None:
        settings = self.settings
        train_shards = resolve_shards(settings.path)
        self.train_scan = scan_pairs(train_shards, self.processor, self.fmt, settings,
                                     cache_dir=settings.scan_cache_dir, desc="scan pairs")
        if settings.val_path:
            val_shards = resolve_shards(settings.val_path)
            self.val_scan = scan_pairs(val_shards, self.processor, self.fmt, settings,
                                       cache_dir=settings.scan_cache_dir, desc="scan validation pairs")

    def prepare_data(self) -> None:
        # Local rank 0 scans first (and fills the shared scan cache); the others then read it in setup().
        if self.settings.scan_cache_dir and self.train_scan is None:
            self._scan()

    def setup(self, stage: str | None = None) -> None:
        if self.train_scan is not None:
            return
        self._scan()
        assert self.train_scan is not None
        settings = self.settings
        if self.val_scan is not None:
            pool = self.train_scan.entries
            self.val_entries = list(self.val_scan.entries)
            clash = {e.id for e in pool} & {e.id for e in self.val_entries}
            if clash:
                raise ValueError(f"data.val_path shares {len(clash)} pair ids with data.path, e.g. {sorted(clash)[:3]}")
        else:
            pool, self.val_entries = [], []
            for entry in self.train_scan.entries:
                is_val = settings.val_ratio > 0 and fraction_score("val\x00" + entry.id, settings.fraction_seed) < settings.val_ratio
                (self.val_entries if is_val else pool).append(entry)
        self.train_entries = [e for e in pool if in_fraction(e.id, settings.fraction, settings.fraction_seed)]
        if not self.train_entries:
            raise ValueError(f"no training pair left (data.path={settings.path}, fraction={settings.fraction}, "
                             f"skipped: {self.train_scan.report['skipped']})")
        self.summary = self._summary(pool)
        if self.out_dir is not None and self.rank == 0:
            write_selected_ids(self.out_dir / "selected_ids.txt", [e.id for e in self.train_entries])
            write_selected_ids(self.out_dir / "val_ids.txt", [e.id for e in self.val_entries])
            atomic_write_json(self.out_dir / "data_summary.json", self.summary)
        log.info("preference data: %d training pairs (fraction %.3g of %d), %d validation pairs; skipped %s",
                 len(self.train_entries), settings.fraction, len(pool), len(self.val_entries),
                 self.summary["scan"]["skipped"] or "none")

    def _summary(self, pool: list[ScanEntry]) -> dict[str, Any]:
        def stats(entries: list[ScanEntry]) -> dict[str, Any]:
            if not entries:
                return {"pairs": 0}
            lengths = sorted(e.length for e in entries)
            answers = sorted(e.chosen_tokens for e in entries) + sorted(e.rejected_tokens for e in entries)
            return {"pairs": len(entries), "max_length": lengths[-1], "median_length": lengths[len(lengths) // 2],
                    "mean_prompt_tokens": sum(e.prompt_tokens for e in entries) / len(entries),
                    "mean_answer_tokens": sum(answers) / len(answers)}

        assert self.train_scan is not None
        scan = dict(self.train_scan.report)
        if self.val_scan is not None:
            scan = {"train": scan, "val": self.val_scan.report, "skipped": {
                **Counter(self.train_scan.report["skipped"]) + Counter(self.val_scan.report["skipped"])}}
        return {"path": self.settings.path, "val_path": self.settings.val_path, "fraction": self.settings.fraction,
                "fraction_seed": self.settings.fraction_seed, "max_length": self.settings.max_length,
                "pool": len(pool), "train": stats(self.train_entries), "val": stats(self.val_entries), "scan": scan,
                "data_fingerprint": self.data_fingerprint}

    @property
    def data_fingerprint(self) -> str:
        assert self.train_scan is not None
        parts = [self.train_scan.fingerprint] + ([self.val_scan.fingerprint] if self.val_scan is not None else [])
        return stable_hash(parts, n=16)

    @property
    def digests(self) -> dict[str, str]:
        """Content digest of every pair this run uses (training selection and validation)."""
        return {e.id: e.digest for e in (*self.train_entries, *self.val_entries)}

    def _plan(self, scan: ScanResult, entries: Sequence[ScanEntry]) -> StreamPlan:
        lines: list[list[int]] = [[] for _ in scan.shards]
        for entry in entries:
            lines[entry.shard].append(entry.line)
        return StreamPlan(shards=[Path(s) for s in scan.shards], lines=[sorted(x) for x in lines])

    # ---- loaders ---------------------------------------------------------------------------------------

    def train_dataset(self, *, rank: int | None = None, world_size: int | None = None) -> PreferenceBatches:
        assert self.train_scan is not None, "call setup() first"
        return PreferenceBatches(
            self._plan(self.train_scan, self.train_entries), self.collator, batch_size=self.settings.batch_size,
            num_workers=self.settings.num_workers, rank=self.rank if rank is None else rank,
            world_size=self.world_size if world_size is None else world_size, shuffle=True,
            seed=self.settings.seed, shuffle_buffer=self.settings.shuffle_buffer,
        )

    def val_dataset(self, *, rank: int | None = None, world_size: int | None = None) -> PreferenceBatches:
        scan = self.val_scan or self.train_scan
        assert scan is not None, "call setup() first"
        return PreferenceBatches(
            self._plan(scan, self.val_entries), self.collator,
            batch_size=self.settings.val_batch_size or self.settings.batch_size,
            num_workers=self.settings.num_workers, rank=self.rank if rank is None else rank,
            world_size=self.world_size if world_size is None else world_size, shuffle=False,
        )

    def train_dataloader(self) -> PreferenceLoader:
        dataset = self.train_dataset()
        dataset.check_every_slot_has_pairs("training pairs")
        loader = PreferenceLoader(dataset, num_workers=self.settings.num_workers,
                                  pin_memory=torch.cuda.is_available())
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
        self._train_loader = loader
        return loader

    # Lightning restores a datamodule's state before it first builds the train loader. Its own hand-over of
    # loader states (``fit_loop`` "combined_loader") comes too late whenever ``configure_optimizers`` asks for
    # ``estimated_stepping_batches`` (ours does, for the schedule): that builds the loader before the loops are
    # restored. So the loader's position travels in the datamodule's checkpoint entry.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = state_dict.get("train_loader")
        if self._loader_state is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._loader_state)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_entries:
            return []
        dataset = self.val_dataset()
        dataset.check_every_slot_has_pairs("validation pairs")
        return DataLoader(dataset, batch_size=None, num_workers=self.settings.num_workers,
                          collate_fn=_identity, pin_memory=torch.cuda.is_available())

    def reference_batches(self, ids: set[str] | None = None, *, rank: int = 0, world_size: int = 1,
                          batch_size: int | None = None) -> PreferenceBatches:
        """Every pair of this run (training selection and validation, optionally only ``ids``), in file order,
        sharded over ``world_size`` ranks without padding: what the reference pre-computation walks over."""
        assert self.train_scan is not None, "call setup() first"
        groups: list[tuple[ScanResult, list[ScanEntry]]] = []
        if self.val_scan is not None:
            groups = [(self.train_scan, self.train_entries), (self.val_scan, self.val_entries)]
        else:
            groups = [(self.train_scan, [*self.train_entries, *self.val_entries])]
        shards: list[Path] = []
        lines: list[list[int]] = []
        for scan, entries in groups:
            plan = self._plan(scan, [e for e in entries if ids is None or e.id in ids])
            shards.extend(plan.shards)
            lines.extend(plan.lines)
        return PreferenceBatches(StreamPlan(shards=shards, lines=lines), self.collator,
                                 batch_size=batch_size or self.settings.val_batch_size or self.settings.batch_size,
                                 num_workers=1, rank=rank, world_size=world_size, shuffle=False, pad_slots=False)
