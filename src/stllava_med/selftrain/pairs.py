"""Preference pairs from judgements: per question, the best-scored answer is *chosen* and the worst-scored one
*rejected* (with K = 2, simply the higher and the lower).

Differences from the official code, deliberately: a tie is dropped and counted instead of going to answer 2,
and pairs whose margin is under ``min_margin`` are dropped and counted too (a 6-vs-5 verdict is mostly noise).
``max_per_image`` optionally keeps only an image's strongest pairs (largest margin first), so a few images with
many questions do not dominate DPO, and ``max_pairs`` then caps the total (the paper trained DPO on about 10K
pairs): both keep the largest margins, ties between equal margins broken by pair id, so the result is
deterministic and independent of the order candidates were judged in; the kept pairs stay in candidate order.
Each cap's drops are counted (``capped``: per image, ``capped_total``: the total cap). When several answers share
the best (or worst) score, the first of them in sampling order is taken.

Pairs are written as JSONL shards of :class:`~stllava_med.data.preference.PreferencePair` (the DPO stage's
schema): ``prompt`` is the question, rendered at training time as the single-turn VQA conversation the answers
were sampled from; ``meta`` carries the provenance (candidate, judgement key, all scores, rationales).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stllava_med.data.preference import PreferencePair
from stllava_med.schema import PairSettings
from stllava_med.selftrain.records import Candidate, Judgement
from stllava_med.utils.io import write_jsonl

SHARD_PREFIX = "pairs"


@dataclass
class PairStats:
    """The counts the summary reports: from images and questions down to pairs, every drop counted."""

    images: int = 0
    questions: int = 0
    candidates: int = 0  # answers, over all questions
    judged: int = 0
    failed: int = 0
    unjudged: int = 0
    ties_dropped: int = 0
    low_margin_dropped: int = 0
    capped: int = 0        # dropped by max_per_image
    capped_total: int = 0  # dropped by max_pairs
    pairs: int = 0
    failure_reasons: Counter = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "questions": self.questions, "candidates": self.candidates,
                "judged": self.judged, "failed": self.failed, "unjudged": self.unjudged,
                "ties_dropped": self.ties_dropped, "low_margin_dropped": self.low_margin_dropped,
                "capped": self.capped, "capped_total": self.capped_total, "pairs": self.pairs,
                "failure_reasons": dict(self.failure_reasons.most_common(20))}


def best_and_worst(scores: Sequence[float]) -> tuple[int, int]:
    """Indices of the first highest and the first lowest score."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def pair_from_judgement(candidate: Candidate, judgement: Judgement, *, source: str) -> PreferencePair:
    assert judgement.scores is not None
    best, worst = best_and_worst(judgement.scores)
    rationales = judgement.rationales or [""] * len(judgement.scores)
    return PreferencePair(
        id=candidate.id,
        images=[candidate.image],
        prompt=candidate.question,
        chosen=candidate.answers[best],
        rejected=candidate.answers[worst],
        chosen_score=judgement.scores[best],
        rejected_score=judgement.scores[worst],
        judge=judgement.expert,
        source=source,
        meta={
            "candidate_id": candidate.id,
            "judgement_key": judgement.key,
            "image_sha256": candidate.image_sha256,
            "question_source": candidate.question_source,
            "prompt_version": judgement.prompt_version,
            "policy": candidate.policy,
            "margin": judgement.scores[best] - judgement.scores[worst],
            "chosen_index": best,
            "rejected_index": worst,
            "scores": list(judgement.scores),
            "chosen_is_reference": candidate.meta.get("reference_answer_index") == best,
            "chosen_rationale": rationales[best],
            "rejected_rationale": rationales[worst],
        },
    )


def build_pairs(candidates: Sequence[Candidate], judgements: Mapping[str, Judgement],
                settings: PairSettings) -> tuple[list[PreferencePair], PairStats]:
    """Pairs for ``candidates`` given their judgements (candidate id → judgement; absent = not judged)."""
    stats = PairStats(images=len({c.image_sha256 for c in candidates}), questions=len(candidates),
                      candidates=sum(len(c.answers) for c in candidates))
    kept: list[PreferencePair] = []
    for candidate in candidates:
        judgement = judgements.get(candidate.id)
        if judgement is None:
            stats.unjudged += 1
            continue
        if not judgement.ok:
            stats.failed += 1
            stats.failure_reasons[(judgement.failure or "").split(":", 1)[0][:60]] += 1
            continue
        stats.judged += 1
        pair = pair_from_judgement(candidate, judgement, source=settings.source)
        margin = pair.meta["margin"]
        if margin <= 0:
            stats.ties_dropped += 1
        elif margin < settings.min_margin:
            stats.low_margin_dropped += 1
        else:
            kept.append(pair)
    if settings.max_per_image is not None:
        by_image: dict[str, list[PreferencePair]] = defaultdict(list)
        for pair in kept:
            by_image[pair.meta["image_sha256"]].append(pair)
        allowed: set[str] = set()
        for pairs in by_image.values():
            strongest = sorted(pairs, key=_strength)[: settings.max_per_image]
            allowed.update(p.id for p in strongest)
        stats.capped = len(kept) - len(allowed)
        kept = [p for p in kept if p.id in allowed]
    if settings.max_pairs is not None and len(kept) > settings.max_pairs:
        strongest_ids = {p.id for p in sorted(kept, key=_strength)[: settings.max_pairs]}
        stats.capped_total = len(kept) - len(strongest_ids)
        kept = [p for p in kept if p.id in strongest_ids]
    stats.pairs = len(kept)
    return kept, stats


def _strength(pair: PreferencePair) -> tuple[float, str]:
    """Sort key of the caps: largest margin first, then pair id (deterministic)."""
    return (-pair.meta["margin"], pair.id)


def write_shards(pairs: Sequence[PreferencePair], out_dir: str | Path, *, shard_size: int = 5000) -> list[Path]:
    """Write ``pairs`` as ``<out_dir>/pairs-00000.jsonl`` ... atomically, removing shards a previous, larger
    write left behind (the pair set is rebuilt from the store on every run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, start in enumerate(range(0, max(len(pairs), 1), shard_size)):
        path = out_dir / f"{SHARD_PREFIX}-{index:05d}.jsonl"
        write_jsonl(path, [p.to_json() for p in pairs[start:start + shard_size]])
        written.append(path)
    for stale in out_dir.glob(f"{SHARD_PREFIX}-*.jsonl"):
        if stale not in written:
            stale.unlink()
    return written
