"""Preference pairs: the record the judge writes and the DPO stage reads, its shards, and converters.

One JSON object per line in JSONL shards (a file, a directory of ``*.jsonl`` shards, or a glob)::

    {"id": "...", "images": ["/data/img.jpg"], "prompt": "question", "chosen": "...", "rejected": "...",
     "chosen_score": 8.0, "rejected_score": 3.0, "judge": "gpt-4o", "source": "selftrain/round0",
     "meta": "{\"margin\": 5.0}"}

Every line we write has every key, each always of one type (:data:`PAIR_SCHEMA`), so that shards from
different writers load and concatenate with ``datasets.load_dataset("json", data_files=...)`` (which takes
the column types of the first file, and cannot cast a column that is all ``null`` there, or a ``meta`` struct
with other keys): a score that is not known is ``NaN`` (read back as ``None``), an unknown judge or source is
``""``, and ``meta`` is a JSON object serialised to a string. The reader also takes the older lines (``null``
scores, ``meta`` as an object, keys left out).

A relative image path is resolved against ``image_root`` when one is given, else against the directory of
the shard that names it (so a folder of shards plus images can be moved as a whole). Our converters write
absolute paths unless asked for relative ones (the committed sample shard is relative, to stay movable).

Foreign formats read here and converted to shards by ``python -m stllava_med.convert_pairs``:

- TRL's vision preference format: ``images`` (or ``image``), ``prompt``, ``chosen``, ``rejected``, each text
  either a string or a conversational message list (``[{"role": "user", "content": [{"type": "image"},
  {"type": "text", "text": ...}]}]``); JSON, JSONL or Parquet (images as paths or ``{"bytes", "path"}``).
  :func:`pair_to_trl` writes it (conversational, absolute image paths).
- The official STLLaVA-Med DPO JSON: ``id``, ``image``, ``chosen_conversations``, ``reject_conversations``,
  each ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]``.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from stllava_med.data.vqa import LoadReport
from stllava_med.utils.io import atomic_write_text, load_json, read_jsonl

log = logging.getLogger(__name__)

BAD_PAIR_POLICIES = ("error", "skip")
_IMAGE_PLACEHOLDER = re.compile(r"^\s*(<image>\s*)+|(\s*<image>)+\s*$")


# The type of every key of a shard line, as ``datasets`` / Arrow read it (``docs/data-formats.md``).
PAIR_SCHEMA: dict[str, str] = {
    "id": "string",
    "images": "list<string>",
    "prompt": "string",
    "chosen": "string",
    "rejected": "string",
    "chosen_score": "double",  # NaN: no score (ground truth, imported pairs)
    "rejected_score": "double",
    "judge": "string",  # "": unknown
    "source": "string",  # "": unknown
    "meta": "string",  # a JSON object, "{}" when empty
}


def _score_out(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _score_in(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: field {key!r} must be a number, got {type(value).__name__}")
    return None if math.isnan(value) else float(value)


def _meta_in(value: Any, where: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: field 'meta' is not a JSON object ({err.msg})") from err
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: field 'meta' must be a JSON object, got {type(value).__name__}")
    return dict(value)


@dataclass(frozen=True)
class PreferencePair:
    id: str
    images: list[str]
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    judge: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The shard line: every key of :data:`PAIR_SCHEMA`, each of its one type."""
        return {
            "id": self.id, "images": list(self.images), "prompt": self.prompt, "chosen": self.chosen,
            "rejected": self.rejected, "chosen_score": _score_out(self.chosen_score),
            "rejected_score": _score_out(self.rejected_score), "judge": self.judge or "", "source": self.source or "",
            "meta": json.dumps(self.meta, ensure_ascii=False, sort_keys=True, default=str),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "pair") -> PreferencePair:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("id", "images", "prompt", "chosen", "rejected") if k not in obj]
        if missing:
            hint = ""
            if {"prompt", "chosen", "rejected"} <= obj.keys() or "chosen_conversations" in obj:
                hint = (" (this looks like TRL's or the official STLLaVA-Med format: data.format=auto converts it,"
                        " or python -m stllava_med.convert_pairs)")
            raise ValueError(f"{where}: missing field(s) {missing}{hint}")
        images = obj["images"]
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ValueError(f"{where}: field 'images' must be a list of paths")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(obj[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        return cls(
            id=str(obj["id"]),
            images=list(images),
            prompt=obj["prompt"],
            chosen=obj["chosen"],
            rejected=obj["rejected"],
            chosen_score=_score_in(obj, "chosen_score", where),
            rejected_score=_score_in(obj, "rejected_score", where),
            judge=obj.get("judge") or None,
            source=obj.get("source") or None,
            meta=_meta_in(obj.get("meta"), where),
        )


class BadPairError(ValueError):
    """A pair that cannot be trained on; the message names the file, line, pair id and field."""


# --------------------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------------------


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], *,
                   suffixes: Sequence[str] = (".jsonl",)) -> list[Path]:
    """The files named by ``spec``: a file, a directory, a glob, or a list (or comma-separated string) of those.
    A directory gives its files of the first of ``suffixes`` it holds any of, sorted (by default its
    ``*.jsonl`` shards; the DPO data also takes a folder of ``*.parquet`` or ``*.json`` files, which a folder of
    our shards and its ``conversion_report.json`` never are). Order is deterministic; a spec that matches
    nothing is an error."""
    if isinstance(spec, str | os.PathLike):
        parts = [p for p in str(spec).split(",") if p.strip()] if "," in str(spec) else [str(spec)]
    else:
        parts = [str(p) for p in spec]
    if not parts:
        raise ValueError("data.path is empty: give a JSONL file, a directory of shards or a glob")
    shards: list[Path] = []
    for part in parts:
        part = os.path.expanduser(part.strip())
        path = Path(part)
        if path.is_dir():
            found = []
            for suffix in suffixes:
                found = sorted(p for p in path.glob(f"*{suffix}") if p.is_file())
                if found:
                    break
            if not found:
                kinds = " or ".join(f"*{x}" for x in suffixes)
                raise FileNotFoundError(f"data.path: directory {path} holds no {kinds} {'shard' if len(suffixes) == 1 else 'file'}")
        elif path.is_file():
            found = [path]
        elif globlib.has_magic(part):
            found = sorted(Path(p) for p in globlib.glob(part, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"data.path: glob {part!r} matched no file")
        else:
            raise FileNotFoundError(f"data.path: {path} does not exist")
        shards.extend(p.resolve() for p in found)
    seen: set[Path] = set()
    unique = []
    for shard in shards:
        if shard not in seen:
            seen.add(shard)
            unique.append(shard)
    return unique


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-empty lines of a file, read one at a time (shards can be large). Bytes that
    are not UTF-8 are kept as surrogate escapes, so that one bad line does not end the iteration:
    :func:`parse_pair_line` refuses that line, naming it."""
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield lineno, line


def _not_utf8(line: str) -> str | None:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = line[err.start].encode("utf-8", "surrogateescape")
        return f"not UTF-8 text (byte 0x{raw[0]:02x} at column {err.start + 1})"
    return None


def parse_pair_line(line: str, where: str) -> PreferencePair:
    """One JSONL line as a pair; a line that is not UTF-8, not JSON or not a valid pair is a
    :class:`BadPairError` naming ``where`` (file and line) and the field."""
    problem = _not_utf8(line)
    if problem:
        raise BadPairError(f"{where}: {problem}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadPairError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
    try:
        return PreferencePair.from_json(obj, where=where)
    except BadPairError:
        raise
    except (ValueError, TypeError) as err:
        raise BadPairError(str(err) if str(err).startswith(where) else f"{where}: {err}") from err


def iter_pairs(shards: Sequence[Path]) -> Iterator[tuple[PreferencePair, Path, int]]:
    """Stream (pair, shard, line number) over the shards; a malformed record is an error naming file and line."""
    for shard in shards:
        for lineno, line in iter_lines(shard):
            yield parse_pair_line(line, f"{shard}:{lineno}"), shard, lineno


def resolve_image(path: str, shard: Path | None, image_root: str | os.PathLike | None = None) -> Path:
    image = Path(os.path.expanduser(path))
    if image.is_absolute():
        return image
    if image_root:
        return Path(image_root) / image
    if shard is not None:
        return shard.parent / image
    return image


def pair_problem(pair: PreferencePair, image_paths: Sequence[Path]) -> str | None:
    """Why ``pair`` cannot be trained on (a short reason used as a skip counter), or None.

    Reasons: ``empty_prompt``, ``empty_chosen``, ``empty_rejected``, ``chosen_equals_rejected`` (the same text up
    to case and whitespace: "Yes." / "yes." teaches nothing but capitalisation), ``no_image`` (``images: []``: the
    method trains on images; a text-only pair is not what it learns from), ``too_many_images`` (one image per pair,
    as in the paper), ``missing_image``."""
    if not pair.prompt.strip():
        return "empty_prompt"
    if not pair.chosen.strip():
        return "empty_chosen"
    if not pair.rejected.strip():
        return "empty_rejected"
    if _same_text(pair.chosen, pair.rejected):
        return "chosen_equals_rejected"
    if not pair.images:
        return "no_image"
    if len(pair.images) > 1:
        return "too_many_images"
    for image in image_paths:
        if not image.is_file():
            return "missing_image"
    return None


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


# The field a reason is about, for the error message (handle_bad adds it when the caller gives no detail).
PROBLEM_FIELDS = {
    "empty_prompt": "field 'prompt' is empty", "empty_chosen": "field 'chosen' is empty",
    "empty_rejected": "field 'rejected' is empty",
    "chosen_equals_rejected": "fields 'chosen' and 'rejected' are the same text up to case and whitespace",
    "no_image": "field 'images' is empty (text-only pairs are not trained)",
    "too_many_images": "field 'images' lists more than one image (one image per pair)",
}


# What a reader kept and skipped: the same report the VQA loaders give.
SkipReport = LoadReport


def handle_bad(report: SkipReport, policy: str, reason: str, where: str, detail: str = "") -> None:
    """Raise (``policy='error'``) or count a bad record."""
    if policy not in BAD_PAIR_POLICIES:
        raise ValueError(f"on_bad_pair must be one of {BAD_PAIR_POLICIES}, not {policy!r}")
    detail = detail or PROBLEM_FIELDS.get(reason, "")
    message = f"{where}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}"
    if policy == "error":
        raise BadPairError(f"{message} (set data.on_bad_pair=skip to skip such pairs, counted)")
    report.skip(reason, message)


def write_shards(pairs: Iterable[PreferencePair], out_dir: str | os.PathLike, *, shard_size: int = 10000,
                 prefix: str = "pairs", to_row: Callable[[PreferencePair], dict[str, Any]] | None = None) -> list[Path]:
    """Write pairs as ``<out_dir>/<prefix>-00000.jsonl`` ... (each shard written atomically); returns the paths.

    ``to_row`` makes a line of a pair (default :meth:`PreferencePair.to_json`; :func:`pair_to_trl` for TRL)."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out_dir = Path(out_dir)
    written: list[Path] = []
    buffer: list[str] = []

    def flush() -> None:
        path = out_dir / f"{prefix}-{len(written):05d}.jsonl"
        atomic_write_text(path, "".join(buffer))
        written.append(path)
        buffer.clear()

    for pair in pairs:
        buffer.append(json.dumps(pair.to_json() if to_row is None else to_row(pair), ensure_ascii=False) + "\n")
        if len(buffer) >= shard_size:
            flush()
    if buffer:
        flush()
    return written


# --------------------------------------------------------------------------------------------------------------
# Foreign formats
# --------------------------------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, where) from a JSON list, a JSONL file or a Parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # only Parquet inputs need pyarrow (and its import time)

        table = pq.ParquetFile(path)
        index = 0
        for batch in table.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield row, f"{path}: row {index}"
                index += 1
    elif suffix == ".jsonl":
        for index, row in enumerate(read_jsonl(path)):
            yield row, f"{path}: record {index}"
    else:
        data = load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for index, row in enumerate(data):
            yield row, f"{path}: record {index}"


def _strip_image_placeholder(text: str) -> str:
    """The text without a leading or trailing ``<image>`` placeholder and the whitespace between it and the
    text; the rest is kept as it is (a conversational prompt carries its image as a separate part)."""
    return _IMAGE_PLACEHOLDER.sub("", text)


def _message_text(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping) and part.get("type") == "text")
    raise ValueError(f"{where}: message content must be a string or a list of parts")


def _conversation_text(value: Any, role: str, where: str) -> str:
    """The text of a TRL field: a string, or a message list with exactly one ``role`` message."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        raise ValueError(f"{where}: expected a string or a list of messages")
    others = [m.get("role") for m in value if m.get("role") not in (role, "system")]
    matching = [m for m in value if m.get("role") == role]
    if others or len(matching) != 1:
        raise _MultiTurn(f"{where}: expected one {role!r} message, got roles {[m.get('role') for m in value]}")
    return _message_text(matching[0], where)


class _MultiTurn(ValueError):
    """A conversation with more than one exchange; our pair record is single-turn, as in the paper."""


def _save_image_bytes(data: bytes, images_dir: Path) -> str:
    digest = hashlib.sha256(data).hexdigest()[:24]
    with Image.open(io.BytesIO(data)) as img:
        ext = (img.format or "png").lower().replace("jpeg", "jpg")
    target = images_dir / f"{digest}.{ext}"
    if not target.is_file():
        images_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return str(target)


def _trl_image(value: Any, where: str, images_dir: Path | None) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes"):
            if images_dir is None:
                raise ValueError(f"{where}: the image is embedded as bytes; give an images directory to write it to")
            return _save_image_bytes(bytes(value["bytes"]), images_dir)
        if value.get("path"):
            return str(value["path"])
    raise ValueError(f"{where}: an image must be a path or {{'bytes', 'path'}}, got {type(value).__name__}")


def pair_from_trl(row: Mapping[str, Any], where: str, *, index: int = 0, images_dir: Path | None = None,
                  source: str | None = None) -> PreferencePair:
    """One TRL vision preference record (``images``/``image``, ``prompt``, ``chosen``, ``rejected``)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    raw_images = row.get("images", row.get("image"))
    if raw_images is None:
        raw_images = []
    elif not isinstance(raw_images, list):
        raw_images = [raw_images]
    images = [_trl_image(img, f"{where}: field 'images'", images_dir) for img in raw_images]
    prompt = _strip_image_placeholder(_conversation_text(row["prompt"], "user", f"{where}: field 'prompt'"))
    chosen = _conversation_text(row["chosen"], "assistant", f"{where}: field 'chosen'")
    rejected = _conversation_text(row["rejected"], "assistant", f"{where}: field 'rejected'")
    return PreferencePair(id=str(row.get("id", f"trl-{index}")), images=images, prompt=prompt,
                          chosen=chosen.strip(), rejected=rejected.strip(),
                          source=source or str(row.get("source") or "trl"))


def pair_to_trl(pair: PreferencePair) -> dict[str, Any]:
    """A pair as one record of TRL's conversational vision preference format (the dataset ``DPOTrainer`` takes):
    the user turn holds one ``{"type": "image"}`` part per image, then the question; ``chosen`` / ``rejected``
    are one assistant turn each; ``images`` are the pair's paths as given (make them absolute first: TRL
    resolves nothing against the file). ``id`` rides along (TRL drops or ignores columns it does not use)."""
    def turn(role: str, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"role": role, "content": parts}]

    return {
        "id": pair.id,
        "images": list(pair.images),
        "prompt": turn("user", [*({"type": "image"} for _ in pair.images), {"type": "text", "text": pair.prompt}]),
        "chosen": turn("assistant", [{"type": "text", "text": pair.chosen}]),
        "rejected": turn("assistant", [{"type": "text", "text": pair.rejected}]),
    }


def _official_turns(value: Any, where: str) -> tuple[str, str]:
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ValueError(f"{where}: expected a list of {{'from', 'value'}} turns")
    if len(value) != 2:
        raise _MultiTurn(f"{where}: expected one human and one gpt turn, got {len(value)} turns")
    human, gpt = value
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise ValueError(f"{where}: expected turns from 'human' then 'gpt', got {[t.get('from') for t in value]}")
    return _strip_image_placeholder(str(human.get("value", ""))), str(gpt.get("value", "")).strip()


def pair_from_stllava(row: Mapping[str, Any], where: str, *, index: int = 0, source: str | None = None) -> PreferencePair:
    """One record of the official STLLaVA-Med DPO JSON."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("image", "chosen_conversations", "reject_conversations"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    prompt, chosen = _official_turns(row["chosen_conversations"], f"{where}: field 'chosen_conversations'")
    prompt_rejected, rejected = _official_turns(row["reject_conversations"], f"{where}: field 'reject_conversations'")
    if prompt != prompt_rejected:
        raise ValueError(f"{where}: chosen and rejected conversations ask different questions")
    image = row["image"]
    images = [str(image)] if image else []
    return PreferencePair(id=str(row.get("id", f"stllava-{index}")), images=images, prompt=prompt, chosen=chosen,
                          rejected=rejected, source=source or "stllava_med")


FOREIGN_FORMATS = ("native", "trl", "stllava", "official")  # "official" is "stllava" (the official DPO JSON)


def convert_records(path: str | os.PathLike, fmt: str, *, image_root: str | os.PathLike | None = None,
                    images_dir: Path | None = None, on_bad_pair: str = "error",
                    report: SkipReport | None = None) -> Iterator[PreferencePair]:
    """Pairs from a file in ``fmt`` (``native``, ``trl`` or ``stllava``), with image paths made absolute
    (relative ones resolved against ``image_root``, else the file's directory) and bad pairs checked.

    Multi-turn conversations cannot become one pair: they are bad pairs (``multi_turn``)."""
    if fmt not in FOREIGN_FORMATS:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of {FOREIGN_FORMATS}")
    path = Path(path)
    report = report if report is not None else SkipReport()
    seen: set[str] = set()
    for index, (row, where) in enumerate(read_records(path)):
        report.read += 1
        try:
            if fmt == "trl":
                pair = pair_from_trl(row, where, index=index, images_dir=images_dir)
            elif fmt in ("stllava", "official"):
                pair = pair_from_stllava(row, where, index=index)
            else:
                pair = PreferencePair.from_json(row, where=where)
        except _MultiTurn as err:
            handle_bad(report, on_bad_pair, "multi_turn", where, str(err).split(": ", 1)[-1])
            continue
        images = [str(resolve_image(i, path, image_root).resolve()) for i in pair.images]
        pair = PreferencePair(**{**asdict(pair), "images": images})
        where = f"{where} (id {pair.id!r})"
        if pair.id in seen:
            handle_bad(report, on_bad_pair, "duplicate_id", where)
            continue
        problem = pair_problem(pair, [Path(i) for i in images])
        if problem:
            handle_bad(report, on_bad_pair, problem, where, ", ".join(images) if problem == "missing_image" else "")
            continue
        seen.add(pair.id)
        report.kept += 1
        yield pair


# --------------------------------------------------------------------------------------------------------------
# Real pairs from the bundled VQA-RAD sample (tests, demo)
# --------------------------------------------------------------------------------------------------------------


def _norm_answer(answer: str) -> str:
    return " ".join(str(answer).lower().strip().rstrip(".").split())


def vqa_ground_truth_pairs(records: Sequence[Any], *, seed: int = 0, source: str = "vqa_rad_sample/ground_truth",
                           id_prefix: str = "vqa_rad") -> list[PreferencePair]:
    """Preference pairs from VQA records with the ground truth as the expert: ``chosen`` is the record's
    answer; ``rejected`` is the opposite for a yes/no answer, else the answer of another question of the same
    answer type and question type (falling back to any of that answer type) about the same organ
    (``image_organ``) whose answer differs — a plausible but wrong finding. The choice is a seeded hash, so
    the output is deterministic.

    ``records`` are :class:`stllava_med.data.vqa.VQARecord`; records with no differing answer are left out."""
    narrow: dict[tuple[str, str, str], list[Any]] = {}
    broad: dict[tuple[str, str], list[Any]] = {}
    for record in records:
        organ = str(record.meta.get("image_organ", ""))
        narrow.setdefault((organ, record.answer_type, str(record.meta.get("question_type", ""))), []).append(record)
        broad.setdefault((organ, record.answer_type), []).append(record)
    pairs = []
    for record in records:
        answer = _norm_answer(record.answer)
        if not answer:
            continue
        organ = str(record.meta.get("image_organ", ""))
        if answer in ("yes", "no"):
            candidates = [("no", "No")] if answer == "yes" else [("yes", "Yes")]
        else:
            candidates = []
            for group in (narrow[(organ, record.answer_type, str(record.meta.get("question_type", "")))],
                          broad[(organ, record.answer_type)]):
                candidates = sorted({_norm_answer(r.answer): str(r.answer).strip() for r in group
                                     if _norm_answer(r.answer) not in ("", answer, "yes", "no")}.items())
                if candidates:
                    break
        if not candidates:
            continue
        digest = hashlib.sha256(f"{seed}\x00{record.id}".encode()).digest()
        rejected = candidates[int.from_bytes(digest[:8], "big") % len(candidates)][1]
        pairs.append(PreferencePair(
            id=f"{id_prefix}-{record.id}", images=[record.image], prompt=record.question,
            chosen=str(record.answer).strip(), rejected=rejected, judge="ground_truth", source=source,
            meta={"answer_type": record.answer_type, "image_organ": record.meta.get("image_organ")},
        ))
    return pairs


def relative_images(pairs: Iterable[PreferencePair], shard_dir: Path) -> Iterator[PreferencePair]:
    """The pairs with image paths relative to ``shard_dir`` (so a folder of shards and images can move)."""
    for pair in pairs:
        images = [os.path.relpath(Path(i).resolve(), shard_dir.resolve()) for i in pair.images]
        yield PreferencePair(**{**asdict(pair), "images": images})
