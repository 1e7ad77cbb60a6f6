"""Two judge processes on one store (one out_dir) against the real OpenAI-compatible test server: each judgement is
asked once (claimed in SQLite before it is asked), and expert.max_requests is the store's budget, counted across
both processes (reserved in SQLite before a request is sent), not one allowance per process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_judge_exit import _candidates, _command, _env  # noqa: E402

from openai_server import OpenAITestServer  # noqa: E402

pytestmark = pytest.mark.integration


def _both(command: list[str]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _stored_requests(out_dir: Path) -> int:
    with sqlite3.connect(out_dir / "judgements.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def test_two_judges_ask_each_judgement_once(tmp_path, sample_dir):
    candidates = _candidates(tmp_path, sample_dir, 12)
    out_dir = tmp_path / "run"
    with OpenAITestServer(latency_s=0.3) as server:
        results = _both(_command(server.base_url, candidates, out_dir, "expert.concurrency=2"))
        for result in results:
            assert result.returncode == 0, result.stderr[-3000:]
        asked = server.requests_per_question()
    assert len(asked) == 12 and set(asked.values()) == {1}, asked
    assert _stored_requests(out_dir) == 12


def test_budget_counts_across_processes(tmp_path, sample_dir):
    candidates = _candidates(tmp_path, sample_dir, 12)
    out_dir = tmp_path / "run"
    with OpenAITestServer(latency_s=0.3) as server:
        results = _both(_command(server.base_url, candidates, out_dir, "expert.concurrency=2",
                                 "expert.max_requests=5"))
        sent = len(server.log)
    assert sent == 5, f"{sent} requests for a budget of 5"
    assert _stored_requests(out_dir) == 5
    for result in results:
        assert result.returncode == 3, result.stderr[-3000:]
        assert "budget: max_requests=5 reached" in result.stdout + result.stderr
