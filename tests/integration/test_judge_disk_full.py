"""The judge on a full disk: its store on a small tmpfs (mounted in a private mount namespace) fills mid-run.

The run must end non-zero with one line naming the store and saying the disk is full; every judgement committed
before stays; and once there is space, the same command finishes, asking only what was not recorded, with a
budget that counts every request the server received (those answered but never recorded included)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stllava_med.selftrain.store import JudgementStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_selftrain_judge import _env, _judge_command, make_candidates  # noqa: E402

from openai_server import OpenAITestServer  # noqa: E402
from tmpfs import require_tmpfs, run_on_tmpfs  # noqa: E402

pytestmark = pytest.mark.integration


def _on_full_tmpfs(command: list[str], mount_at: Path, size: str, save_to: Path, env: dict) -> subprocess.CompletedProcess:
    """Run ``command`` with a ``size`` tmpfs mounted at ``mount_at`` (private to the command), then copy what it
    left there to ``save_to`` (the tmpfs ends with the command)."""
    save_to.mkdir(parents=True, exist_ok=True)
    then_copy = ['sh', '-c', '"$@"; rc=$?; cp -a "$MOUNT_AT/." "$SAVE_TO/"; exit $rc', 'sh', *command]
    return run_on_tmpfs(then_copy, mount_at, size, env={**env, "MOUNT_AT": str(mount_at), "SAVE_TO": str(save_to)},
                        timeout=300)


def test_full_disk_stops_the_judge_with_the_store_named_and_loses_no_request(tmp_path, sample_dir):
    require_tmpfs()
    candidates = make_candidates(sample_dir, 60, k=2)
    candidates_path = tmp_path / "candidates.jsonl"
    candidates_path.write_text("".join(json.dumps(c.to_json()) + "\n" for c in candidates))
    run_dir, saved = tmp_path / "run", tmp_path / "saved"
    run_dir.mkdir()
    with OpenAITestServer(latency_s=0.005) as server:
        # 640 KiB: the config files and the store's first pages fit, the write-ahead log fills after a few
        # judgements (each commit appends whole pages)
        full = _on_full_tmpfs(_judge_command(server, candidates_path, run_dir, tmp_path / "hydra-1"), run_dir,
                              "640k", saved, _env())
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
        store_path = run_dir / "judgements.sqlite"
        assert "Traceback" not in full.stderr
        errors = [line for line in full.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, full.stderr[-3000:]
        assert errors[0].startswith(f"Error: {store_path}: cannot write the judgement store while ")
        assert "database or disk is full" in errors[0] and "rerun the same command" in errors[0]
        first_requests = len(server.log)
        with JudgementStore(saved / "judgements.sqlite", readonly=True) as store:
            recorded_before = store.count("ok")
        assert 0 < recorded_before < len(candidates)  # it stopped mid-run: some judged, not all
        assert first_requests >= recorded_before

        # the same command once there is space (the run directory moved to a disk with room)
        resumed_dir = tmp_path / "resumed"
        shutil.copytree(saved, resumed_dir)
        rerun = subprocess.run(_judge_command(server, candidates_path, resumed_dir, tmp_path / "hydra-2"),
                               env=_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        asked_again = [e.question for e in server.log[first_requests:]]
        total_requests = len(server.log)

    answered_first = {e.question for e in server.log[:first_requests]}
    assert len(asked_again) == len(candidates) - recorded_before  # only what was not recorded is asked again
    assert len(answered_first & set(asked_again)) == first_requests - recorded_before
    with JudgementStore(resumed_dir / "judgements.sqlite", readonly=True) as store:
        assert store.count("ok") == len(candidates)
        outcomes = store.request_outcomes()
        # every request the server received is in the budget: those answered but never recorded count as lost
        assert store.usage().requests == total_requests
        assert outcomes.get("lost", 0) + outcomes.get("unrecorded", 0) == first_requests - recorded_before
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["complete"] and summary["judged"] == len(candidates)
