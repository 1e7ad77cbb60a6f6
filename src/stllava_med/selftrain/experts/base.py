"""What every expert shares: the rubric and its prompt, the response schema and its validation, position
randomisation, and the errors the judge runner acts on.

The rubric is LLaVA's review rubric (helpfulness, relevance, accuracy, level of detail; an overall 1–10 score
per assistant), which STLLaVA-Med uses with GPT-4o, generalised from 2 to K answers. Unlike the official code,
answers are shown in a random order per call and mapped back, so an expert's position bias averages out
instead of always favouring one answer slot.
"""

from __future__ import annotations

import json
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stllava_med.selftrain.records import Candidate
from stllava_med.utils.io import stable_hash

# Bump whenever the rubric, the prompt layout or the schema changes: it is part of every judgement key, so a
# changed prompt is asked afresh instead of mixing with answers to the old one.
PROMPT_VERSION = "review-v1"
SCORE_MIN = 1
SCORE_MAX = 10

SYSTEM_PROMPT = (
    "You are a careful biomedical expert who checks the quality of answers that AI assistants give to "
    "questions about a medical image."
)

RUBRIC = (
    "We would like your feedback on the performance of {n} AI assistants in response to the question about "
    "the medical image above. Rate the helpfulness, relevance, accuracy and level of detail of each answer. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score means better "
    "overall performance. Judge every answer on its own merits: the order in which the answers are shown "
    "must not influence you.\n"
    "Reply with JSON only, in the form "
    '{{"scores": [{{"answer": 1, "score": <1-10>, "rationale": "<one or two sentences>"}}, ...]}} '
    "with exactly one entry for each of the {n} answers."
)


class ExpertError(Exception):
    """Base of the errors an expert raises; ``reason`` is what the store records."""

    def __init__(self, reason: str, *, status: int | None = None, prompt_tokens: int = 0,
                 completion_tokens: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        # A malformed answer still costs tokens: the runner charges them to the budget.
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


class TransientError(ExpertError):
    """Worth retrying after a pause: 429, 5xx, timeouts, dropped connections. ``retry_after`` (seconds) is the
    server's ``Retry-After`` when it sent one."""

    def __init__(self, reason: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(reason, status=status)
        self.retry_after = retry_after


class InvalidResponse(ExpertError):
    """The expert answered, but not with a valid judgement (not JSON, wrong count, score out of range...)."""


class ItemError(ExpertError):
    """This candidate cannot be judged (no ground truth, request rejected as malformed); not retried."""


class FatalError(ExpertError):
    """Nothing can be judged (bad key, unknown model, unreachable configuration): the run stops cleanly."""


@dataclass(frozen=True)
class ExpertResult:
    """Scores and rationales in the candidate's answer order; ``order[p]`` is the answer shown at position p."""

    scores: list[float]
    rationales: list[str]
    order: list[int]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    raw: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Expert(ABC):
    """An expert grades the K answers of a candidate. ``identity`` names the grading model (it is part of the
    judgement key); ``max_concurrency`` caps the runner's concurrency (None: no cap of its own)."""

    identity: str = "expert"
    prompt_version: str = PROMPT_VERSION
    max_concurrency: int | None = None
    needs_image: bool = True

    @abstractmethod
    async def judge(self, candidate: Candidate, *, key: str, attempt: int) -> ExpertResult:
        """Grade ``candidate``; raise an :class:`ExpertError` subclass on failure."""

    def estimate_tokens(self, candidate: Candidate) -> tuple[int, int]:
        """(prompt, completion) tokens a request may use, estimated before sending it: the tokens-per-minute
        limiter and the cost budget reserve this much. Completion is the reply's upper bound (max tokens)."""
        return 0, 0

    async def aclose(self) -> None:  # noqa: B027 - optional hook; most experts hold nothing to release
        """Release connections or models."""


# ----------------------------------------------------------------------------------------------------------
# Prompt and response
# ----------------------------------------------------------------------------------------------------------


def presentation_order(n: int, *, key: str, attempt: int, seed: int = 0) -> list[int]:
    """A random order of ``n`` answers, reproducible from (seed, judgement key, attempt): a rerun shows the
    same order, a retry of the same judgement a fresh one."""
    order = list(range(n))
    random.Random(stable_hash({"seed": seed, "key": key, "attempt": attempt})).shuffle(order)
    return order


def render_prompt(question: str, answers: Sequence[str]) -> str:
    """The text the expert sees after the image: the question, the numbered answers, the rubric."""
    parts = [f"[Question]\n{question.strip()}\n"]
    for number, answer in enumerate(answers, start=1):
        parts.append(f"[Answer {number}]\n{answer.strip()}\n[End of Answer {number}]\n")
    parts.append(f"[Instructions]\n{RUBRIC.format(n=len(answers))}")
    return "\n".join(parts)


def response_schema(n: int) -> dict[str, Any]:
    """JSON schema of the expert's reply for ``n`` answers (OpenAI structured outputs, strict mode).

    Bounds are ``enum``s rather than ``minimum``/``maximum`` because every structured-output backend we target
    (OpenAI strict mode, vLLM/SGLang guided decoding, Ollama) honours enums."""
    return {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "answer": {"type": "integer", "enum": list(range(1, n + 1))},
                        "score": {"type": "integer", "enum": list(range(SCORE_MIN, SCORE_MAX + 1))},
                        "rationale": {"type": "string"},
                    },
                    "required": ["answer", "score", "rationale"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["scores"],
        "additionalProperties": False,
    }


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _extract_json(text: str, lenient: bool) -> Any:
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as err:
        if lenient:
            # small local models wrap the object in prose; take the outermost {...}
            start, end = stripped.find("{"), stripped.rfind("}")
            if 0 <= start < end:
                try:
                    return json.loads(stripped[start:end + 1])
                except json.JSONDecodeError:
                    pass
        preview = stripped[:80].replace("\n", " ")
        raise InvalidResponse(f"malformed JSON ({err.msg} at char {err.pos}): {preview!r}") from None


def parse_scores(text: str | None, n: int, *, lenient: bool = False) -> tuple[list[float], list[str]]:
    """Validate an expert reply for ``n`` presented answers; return scores and rationales in *presented* order.

    Raises :class:`InvalidResponse` naming what is wrong: not JSON, no ``scores`` list, an entry missing or
    repeated, a score that is not a number or is outside 1–10."""
    if text is None or not str(text).strip():
        raise InvalidResponse("empty reply")
    data = _extract_json(str(text), lenient)
    if not isinstance(data, dict) or not isinstance(data.get("scores"), list):
        raise InvalidResponse("reply is not an object with a 'scores' list")
    entries = data["scores"]
    if len(entries) != n:
        raise InvalidResponse(f"expected {n} scores, got {len(entries)}")
    scores: list[float | None] = [None] * n
    rationales = [""] * n
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidResponse(f"scores[{index}] is not an object")
        number = entry.get("answer", index + 1)
        if isinstance(number, bool) or not isinstance(number, int | float) or int(number) != number:
            raise InvalidResponse(f"scores[{index}].answer is not an answer number: {number!r}")
        position = int(number) - 1
        if not 0 <= position < n:
            raise InvalidResponse(f"scores[{index}].answer={number} is not between 1 and {n}")
        if scores[position] is not None:
            raise InvalidResponse(f"answer {number} scored twice")
        score = entry.get("score")
        if isinstance(score, str):
            try:
                score = float(score.strip())
            except ValueError:
                raise InvalidResponse(f"scores[{index}].score is not a number: {score!r}") from None
        if isinstance(score, bool) or not isinstance(score, int | float) or score != score:
            raise InvalidResponse(f"scores[{index}].score is not a number: {score!r}")
        if not SCORE_MIN <= float(score) <= SCORE_MAX:
            raise InvalidResponse(f"scores[{index}].score={score} is outside {SCORE_MIN}-{SCORE_MAX}")
        scores[position] = float(score)
        rationale = entry.get("rationale", "")
        rationales[position] = rationale if isinstance(rationale, str) else json.dumps(rationale)
    return [float(s) for s in scores if s is not None], rationales


def map_back(presented: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """Values given per presented position → values per original answer (``order[p]`` was shown at p)."""
    if sorted(order) != list(range(len(presented))):
        raise ValueError(f"order {list(order)} is not a permutation of {len(presented)} positions")
    out: list[Any] = [None] * len(presented)
    for position, original in enumerate(order):
        out[original] = presented[position]
    return out
