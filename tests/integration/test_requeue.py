"""Preemption and requeue under (simulated) SLURM, as a plain sbatch job runs it (``slurm_auto_requeue=true``,
``#SBATCH --signal=USR1@90``): SLURM's variables in the environment, a stub ``scontrol`` on PATH that records its
arguments, and real signals — SIGUSR1 to the job, then SIGKILL if it has not exited after a grace period. The
stage writes a complete checkpoint at the next optimizer step (or, during the DPO reference pre-pass, none: the
cache keeps what it computed), calls ``scontrol requeue <job>`` and exits 138; the "requeued" run — the same
command, the same SLURM variables plus SLURM_RESTART_COUNT=1 — resumes at the checkpointed step and ends with
the trainable weights of an uninterrupted run (torch.equal)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, compose

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

JOB_ID = "4242"
GRACE_S = 90  # SLURM's --signal lead time in the sbatch scripts: SIGKILL after it
STOPPED = re.compile(r"stopped by (SIG\w+)(?: at step (\d+)(?: of \d+)?)?(.*?); (checkpoint (\S+)|no checkpoint "
                     r"written[^;]*); rerun the same command")


def _slurm_env(tmp_path: Path, restart: int | None = None) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        stub = bin_dir / "scontrol"
        stub.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path / "scontrol.log"}\n')
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "stllava-test", "SLURM_NTASKS": "1",
                "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "node001",
                "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(REPO_ROOT)})
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = str(restart)
    return env


def _preempt(args: list[str], env: dict[str, str], trigger: re.Pattern[str], *, group: bool = False,
             timeout: float = 600) -> tuple[int, str, bool]:
    """Run ``python -m <args>``; when a line matches ``trigger`` send SIGUSR1 (to the process group with
    ``group``, as SLURM signals every process of a job), and SIGKILL it if it is still alive GRACE_S later.
    (status, output, killed)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True)
    reader.start()
    output: list[str] = []
    deadline = time.monotonic() + timeout
    signalled_at: float | None = None
    killed = False
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            output.append(line)
            if line and signalled_at is None and trigger.search(line):
                (os.killpg(proc.pid, signal.SIGUSR1) if group else proc.send_signal(signal.SIGUSR1))
                signalled_at = time.monotonic()
            if signalled_at is not None and time.monotonic() - signalled_at > GRACE_S and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the scheduler's kill after the grace period
                killed = True
            assert time.monotonic() < deadline, "".join(output)[-3000:]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = "".join(output)
    assert signalled_at is not None, text[-3000:]
    return proc.returncode, text, killed


def _rerun(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def _requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.is_file() else []


def _checkpoint_step(path: Path) -> int:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"] and checkpoint["loops"]["fit_loop"]
    return int(checkpoint["global_step"])


def _assert_same_adapter(ours: Path, theirs: Path) -> None:
    a = load_file(ours / "adapter" / "adapter_model.safetensors")
    b = load_file(theirs / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _stage(stage: str, out_dir: Path, hydra_dir: Path, extra: list[str]) -> list[str]:
    return [f"stllava_med.train_{stage}", *extra, "logger=none", "objective=null", "print_summary=false",
            "num_threads=1", "export.merged=false", "slurm_auto_requeue=true", f"out_dir={out_dir}",
            f"hydra.run.dir={hydra_dir}"]


SFT = ["experiment=sft_tiny", "trainer.max_steps=30", "data.val_fraction=0"]


def test_sft_preempted_mid_training_requeues_with_a_checkpoint_and_resumes_to_the_same_weights(
        tmp_path, tiny_backbone_path):
    from stllava_med.train_sft import run_train_sft

    out_dir = tmp_path / "sft"
    args = _stage("sft", out_dir, tmp_path / "hydra-1", SFT)
    status, output, killed = _preempt(args, _slurm_env(tmp_path), re.compile(r"Step (6|9)/30 "))
    assert not killed and status == 138, output[-3000:]
    match = STOPPED.search(output)
    assert match and match.group(1) == "SIGUSR1", output[-3000:]
    step, checkpoint = int(match.group(2)), Path(match.group(5))
    assert checkpoint == out_dir / "checkpoints" / "last.ckpt" and 6 <= step < 30
    assert _checkpoint_step(checkpoint) == step
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]
    assert not list(out_dir.glob("hpc_ckpt_*")) and not (out_dir / "metrics.json").exists()
    assert not list(checkpoint.parent.glob(".*.tmp"))

    log = _rerun(_stage("sft", out_dir, tmp_path / "hydra-2", SFT), _slurm_env(tmp_path, restart=1))
    assert f"resuming from {checkpoint}" in log and "Restored all states" in log
    assert json.loads((out_dir / "metrics.json").read_text())["global_step"] == 30
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]  # the rerun finished: no second requeue
    straight = run_train_sft(compose("sft", _stage("sft", tmp_path / "straight", tmp_path / "hydra-3", SFT)[1:-1]))
    assert straight["global_step"] == 30
    _assert_same_adapter(out_dir, tmp_path / "straight")


def _dpo(tmp_path: Path, extra: list[str]) -> list[str]:
    return ["trainer.max_steps=12", "data.progress=false", f"data.scan_cache_dir={tmp_path}/scan", *extra]


def test_dpo_preempted_during_the_reference_prepass_keeps_the_cache_and_requeues_without_a_checkpoint(
        tmp_path, tiny_backbone_path):
    from stllava_med.dpo.reference import CacheClaim
    from stllava_med.train_dpo import run_train_dpo

    out_dir, cache = tmp_path / "dpo", tmp_path / "reference"
    extra = _dpo(tmp_path, ["dpo.reference=precomputed", f"dpo.reference_cache_dir={cache}", "data.num_workers=0",
                            "dpo.precompute_batch_size=4"])
    status, output, killed = _preempt(_stage("dpo", out_dir, tmp_path / "hydra-1", extra), _slurm_env(tmp_path),
                                      re.compile(r"precomputing reference log-probs \(\d+ missing\)"))
    assert not killed and status == 138, output[-3000:]
    match = STOPPED.search(output)
    assert match and match.group(1) == "SIGUSR1" and match.group(2) is None, output[-3000:]
    assert "before the first training step" in match.group(3) and match.group(4).startswith("no checkpoint")
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]
    assert not (out_dir / "checkpoints").exists() or not list((out_dir / "checkpoints").iterdir())
    missing = int(re.search(r"precomputing reference log-probs \((\d+) missing\)", output).group(1))
    written = list(cache.glob("*/logps.jsonl"))
    kept = [json.loads(line) for line in written[0].read_text().splitlines()] if written else []
    assert len(kept) < missing and len({row["id"] for row in kept}) == len(kept)
    # released on the way out, or (the signal came while claiming or releasing) dead: the next reader reclaims it
    assert all(CacheClaim.live_ids(path) is None for path in cache.glob("*/claims/*.json"))

    log = _rerun(_stage("dpo", out_dir, tmp_path / "hydra-2", extra), _slurm_env(tmp_path, restart=1))
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["global_step"] == 12 and "resuming from" not in log
    assert summary["reference_cache"]["computed_now"] == missing - len(kept)  # nothing computed twice
    (logps,) = cache.glob("*/logps.jsonl")
    assert len(logps.read_text().splitlines()) == missing
    straight_extra = [e if not e.startswith("dpo.reference_cache_dir=") else
                      f"dpo.reference_cache_dir={tmp_path}/reference-straight" for e in extra]
    run_train_dpo(compose("dpo", _stage("dpo", tmp_path / "straight", tmp_path / "hydra-3", straight_extra)[1:-1]))
    _assert_same_adapter(out_dir, tmp_path / "straight")


def test_dpo_preempted_mid_training_with_workers_requeues_with_a_checkpoint_and_resumes_to_the_same_weights(
        tmp_path, tiny_backbone_path):
    """The adapter-off reference (its pass turns requires_grad off every step) and DataLoader workers, the
    signal to the whole process group as SLURM sends it."""
    from stllava_med.train_dpo import run_train_dpo

    out_dir = tmp_path / "dpo"
    extra = _dpo(tmp_path, ["dpo.reference=adapter_off", "data.num_workers=2"])
    status, output, killed = _preempt(_stage("dpo", out_dir, tmp_path / "hydra-1", extra), _slurm_env(tmp_path),
                                      re.compile(r"Step [3-5]/12 "), group=True)
    assert not killed and status == 138, output[-3000:]
    match = STOPPED.search(output)
    assert match and match.group(1) == "SIGUSR1", output[-3000:]
    step, checkpoint = int(match.group(2)), Path(match.group(5))
    assert 3 <= step < 12 and _checkpoint_step(checkpoint) == step
    assert "DataLoader worker" not in output
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]

    log = _rerun(_stage("dpo", out_dir, tmp_path / "hydra-2", extra), _slurm_env(tmp_path, restart=1))
    assert f"resuming from {checkpoint}" in log and "Restored all states" in log
    assert "lacks" not in log and "not resuming" not in log
    assert json.loads((out_dir / "metrics.json").read_text())["global_step"] == 12
    run_train_dpo(compose("dpo", _stage("dpo", tmp_path / "straight", tmp_path / "hydra-3", extra)[1:-1]))
    _assert_same_adapter(out_dir, tmp_path / "straight")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_sft_under_submitit_checkpoints_before_submitits_requeue_and_the_requeued_job_resumes(
        tmp_path, tiny_backbone_path):
    """hydra/launcher=submitit_local: submitit's preemption signal (SIGUSR2) to the job's task. The stage
    checkpoints at the next step, then hands over to submitit's handler, which dumps the job's resubmission and
    requeues it (locally: exits with submitit's requeue status and its controller starts the task again); the
    requeued job resumes from that checkpoint and ends with the uninterrupted run's weights."""
    from stllava_med.train_sft import run_train_sft

    out_dir, sweep = tmp_path / "sft", tmp_path / "sweep"
    env = {k: v for k, v in _slurm_env(tmp_path).items() if not k.startswith("SLURM_")}
    args = [sys.executable, "-m", "stllava_med.train_sft", "-m", "hydra/launcher=submitit_local", *SFT,
            "logger=none", "objective=null", "print_summary=false", "num_threads=1", "export.merged=false",
            f"out_dir={out_dir}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline, signalled = time.monotonic() + 600, None
    try:
        while signalled is None and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.5)
            logs = list(sweep.glob(".submitit/*/*_0_log.*"))
            if not any(re.search(r"Step (6|9)/30 ", p.read_text(errors="replace")) for p in logs):
                continue
            controller = int(logs[0].parent.name)
            tasks = _children(controller)
            assert len(tasks) == 1, tasks
            os.kill(tasks[0], signal.SIGUSR2)
            signalled = tasks[0]
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    logs = "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_0_log.*")))
    assert signalled is not None and proc.returncode == 0, (out + logs)[-4000:]
    match = STOPPED.search(logs)
    assert match and match.group(1) == "SIGUSR2", logs[-4000:]
    step, checkpoint = int(match.group(2)), Path(match.group(5))
    assert "handing over to submitit's requeue handler" in logs and "Requeued job" in logs
    assert f"resuming from {checkpoint}" in logs and "Restored all states" in logs
    assert 6 <= step < 30 and json.loads((out_dir / "metrics.json").read_text())["global_step"] == 30
    straight = run_train_sft(compose("sft", [*SFT, "logger=none", "objective=null", "print_summary=false",
                                             "num_threads=1", "export.merged=false",
                                             f"out_dir={tmp_path / 'straight'}"]))
    assert straight["global_step"] == 30
    _assert_same_adapter(out_dir, tmp_path / "straight")
