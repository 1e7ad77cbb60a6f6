"""Run identity: a run directory belongs to the config that made it (run_identity.json) and to one process at a
time (.run.lock). A changed config in an explicit out_dir is refused naming each differing key (old → new), or
runs in <out_dir>/run-<hash> with run_dir_mismatch=new; keys in run_dir_ignore may change; a second process on a
running directory is refused naming the holder. Real CLI runs (train_dpo, judge), real processes and locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stllava_med.selftrain.records import Candidate, candidate_id
from stllava_med.utils.config import save_config
from stllava_med.utils.io import sha256_file
from stllava_med.utils.run_identity import (
    IDENTITY_FILE,
    RunDirMismatch,
    check_identity,
    claim_run_dir,
    hold_lock,
    release,
    shard_lock_name,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import compose  # noqa: E402

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"stllava_med.{module}", *args]


def _dpo_args(out_dir: Path, *extra: str) -> list[str]:
    return [f"out_dir={out_dir}", f"hydra.run.dir={out_dir}-hydra-{time.monotonic_ns()}", "data.num_workers=0",
            "export.merged=false", "num_threads=1", "data.progress=false", "trainer.enable_progress_bar=false",
            "print_summary=false", *extra]


# --------------------------------------------------------------------------------------------------------------
# train_dpo: two identical processes, then a changed beta
# --------------------------------------------------------------------------------------------------------------


def test_dpo_second_process_refused_then_changed_beta_refused(tmp_path):
    out_dir = tmp_path / "dpo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the first process trains (long enough to be still running when the second one starts)
    first = subprocess.Popen(_cli("train_dpo", *_dpo_args(out_dir, "dpo.beta=0.1", "trainer.max_steps=100000",
                                                          "trainer.max_epochs=1000")),
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        lock = out_dir / ".run.lock"
        deadline = time.monotonic() + 300
        while not (lock.is_file() and lock.read_text().startswith("pid")):
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.monotonic() < deadline, "the first train_dpo never took its run directory's lock"
            time.sleep(0.2)
        second = subprocess.run(_cli("train_dpo", *_dpo_args(out_dir, "dpo.beta=0.1", "trainer.max_steps=100000",
                                                             "trainer.max_epochs=1000")),
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first process must still hold the directory"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert second.returncode == 75, second.stderr[-3000:]  # EX_TEMPFAIL: try again later
    assert "Traceback" not in second.stderr and second.stderr.count("Error: ") == 1  # one line, no traceback
    assert f"dpo: {out_dir} is in use by another process (pid {first.pid} on " in second.stderr
    assert "wait for it to end" in second.stderr
    assert "Epoch" not in second.stdout + second.stderr  # it never started training

    # the same directory with another beta: refused before anything is written, the recorded config untouched
    identity = json.loads((out_dir / IDENTITY_FILE).read_text())
    assert identity["config"]["dpo.beta"] == 0.1
    before = sorted(p.name for p in out_dir.iterdir())
    changed = subprocess.run(_cli("train_dpo", *_dpo_args(out_dir, "dpo.beta=0.5", "trainer.max_steps=100000",
                                                          "trainer.max_epochs=1000")), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "Traceback" not in changed.stderr and changed.stderr.count("Error: ") == 1
    assert (f"dpo: {out_dir} was made by another config (fingerprint {identity['fingerprint']}, recorded in "
            f"{out_dir / IDENTITY_FILE}") in changed.stderr
    assert "Differing keys (old → new): dpo.beta: 0.1 → 0.5." in changed.stderr
    assert "run_dir_mismatch=new" in changed.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == before
    assert "beta: 0.1" in (out_dir / "config.yaml").read_text()
    assert json.loads((out_dir / IDENTITY_FILE).read_text()) == identity

    # run_dir_mismatch=new: the beta=0.5 run gets its own sub-directory (checked without training it here)
    cfg = compose("dpo", [f"out_dir={out_dir}", "dpo.beta=0.5", "run_dir_mismatch=new"])
    sub = check_identity(cfg, out_dir, "dpo")
    assert sub.parent == out_dir and sub.name.startswith("run-")
    assert json.loads((sub / IDENTITY_FILE).read_text())["config"]["dpo.beta"] == 0.5
    assert check_identity(cfg, out_dir, "dpo") == sub  # rerunning it resumes the same sub-run


# --------------------------------------------------------------------------------------------------------------
# Every stage: a result-affecting key refused, run_dir_ignore keys allowed
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,first,changed,message,ignored", [
    ("generate", ["generate.answers_per_question=2"], ["generate.answers_per_question=3"],
     "generate.answers_per_question: 2 → 3", ["generate.max_images=7", "generate.progress=false",
                                               "generate.num_shards=2", "device=cpu", "num_threads=1"]),
    ("sft", ["optim.lr=0.0002"], ["optim.lr=0.001"], "optim.lr: 0.0002 → 0.001",
     ["checkpoint.every_n_steps=3", "export.merged=false", "data.num_workers=1", "trainer.log_every_n_steps=1"]),
    ("evaluate", ["eval.max_new_tokens=32"], ["eval.max_new_tokens=8"], "eval.max_new_tokens: 32 → 8",
     ["eval.progress=false", "print_table=false", "eval.num_shards=3", "objective=open_f1"]),
    ("dpo", ["dpo.loss_type=sigmoid"], ["dpo.loss_type=ipo", "seed=3"], "data.seed: 0 → 3; dpo.loss_type: sigmoid → ipo; seed: 0 → 3",
     ["checkpoint.every_n_steps=1", "data.progress=false", "dpo.precompute_batch_size=2", "data.num_workers=0"]),
])
def test_stage_identity(tmp_path, stage, first, changed, message, ignored):
    out = [f"out_dir={tmp_path}"]
    assert check_identity(compose(stage, out + first), tmp_path, stage) == tmp_path
    assert check_identity(compose(stage, out + first + ignored), tmp_path, stage) == tmp_path  # resumes
    with pytest.raises(RunDirMismatch, match=rf"^{stage}: {tmp_path} was made by another config") as err:
        check_identity(compose(stage, out + changed + ignored), tmp_path, stage)
    assert f"Differing keys (old → new): {message}." in str(err.value)


def test_directory_from_before_the_record_is_judged_by_its_config_yaml(tmp_path):
    old = compose("dpo", [f"out_dir={tmp_path}", "dpo.beta=0.1"])
    save_config(old, tmp_path)  # what a run before run_identity.json left behind
    with pytest.raises(RunDirMismatch, match=rf"recorded in {tmp_path / 'config.yaml'}.*dpo\.beta: 0\.1 → 0\.5\."):
        check_identity(compose("dpo", [f"out_dir={tmp_path}", "dpo.beta=0.5"]), tmp_path, "dpo")
    assert not (tmp_path / IDENTITY_FILE).exists()
    assert check_identity(compose("dpo", [f"out_dir={tmp_path}", "dpo.beta=0.1", "checkpoint.every_n_steps=9"]),
                          tmp_path, "dpo") == tmp_path
    assert (tmp_path / IDENTITY_FILE).is_file()  # the same config: the record is written now


def _recorded_without(tmp_path: Path, cfg, stage: str, key: str) -> dict:
    """The identity an older version (one without ``key``) recorded for ``cfg``."""
    check_identity(cfg, tmp_path, stage)
    record = json.loads((tmp_path / IDENTITY_FILE).read_text())
    del record["config"][key]
    record["fingerprint"] = "older00000"
    (tmp_path / IDENTITY_FILE).write_text(json.dumps(record))
    return record


def test_a_key_added_since_at_its_default_is_the_same_config(tmp_path):
    """A run directory recorded before ``data.on_bad_image`` existed resumes with it at its default (what the
    older code did), and is refused with it at another value."""
    out = [f"out_dir={tmp_path}", "optim.lr=0.0002"]
    _recorded_without(tmp_path, compose("sft", out), "sft", "data.on_bad_image")
    assert check_identity(compose("sft", out), tmp_path, "sft") == tmp_path
    record = json.loads((tmp_path / IDENTITY_FILE).read_text())
    assert record["previous_fingerprint"] == "older00000" and record["config"]["data.on_bad_image"] == "error"

    _recorded_without(tmp_path, compose("sft", out), "sft", "data.on_bad_image")
    with pytest.raises(RunDirMismatch) as err:
        check_identity(compose("sft", [*out, "data.on_bad_image=skip"]), tmp_path, "sft")
    assert "Differing keys (old → new): data.on_bad_image: <unset> → skip." in str(err.value)
    # an added key at its default does not hide another change
    with pytest.raises(RunDirMismatch) as err:
        check_identity(compose("sft", [f"out_dir={tmp_path}", "optim.lr=0.001"]), tmp_path, "sft")
    assert "optim.lr: 0.0002 → 0.001" in str(err.value)


def test_bad_policy_named(tmp_path):
    cfg = compose("dpo", [f"out_dir={tmp_path}"])
    cfg.run_dir_mismatch = "overwrite"
    with pytest.raises(ValueError, match=r"run_dir_mismatch must be one of \('error', 'new'\), not 'overwrite'"):
        check_identity(cfg, tmp_path, "dpo")


# --------------------------------------------------------------------------------------------------------------
# Locks: another process, ranks > 0, shards
# --------------------------------------------------------------------------------------------------------------

_HOLD = """
import sys
from pathlib import Path
from stllava_med.utils.run_identity import hold_lock, RunDirBusy
try:
    print("held" if hold_lock(Path(sys.argv[1]), "dpo", sys.argv[2]) else "not taken")
except RunDirBusy as err:
    print(f"busy: {err}")
"""


def _other_process(run_dir: Path, name: str = ".run.lock", **env: str) -> str:
    return subprocess.run([sys.executable, "-c", _HOLD, str(run_dir), name], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=True).stdout.strip()


def test_lock_other_process_rank_and_shards(tmp_path):
    cfg = compose("dpo", [f"out_dir={tmp_path}"])
    assert claim_run_dir(cfg, tmp_path, "dpo") == tmp_path
    try:
        assert claim_run_dir(cfg, tmp_path, "dpo") == tmp_path  # the same process again (the pipeline): fine
        refused = _other_process(tmp_path)
        assert refused.startswith(f"busy: dpo: {tmp_path} is in use by another process (pid {os.getpid()} on ")
        assert _other_process(tmp_path, RANK="1") == "not taken"          # torchrun's rank 1 joins rank 0's run
        assert _other_process(tmp_path, LOCAL_RANK="2") == "not taken"    # Lightning's DDP subprocesses too
        assert _other_process(tmp_path, SLURM_PROCID="0", SLURM_NTASKS="2").startswith("busy: ")
    finally:
        release(tmp_path)
    assert _other_process(tmp_path) == "held"  # released: the next process may run

    gen = [f"out_dir={tmp_path}", "generate.num_shards=2"]
    names = {shard_lock_name(compose("generate", [*gen, f"generate.shard_index={i}"]), "generate") for i in (0, 1)}
    assert names == {".run-shard-00000-of-00002.lock", ".run-shard-00001-of-00002.lock"}
    assert shard_lock_name(compose("generate", [*gen, "generate.merge_only=true"]), "generate") is None
    assert shard_lock_name(compose("evaluate", [f"out_dir={tmp_path}"]), "evaluate") == ".run.lock"
    hold_lock(tmp_path, "generate", ".run-shard-00000-of-00002.lock")
    try:  # shard 1 runs beside shard 0; a second shard 0 does not
        assert _other_process(tmp_path, ".run-shard-00001-of-00002.lock") == "held"
        assert _other_process(tmp_path, ".run-shard-00000-of-00002.lock").startswith("busy: ")
    finally:
        release(tmp_path, ".run-shard-00000-of-00002.lock")


# --------------------------------------------------------------------------------------------------------------
# judge (CLI): another pairs config refused, an ignored key allowed, run_dir_mismatch=new
# --------------------------------------------------------------------------------------------------------------


def _dataset_candidates(tmp_path: Path, sample_dir: Path, n: int = 4) -> Path:
    images = sorted((sample_dir / "images").glob("*.jpg"))[:2]
    rows = []
    for i in range(n):
        image = images[i % len(images)]
        sha = sha256_file(image)
        question = f"Is there an abnormality {i}?"
        rows.append(Candidate(id=candidate_id(sha, question), image=str(image), image_sha256=sha, question=question,
                              answers=["yes", "no"], question_source="dataset", reference_answer="yes",
                              answer_type="CLOSED").to_json())
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judge(candidates: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli("judge", f"candidates={candidates}", "expert=reference", f"out_dir={out_dir}",
                               f"hydra.run.dir={out_dir}-hydra", "print_summary=false", *extra),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_judge_cli_identity(tmp_path, sample_dir):
    candidates = _dataset_candidates(tmp_path, sample_dir)
    out_dir = tmp_path / "judge"
    first = _judge(candidates, out_dir, "pairs.min_margin=1", "judge.progress=false")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out_dir / "summary.json").read_text())["pairs"] == 4
    again = _judge(candidates, out_dir, "pairs.min_margin=1", "judge.progress=true")  # run_dir_ignore: allowed
    assert again.returncode == 0, again.stderr[-3000:]
    changed = _judge(candidates, out_dir, "pairs.min_margin=2")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert f"judge: {out_dir} was made by another config" in changed.stderr
    assert "Differing keys (old → new): pairs.min_margin: 1.0 → 2.0." in changed.stderr
    fresh = _judge(candidates, out_dir, "pairs.min_margin=2", "run_dir_mismatch=new")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    subs = sorted(out_dir.glob("run-*"))
    assert len(subs) == 1
    summary = json.loads((subs[0] / "summary.json").read_text())
    assert summary["pairs_settings"]["min_margin"] == 2.0
    assert json.loads((out_dir / "summary.json").read_text())["pairs_settings"]["min_margin"] == 1.0
