"""The ``reference`` expert: grades answers against a question's ground-truth answer with the evaluation
metrics themselves (LLaVA-Med's definitions in :mod:`stllava_med.eval.metrics`). Deterministic, free and
offline — the expert of the offline demo, and a sanity baseline for any other expert.

Scores use the rubric's 1–10 scale so that pairs, margins and summaries read the same for every expert:

* open questions: ``1 + 9 × token F1`` (F1 of the answer's words against the ground truth's);
* closed questions: ``10`` when the answer is correct, else ``1``. ``closed_match=strict`` (default) needs the
  answer to start with the ground-truth words; ``lenient`` is LLaVA-Med's substring test, which also rewards a
  hedging "yes or no" — fine for reporting accuracy, harmful as a preference label.
"""

from __future__ import annotations

from stllava_med.data.answers import normalize_answer_type
from stllava_med.eval.metrics import (
    closed_correct,
    closed_correct_strict,
    normalize_answer,
    open_f1_precision_recall,
)
from stllava_med.selftrain.experts.base import SCORE_MAX, SCORE_MIN, Expert, ExpertResult, ItemError
from stllava_med.selftrain.records import Candidate

CLOSED_MATCHES = ("strict", "lenient")
REFERENCE_VERSION = "reference-v1"


def infer_answer_type(reference_answer: str) -> str:
    """VQA convention when a set carries no answer type: yes/no answers are closed questions."""
    return "CLOSED" if normalize_answer(reference_answer) in ("yes", "no") else "OPEN"


def reference_score(answer: str, reference_answer: str, answer_type: str, *,
                    closed_match: str = "strict") -> tuple[float, str]:
    """(score on 1–10, rationale) of ``answer`` against ``reference_answer``."""
    if normalize_answer_type(answer_type) == "OPEN":
        f1, precision, recall = open_f1_precision_recall(answer, reference_answer)
        score = SCORE_MIN + (SCORE_MAX - SCORE_MIN) * f1
        return round(score, 4), f"open: token F1 {f1:.3f} (precision {precision:.3f}, recall {recall:.3f})"
    if closed_match not in CLOSED_MATCHES:
        raise ValueError(f"closed_match must be one of {CLOSED_MATCHES}, not {closed_match!r}")
    correct = (closed_correct_strict if closed_match == "strict" else closed_correct)(answer, reference_answer)
    return (float(SCORE_MAX) if correct else float(SCORE_MIN)), f"closed ({closed_match}): {'correct' if correct else 'wrong'}"


class ReferenceExpert(Expert):
    """Scores every answer of a ``question_source=dataset`` candidate against its ground truth."""

    needs_image = False

    def __init__(self, *, closed_match: str = "strict") -> None:
        if closed_match not in CLOSED_MATCHES:
            raise ValueError(f"expert.closed_match must be one of {CLOSED_MATCHES}, not {closed_match!r}")
        self.closed_match = closed_match
        self.identity = f"reference:{closed_match}"
        self.prompt_version = REFERENCE_VERSION

    async def judge(self, candidate: Candidate, *, key: str, attempt: int) -> ExpertResult:
        if candidate.reference_answer is None:
            raise ItemError("no ground-truth answer: the reference expert needs candidates generated with "
                            "generate.question_source=dataset")
        answer_type = candidate.answer_type or infer_answer_type(candidate.reference_answer)
        graded = [reference_score(a, candidate.reference_answer, answer_type, closed_match=self.closed_match)
                  for a in candidate.answers]
        return ExpertResult(scores=[s for s, _ in graded], rationales=[r for _, r in graded],
                            order=list(range(len(candidate.answers))))
