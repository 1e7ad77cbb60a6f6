"""Candidate / Judgement records, keys, the SQLite store, pair building and the rate limiter."""

from __future__ import annotations

import json
import sqlite3

import pytest

from stllava_med.data.preference import PreferencePair
from stllava_med.selftrain.judge import JudgeSettings, RateLimiter
from stllava_med.selftrain.pairs import PairSettings, best_and_worst, build_pairs, write_shards
from stllava_med.selftrain.records import Candidate, Judgement, judgement_key, load_candidates
from stllava_med.selftrain.store import JudgementStore


def candidate(i: int, answers=("a", "b"), image_sha="f" * 64, **kw) -> Candidate:
    return Candidate(id=f"c{i}", image=f"/img/{image_sha[:4]}.png", image_sha256=image_sha, question=f"q{i}?",
                     answers=list(answers), **kw)


def judged(c: Candidate, scores, status="ok", **kw) -> Judgement:
    return Judgement(key=f"k-{c.id}", candidate_id=c.id, expert="test", prompt_version="v", status=status,
                     scores=None if scores is None else [float(s) for s in scores],
                     rationales=None if scores is None else [f"r{i}" for i in range(len(scores))], **kw)


def test_candidate_round_trips_and_errors_name_the_field():
    c = candidate(1, answers=("x", "y", "z"), question_source="dataset", reference_answer="x", answer_type="OPEN",
                  meta={"record_id": "7"})
    assert Candidate.from_json(json.loads(json.dumps(c.to_json()))) == c
    bad = c.to_json() | {"answers": ["only one"]}
    with pytest.raises(ValueError, match=r"f\.jsonl:3: field 'answers' needs at least 2"):
        Candidate.from_json(bad, where="f.jsonl:3")
    with pytest.raises(ValueError, match="missing field 'image_sha256'"):
        Candidate.from_json({k: v for k, v in c.to_json().items() if k != "image_sha256"})
    with pytest.raises(ValueError, match="answer_type"):
        Candidate.from_json(c.to_json() | {"answer_type": "maybe"})


def test_judgement_round_trips_and_validates_status():
    j = judged(candidate(1), [7, 3], order=[1, 0], prompt_tokens=10, completion_tokens=5, cost_usd=0.01)
    assert Judgement.from_json(json.loads(json.dumps(j.to_json()))) == j
    with pytest.raises(ValueError, match="needs a reason"):
        Judgement(key="k", candidate_id="c", expert="e", prompt_version="v", status="failed")
    with pytest.raises(ValueError, match="status must be one of"):
        Judgement.from_json(j.to_json() | {"status": "maybe"})


def test_judgement_key_covers_everything_the_expert_sees():
    base = judgement_key("openai:gpt-4o", "v1", "a" * 64, "q?", ["x", "y"])
    assert base == judgement_key("openai:gpt-4o", "v1", "a" * 64, "q?", ["x", "y"])
    variants = [judgement_key("openai:other", "v1", "a" * 64, "q?", ["x", "y"]),
                judgement_key("openai:gpt-4o", "v2", "a" * 64, "q?", ["x", "y"]),
                judgement_key("openai:gpt-4o", "v1", "b" * 64, "q?", ["x", "y"]),
                judgement_key("openai:gpt-4o", "v1", "a" * 64, "q!", ["x", "y"]),
                judgement_key("openai:gpt-4o", "v1", "a" * 64, "q?", ["y", "x"])]
    assert len({base, *variants}) == 6


def test_load_candidates_reads_directories_and_globs_and_names_bad_lines(tmp_path):
    shards = tmp_path / "run" / "candidates"
    shards.mkdir(parents=True)
    (shards / "candidates-00000.jsonl").write_text(json.dumps(candidate(1).to_json()) + "\n"
                                                   + json.dumps(candidate(2).to_json()) + "\n")
    (shards / "candidates-00001.jsonl").write_text(json.dumps(candidate(2).to_json()) + "\n")  # duplicate id
    (tmp_path / "run" / "progress.jsonl").write_text('{"image_id": "x"}\n')  # not a candidate file
    assert [c.id for c in load_candidates(tmp_path / "run")] == ["c1", "c2"]
    assert [c.id for c in load_candidates(str(shards / "*.jsonl"))] == ["c1", "c2"]
    (shards / "candidates-00002.jsonl").write_text('{"id": "c3"}\n')
    with pytest.raises(ValueError, match=r"candidates-00002\.jsonl:1: missing field 'answers'"):
        load_candidates(shards)
    with pytest.raises(FileNotFoundError, match="no JSONL file"):
        load_candidates(tmp_path / "nowhere")


def test_store_is_wal_persistent_and_accounts_usage(tmp_path):
    path = tmp_path / "j.sqlite"
    c1, c2 = candidate(1), candidate(2)
    with JudgementStore(path) as store:
        store.put(judged(c1, [8, 2]), request={"attempt": 0, "outcome": "ok", "prompt_tokens": 100,
                                               "completion_tokens": 20, "cost_usd": 0.5})
        store.log_request("k-c2", attempt=0, outcome="transient", detail="HTTP 500")
        store.put(judged(c2, None, status="failed", failure="gave up", retryable=True),
                  request={"attempt": 1, "outcome": "transient"})
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with JudgementStore(path, readonly=True) as store:
        assert store.get("k-c1").scores == [8.0, 2.0]
        assert store.statuses() == {"k-c1": ("ok", False), "k-c2": ("failed", True)}
        usage = store.usage()
        assert (usage.requests, usage.prompt_tokens, usage.completion_tokens, usage.cost_usd) == (3, 100, 20, 0.5)
        assert store.request_outcomes() == {"ok": 1, "transient": 2}
        assert store.count("ok") == 1 and store.count() == 2
    with JudgementStore(path) as store:  # a later success replaces the failure
        store.put(judged(c2, [5, 5]))
        assert store.statuses()["k-c2"] == ("ok", False)


def test_best_and_worst_take_the_first_of_equal_scores():
    assert best_and_worst([3, 9, 9, 1, 1]) == (1, 3)


def test_pairs_drop_ties_and_low_margins_and_cap_per_image(tmp_path):
    img_a, img_b = "a" * 64, "b" * 64
    cands = [candidate(1, answers=("good", "bad", "mid"), image_sha=img_a),
             candidate(2, image_sha=img_a), candidate(3, image_sha=img_a), candidate(4, image_sha=img_b),
             candidate(5, image_sha=img_b), candidate(6, image_sha=img_b), candidate(7, image_sha=img_b)]
    judgements = {"c1": judged(cands[0], [9, 2, 5]), "c2": judged(cands[1], [6, 6]),
                  "c3": judged(cands[2], [5, 5.5]), "c4": judged(cands[3], [3, 8]),
                  "c5": judged(cands[4], [10, 1]),
                  "c6": judged(cands[5], None, status="failed", failure="invalid reply after 3 attempts: x")}
    pairs, stats = build_pairs(cands, judgements, PairSettings(min_margin=1.0))
    assert stats.to_json() | {"failure_reasons": {}} == {
        "images": 2, "questions": 7, "candidates": 15, "judged": 5, "failed": 1, "unjudged": 1, "ties_dropped": 1,
        "low_margin_dropped": 1, "capped": 0, "capped_total": 0, "pairs": 3, "failure_reasons": {}}
    assert stats.failure_reasons == {"invalid reply after 3 attempts": 1}
    by_id = {p.id: p for p in pairs}
    assert (by_id["c1"].chosen, by_id["c1"].rejected, by_id["c1"].chosen_score, by_id["c1"].rejected_score) == \
        ("good", "bad", 9.0, 2.0)
    assert (by_id["c4"].chosen, by_id["c4"].rejected) == ("b", "a")
    assert by_id["c1"].meta["scores"] == [9.0, 2.0, 5.0] and by_id["c1"].meta["margin"] == 7.0
    capped, capped_stats = build_pairs(cands, judgements, PairSettings(min_margin=0.0, max_per_image=1))
    assert capped_stats.low_margin_dropped == 0 and capped_stats.capped == 2
    assert sorted(p.id for p in capped) == ["c1", "c5"]  # the largest margin of each image
    written = write_shards(pairs, tmp_path / "pref", shard_size=2)
    assert [p.name for p in written] == ["pairs-00000.jsonl", "pairs-00001.jsonl"]
    back = [PreferencePair.from_json(json.loads(line)) for f in written for line in f.read_text().splitlines()]
    assert back == pairs
    write_shards(pairs[:1], tmp_path / "pref", shard_size=2)  # a smaller rewrite leaves no stale shard
    assert sorted(p.name for p in (tmp_path / "pref").iterdir()) == ["pairs-00000.jsonl"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _take(limiter: RateLimiter, tokens: int = 0) -> None:
    assert limiter.wait_time() < 1e-9
    limiter._requests -= 1.0 if limiter.request_rate else 0.0
    limiter._tokens -= tokens if limiter.token_rate else 0


def test_rate_limiter_spaces_requests_and_repays_token_debt():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=None, burst_s=0.5, clock=clock)
    for _ in range(5):  # 10 req/s with half a second of burst
        _take(limiter)
    assert limiter.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    _take(limiter)
    tokens = RateLimiter(requests_per_minute=None, tokens_per_minute=6000, burst_s=1.0, clock=clock)  # 100 tok/s
    _take(tokens, 400)  # one large request passes and leaves a debt of 300 tokens
    assert tokens.wait_time() == pytest.approx(3.0)
    tokens.correct(-200)  # it used 200 fewer tokens than estimated
    assert tokens.wait_time() == pytest.approx(1.0)
    tokens.pause_for(5.0)  # a Retry-After pauses everyone
    assert tokens.wait_time() == pytest.approx(5.0)


def test_rate_limiter_acquire_really_waits():
    import asyncio
    import time

    async def take(n: int) -> float:
        limiter = RateLimiter(requests_per_minute=3000, tokens_per_minute=None, burst_s=0.1)  # 50/s, burst 5
        start = time.perf_counter()
        for _ in range(n):
            await limiter.acquire()
        return time.perf_counter() - start

    assert asyncio.run(take(15)) >= 0.18  # 10 beyond the burst at 50/s


def test_settings_validate_and_price():
    settings = JudgeSettings(price_input_per_mtok=2.5, price_output_per_mtok=10.0)
    assert settings.cost(1_000_000, 100_000) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="retry_failed"):
        JudgeSettings(retry_failed="sometimes")
    with pytest.raises(ValueError, match="concurrency"):
        JudgeSettings(concurrency=0)
    picked = JudgeSettings.from_config({"concurrency": 3, "model": "ignored", "max_requests": 7}, seed=5)
    assert (picked.concurrency, picked.max_requests, picked.seed) == (3, 7, 5)
