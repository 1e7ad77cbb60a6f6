"""Visual instruction conversations for stage 1: the LLaVA-Med instruct format and VQA sets as conversations.

The LLaVA-Med instruct format (``llava_med_instruct_60k_inline_mention.json`` and its siblings) is a JSON list
(or JSONL) of::

    {"id": "...", "image": "relative/path.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat modality ...?"},
                       {"from": "gpt", "value": "The image is a CT scan ..."},
                       {"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}

Turns alternate human / gpt, starting with a human turn that holds the single ``<image>`` placeholder. The
placeholder is removed from the text: :mod:`stllava_med.chat` puts the image in the first user turn itself,
through the backbone's own chat template. Anything else is an error naming the file, the record and the field.

VQA records (:mod:`stllava_med.data.vqa`) become conversations in one of two ways:

* ``single``: one question, one answer per conversation (LLaVA-Med's zero-shot prompt shape);
* ``image`` (default for stage 1): the questions a dataset asks about the same image, in file order, become one
  multi-turn conversation (at most ``max_qa_per_conversation`` pairs; longer groups are split). Self-questioning
  turns a human turn *after the first* into a questioner turn, so single-turn data would never teach the model
  to ask; grouped VQA-RAD (about 10 questions per image) does.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stllava_med.chat import Turn
from stllava_med.data.vqa import ImageError, LoadReport, VQARecord, check_limit, load_vqa
from stllava_med.utils.io import load_json, read_jsonl

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
INSTRUCT_FORMATS = ("llava_med_instruct",)
Speaker = Literal["human", "gpt"]
GROUPINGS = ("image", "single")


@dataclass(frozen=True)
class Message:
    """One turn as the instruct files store it: ``human`` (the user, or the questioner) or ``gpt``."""

    speaker: Speaker
    text: str


@dataclass(frozen=True)
class InstructRecord:
    """One image and a conversation about it: human / gpt turns alternating, human first, gpt last.

    ``image`` is a resolved path; ``uid`` (``<dataset>/<id>``) is unique across the datasets of a run and is
    what data fractions, self-questioning draws and the selected-ids file use."""

    id: str
    image: str
    messages: tuple[Message, ...]
    dataset: str = "instruct"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def uid(self) -> str:
        return f"{self.dataset}/{self.id}"

    @property
    def n_pairs(self) -> int:
        return len(self.messages) // 2

    def turns(self, questioner: Sequence[bool] | None = None) -> list[Turn]:
        """Chat turns; ``questioner[k]`` makes the k-th human turn a questioner turn (k = 0 never is)."""
        turns: list[Turn] = []
        human_index = 0
        for message in self.messages:
            if message.speaker == "gpt":
                turns.append(Turn("assistant", message.text))
                continue
            asks = bool(questioner[human_index]) if questioner is not None and human_index > 0 else False
            turns.append(Turn("questioner" if asks else "user", message.text))
            human_index += 1
        return turns

    def truncated(self, n_pairs: int) -> InstructRecord:
        """The conversation cut after its first ``n_pairs`` question/answer pairs."""
        if not 1 <= n_pairs <= self.n_pairs:
            raise ValueError(f"{self.uid}: cannot keep {n_pairs} of {self.n_pairs} pairs")
        return InstructRecord(self.id, self.image, self.messages[: 2 * n_pairs], self.dataset, self.meta)

    def to_json(self, image_root: str | Path | None = None) -> dict[str, Any]:
        """The LLaVA-Med instruct format (``<image>\\n`` leads the first human turn)."""
        image = str(Path(self.image).relative_to(image_root)) if image_root is not None else self.image
        conversations = []
        for index, message in enumerate(self.messages):
            text = f"{IMAGE_PLACEHOLDER}\n{message.text}" if index == 0 else message.text
            conversations.append({"from": message.speaker, "value": text})
        out: dict[str, Any] = {"id": self.id, "image": image, "conversations": conversations}
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, obj: Any, *, where: str, image_folder: str | Path | None = None,
                  dataset: str = "instruct") -> InstructRecord:
        """Parse and validate one record; errors name ``where`` (file and record) and the field."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "image", "conversations"):
            if key not in obj:
                raise ValueError(f"{where}: missing field {key!r}")
        record_id = obj["id"]
        if not isinstance(record_id, str | int) or str(record_id) == "":
            raise ValueError(f"{where}: field 'id' must be a non-empty string or integer")
        image = obj["image"]
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: field 'image' must be a non-empty path string (text-only records are "
                             "not supported by stage 1)")
        messages = _parse_conversations(obj["conversations"], where)
        path = Path(image_folder) / image if image_folder is not None else Path(image)
        return cls(id=str(record_id), image=str(path), messages=messages, dataset=dataset,
                   meta=dict(obj.get("meta") or {}))


def _parse_conversations(conversations: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
    messages: list[Message] = []
    for index, turn in enumerate(conversations):
        field_name = f"conversations[{index}]"
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}: field {field_name!r} must be an object with 'from' and 'value'")
        speaker = turn.get("from")
        expected = "human" if index % 2 == 0 else "gpt"
        if speaker not in ("human", "gpt"):
            raise ValueError(f"{where}: field '{field_name}.from' must be 'human' or 'gpt', got {speaker!r}")
        if speaker != expected:
            raise ValueError(f"{where}: field '{field_name}.from' is {speaker!r} but turns must alternate "
                             f"human/gpt starting with human (expected {expected!r})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where}: field '{field_name}.value' must be a string")
        placeholders = value.count(IMAGE_PLACEHOLDER)
        if index == 0:
            if placeholders != 1:
                raise ValueError(f"{where}: field '{field_name}.value' must hold exactly one {IMAGE_PLACEHOLDER} "
                                 f"placeholder (found {placeholders})")
            value = value.replace(IMAGE_PLACEHOLDER, "")
        elif placeholders:
            raise ValueError(f"{where}: field '{field_name}.value' has an {IMAGE_PLACEHOLDER} placeholder; only "
                             "the first human turn may carry the image")
        value = value.strip()
        if not value:
            raise ValueError(f"{where}: field '{field_name}.value' is empty")
        messages.append(Message(speaker, value))
    if len(messages) % 2:
        raise ValueError(f"{where}: field 'conversations' ends with a human turn; the last turn must be 'gpt'")
    return tuple(messages)


# --------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------


def load_instruct(path: str | Path, image_folder: str | Path, *, dataset: str = "llava_med_instruct",
                  on_missing_image: str = "error", limit: int | None = None,
                  ) -> tuple[list[InstructRecord], LoadReport]:
    """Read a LLaVA-Med instruct file (JSON list, or JSONL when the suffix is ``.jsonl``).

    Missing images are an error (``on_missing_image="error"``) or skipped and counted in the report."""
    if on_missing_image not in ("error", "skip"):
        raise ValueError(f"on_missing_image must be 'error' or 'skip', not {on_missing_image!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruct data file not found: {path}")
    if path.suffix == ".jsonl":
        rows: Iterable[tuple[str, Any]] = ((f"{path}: line {i + 1}", row) for i, row in enumerate(read_jsonl(path)))
    else:
        data = load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        rows = ((f"{path}: record {i}", row) for i, row in enumerate(data))
    report = LoadReport(source=str(path))
    records: list[InstructRecord] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        report.read += 1
        record = InstructRecord.from_json(row, where=where, image_folder=image_folder, dataset=dataset)
        if record.id in seen:
            raise ValueError(f"{where}: field 'id': duplicate id {record.id!r} (first at {seen[record.id]})")
        seen[record.id] = where
        if not Path(record.image).is_file():
            if on_missing_image == "error":
                raise ImageError(f"{where}: record {record.id!r}: field 'image': image not found: {record.image} "
                                 "(set on_missing_image=skip to skip such records, counted)")
            report.skip("missing_image", f"{record.id} -> {record.image}")
            continue
        records.append(record)
        if limit and len(records) >= int(limit):
            break
    report.kept = len(records)
    if report.skipped:
        log.warning("%s: skipped %s", report.source, dict(report.skipped))
    return records, report


def vqa_to_conversations(records: Sequence[VQARecord], *, dataset: str, grouping: str = "image",
                         max_qa_per_conversation: int | None = 10) -> list[InstructRecord]:
    """VQA records as conversations: one per question (``single``) or grouped per image (``image``).

    Grouping keeps the file order of questions and of images (first appearance), so it is deterministic;
    a group longer than ``max_qa_per_conversation`` is split into consecutive chunks (ids ``<image>#<k>``)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"VQA grouping must be one of {GROUPINGS}, not {grouping!r}")
    if grouping == "single":
        return [InstructRecord(id=r.id, image=r.image, dataset=dataset,
                               messages=(Message("human", r.question.strip()), Message("gpt", r.answer.strip())),
                               meta={"question_ids": [r.id]}) for r in records]
    by_image: dict[str, list[VQARecord]] = {}
    for record in records:
        by_image.setdefault(record.image, []).append(record)
    chunk = int(max_qa_per_conversation) if max_qa_per_conversation else None
    if chunk is not None and chunk < 1:
        raise ValueError(f"max_qa_per_conversation must be >= 1 or null, got {max_qa_per_conversation}")
    out: list[InstructRecord] = []
    for image, group in by_image.items():
        parts = [group[i:i + chunk] for i in range(0, len(group), chunk)] if chunk else [group]
        name = Path(image).name
        for index, part in enumerate(parts):
            messages: list[Message] = []
            for r in part:
                messages += [Message("human", r.question.strip()), Message("gpt", r.answer.strip())]
            conversation_id = name if len(parts) == 1 else f"{name}#{index}"
            out.append(InstructRecord(id=conversation_id, image=image, messages=tuple(messages), dataset=dataset,
                                      meta={"question_ids": [r.id for r in part]}))
    return out


def load_conversations(name: str, spec: Mapping[str, Any], *, vqa_grouping: str = "image",
                       max_qa_per_conversation: int | None = 10) -> tuple[list[InstructRecord], LoadReport]:
    """Load one ``data.<name>`` entry as conversations: instruct files directly, VQA sets through
    :func:`vqa_to_conversations` (a dataset entry's own ``grouping`` key overrides ``vqa_grouping``)."""
    spec = dict(spec)
    if spec.get("format") in INSTRUCT_FORMATS:
        for key in ("path", "image_folder"):
            if not spec.get(key):
                raise ValueError(f"data.{name}: missing {key!r} for format {spec['format']!r}")
        return load_instruct(spec["path"], spec["image_folder"], dataset=name,
                             on_missing_image=str(spec.get("on_missing_image", "error")),
                             limit=check_limit(spec.get("limit"), f"data.sets.{name}.limit"))
    records, report = load_vqa(spec)
    grouping = str(spec.get("grouping") or vqa_grouping)
    conversations = vqa_to_conversations(records, dataset=name, grouping=grouping,
                                         max_qa_per_conversation=spec.get("max_qa_per_conversation",
                                                                          max_qa_per_conversation))
    return conversations, report


def check_unique(records: Sequence[InstructRecord]) -> None:
    counts = Counter(r.uid for r in records)
    duplicated = [uid for uid, n in counts.items() if n > 1]
    if duplicated:
        raise ValueError(f"duplicate conversation ids across datasets: {duplicated[:5]}")
