"""Conversations through the processor's own chat template, with exact target masks.

One renderer serves training and generation, so the prompt a model sees when it is asked to answer (or to
ask) at generation time is byte-for-byte the prefix it was trained on.

Roles: ``system``, ``user``, ``assistant`` and the **questioner** (STLLaVA-Med's third role, "VUSER" in the
official code). A questioner turn is the model speaking a question about the image; it is passed to the chat
template under ``questioner_role`` (``vuser`` by default). Templates that render ``role.upper() + ': '``
(LLaVA-1.5), ``<|im_start|>role`` (Qwen) or ``role | capitalize`` (SmolVLM) accept an extra role name as
published; for families whose published template cannot (Mistral's ``[INST]``, Gemma 3), the family layer
installs a template of ours that renders user and assistant turns token-identically and adds the questioner
in the family's idiom (:mod:`stllava_med.families`).

Target masks are found from the text, not from hand-written token arithmetic: the conversation is rendered turn
by turn, each turn's segment is located, and a token is a target when its character offset falls inside a
target span (the turn's content plus its end-of-turn marker — the family's, e.g. ``<|im_end|>``,
``<end_of_utterance>``, ``<end_of_turn>``). When a template adds no end-of-turn marker after a model turn
(llava-hf's LLaVA-1.5 template), the tokenizer's EOS is appended so the model learns to stop. Image
placeholders expand inside the processor; target spans follow them through its replacement offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from stllava_med.families import processor_family
from stllava_med.utils.config import settings_from

IGNORE_INDEX = -100
Role = Literal["system", "user", "assistant", "questioner"]
TARGET_ROLES = ("assistant", "questioner")
# A string no template alters; used to find where a turn's content starts.
_SENTINEL = "\u2063STLLAVA_CONTENT\u2063"


@dataclass(frozen=True)
class ChatFormat:
    """How our roles map onto a backbone's chat template."""

    questioner_role: str = "vuser"
    # The system text of every stage that sets no ``prompts.system`` of its own: a preset of
    # :mod:`stllava_med.prompts` (v1_sq | llava_v1 | v1 | none) or a text; null: no system message.
    # (The describe / question instructions are generation's: ``generate`` stage ``prompts.*``.)
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        from stllava_med.prompts import system_text

        object.__setattr__(self, "system_prompt", system_text(self.system_prompt, "backbone.chat.system_prompt"))

    @classmethod
    def from_config(cls, cfg: Any) -> ChatFormat:
        return settings_from(cls, dict(cfg or {}), "backbone.chat")


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass
class Encoded:
    """One tokenised conversation. ``labels`` is IGNORE_INDEX outside targets; ``target_role`` holds, per
    token, 0 (not a target), 1 (answer) or 2 (question) for separate accuracies."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    target_role: torch.Tensor
    pixel_values: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. image_sizes / image_grid_thw

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class TemplateError(ValueError):
    """The chat template cannot be used for masked training (not prefix-stable, content altered...)."""


def _message(role: Role, text: str, fmt: ChatFormat, with_image: bool) -> dict[str, Any]:
    template_role = fmt.questioner_role if role == "questioner" else role
    content: list[dict[str, str]] = []
    if with_image:
        content.append({"type": "image"})
    content.append({"type": "text", "text": text})
    return {"role": template_role, "content": content}


def to_messages(turns: Sequence[Turn], fmt: ChatFormat, *, image: bool = True) -> list[dict[str, Any]]:
    """Template messages for ``turns``; the image goes with the first user turn; ``fmt.system_prompt`` first."""
    messages: list[dict[str, Any]] = []
    if fmt.system_prompt and (not turns or turns[0].role != "system"):
        messages.append({"role": "system", "content": [{"type": "text", "text": fmt.system_prompt}]})
    image_done = not image
    for turn in turns:
        with_image = not image_done and turn.role == "user"
        image_done = image_done or with_image
        messages.append(_message(turn.role, turn.text, fmt, with_image))
    if not image_done:
        raise ValueError("a conversation with an image needs a user turn to carry it")
    return messages


def _render(processor: Any, messages: list[dict[str, Any]]) -> str:
    if not messages:
        return ""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def prompt_text(processor: Any, turns: Sequence[Turn], next_role: Role, fmt: ChatFormat, *, image: bool = True) -> str:
    """The text that precedes a ``next_role`` turn's content: what generation feeds the model.

    Identical to the prefix a training example has before that role's first target token (trailing spaces
    are left to the target, so word-initial tokens such as ``▁It`` are the same in both)."""
    if next_role not in TARGET_ROLES:
        raise ValueError(f"the model speaks as assistant or questioner, not {next_role!r}")
    # Rendered by the training renderer itself: when a template has no end-of-turn marker (llava-hf's
    # LLaVA-1.5), training appends EOS after every model turn, so a multi-turn history (describe, then ask)
    # must carry those EOS tokens here too, or generation would see a context it was never trained on.
    text, spans = render_with_spans(processor, [*turns, Turn(next_role, _SENTINEL)], fmt, image=image)
    if not spans or text.find(_SENTINEL) < 0:
        raise TemplateError(f"the chat template dropped the content of a {next_role!r} turn")
    return text[: spans[-1].start]


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    role: Role


def render_with_spans(processor: Any, turns: Sequence[Turn], fmt: ChatFormat, *, image: bool = True,
                      target_roles: Sequence[str] = TARGET_ROLES) -> tuple[str, list[Span]]:
    """Render ``turns`` and return the text plus the character spans that are training targets."""
    messages = to_messages(turns, fmt, image=image)
    offset = 1 if (fmt.system_prompt and (not turns or turns[0].role != "system")) else 0

    family = processor_family(processor)
    eos = family.end_of_turn_text(processor)
    pieces: list[str] = []
    spans: list[Span] = []
    previous = _render(processor, messages[:offset])
    pieces.append(previous)
    length = len(previous)
    for index, turn in enumerate(turns):
        current = _render(processor, messages[: offset + index + 1])
        if not current.startswith(previous):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering one more turn changed earlier text); "
                "masked training needs a template that appends turns"
            )
        segment = current[len(previous):]
        previous = current
        if turn.role not in target_roles:
            pieces.append(segment)
            length += len(segment)
            continue
        probe = _render(processor, [*messages[: offset + index], {**messages[offset + index],
                                                                   "content": _sentinel_content(messages[offset + index])}])
        header_end = probe.find(_SENTINEL)
        if header_end < 0 or not segment.startswith(turn.text, header_end - len(current) + len(segment)):
            raise TemplateError(f"turn {index} ({turn.role}): the chat template altered or dropped its content")
        header = segment[: header_end - (len(current) - len(segment))]
        stripped = header.rstrip(" ")
        start = length + len(stripped)
        body = segment[len(stripped):]
        content_end = len(header) - len(stripped) + len(turn.text)
        tail = body[content_end:]
        marker = family.questioner_stop if (turn.role == "questioner" and family.questioner_stop) else eos
        if marker and marker in tail:
            # the end-of-turn marker is a target; what follows it (newlines, next headers) is not
            end_in_body = content_end + tail.index(marker) + len(marker)
        elif family.end_of_turn is not None or marker != eos:
            raise TemplateError(f"turn {index} ({turn.role}): the chat template wrote no {marker!r} after it")
        else:
            # template without an end-of-turn marker: append EOS so the model learns to stop
            body = body[:content_end] + eos + tail
            end_in_body = content_end + len(eos)
        spans.append(Span(start, start + end_in_body, turn.role))
        pieces.append(stripped + body)
        length = sum(len(p) for p in pieces)
    return "".join(pieces), spans


def _sentinel_content(message: dict[str, Any]) -> list[dict[str, str]]:
    return [item if item.get("type") != "text" else {"type": "text", "text": _SENTINEL} for item in message["content"]]


def tokenizer_kwargs(processor: Any, text: str | Sequence[str]) -> dict[str, Any]:
    """``add_special_tokens=False`` when the rendered text already starts with the BOS token (Gemma's and
    Mistral's templates write it), so it is never doubled; the tokenizer's default otherwise."""
    bos = processor.tokenizer.bos_token
    first = text if isinstance(text, str) else (text[0] if text else "")
    return {"add_special_tokens": False} if bos and first.startswith(bos) else {}


def _shift_map(replacements: Sequence[Mapping[str, Any]]) -> Callable[[int], int]:
    """Map a character position of the rendered text to the processor's expanded text (image placeholders
    replaced by their token strings), from the processor's own replacement offsets."""
    edits = sorted((int(r["span"][0]), int(r["span"][1]), int(r["new_span"][1]) - int(r["new_span"][0]))
                   for r in replacements)

    def shift(position: int) -> int:
        moved = 0
        for start, end, new_length in edits:
            if end <= position:
                moved += new_length - (end - start)
            elif start < position:
                raise TemplateError("a training target overlaps an image placeholder")
        return position + moved

    return shift


def encode(processor: Any, turns: Sequence[Turn], fmt: ChatFormat, image: Any | None, *,
           max_length: int | None = None, target_roles: Sequence[str] = TARGET_ROLES) -> Encoded:
    """Tokenise a conversation (with its image) and build labels from the target spans.

    Image placeholders are expanded by the processor itself, so the image-token count always matches the
    model; target spans are moved into the expanded text with the processor's replacement offsets, so they
    are exact for any expansion (LLaVA's repeated token, Idefics3's tiles wrapped in
    ``<fake_token_around_image>``, Gemma's ``<start_of_image>`` block, Qwen's merged patches). Raises
    :class:`SequenceTooLong` when the result exceeds ``max_length`` — conversations are never truncated,
    because cutting image tokens breaks the model and cutting answers changes the targets."""
    family = processor_family(processor)
    text, spans = render_with_spans(processor, turns, fmt, image=image is not None, target_roles=target_roles)
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "return_offsets_mapping": True,
                              **tokenizer_kwargs(processor, text)}
    if image is not None:
        kwargs["images"] = family.processor_images([image])
        kwargs["return_text_replacement_offsets"] = True
    batch = processor(**kwargs)
    input_ids = batch["input_ids"][0]
    offsets = batch["offset_mapping"][0]
    replacements = (batch.get("text_replacement_offsets") or [[]])[0] if image is not None else []
    if image is not None and not replacements:
        raise TemplateError(f"{type(processor).__name__}: the processor expanded no image placeholder")
    shift = _shift_map(replacements)
    starts = offsets[:, 0]
    ends = offsets[:, 1]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    target_role = torch.zeros_like(input_ids)
    for span in spans:
        lo, hi = shift(span.start), shift(span.end)
        inside = (starts >= lo) & (starts < hi) & (ends > starts)
        labels[inside] = input_ids[inside]
        target_role[inside] = 1 if span.role == "assistant" else 2
    if max_length is not None and input_ids.shape[0] > max_length:
        raise SequenceTooLong(int(input_ids.shape[0]), max_length)
    skip = ("input_ids", "attention_mask", "offset_mapping", "pixel_values", "text_replacement_offsets")
    extra = {k: v for k, v in batch.items() if k not in skip and isinstance(v, torch.Tensor)}
    return Encoded(input_ids=input_ids, labels=labels, target_role=target_role,
                   pixel_values=batch.get("pixel_values"), extra=extra)


class SequenceTooLong(ValueError):
    def __init__(self, length: int, max_length: int) -> None:
        super().__init__(f"sequence of {length} tokens exceeds max_length={max_length}")
        self.length = length
        self.max_length = max_length


def vqa_turns(question: str, answer: str | None = None) -> list[Turn]:
    """The single-turn zero-shot VQA conversation (LLaVA-Med's ``<image>\\n{question}``)."""
    turns = [Turn("user", question)]
    if answer is not None:
        turns.append(Turn("assistant", answer))
    return turns


def pad_sequences(seqs: Sequence[torch.Tensor], value: int, side: str = "right") -> torch.Tensor:
    """Stack 1-D tensors into a (batch, max_len) tensor padded with ``value`` on ``side``."""
    longest = max(int(s.shape[0]) for s in seqs)
    out = torch.full((len(seqs), longest), value, dtype=seqs[0].dtype)
    for row, seq in enumerate(seqs):
        n = int(seq.shape[0])
        if side == "right":
            out[row, :n] = seq
        else:
            out[row, longest - n:] = seq
    return out
