"""Answer types of medical VQA questions: ``OPEN`` or ``CLOSED``, as every benchmark file labels them (in its own
case and spacing). Loaders (:mod:`stllava_med.data.vqa`), candidate records and the metrics
(:mod:`stllava_med.eval.metrics`) all check labels here; pure Python, no torch."""

from __future__ import annotations

ANSWER_TYPES: tuple[str, str] = ("OPEN", "CLOSED")


def normalize_answer_type(value: object) -> str:
    """Map an answer-type label to ``"OPEN"`` or ``"CLOSED"``.

    Dataset files disagree on case and trailing whitespace (``"CLOSED "``,
    ``"open"``); anything else is rejected loudly because silently dropping or
    misfiling a question would shift every reported score.
    """
    normalized = str(value).strip().upper()
    if normalized not in ANSWER_TYPES:
        raise ValueError(f"unknown answer type {value!r}; expected one of {ANSWER_TYPES} (case-insensitive)")
    return normalized
