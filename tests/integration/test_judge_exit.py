"""The judge CLI's exit status and last words, against the real OpenAI-compatible HTTP server on 127.0.0.1
(tests/openai_server.py) or a port with nothing listening: a judge that stops before judging every candidate
exits 3 (a budget) or 4 (the expert: unreachable, fatal HTTP status), names the reason in its last log line and
in summary.json, and says that the expert is down seconds after it starts, not minutes; a complete judge exits 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stllava_med.selftrain.experts.openai_expert import _connection_reason, _unresolvable
from stllava_med.selftrain.records import Candidate, candidate_id
from stllava_med.utils.io import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openai_server import OpenAITestServer  # noqa: E402

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _candidates(tmp_path: Path, sample_dir: Path, n: int) -> Path:
    images = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    rows = []
    for i in range(n):
        image = images[i % len(images)]
        sha = sha256_file(image)
        question = f"Question {i}: what does the image show?"
        rows.append(Candidate(id=candidate_id(sha, question), image=str(image), image_sha256=sha, question=question,
                              answers=[f"answer a [q={i % 9 + 1}]", "answer b [q=10]"], question_source="self"))
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(c.to_json()) + "\n" for c in rows))
    return path


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(base_url: str, candidates: Path, out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stllava_med.judge", f"candidates={candidates}", "expert=openai",
            f"expert.base_url={base_url}", "expert.model=test-expert", "expert.concurrency=2",
            "expert.backoff_base_s=0.05", "expert.backoff_max_s=0.2", f"out_dir={out_dir}",
            f"hydra.run.dir={out_dir}/hydra", "judge.progress=false", "print_summary=false", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)  # a placeholder key goes to the local server
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)


def _log_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[")]


def test_a_budget_stop_exits_3_and_a_larger_budget_finishes_with_0(tmp_path, sample_dir):
    candidates = _candidates(tmp_path, sample_dir, 8)
    out_dir = tmp_path / "run"
    with OpenAITestServer() as server:
        stopped = _run(_command(server.base_url, candidates, out_dir, "expert.max_requests=3"))
        summary = json.loads((out_dir / "summary.json").read_text())
        assert stopped.returncode == 3, stopped.stderr[-3000:]
        assert summary["exit_code"] == 3 and summary["complete"] is False
        assert summary["stopped"].startswith("budget: max_requests=3") and summary["unjudged"] == 5
        last = _log_lines(stopped)[-1]
        assert "ERROR" in last and "judge: stopped (budget) with 5 of 8 candidates unjudged, 0 failed — budget" in last, last
        assert "budget: max_requests=3" in last and "(exit 3)" in last

        finished = _run(_command(server.base_url, candidates, out_dir, "expert.max_requests=100"))
        assert finished.returncode == 0, finished.stderr[-3000:]
        summary = json.loads((out_dir / "summary.json").read_text())
        assert (summary["exit_code"], summary["complete"], summary["judged"], summary["stopped"]) == (0, True, 8, None)
        assert len(server.log) == 8  # nothing judged before was asked again


def test_a_fatal_http_404_exits_4_with_the_reason(tmp_path, sample_dir):
    candidates = _candidates(tmp_path, sample_dir, 6)
    out_dir = tmp_path / "run"
    with OpenAITestServer() as server:
        wrong_path = server.base_url.replace("/v1", "/not-an-api/v1")
        proc = _run(_command(wrong_path, candidates, out_dir))
        assert len(server.log) <= 2  # the first replies stop the run: nothing is retried
    assert proc.returncode == 4, proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["exit_code"] == 4 and summary["stopped"].startswith("fatal: HTTP 404")
    last = _log_lines(proc)[-1]
    assert "judge: stopped (expert) with 6 of 6 candidates unjudged, 0 failed — fatal: HTTP 404" in last, last


def test_nothing_listening_is_logged_at_once_and_exits_4_after_one_judgements_retries(tmp_path, sample_dir):
    candidates = _candidates(tmp_path, sample_dir, 40)
    out_dir = tmp_path / "run"
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    started = time.monotonic()
    proc = _run(_command(dead, candidates, out_dir, "expert.max_retries=3"))
    seconds = time.monotonic() - started
    assert proc.returncode == 4, proc.stderr[-3000:]
    lines = _log_lines(proc)
    retries = [line for line in lines if "expert retry" in line]
    # the first retry of the burst is logged, at WARNING, with the reason and the wait
    assert retries and "WARNING" in retries[0], lines
    assert "expert retry 1/3 for " in retries[0] and "ConnectionRefusedError" in retries[0]
    assert "; next in " in retries[0] and retries[0].rstrip().endswith(" s")
    # rate-limited: not one line per retry (2 workers x 3 retries each, at least)
    assert len(retries) < 6
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["exit_code"] == 4
    assert summary["stopped"].startswith("expert unavailable: no answer since the run started")
    assert summary["unjudged"] >= 36  # stopped after the first judgements, not after 50 in a row
    assert "judge: stopped (expert)" in lines[-1] and "no answer since the run started" in lines[-1]
    assert seconds < 60


def test_a_dead_expert_exits_4_even_when_every_candidate_ended_as_a_stored_failure(tmp_path, sample_dir):
    """Two candidates, two workers: both exhaust their retries, so none is unjudged, but both are failures a
    rerun asks again: the run is not complete in any useful sense."""
    candidates = _candidates(tmp_path, sample_dir, 2)
    out_dir = tmp_path / "run"
    proc = _run(_command(f"http://127.0.0.1:{_free_port()}/v1", candidates, out_dir, "expert.max_retries=1"))
    assert proc.returncode == 4, proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["unjudged"], summary["failed"], summary["exit_code"]) == (0, 2, 4)
    assert "with 0 of 2 candidates unjudged, 2 failed — expert unavailable" in _log_lines(proc)[-1]


def test_with_default_retries_a_dead_server_is_reported_within_seconds(tmp_path, sample_dir):
    """The default backoff (1 s base, 6 retries) takes about a minute to give up: the first WARNING comes at
    once. The process is stopped by the test (by its pid) once that line is read."""
    candidates = _candidates(tmp_path, sample_dir, 4)
    out_dir = tmp_path / "run"
    command = [c for c in _command(f"http://127.0.0.1:{_free_port()}/v1", candidates, out_dir)
               if not c.startswith("expert.backoff")]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        asking = first_retry = None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if "to ask" in line and asking is None:
                asking = time.monotonic()
            if "expert retry 1/6" in line:
                first_retry = time.monotonic()
                assert "WARNING" in line and "connection error to http://127.0.0.1:" in line, line
                break
            assert time.monotonic() < deadline, "no retry line within 60 s"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert asking is not None and first_retry is not None
    assert first_retry - asking < 5.0


def test_connection_errors_name_the_cause():
    """The reason a dead or misspelt host gives, from a real connection error of the openai client and a real
    resolver error (EAI_NONAME, raised here without asking any resolver)."""
    import openai

    port = _free_port()
    client = openai.OpenAI(api_key="EMPTY", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=2)
    with pytest.raises(openai.APIConnectionError) as refused:
        client.models.list()
    reason = _connection_reason(refused.value, f"http://127.0.0.1:{port}/v1")
    assert reason.startswith(f"connection error to http://127.0.0.1:{port}/v1: ConnectionRefusedError"), reason
    assert not _unresolvable(refused.value)
    for errno, unresolvable in ((socket.EAI_NONAME, True), (socket.EAI_AGAIN, False)):  # AGAIN: retried
        try:
            raise ConnectionError("resolver") from socket.gaierror(errno, "resolver says no")
        except ConnectionError as err:
            assert _unresolvable(err) is unresolvable
            assert f"gaierror: [Errno {errno}] resolver says no" in _connection_reason(err, "http://nohost:1/v1")
