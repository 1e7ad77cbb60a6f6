"""The self-training records: a :class:`Candidate` (one question about one image with K sampled answers) and a
:class:`Judgement` (an expert's scores for a candidate's answers).

Both are JSON-lines friendly (``to_json`` / ``from_json`` with errors that name the file and field). A
judgement is keyed by :func:`judgement_key`, a hash of everything that determines the expert's answer — the
expert model, the prompt version, the image bytes, the question and the answers — so that an answer is paid for
once and a resumed run never asks it again.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stllava_med.data.answers import ANSWER_TYPES
from stllava_med.utils.io import load_json, read_jsonl, stable_hash

QUESTION_SOURCES = ("self", "dataset")
JUDGEMENT_STATUSES = ("ok", "failed")


def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    return obj[key]


def _string(obj: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(key) if optional else _require(obj, key, where)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def candidate_id(image_sha256: str, question: str) -> str:
    """Identity of a question about an image (independent of where the image file lives)."""
    return stable_hash({"image_sha256": image_sha256, "question": question}, n=20)


@dataclass(frozen=True)
class Candidate:
    """A question about an image and the K answers the policy sampled for it.

    ``reference_answer`` / ``answer_type`` are present when the question came from a labelled VQA set
    (``question_source == "dataset"``); the ``reference`` expert needs them. ``description`` is the policy's
    greedy description of the image that preceded its self-asked questions."""

    id: str
    image: str
    image_sha256: str
    question: str
    answers: list[str]
    question_source: str = "self"
    description: str | None = None
    reference_answer: str | None = None
    answer_type: str | None = None
    policy: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("description", "reference_answer", "answer_type", "policy"):
            if out[key] is None:
                out.pop(key)
        if not out["meta"]:
            out.pop("meta")
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "candidate") -> Candidate:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        answers = _require(obj, "answers", where)
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: field 'answers' must be a list of strings")
        if len(answers) < 2:
            raise ValueError(f"{where}: field 'answers' needs at least 2 answers to compare, got {len(answers)}")
        source = str(obj.get("question_source", "self"))
        if source not in QUESTION_SOURCES:
            raise ValueError(f"{where}: field 'question_source' must be one of {QUESTION_SOURCES}, not {source!r}")
        answer_type = _string(obj, "answer_type", where, optional=True)
        if answer_type is not None:
            answer_type = answer_type.strip().upper()
            if answer_type not in ANSWER_TYPES:
                raise ValueError(f"{where}: field 'answer_type' must be one of {ANSWER_TYPES}, not {obj['answer_type']!r}")
        return cls(
            id=str(_require(obj, "id", where)),
            image=str(_string(obj, "image", where)),
            image_sha256=str(_string(obj, "image_sha256", where)),
            question=str(_string(obj, "question", where)),
            answers=list(answers),
            question_source=source,
            description=_string(obj, "description", where, optional=True),
            reference_answer=_string(obj, "reference_answer", where, optional=True),
            answer_type=answer_type,
            policy=_string(obj, "policy", where, optional=True),
            meta=dict(obj.get("meta") or {}),
        )


def judgement_key(expert: str, prompt_version: str, image_sha256: str, question: str, answers: Sequence[str]) -> str:
    """The store key of a judgement: everything that determines what the expert is asked."""
    return stable_hash({"expert": expert, "prompt_version": prompt_version, "image_sha256": image_sha256,
                        "question": question, "answers": list(answers)}, n=32)


@dataclass(frozen=True)
class Judgement:
    """An expert's verdict on one candidate. ``scores`` / ``rationales`` follow the candidate's answer order
    (whatever order the expert was shown, recorded in ``order``: position p showed answer ``order[p]``).

    A failed judgement keeps the reason; ``retryable`` failures (the server kept failing) are asked again by a
    later run, non-retryable ones (the expert kept answering nonsense, no ground truth) are final."""

    key: str
    candidate_id: str
    expert: str
    prompt_version: str
    status: str
    scores: list[float] | None = None
    rationales: list[str] | None = None
    order: list[int] | None = None
    failure: str | None = None
    retryable: bool = False
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    created_at: float = 0.0
    raw: str | None = None

    def __post_init__(self) -> None:
        if self.status not in JUDGEMENT_STATUSES:
            raise ValueError(f"judgement {self.key}: status must be one of {JUDGEMENT_STATUSES}, not {self.status!r}")
        if self.status == "ok" and not self.scores:
            raise ValueError(f"judgement {self.key}: an ok judgement needs scores")
        if self.status == "failed" and not self.failure:
            raise ValueError(f"judgement {self.key}: a failed judgement needs a reason")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "judgement") -> Judgement:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        known = set(cls.__dataclass_fields__)
        for key in ("key", "candidate_id", "expert", "prompt_version", "status"):
            _require(obj, key, where)
        values = {k: v for k, v in obj.items() if k in known}
        if values.get("scores") is not None:
            values["scores"] = [float(s) for s in values["scores"]]
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err


def candidate_files(path: str | os.PathLike) -> list[Path]:
    """The JSONL files a ``candidates=`` argument names: a file, a generation run directory (its
    ``candidates/`` shards), a directory of ``*.jsonl`` shards (searched recursively) or a glob."""
    text = str(path)
    p = Path(text).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir() and (p / "candidates").is_dir():  # a generation run directory
        p = p / "candidates"
    elif p.is_dir() and (p / "shards" / "sharding.json").is_file():  # sharded, not merged (utils/sharding.py)
        raise FileNotFoundError(
            f"candidates: {p} is a sharded generation run whose shards are not merged yet (the last shard to finish "
            "merges them into candidates/); finish the missing shards, or merge the finished ones with the same "
            "generate command and generate.merge_only=true")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.jsonl") if f.name != "progress.jsonl")
    else:
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"candidates: no JSONL file at {text} (give a file, a directory of shards or a glob)")
    return files


def unfinished_generation(path: str | os.PathLike) -> str | None:
    """Why the generation run that ``path`` names (its directory, or its ``candidates/``) has not finished, with
    its counts; None when it has, or when ``path`` is not a generation run (a file, a folder of shards, a glob).

    Finished: ``summary.json`` (written when a run, or the merge of its shards, ends) says ``complete: true`` and
    ``progress.jsonl`` (one line per finished image) holds no image more than it counted: a run that was stopped,
    or a later run of the same directory that is still going (a raised ``generate.max_images``), is not."""
    p = Path(str(path)).expanduser()
    run = p if (p / "candidates").is_dir() else p.parent if p.name == "candidates" and p.is_dir() else None
    if run is None or not ((run / "progress.jsonl").is_file() or (run / "summary.json").is_file()):
        return None
    done = sum(1 for _ in read_jsonl(run / "progress.jsonl", allow_truncated_tail=True)) \
        if (run / "progress.jsonl").is_file() else 0
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return (f"{run} is an unfinished generation run: no summary.json (stopped, or still running); "
                f"progress.jsonl has {done} images done")
    summary = load_json(summary_path)
    if not summary.get("complete"):
        return (f"{summary_path}: complete=false, {summary.get('images_done')} of {summary.get('images')} images "
                "done")
    if done != int(summary.get("images_done") or 0):
        return (f"{run}: progress.jsonl has {done} images done, {summary_path} counted "
                f"{summary.get('images_done')} of {summary.get('images')}: a later run of this directory was "
                "stopped or is still running")
    return None


def iter_candidates(path: str | os.PathLike) -> Iterator[Candidate]:
    """Every candidate under ``path``; malformed records raise with the file and line."""
    for file in candidate_files(path):
        for lineno, obj in enumerate(read_jsonl(file), start=1):
            yield Candidate.from_json(obj, where=f"{file}:{lineno}")


def load_candidates(path: str | os.PathLike) -> list[Candidate]:
    """All candidates under ``path``, duplicates (same id) dropped keeping the first."""
    seen: dict[str, Candidate] = {}
    for candidate in iter_candidates(path):
        seen.setdefault(candidate.id, candidate)
    return list(seen.values())
