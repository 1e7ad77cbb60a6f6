"""pairs.max_pairs: the total cap keeps the largest margins (ties by pair id), whatever order the candidates come
in; it applies after pairs.max_per_image; both caps' drops are counted; kept pairs stay in candidate order."""

from __future__ import annotations

import random

import pytest

from conftest import compose
from stllava_med.schema import PairSettings
from stllava_med.selftrain.pairs import build_pairs
from stllava_med.selftrain.records import Candidate, Judgement


def _candidate(i: int, image: str) -> Candidate:
    sha = (image * 64)[:64]
    return Candidate(id=f"c{i:02d}", image=f"/img/{image}.png", image_sha256=sha, question=f"q{i}?",
                     answers=["first", "second"])


def _judged(c: Candidate, scores: tuple[float, float]) -> Judgement:
    return Judgement(key=f"k-{c.id}", candidate_id=c.id, expert="test", prompt_version="v", status="ok",
                     scores=[float(s) for s in scores], rationales=["r0", "r1"])


# (image, chosen score, rejected score): margins 8, 3, 5, 5, 1, 0 (tie), 7, 5
ROWS = [("a", 9, 1), ("a", 6, 3), ("b", 7, 2), ("b", 2, 7), ("c", 5, 4), ("c", 4, 4), ("d", 8, 1), ("d", 1, 6)]


def _data():
    cands = [_candidate(i, image) for i, (image, *_rest) in enumerate(ROWS)]
    judgements = {c.id: _judged(c, (s1, s2)) for c, (_, s1, s2) in zip(cands, ROWS)}
    return cands, judgements


def test_max_pairs_keeps_the_largest_margins_ties_broken_by_id():
    cands, judgements = _data()
    pairs, stats = build_pairs(cands, judgements, PairSettings(min_margin=1.0, max_pairs=4))
    # margins: c00 8, c01 3, c02 5, c03 5, c04 1, c05 tie, c06 7, c07 5 -> the four largest: 8, 7, 5 (c02), 5 (c03)
    assert [p.id for p in pairs] == ["c00", "c02", "c03", "c06"]  # candidate order, not margin order
    assert [p.meta["margin"] for p in pairs] == [8.0, 5.0, 5.0, 7.0]
    assert (stats.ties_dropped, stats.low_margin_dropped, stats.capped, stats.capped_total, stats.pairs) == \
        (1, 0, 0, 3, 4)
    assert stats.to_json()["capped_total"] == 3
    # the rejected answer of a reversed-score candidate is answer 1
    by_id = {p.id: p for p in pairs}
    assert (by_id["c03"].chosen, by_id["c03"].rejected) == ("second", "first")


def test_max_pairs_is_independent_of_candidate_order():
    cands, judgements = _data()
    expected, _ = build_pairs(cands, judgements, PairSettings(max_pairs=3))
    for seed in range(5):
        shuffled = list(cands)
        random.Random(seed).shuffle(shuffled)
        got, stats = build_pairs(shuffled, judgements, PairSettings(max_pairs=3))
        assert sorted(p.id for p in got) == sorted(p.id for p in expected) == ["c00", "c02", "c06"]
        assert [p.id for p in got] == [c.id for c in shuffled if c.id in {"c00", "c02", "c06"}]
        assert stats.capped_total == 4


def test_max_pairs_applies_after_max_per_image():
    cands, judgements = _data()
    pairs, stats = build_pairs(cands, judgements, PairSettings(max_per_image=1, max_pairs=2))
    # per image: a -> c00 (8), b -> c02 (5 = c03's, the smaller id), c -> c04 (1), d -> c06 (7); then the two largest
    assert [p.id for p in pairs] == ["c00", "c06"]
    assert (stats.capped, stats.capped_total, stats.pairs) == (3, 2, 2)


def test_max_pairs_above_the_pair_count_drops_nothing():
    cands, judgements = _data()
    pairs, stats = build_pairs(cands, judgements, PairSettings(max_pairs=100))
    assert len(pairs) == 7 and stats.capped_total == 0


@pytest.mark.parametrize("value", [0, -3])
def test_max_pairs_must_be_positive(value):
    with pytest.raises(ValueError, match="pairs.max_pairs must be >= 1 or null"):
        PairSettings(max_pairs=value)


def test_paper_judge_preset_caps_at_ten_thousand():
    cfg = compose("judge", ["experiment=stllava_med_paper_judge"])
    assert PairSettings.from_config(dict(cfg.pairs)).max_pairs == 10000
    assert compose("judge").pairs.max_pairs is None
