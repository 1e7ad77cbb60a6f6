"""Honest endings of the training stages: SIGTERM (what SLURM and most schedulers send) and SIGUSR1 to a real
``train_sft`` / ``train_dpo`` / ``pipeline`` process on the tiny backbone. The stage writes ``last.ckpt`` at the
next optimizer step, exports nothing, writes neither metrics.json nor DONE.json, exits 128 + the signal (143 /
138) with a line naming the step and the checkpoint, and the same command resumes there and finishes.

Each run waits for the line the stage logs once its handlers are installed, then signals the process by its
pid (SFT, as Kubernetes and ``kill`` do) or its whole process group (DPO with DataLoader workers, as SLURM
signals every process of a job)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, compose

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
READY = "then stop"  # StopOnSignal's INFO line: the handlers are in place
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+)(?: of \d+)?; checkpoint (\S+); rerun the same command")


def _run_until(args: list[str], sig: signal.Signals, *, ready_count: int = 1, group: bool = False,
               timeout: float = 300) -> tuple[int, str]:
    """Run ``python -m <args>``, send ``sig`` when the ``ready_count``-th READY line appears; (status, output)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if READY in line:
                seen += 1
                if seen == ready_count:
                    if group:
                        os.killpg(proc.pid, sig)
                    else:
                        proc.send_signal(sig)
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert seen >= ready_count, "".join(lines)[-3000:]
    return proc.returncode, "".join(lines)


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _stopped(output: str, sig: str) -> tuple[int, Path]:
    match = STOPPED.search(output)
    assert match, output[-3000:]
    assert match.group(1) == sig
    return int(match.group(2)), Path(match.group(3))


def _checkpoint_step(path: Path) -> int:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"] and checkpoint["loops"]  # resumable
    return int(checkpoint["global_step"])


def _sft_args(out_dir: Path, hydra_dir: Path) -> list[str]:
    return ["stllava_med.train_sft", "experiment=sft_tiny", "logger=none", "trainer.max_steps=40",
            "trainer.enable_progress_bar=false", "data.val_fraction=0", "objective=null", "print_summary=false",
            f"out_dir={out_dir}", f"hydra.run.dir={hydra_dir}"]


def test_sigterm_stops_sft_at_a_step_with_a_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, tiny_backbone_path):
    from stllava_med.train_sft import run_train_sft

    out_dir = tmp_path / "sft"
    status, output = _run_until(_sft_args(out_dir, tmp_path / "hydra-1"), signal.SIGTERM)
    assert status == 143, output[-3000:]
    step, checkpoint = _stopped(output, "SIGTERM")
    assert checkpoint == out_dir / "checkpoints" / "last.ckpt"
    assert 1 <= step < 40 and _checkpoint_step(checkpoint) == step
    assert not (out_dir / "metrics.json").exists() and not (out_dir / "merged").exists()
    assert not (out_dir / "adapter").exists() and not (tmp_path / "hydra-1" / "run_info.json").exists()
    assert not list(checkpoint.parent.glob(".*.tmp"))  # the atomic write left no temporary file

    resumed = _python(*_sft_args(out_dir, tmp_path / "hydra-2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stderr + resumed.stdout
    straight = run_train_sft(compose("sft", _sft_args(tmp_path / "straight", tmp_path / "hydra-3")[1:-1]))
    assert straight["global_step"] == 40
    ours = load_file(out_dir / "merged" / "model.safetensors")
    theirs = load_file(tmp_path / "straight" / "merged" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def _dpo_args(out_dir: Path, hydra_dir: Path) -> list[str]:
    return ["stllava_med.train_dpo", "logger=none", "trainer.max_steps=12", "trainer.enable_progress_bar=false",
            "data.progress=false", "data.num_workers=2", "objective=null", "print_summary=false", "num_threads=1",
            f"out_dir={out_dir}", f"hydra.run.dir={hydra_dir}"]


def test_sigusr1_to_the_process_group_stops_dpo_with_workers_and_the_rerun_resumes_there(
        tmp_path, tiny_backbone_path):
    out_dir = tmp_path / "dpo"
    status, output = _run_until(_dpo_args(out_dir, tmp_path / "hydra-1"), signal.SIGUSR1, group=True)
    assert status == 138, output[-3000:]
    step, checkpoint = _stopped(output, "SIGUSR1")
    assert 1 <= step < 12 and _checkpoint_step(checkpoint) == step
    assert "DataLoader worker" not in output  # the workers got the signal too and kept serving batches
    assert not (out_dir / "metrics.json").exists() and not (out_dir / "merged").exists()

    resumed = _python(*_dpo_args(out_dir, tmp_path / "hydra-2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert f"resuming from {checkpoint}" in log and "Restored all states" in log
    metrics = (out_dir / "metrics.json").read_text()
    assert '"global_step": 12' in metrics and (out_dir / "merged" / "config.json").is_file()


def test_sigterm_during_the_pipelines_dpo_exits_143_without_done_and_the_rerun_resumes_it(
        tmp_path, tiny_backbone_path):
    root = tmp_path / "pipe"
    args = ["stllava_med.pipeline", "experiment=smoke", f"out_dir={root}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    # READY lines: the SFT trainer's, then the DPO trainer's (round 1)
    status, output = _run_until(args, signal.SIGTERM, ready_count=2)
    assert status == 143, output[-3000:]
    assert "round1/dpo: running in" in output
    step, checkpoint = _stopped(output, "SIGTERM")
    dpo_dir = checkpoint.parent.parent
    assert dpo_dir.parent.name == "round1" and dpo_dir.name.startswith("dpo-")
    assert _checkpoint_step(checkpoint) == step and step < 6
    assert not (dpo_dir / "DONE.json").exists() and not (dpo_dir / "metrics.json").exists()
    assert (root / "round0").is_dir() and not (root / "pipeline_summary.json").exists()
    assert not list((root / "eval").glob("evaluate-dpo_round1-*/DONE.json"))

    again = _python(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr + again.stdout
    for label in ("sft", "round1/generate", "round1/judge"):
        assert f"{label}: reusing the finished stage" in log
    assert f"resuming from {checkpoint}" in log
    assert (dpo_dir / "DONE.json").is_file() and '"global_step": 6' in (dpo_dir / "metrics.json").read_text()
    assert (root / "pipeline_summary.json").is_file()
