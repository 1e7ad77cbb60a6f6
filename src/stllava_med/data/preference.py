"""Preference pairs: the record the judge writes and the DPO stage reads.

One JSON object per line in JSONL shards (a file, a directory of ``*.jsonl`` shards, or a glob)::

    {"id": "...", "images": ["path/to/img.jpg"], "prompt": "question", "chosen": "...", "rejected": "...",
     "chosen_score": 8.0, "rejected_score": 3.0, "judge": "gpt-4o", "source": "selftrain/round0"}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


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
        out = asdict(self)
        if not out["meta"]:
            out.pop("meta")
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "pair") -> PreferencePair:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("id", "images", "prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
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
            chosen_score=None if obj.get("chosen_score") is None else float(obj["chosen_score"]),
            rejected_score=None if obj.get("rejected_score") is None else float(obj["rejected_score"]),
            judge=obj.get("judge"),
            source=obj.get("source"),
            meta=dict(obj.get("meta") or {}),
        )
