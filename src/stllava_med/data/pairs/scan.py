"""The scan before training: every pair checked and measured (token lengths without processing images), the
result cached on disk, and the content fingerprints that key the scan cache and the reference cache."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from stllava_med.chat import IGNORE_INDEX, ChatFormat, render_with_spans, vqa_turns
from stllava_med.data.images import image_preparer
from stllava_med.data.pairs.collate import identity_collate
from stllava_med.data.pairs.encoding import EncodedPair, encode_pair, once_processor
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.data.preference import (
    BadPairError,
    PreferencePair,
    SkipReport,
    handle_bad,
    iter_lines,
    pair_problem,
    parse_pair_line,
    resolve_image,
)
from stllava_med.data.vqa import ImageError, load_image, open_image_header
from stllava_med.utils.io import atomic_write_json, load_json, sha256_file, stable_hash

log = logging.getLogger(__name__)

SCAN_VERSION = 2  # 2: no_image, chosen = rejected up to case / whitespace, full decode under skip


# --------------------------------------------------------------------------------------------------------------
# Token lengths of a pair
# --------------------------------------------------------------------------------------------------------------


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

    def __init__(self, processor: Any, fmt: ChatFormat, *, check_every: int = 200,
                 image_aspect_ratio: str = "keep") -> None:
        self.processor = processor
        self.fmt = fmt
        self.check_every = check_every
        self.pad = image_aspect_ratio == "pad"
        self.prepare_image = image_preparer(processor, image_aspect_ratio)
        self.count = 0
        placeholder = getattr(processor, "image_token", None)
        self.placeholder_id = processor.tokenizer.convert_tokens_to_ids(placeholder) if placeholder else None
        self.fast = callable(getattr(processor, "_get_num_multimodal_tokens", None)) and self.placeholder_id is not None
        self.full, _ = once_processor(processor)

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
                    size = open_image_header(images[0], record_id=pair.id)  # the header only: no decoding
                    size = (max(size),) * 2 if self.pad else size  # pad: a square of the long side
                    n_tokens = self._image_tokens(size)
                c_len, c_first, c_count = self._text_lengths(vqa_turns(pair.prompt, pair.chosen), n_tokens)
                r_len, r_first, r_count = self._text_lengths(vqa_turns(pair.prompt, pair.rejected), n_tokens)
                measured = PairLengths(min(c_first, r_first), c_count, r_count, max(c_len, r_len))
            except _MeasureMismatch as err:
                log.info("fast length measurement does not fit this processor (%s): encoding fully", err)
                self.fast, check = False, True
        if not check:
            return measured
        image = self.prepare_image(load_image(images[0], record_id=pair.id)) if images else None
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


def processor_fingerprint(processor: Any, fmt: ChatFormat, image_aspect_ratio: str = "keep") -> str:
    """Hash of what turns a pair into tokens and pixels: tokenizer, chat template, image processing (and padding),
    roles and system text."""
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
    if image_aspect_ratio != "keep":  # only when set: fingerprints of earlier runs stay valid
        payload["image_aspect_ratio"] = image_aspect_ratio
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
        measurer = PairMeasurer(self.processor, self.fmt, image_aspect_ratio=self.settings.image_aspect_ratio)
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
    try:
        pair = parse_pair_line(line, where)
    except BadPairError as err:  # not UTF-8, not JSON, a missing or wrong-typed field
        if settings.on_bad_pair != "skip":
            raise BadPairError(f"{err} (set data.on_bad_pair=skip to skip such lines, counted)") from None
        return {"skip": ("malformed", str(err))}
    where = f"{where} (pair {pair.id!r})"
    images = [resolve_image(i, shard, settings.image_root) for i in pair.images]
    problem = pair_problem(pair, images)
    if problem:
        handle_bad(report, settings.on_bad_pair, problem, where, ", ".join(map(str, images)) if problem == "missing_image" else "")
        return {"skip": (problem, report.examples[0])}
    try:
        if settings.on_bad_pair == "skip" and images:  # decode it all now: a truncated file is skipped here,
            load_image(images[0], record_id=pair.id)     # counted, not a crash in the collator hours later
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
        "processor": processor_fingerprint(processor, fmt, settings.image_aspect_ratio),
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
    entries: list[ScanEntry] = []
    report = SkipReport()
    loader = DataLoader(_ScanLines(shards, processor, fmt, settings), batch_size=None,
                        num_workers=settings.num_workers, collate_fn=identity_collate)
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
