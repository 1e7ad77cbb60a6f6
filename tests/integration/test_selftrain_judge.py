"""The judge against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/openai_server.py), through the
official ``openai`` client: structured output, position randomisation, injected faults, budgets, a SIGKILL in
the middle of a run, and the API key kept out of every file.

Answers carry a ``[q=N]`` tag that the server grades as N, so every test knows the right score of every
answer whatever order the answers were shown in."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stllava_med.data.preference import PreferencePair
from stllava_med.selftrain.experts.openai_expert import OpenAIExpert
from stllava_med.selftrain.judge import JudgeSettings, judge_candidates
from stllava_med.selftrain.records import Candidate, candidate_id
from stllava_med.selftrain.store import JudgementStore
from stllava_med.utils.io import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openai_server import OpenAITestServer  # noqa: E402

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_KEY = "sk-test-9f8e7d6c5b4a-never-write-me"


def make_candidates(sample_dir: Path, n: int, k: int = 3) -> list[Candidate]:
    """n questions over a few real sample images; answer j of question i is graded (i + 3 j) % 10 + 1."""
    images = sorted((sample_dir / "images").glob("*.jpg"))[:4]
    out = []
    for i in range(n):
        image = images[i % len(images)]
        sha = sha256_file(image)
        question = f"Question {i}: what does the image show?"
        answers = [f"answer {j} of {i} [q={(i + 3 * j) % 10 + 1}]" for j in range(k)]
        out.append(Candidate(id=candidate_id(sha, question), image=str(image), image_sha256=sha, question=question,
                             answers=answers, question_source="self"))
    return out


def true_scores(candidate: Candidate) -> list[float]:
    return [float(a.rsplit("[q=", 1)[1].rstrip("]")) for a in candidate.answers]


def expert_for(server: OpenAITestServer, *, timeout_s: float = 5.0, key: str = TEST_KEY) -> OpenAIExpert:
    return OpenAIExpert(model="test-expert", api_key=key, base_url=server.base_url, timeout_s=timeout_s)


def fast(**overrides) -> JudgeSettings:
    values = dict(concurrency=4, backoff_base_s=0.05, backoff_max_s=0.2, max_retries=3, max_invalid_retries=2,
                  price_input_per_mtok=2.5, price_output_per_mtok=10.0, progress=False)
    values.update(overrides)
    return JudgeSettings(**values)


def stored(store_path: Path):
    with JudgementStore(store_path, readonly=True) as store:
        return {j.candidate_id: j for j in store.judgements()}


def test_structured_output_scores_map_back_through_shuffled_positions(tmp_path, sample_dir):
    candidates = make_candidates(sample_dir, 16, k=3)
    with OpenAITestServer(api_key=TEST_KEY) as server:
        stats, _ = judge_candidates(candidates, expert_for(server), tmp_path / "j.sqlite", fast())
        log = server.log
    assert (stats.judged, stats.failed, stats.requests, stats.stopped) == (16, 0, 16, None)
    judgements = stored(tmp_path / "j.sqlite")
    for candidate in candidates:
        judgement = judgements[candidate.id]
        assert judgement.scores == true_scores(candidate), candidate.question
        assert sorted(judgement.order) == [0, 1, 2]
    # what the server was shown is the recorded order, and the order really varied between calls
    by_question = {e.question: e for e in log}
    for candidate in candidates:
        order = judgements[candidate.id].order
        assert by_question[candidate.question].presented == [candidate.answers[i] for i in order]
    assert len({tuple(j.order) for j in judgements.values()}) >= 3
    assert all(e.response_format == "json_schema" and e.has_image and e.authorized for e in log)
    # usage from the server's `usage` block, priced with the configured rates
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    assert stats.cost_usd == pytest.approx((stats.prompt_tokens * 2.5 + stats.completion_tokens * 10.0) / 1e6)


def test_faults_are_retried_boundedly_and_failures_keep_their_reason(tmp_path, sample_dir):
    candidates = make_candidates(sample_dir, 8, k=2)
    q = {i: f"Question {i}:" for i in range(8)}
    script = {
        q[0]: ["429:0.4", "500"],                    # rate limited, then a server error, then fine
        q[1]: ["timeout"],                           # client times out, retries
        q[2]: ["malformed", "out_of_range"],         # two invalid replies, the third attempt is valid
        q[3]: ["malformed", "wrong_count", "bad_body"],  # 3 invalid replies: max_invalid_retries=2 exhausted
        q[4]: ["503"] * 20,                          # keeps failing: max_retries=3, then a retryable failure
        q[5]: ["bad_body"],                          # a 200 whose body is not JSON
    }
    store_path = tmp_path / "j.sqlite"
    with OpenAITestServer(question_faults=script, timeout_sleep_s=1.5) as server:
        stats, _ = judge_candidates(candidates, expert_for(server, timeout_s=0.4), store_path, fast())
        counts = server.requests_per_question()
        log = server.log
    assert counts[candidates[0].question] == 3
    assert counts[candidates[1].question] == 2
    assert counts[candidates[2].question] == 3
    assert counts[candidates[3].question] == 3
    assert counts[candidates[4].question] == 4  # 1 + max_retries
    assert counts[candidates[5].question] == 2
    assert all(counts[c.question] == 1 for c in candidates[6:])
    # the retry after a 429 with Retry-After: 0.4 came no sooner than asked
    times = [e.time for e in log if e.question == candidates[0].question]
    assert times[1] - times[0] >= 0.4
    judgements = stored(store_path)
    for i in (0, 1, 2, 5, 6, 7):
        assert judgements[candidates[i].id].ok and judgements[candidates[i].id].scores == true_scores(candidates[i])
    invalid = judgements[candidates[3].id]
    assert (invalid.status, invalid.retryable) == ("failed", False)
    assert invalid.failure.startswith("invalid reply after 3 attempts: response body is not JSON")
    down = judgements[candidates[4].id]
    assert (down.status, down.retryable) == ("failed", True)
    assert down.failure.startswith("gave up after 4 attempts: HTTP 503")
    assert (stats.judged, stats.failed, stats.transient_errors, stats.invalid_replies) == (6, 2, 7, 6)

    # a rerun asks only the retryable failure again (the server is healthy now); the final failure stays
    with OpenAITestServer() as server:
        rerun, _ = judge_candidates(candidates, expert_for(server), store_path, fast())
        assert [e.question for e in server.log] == [candidates[4].question]
    assert (rerun.already_judged, rerun.todo, rerun.judged) == (7, 1, 1)
    assert stored(store_path)[candidates[4].id].scores == true_scores(candidates[4])


def test_budget_stops_cleanly_and_counts_across_runs(tmp_path, sample_dir):
    candidates = make_candidates(sample_dir, 12, k=2)
    store_path = tmp_path / "j.sqlite"
    with OpenAITestServer(latency_s=0.02) as server:
        stats, _ = judge_candidates(candidates, expert_for(server), store_path, fast(concurrency=3, max_requests=5))
        assert len(server.log) == 5
        assert stats.stopped.startswith("budget: max_requests=5")
        assert stats.judged == 5 and len(stored(store_path)) == 5  # in-flight requests finished and were stored
        again, _ = judge_candidates(candidates, expert_for(server), store_path, fast(max_requests=5))
        assert len(server.log) == 5 and again.requests == 0 and again.stopped.startswith("budget")
        more, _ = judge_candidates(candidates, expert_for(server), store_path, fast(max_requests=100))
        assert more.stopped is None and more.judged == 7
        assert sorted(server.requests_per_question().values()) == [1] * 12  # nothing asked twice

    # a cost cap: the server's usage × prices. Each request reserves its estimated cost (~1000 prompt tokens
    # with the image estimate, while this server reports ~300), so the run stops before the cap is crossed.
    cost_store = tmp_path / "cost.sqlite"
    with OpenAITestServer() as server:
        settings = fast(concurrency=2, max_cost_usd=0.2, price_input_per_mtok=100.0, price_output_per_mtok=0.0)
        capped, _ = judge_candidates(candidates, expert_for(server), cost_store, settings)
        with JudgementStore(cost_store, readonly=True) as store:
            spent = store.usage().cost_usd
        assert capped.stopped.startswith("budget: max_cost_usd=0.2")
        assert 0 < capped.judged < 12 and 0.2 - 0.1 < spent <= 0.2
        assert len(server.log) == capped.requests == capped.judged


def test_fatal_errors_and_a_dead_expert_stop_the_run_boundedly(tmp_path, sample_dir):
    candidates = make_candidates(sample_dir, 10, k=2)
    with OpenAITestServer(api_key=TEST_KEY) as server:  # wrong key: 401 is fatal, nothing is stored as failed
        stats, _ = judge_candidates(candidates, expert_for(server, key="sk-wrong-key-0000"), tmp_path / "a.sqlite",
                                    fast(concurrency=2))
        assert stats.stopped.startswith("fatal: HTTP 401") and len(server.log) <= 2
    assert stored(tmp_path / "a.sqlite") == {}
    with OpenAITestServer(faults=["500"] * 100) as server:
        stats, _ = judge_candidates(candidates, expert_for(server), tmp_path / "b.sqlite",
                                    fast(concurrency=1, max_retries=1, max_consecutive_failures=3))
        assert stats.stopped.startswith("expert unavailable: 3 judgements in a row")
        assert len(server.log) == 6 and stats.failed == 3


def _judge_command(server: OpenAITestServer, candidates_path: Path, out_dir: Path, hydra_dir: Path) -> list[str]:
    return [sys.executable, "-m", "stllava_med.judge", f"candidates={candidates_path}", "expert=openai",
            f"expert.base_url={server.base_url}", "expert.model=test-expert", "expert.concurrency=4",
            "expert.api_key_env=STLLAVA_TEST_EXPERT_KEY", "expert.backoff_base_s=0.05", f"out_dir={out_dir}",
            f"hydra.run.dir={hydra_dir}", "judge.progress=false", "pairs.min_margin=1"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["STLLAVA_TEST_EXPERT_KEY"] = TEST_KEY
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def _ok_count(store_path: Path) -> int:
    if not store_path.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM judgements WHERE status = 'ok'").fetchone()[0])
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def test_sigkilled_cli_run_resumes_without_asking_anything_twice_and_never_writes_the_key(tmp_path, sample_dir):
    candidates = make_candidates(sample_dir, 16, k=2)
    candidates_path = tmp_path / "candidates.jsonl"
    candidates_path.write_text("".join(json.dumps(c.to_json()) + "\n" for c in candidates))
    run_dir = tmp_path / "run"
    store_path = run_dir / "judgements.sqlite"
    # one question first meets a server error that echoes the Authorization header: its reason is stored
    echo = {candidates[0].question: ["echo_key"]}
    with OpenAITestServer(api_key=TEST_KEY, hold_after=6, latency_s=0.01, question_faults=echo) as server:
        first = subprocess.Popen(_judge_command(server, candidates_path, run_dir, run_dir / "hydra-1"), env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            # wait until every answered request is committed and all 4 workers sit on held requests
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                answered = sum(e.answered for e in server.log)
                held = sum(e.held for e in server.log)
                if held == 4 and answered >= 6 and _ok_count(store_path) == answered:
                    break
                assert first.poll() is None, first.stdout.read().decode()[-2000:]
                time.sleep(0.05)
            else:
                pytest.fail("the judge never reached the kill point")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(timeout=10)
        answered_before = {e.question for e in server.log if e.answered}
        held_before = {e.question for e in server.log if e.held}
        server.release(drop=True)  # the held requests die unanswered with the process that sent them
        assert first.returncode == -signal.SIGKILL
        assert 6 <= len(answered_before) <= 12 and len(held_before) == 4  # killed mid-way, 4 requests in flight
        assert _ok_count(store_path) == len(answered_before)
        n_before = len(server.log)

        second = subprocess.run(_judge_command(server, candidates_path, run_dir, run_dir / "hydra-2"), env=_env(),
                                capture_output=True, text=True, timeout=90)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        resumed = [e.question for e in server.log[n_before:]]
        n_server_requests = len(server.log)
        answered_per_question = server.requests_per_question(answered_only=True)

    assert not answered_before & set(resumed)  # nothing answered before the kill was asked again
    assert held_before <= set(resumed)  # the requests lost in flight were asked again, once
    assert sorted(resumed) == sorted({c.question for c in candidates} - answered_before)
    assert answered_per_question == {c.question: 1 for c in candidates}
    with JudgementStore(store_path, readonly=True) as store:
        outcomes = store.request_outcomes()
        assert outcomes["transient"] == 1  # the echoing 500, retried
        # the 4 requests in flight at the kill count against the budget (settled by the next run as "lost"):
        # the store has recorded every request the server received, no fewer
        assert outcomes["lost"] == 4
        assert store.usage().requests == n_server_requests
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["judged"], summary["failed"], summary["unjudged"], summary["complete"]) == (16, 0, 0, True)
    assert summary["this_run"]["already_judged"] == len(answered_before)
    pairs = [PreferencePair.from_json(json.loads(line))
             for shard in summary["preference_shards"] for line in Path(shard).read_text().splitlines()]
    by_id = {c.id: c for c in candidates}
    expected_pairs = sum(1 for c in candidates if len(set(true_scores(c))) > 1)
    assert summary["pairs"] == len(pairs) == expected_pairs
    for pair in pairs:
        scores = dict(zip(by_id[pair.id].answers, true_scores(by_id[pair.id])))
        assert scores[pair.chosen] == max(scores.values()) and scores[pair.rejected] == min(scores.values())
        assert pair.judge == "openai:test-expert" and pair.images == [by_id[pair.id].image]
    # the key was used (the server refuses others) but lives in no file of the run, Hydra's files included
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".sqlite" for p in files)
    leaked = [str(p) for p in files if TEST_KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert "STLLAVA_TEST_EXPERT_KEY" in (run_dir / "config.yaml").read_text()
