"""What ``data.path`` may hold: our JSONL shards, or TRL's and the official STLLaVA-Med files, converted once.

``data.format`` (``auto``, the default, or ``native`` | ``trl`` | ``official``) says what the files are; ``auto``
looks at each file (its first record; Parquet: its first row). Our own JSONL shards are streamed where they
lie, as before. Anything else — a TRL JSON / JSONL / Parquet file (images as paths or embedded bytes), the
official DPO JSON, or our records in Parquet or a JSON list — goes through the converters of
:mod:`stllava_med.data.preference` **once**, into ``<cache_dir>/<key>/pairs-NNNNN.jsonl``, and the run streams
those shards like any other.

Why convert instead of reading foreign rows on the fly: the DPO data streams shards by (file, line) — the
scan records positions, every epoch and every resumed run seeks them again, DDP ranks and workers share them
— and Parquet rows or a JSON list have no lines. A converted copy keeps one code path (and its guarantees:
exactly once per epoch, mid-epoch resume, the scan cache) for every input, and turns embedded image bytes
into files once instead of every epoch.

The key hashes the file's content, its directory (relative image paths resolve against it), the format,
``image_root``, the bad-pair policy and :data:`CONVERT_VERSION`, so a changed file is converted again and sweep
jobs share one copy. A conversion is written to a temporary directory and renamed into place (under a file
lock): readers see a complete conversion or none, and concurrent ranks or jobs convert once. Embedded images
go to ``<cache_dir>/images/<sha256>.<ext>`` (content-addressed, so conversions share them). Each conversion
keeps its ``conversion_report.json`` (read, kept, skipped by reason), which the data summary reports.

Torch-free, like :mod:`stllava_med.data.preference`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stllava_med.data.preference import SkipReport, convert_records, resolve_shards, write_shards
from stllava_med.schema import PAIR_FORMATS
from stllava_med.utils.io import atomic_write_json, file_lock, load_json, sha256_file, stable_hash

log = logging.getLogger(__name__)

# What a directory given as data.path contributes, in this preference (see resolve_shards).
PAIR_SUFFIXES = (".jsonl", ".parquet", ".json")
CONVERT_VERSION = 1
REPORT_NAME = "conversion_report.json"


def default_cache_dir() -> Path:
    """Where conversions go when neither ``data.convert_cache_dir`` nor a run directory is given."""
    return Path(tempfile.gettempdir()) / "stllava_med" / "converted_pairs"


def record_format(row: Any) -> str:
    """``native``, ``trl`` or ``official``: which format one record is in (``native`` when unsure, so that our
    reader names what is missing)."""
    if not isinstance(row, Mapping):
        return "native"
    if "chosen_conversations" in row or "reject_conversations" in row:
        return "official"
    if any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
        return "trl"  # conversational
    images = row.get("images")
    if "image" in row and images is None:
        return "trl"
    if isinstance(images, list) and not all(isinstance(i, str) for i in images):
        return "trl"  # embedded {"bytes", "path"}
    if "id" in row and images is not None:
        return "native"
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return "trl"  # TRL's standard (string) format
    return "native"


def _first_record(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # only Parquet inputs need pyarrow (and its import time)

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1):
            rows = batch.to_pylist()
            if rows:
                return rows[0]
        return None
    if suffix == ".json":
        data = load_json(path)
        return data[0] if isinstance(data, list) and data else None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None  # the scan reports the malformed line with its number
    return None


def detect_format(path: str | os.PathLike) -> str:
    """The format of a pair file, from its first record (an empty file counts as ours)."""
    return record_format(_first_record(Path(path)))


def streams_as_is(path: Path, fmt: str) -> bool:
    """Our JSONL shards are read in place; everything else is converted first."""
    return fmt == "native" and path.suffix.lower() not in (".parquet", ".json")


@dataclass
class PreparedShards:
    """The JSONL shards a run streams, and a report per converted input file."""

    shards: list[Path]
    conversions: list[dict[str, Any]] = field(default_factory=list)

    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for report in self.conversions:
            for reason, count in (report.get("skipped") or {}).items():
                total[reason] = total.get(reason, 0) + int(count)
        return total


def conversion_key(path: Path, fmt: str, *, image_root: str | os.PathLike | None, on_bad_pair: str) -> str:
    return stable_hash({"version": CONVERT_VERSION, "sha256": sha256_file(path), "dir": str(path.parent),
                        "format": fmt, "image_root": str(Path(image_root).resolve()) if image_root else None,
                        "on_bad_pair": on_bad_pair}, n=20)


def convert_file(path: Path, fmt: str, cache_dir: Path, *, image_root: str | os.PathLike | None = None,
                 on_bad_pair: str = "error") -> tuple[list[Path], dict[str, Any]]:
    """Convert one foreign file into native shards under ``cache_dir`` (or reuse an earlier conversion)."""
    key = conversion_key(path, fmt, image_root=image_root, on_bad_pair=on_bad_pair)
    entry = cache_dir / key
    with file_lock(cache_dir / ".locks" / f"{key}.lock"):
        report_path = entry / REPORT_NAME
        if report_path.is_file():
            report = load_json(report_path)
            return [entry / name for name in report["shards"]], {**report, "reused": True}
        tmp = cache_dir / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            skip_report = SkipReport()
            pairs = convert_records(path, fmt, image_root=image_root,
                                    images_dir=cache_dir / "images", on_bad_pair=on_bad_pair, report=skip_report)
            shards = write_shards(pairs, tmp)
            report = {"source": str(path), "format": fmt, **skip_report.to_json(),
                      "shards": [s.name for s in shards], "key": key}
            atomic_write_json(tmp / REPORT_NAME, report)  # written last: its presence marks a whole conversion
            if entry.exists():  # a previous attempt that died before its report: replace it
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s (%s): %d pairs kept of %d into %s", path, fmt, report["kept"], report["read"], entry)
    if report.get("skipped"):
        log.warning("converting %s skipped %s", path, report["skipped"])
    return [entry / name for name in report["shards"]], {**report, "reused": False}


def prepare_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], *, fmt: str = "auto",
                   cache_dir: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
                   on_bad_pair: str = "error") -> PreparedShards:
    """The native JSONL shards for ``data.path`` (or ``val_path``): ours as they are, the others converted."""
    if fmt not in PAIR_FORMATS:
        raise ValueError(f"data.format must be one of {PAIR_FORMATS}, not {fmt!r}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    prepared = PreparedShards(shards=[])
    for path in resolve_shards(spec, suffixes=PAIR_SUFFIXES):
        file_format = detect_format(path) if fmt == "auto" else fmt
        if streams_as_is(path, file_format):
            prepared.shards.append(path)
            continue
        shards, report = convert_file(path, file_format, cache, image_root=image_root, on_bad_pair=on_bad_pair)
        prepared.shards.extend(shards)
        prepared.conversions.append(report)
    return prepared
