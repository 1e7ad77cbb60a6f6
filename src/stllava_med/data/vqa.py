"""Medical VQA records and loaders: VQA-RAD, SLAKE, PathVQA, the LLaVA-Med evaluation format, our own JSONL.

One record type, :class:`VQARecord`, for every benchmark. Loaders read the files in the formats they are
published in, check every field they use, and name the file, record and field when something is wrong.
Missing images are an error by default; with ``on_missing_image="skip"`` they are skipped, counted and
reported in a :class:`LoadReport`, never dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from stllava_med.data.answers import normalize_answer_type
from stllava_med.schema import ExpectedCounts
from stllava_med.utils.io import atomic_write_text, load_json, read_jsonl

log = logging.getLogger(__name__)

FORMATS = ("vqa_rad", "vqa_rad_public", "slake", "pathvqa", "llava_med", "native")


@dataclass(frozen=True)
class VQARecord:
    """One question about one image. ``answer_type`` is ``OPEN`` or ``CLOSED``; ``id`` is unique per dataset.

    ``source_id`` is the id as the benchmark file spells it when that is not a string (VQA-RAD's and SLAKE's
    ``qid`` are integers): answer files carry it as ``question_id`` (:attr:`question_id`), so LLaVA-Med's own
    scripts, which compare ids with ``==``, accept them."""

    id: str
    image: str
    question: str
    answer: str
    answer_type: str
    dataset: str
    split: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source_id: int | str | None = field(default=None, compare=False)

    @property
    def question_id(self) -> int | str:
        return self.id if self.source_id is None else self.source_id

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["id"] = self.question_id
        out.pop("source_id")
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "record") -> VQARecord:
        missing = [k for k in ("id", "image", "question", "answer", "answer_type") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        return cls(
            id=str(obj["id"]),
            image=str(obj["image"]),
            question=_text(obj["question"], where, "question"),
            answer=_text(obj["answer"], where, "answer"),
            answer_type=_answer_type(obj["answer_type"], where),
            dataset=str(obj.get("dataset", "native")),
            split=str(obj.get("split", "test")),
            meta=dict(obj.get("meta") or {}),
            source_id=_source_id(obj["id"]),
        )


def _source_id(raw: Any) -> int | str | None:
    """What :attr:`VQARecord.source_id` keeps of a file's id: a non-string id (an integer), else nothing."""
    return None if isinstance(raw, str) else raw


@dataclass
class LoadReport:
    """What a loader or reader read, kept and skipped (with reasons and a few examples), for logs and run
    summaries. Shared by the VQA loaders and the preference-pair readers."""

    source: str = ""
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{reason}: {detail}")

    def to_json(self) -> dict[str, Any]:
        counts = {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped), "skip_examples": self.examples}
        return {"source": self.source, **counts} if self.source else counts


class ImageError(ValueError):
    """A record's image is missing or unreadable; the message names the record and the path."""


class EmptyDataset(ValueError):
    """A dataset with no question left to use; the message says what was read and what was dropped, and why."""


def _dropped(report: LoadReport) -> str:
    if not report.read:
        return "the file has no records"
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in report.skipped.items())
    examples = f" (e.g. {'; '.join(report.examples[:3])})" if report.examples else ""
    return f"{report.read} read, {skipped or 'none'} skipped{examples}"


class CountMismatch(ValueError):
    """A benchmark file does not hold the questions its config expects (``data.sets.<name>.expect_counts``)."""


def check_counts(records: Sequence[VQARecord], expected: ExpectedCounts, *, name: str, report: LoadReport) -> None:
    """Refuse ``records`` unless they have ``expected``'s total / open / closed counts; the error names the file,
    the counts found and expected, what the loader skipped, and the opt-out key."""
    n_open = sum(r.answer_type == "OPEN" for r in records)
    found = (len(records), n_open, len(records) - n_open)
    if found == (expected.total, expected.open, expected.closed):
        return
    skipped = f"; the loader skipped {dict(report.skipped)} of {report.read} read" if report.skipped else ""
    raise CountMismatch(
        f"{report.source}: data.sets.{name} has {found[0]} questions ({found[1]} open / {found[2]} closed), expected "
        f"{expected.total} ({expected.open} open / {expected.closed} closed){skipped}. Is this the right file? "
        f"For a custom subset set data.sets.{name}.expect_counts=null"
    )


def _text(value: Any, where: str, name: str) -> str:
    """A question's or answer's text: a non-empty string (a number is taken as its text, ``2`` -> ``"2"``); null,
    a boolean, a list or an empty string is an error naming the record and the field (``str(None)`` would make
    the ground truth the word "None")."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got "
                         f"{'null' if value is None else type(value).__name__ + ' ' + repr(value)[:40]}")
    if name.startswith("question") and not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {type(value).__name__} {value!r}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return text


def _integer(value: Any, where: str, name: str) -> int:
    """An integer field (a JSON number, or a string of digits as some exports write ids)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().lstrip("-").isdigit():
        raise ValueError(f"{where}: field {name!r} must be an integer, got {type(value).__name__} {value!r}"[:300])
    return int(value)


def _answer_type(value: Any, where: str) -> str:
    try:
        return normalize_answer_type(value)
    except ValueError as err:
        raise ValueError(f"{where}: field 'answer_type': {err}") from None


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode that occurs in medical sets to 8-bit RGB without losing the picture.

    16-bit and 32-bit grayscale (``I;16``, ``I``, ``F``: DICOM exports) are rescaled from their actual value
    range — a plain ``convert`` would clip everything above 255 to white. Transparent images (``RGBA``,
    ``LA``, ``P`` with a transparency key) are composited on black, the background of radiographs."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


# PIL's decompression-bomb guard (PIL warns above Image.MAX_IMAGE_PIXELS and refuses above twice that); here one
# limit, the stage setting ``max_image_pixels``, above which an image is a bad image like an unreadable one: an
# ImageError naming the record, or a counted skip where the stage skips bad images.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default, about 9459 x 9459


def set_max_image_pixels(limit: int | None) -> None:
    """Apply the ``max_image_pixels`` setting (null: no limit) to every later image open in this process (and
    the DataLoader workers it forks)."""
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise ValueError(f"max_image_pixels must be a positive number of pixels or null, not {limit!r}")
    Image.MAX_IMAGE_PIXELS = None if limit is None else int(limit)


def _too_large(path: Path, where: str, err: Exception) -> ImageError:
    return ImageError(f"{where}image {path} is larger than max_image_pixels={Image.MAX_IMAGE_PIXELS} ({err}); if it "
                      "is a genuine image, raise the limit: max_image_pixels=<pixels> (or null for none)")


def open_image_header(path: str | Path, *, record_id: str | None = None) -> tuple[int, int]:
    """An image's (width, height) from its header (no decoding), with :func:`load_image`'s errors."""
    where = f"record {record_id!r}: " if record_id is not None else ""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_large(path, where, err) from None
    except FileNotFoundError:
        raise ImageError(f"{where}image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{where}cannot read image {path}: {err}") from err


def load_image(path: str | Path, *, record_id: str | None = None) -> Image.Image:
    """Open an image as RGB; a missing, undecodable or over-``max_image_pixels`` file raises :class:`ImageError`
    naming record and path."""
    where = f"record {record_id!r}: " if record_id is not None else ""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{where}image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_large(path, where, err) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{where}cannot read image {path}: {err}") from err


# --------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------


def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    return obj[key]


def _list_of_records(data: Any, path: Path) -> list[Any]:
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _finish(records: list[VQARecord], report: LoadReport, on_missing_image: str) -> list[VQARecord]:
    """Check images exist; error or count-and-skip as configured."""
    if on_missing_image not in ("error", "skip", "ignore"):
        raise ValueError(f"on_missing_image must be 'error', 'skip' or 'ignore', not {on_missing_image!r}")
    if on_missing_image == "ignore":  # scoring needs answers only, not pixels
        report.kept = len(records)
        return records
    kept: list[VQARecord] = []
    for record in records:
        if not Path(record.image).is_file():
            if on_missing_image == "error":
                raise ImageError(
                    f"{report.source}: record {record.id!r}: image not found: {record.image} "
                    "(set on_missing_image=skip to skip such records, counted)"
                )
            report.skip("missing_image", f"{record.id} -> {record.image}")
            continue
        kept.append(record)
    report.kept = len(kept)
    if report.skipped:
        log.warning("%s: skipped %s", report.source, dict(report.skipped))
    return kept


def _split_file(root: Path, names: Mapping[str, str], split: str, dataset: str) -> Path:
    """The file of ``split`` in a benchmark folder; an unknown split is an error listing the valid ones."""
    if split not in names:
        raise ValueError(f"{dataset} split must be one of {sorted(names)}, not {split!r}")
    return root / names[split]


def load_vqa_rad(root: str | Path, split: str = "test", *, on_missing_image: str = "error",
                 image_dir: str | Path | None = None) -> tuple[list[VQARecord], LoadReport]:
    """VQA-RAD in the MEVF split files ``trainset.json`` / ``testset.json`` (images in ``images/``).

    Record ids are ``qid - 1`` to match LLaVA-Med's VQA-RAD ``test.json`` (so answer files from LLaVA-Med
    score against ours without remapping)."""
    root = Path(root)
    path = _split_file(root, {"train": "trainset.json", "test": "testset.json"}, split, "VQA-RAD")
    images = Path(image_dir) if image_dir else root / "images"
    report = LoadReport(source=str(path))
    records = []
    for index, row in enumerate(_list_of_records(load_json(path), path)):
        where = f"{path}: record {index}"
        qid = _integer(_require(row, "qid", where), where, "qid")
        records.append(VQARecord(
            id=str(qid - 1),
            source_id=qid - 1,
            image=str(images / str(_require(row, "image_name", where))),
            question=_text(_require(row, "question", where), where, "question"),
            answer=_text(_require(row, "answer", where), where, "answer"),
            answer_type=_answer_type(_require(row, "answer_type", where), where),
            dataset="vqa_rad",
            split=split,
            meta={k: row[k] for k in ("image_organ", "question_type", "phrase_type") if k in row},
        ))
    report.read = len(records)
    return _finish(records, report, on_missing_image), report


def load_vqa_rad_public(root: str | Path, split: str = "test", *, include_rephrase: bool = True,
                        on_missing_image: str = "error", image_dir: str | Path | None = None,
                        ) -> tuple[list[VQARecord], LoadReport]:
    """The official release ``VQA_RAD Dataset Public.json``: rows whose ``phrase_type`` starts with ``test_``
    form the test split. ``include_rephrase`` adds each row's paraphrase (``question_rephrase``) as a second
    record with id ``<qid>_rephrase``; ``"NULL"`` marks a missing value in this file."""
    root = Path(root)
    path = root / "VQA_RAD Dataset Public.json"
    if split not in ("train", "test", "all"):
        raise ValueError(f"VQA-RAD split must be 'train', 'test' or 'all', not {split!r}")
    images = Path(image_dir) if image_dir else root / "images"
    report = LoadReport(source=str(path))
    records = []
    for index, row in enumerate(_list_of_records(load_json(path), path)):
        where = f"{path}: record {index}"
        phrase_type = str(_require(row, "phrase_type", where))
        row_split = "test" if phrase_type.startswith("test") else "train"
        if split != "all" and row_split != split:
            continue
        raw_qid = _require(row, "qid", where)
        qid = str(raw_qid)
        base = dict(
            image=str(images / str(_require(row, "image_name", where))),
            answer=_text(_require(row, "answer", where), where, "answer"),
            answer_type=_answer_type(_require(row, "answer_type", where), where),
            dataset="vqa_rad_public",
            split=row_split,
            meta={k: row[k] for k in ("image_organ", "question_type", "phrase_type", "evaluation") if k in row},
        )
        records.append(VQARecord(id=qid, question=_text(_require(row, "question", where), where, "question"), source_id=_source_id(raw_qid),
                                 **base))
        rephrase = row.get("question_rephrase")
        if include_rephrase and rephrase not in (None, "", "NULL"):
            records.append(VQARecord(id=f"{qid}_rephrase", question=_text(rephrase, where, "question_rephrase"), **base))
    report.read = len(records)
    return _finish(records, report, on_missing_image), report


def load_slake(root: str | Path, split: str = "test", *, language: str | None = "en",
               on_missing_image: str = "error", image_dir: str | Path | None = None,
               ) -> tuple[list[VQARecord], LoadReport]:
    """SLAKE (Slake1.0): ``train.json`` / ``validate.json`` / ``test.json`` with images ``imgs/<img_name>``.

    ``language`` filters on ``q_lang`` (``en`` is the usual benchmark; ``zh`` or ``None`` for all). Record ids
    are the ``qid`` field, which is LLaVA-Med's SLAKE id."""
    root = Path(root)
    path = _split_file(root, {"train": "train.json", "validate": "validate.json", "val": "validate.json",
                              "test": "test.json"}, split, "SLAKE")
    images = Path(image_dir) if image_dir else root / "imgs"
    report = LoadReport(source=str(path))
    records = []
    for index, row in enumerate(_list_of_records(load_json(path), path)):
        where = f"{path}: record {index}"
        if language and str(_require(row, "q_lang", where)) != language:
            continue
        qid = _require(row, "qid", where)
        records.append(VQARecord(
            id=str(qid),
            source_id=_source_id(qid),
            image=str(images / str(_require(row, "img_name", where))),
            question=_text(_require(row, "question", where), where, "question"),
            answer=_text(_require(row, "answer", where), where, "answer"),
            answer_type=_answer_type(_require(row, "answer_type", where), where),
            dataset="slake",
            split=split,
            meta={k: row[k] for k in ("modality", "location", "content_type", "q_lang", "base_type") if k in row},
        ))
    report.read = len(records)
    return _finish(records, report, on_missing_image), report


def _pathvqa_answer_type(answer: str) -> str:
    # PathVQA has no answer-type field; LLaVA-Med (and everyone since) treats yes/no answers as CLOSED.
    return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"


def load_pathvqa(root: str | Path, split: str = "test", *, image_cache: str | Path | None = None,
                 on_missing_image: str = "error") -> tuple[list[VQARecord], LoadReport]:
    """PathVQA in its widely used parquet form (``image`` = ``{bytes, path}``, ``question``, ``answer``), files
    ``<split>-*.parquet`` under ``root`` or ``root/data``. Image bytes are written once to ``image_cache``
    (content-addressed names), so downstream stages see ordinary image paths."""
    import pyarrow.parquet as pq  # only PathVQA's Parquet files need pyarrow (and its import time)

    root = Path(root)
    files = sorted([*root.glob(f"{split}-*.parquet"), *root.glob(f"data/{split}-*.parquet"),
                    *root.glob(f"{split}.parquet")])
    if not files:
        raise FileNotFoundError(f"PathVQA: no {split}-*.parquet under {root} or {root / 'data'}")
    cache = Path(image_cache) if image_cache else root / "images_cache"
    cache.mkdir(parents=True, exist_ok=True)
    report = LoadReport(source=", ".join(str(f) for f in files))
    records: list[VQARecord] = []
    row_index = 0
    for file in files:
        table = pq.read_table(file)
        for column in ("image", "question", "answer"):
            if column not in table.column_names:
                raise ValueError(f"{file}: missing column {column!r} (have {table.column_names})")
        for row in table.to_pylist():
            where = f"{file}: row {row_index}"
            image = row["image"]
            data = image.get("bytes") if isinstance(image, Mapping) else image
            if not data:
                if on_missing_image == "error":
                    raise ImageError(f"{where}: field 'image' holds no bytes")
                report.skip("missing_image", where)
                row_index += 1
                continue
            digest = hashlib.sha256(data).hexdigest()[:24]
            out = cache / f"{digest}.png"
            if not out.is_file():
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        to_rgb(img).save(out)
                except (UnidentifiedImageError, OSError) as err:
                    raise ImageError(f"{where}: cannot decode field 'image': {err}") from err
            answer = _text(row["answer"], where, "answer")
            records.append(VQARecord(
                id=str(row_index), source_id=row_index, image=str(out), question=_text(row["question"], where, "question"), answer=answer,
                answer_type=_pathvqa_answer_type(answer), dataset="pathvqa", split=split,
            ))
            row_index += 1
    report.read = row_index
    return _finish(records, report, on_missing_image), report


def load_llava_med(path: str | Path, image_folder: str | Path, *, dataset: str = "llava_med", split: str = "test",
                   on_missing_image: str = "error") -> tuple[list[VQARecord], LoadReport]:
    """The LLaVA-Med evaluation format: ``[{id, image, answer_type, conversations: [{from: human, value:
    "<question>\\n<image>"}, {from: gpt, value: "<answer>"}]}]`` (a JSON list, or JSONL)."""
    path = Path(path)
    rows = list(read_jsonl(path)) if path.suffix == ".jsonl" else _list_of_records(load_json(path), path)
    report = LoadReport(source=str(path))
    records = []
    for index, row in enumerate(rows):
        where = f"{path}: record {index}"
        conversations = _require(row, "conversations", where)
        if not isinstance(conversations, list) or len(conversations) < 2:
            raise ValueError(f"{where}: field 'conversations' must hold a human turn and a gpt turn")
        human = next((c for c in conversations if c.get("from") == "human"), None)
        answer = next((c for c in conversations if c.get("from") == "gpt"), None)
        if human is None or answer is None:
            raise ValueError(f"{where}: field 'conversations' needs one 'human' and one 'gpt' turn")
        question = _text(human.get("value"), where, "conversations[human].value").replace("<image>", "").strip()
        if not question:
            raise ValueError(f"{where}: field 'conversations[human].value' holds no question (only the <image> tag)")
        raw_id = _require(row, "id", where)
        records.append(VQARecord(
            id=str(raw_id),
            source_id=_source_id(raw_id),
            image=str(Path(image_folder) / str(_require(row, "image", where))),
            question=question,
            answer=_text(answer.get("value"), where, "conversations[gpt].value"),
            answer_type=_answer_type(_require(row, "answer_type", where), where),
            dataset=dataset,
            split=split,
        ))
    report.read = len(records)
    return _finish(records, report, on_missing_image), report


def load_native(path: str | Path, *, on_missing_image: str = "error") -> tuple[list[VQARecord], LoadReport]:
    """Our own JSONL of :meth:`VQARecord.to_json` lines."""
    path = Path(path)
    records = [VQARecord.from_json(obj, where=f"{path}: line {i + 1}") for i, obj in enumerate(read_jsonl(path))]
    report = LoadReport(source=str(path), read=len(records))
    return _finish(records, report, on_missing_image), report


def load_vqa(spec: Mapping[str, Any]) -> tuple[list[VQARecord], LoadReport]:
    """Load one dataset from a ``data.sets.<name>`` config entry (``format``, ``root``/``path``, ``split``...).
    ``expect_counts`` (total / open / closed) refuses a file with other counts (:class:`CountMismatch`)."""
    spec = dict(spec)
    fmt = spec.get("format")
    on_missing = str(spec.get("on_missing_image", "error"))
    split = str(spec.get("split", "test"))
    if fmt == "vqa_rad":
        records, report = load_vqa_rad(spec["root"], split, on_missing_image=on_missing, image_dir=spec.get("image_dir"))
    elif fmt == "vqa_rad_public":
        records, report = load_vqa_rad_public(spec["root"], split, include_rephrase=bool(spec.get("include_rephrase", True)),
                                              on_missing_image=on_missing, image_dir=spec.get("image_dir"))
    elif fmt == "slake":
        records, report = load_slake(spec["root"], split, language=spec.get("language", "en"),
                                     on_missing_image=on_missing, image_dir=spec.get("image_dir"))
    elif fmt == "pathvqa":
        records, report = load_pathvqa(spec["root"], split, image_cache=spec.get("image_cache"), on_missing_image=on_missing)
    elif fmt == "llava_med":
        records, report = load_llava_med(spec["path"], spec["image_folder"], dataset=str(spec.get("name", "llava_med")),
                                         split=split, on_missing_image=on_missing)
    elif fmt == "native":
        records, report = load_native(spec["path"], on_missing_image=on_missing)
    else:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
    name = str(spec.get("name", fmt))
    expected = ExpectedCounts.from_config(spec.get("expect_counts"), f"data.sets.{name}.expect_counts")
    if expected is not None:  # the whole file, before a limit= smoke subset
        check_counts(records, expected, name=name, report=report)
    limit = check_limit(spec.get("limit"), f"data.sets.{name}.limit")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise EmptyDataset(f"{report.source}: data.sets.{name} holds no questions: {_dropped(report)}")
    ids = Counter(r.id for r in records)
    duplicated = [i for i, n in ids.items() if n > 1]
    if duplicated:
        raise ValueError(f"{report.source}: duplicate record ids {duplicated[:5]}")
    return records, report


def check_limit(limit: Any, where: str) -> int | None:
    """A dataset's ``limit``: an integer >= 1, or None for every record (0 is not "everything": null is)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where} must be an integer >= 1, or null for every question; got {limit!r}")
    return limit


def dataset_specs(sets: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The selected datasets: ``data.sets`` of a stage config, where ``data=vqa_rad`` puts
    ``conf/data/vqa_rad.yaml`` (``data.sets.vqa_rad``) and ``data=[vqa_rad,slake]`` both. Each entry needs a
    ``format``."""
    specs = {}
    for name, value in dict(sets or {}).items():
        if not isinstance(value, Mapping) or "format" not in value:
            raise ValueError(f"data.sets.{name}: a dataset entry needs a format (see conf/data/*.yaml), got {value!r}")
        spec = dict(value)
        spec.setdefault("name", name)
        specs[str(name)] = spec
    if not specs:
        raise ValueError("no dataset selected: choose one with data=<name> (see conf/data/)")
    return specs


def sniff_format(path: str | Path) -> str:
    """Guess a ground-truth file's format from its first record (for the scorer)."""
    path = Path(path)
    if path.name == "VQA_RAD Dataset Public.json":
        return "vqa_rad_public"
    if path.suffix == ".jsonl":
        first = next(iter(read_jsonl(path)), None)
        return "llava_med" if isinstance(first, dict) and "conversations" in first else "native"
    data = load_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    first = data[0]
    if not isinstance(first, dict):
        raise ValueError(f"{path}: record 0 is not a JSON object")
    if "conversations" in first:
        return "llava_med"
    if "image_name" in first and "qid" in first:
        return "vqa_rad"
    if "img_name" in first and "q_lang" in first:
        return "slake"
    raise ValueError(f"{path}: unrecognised ground-truth format (fields of record 0: {sorted(first)})")


def load_ground_truth(path: str | Path, *, language: str | None = "en") -> list[VQARecord]:
    """Records of a ground-truth file in any supported format, without touching images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth file not found: {path}")
    fmt = sniff_format(path)
    if fmt == "llava_med":
        return load_llava_med(path, path.parent, on_missing_image="ignore")[0]
    if fmt == "native":
        return load_native(path, on_missing_image="ignore")[0]
    if fmt == "vqa_rad_public":
        return load_vqa_rad_public(path.parent, "test", on_missing_image="ignore")[0]
    if fmt == "vqa_rad":
        split = "train" if path.name == "trainset.json" else "test"
        names = {"train": "trainset.json", "test": "testset.json"}
        if path.name != names[split]:
            raise ValueError(f"{path}: VQA-RAD files must be named trainset.json or testset.json")
        return load_vqa_rad(path.parent, split, on_missing_image="ignore")[0]
    split = {"train.json": "train", "validate.json": "validate", "test.json": "test"}.get(path.name)
    if split is None:
        raise ValueError(f"{path}: SLAKE files must be named train.json, validate.json or test.json")
    return load_slake(path.parent, split, language=language, on_missing_image="ignore")[0]


def write_llava_med_eval(records: Iterable[VQARecord], path: str | Path, image_root: str | Path) -> Path:
    """Write records in the LLaVA-Med evaluation format (image paths relative to ``image_root``)."""
    rows = []
    for record in records:
        rows.append({
            "id": record.question_id,
            "image": str(Path(record.image).relative_to(image_root)),
            "answer_type": record.answer_type,
            "conversations": [
                {"from": "human", "value": f"{record.question}\n<image>"},
                {"from": "gpt", "value": record.answer},
            ],
        })
    return atomic_write_text(path, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
