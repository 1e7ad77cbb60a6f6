"""Issue 6: the pipeline reuses finished stages, a β change reruns only DPO and its evaluation, a 2x2 sweep
runs under submitit_local and is reported, a DPO job killed mid-run resumes, and the demo completes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, compose

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src"),
       "OMP_NUM_THREADS": "1"}


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_rerun_reuses_finished_stages_and_beta_reruns_only_dpo_and_eval(tmp_path, tiny_backbone_path):
    from stllava_med.pipeline import run_pipeline

    root = tmp_path / "pipe"
    first = run_pipeline(compose("pipeline", ["experiment=smoke", f"out_dir={root}"]))
    expected = {"sft", "evaluate/stage1", "round1/generate", "round1/judge", "round1/dpo", "evaluate/dpo_round1"}
    assert set(first["stages"]) == expected and not any(s["reused"] for s in first["stages"].values())
    assert (root / "table.md").read_text().count("| vqa_rad_sample |") == 2
    assert (root / "comparison.png").stat().st_size > 0

    again = run_pipeline(compose("pipeline", ["experiment=smoke", f"out_dir={root}"]))
    assert all(s["reused"] for s in again["stages"].values())
    assert again["evaluations"] == first["evaluations"]

    beta = run_pipeline(compose("pipeline", ["experiment=smoke", f"out_dir={root}", "stages.dpo.dpo.beta=0.3"]))
    rerun = {k for k, s in beta["stages"].items() if not s["reused"]}
    assert rerun == {"round1/dpo", "evaluate/dpo_round1"}
    assert beta["stages"]["round1/dpo"]["dir"] != first["stages"]["round1/dpo"]["dir"]
    assert beta["stages"]["round1/judge"]["dir"] == first["stages"]["round1/judge"]["dir"]


def test_two_by_two_sweep_with_submitit_local_is_reported(tmp_path, tiny_backbone_path):
    sweep = tmp_path / "multirun"
    proc = _python("stllava_med.pipeline", "-m", "hydra/launcher=submitit_local", "experiment=smoke",
                   "stages.dpo.dpo.beta=0.1,0.5", "stages.dpo.data.fraction=0.5,1.0", f"out_dir={tmp_path / 'root'}",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _python("stllava_med.report", str(sweep))
    assert report.returncode == 0, report.stderr
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    assert (summary["jobs"], summary["ok"]) == (4, 4)
    rows = (sweep / "report" / "results.csv").read_text().splitlines()
    assert len(rows) == 5  # header + 4 jobs
    header = rows[0].split(",")
    assert {"stages.dpo.dpo.beta", "stages.dpo.data.fraction"} <= set(header)
    combos = {(r.split(",")[header.index("stages.dpo.dpo.beta")], r.split(",")[header.index("stages.dpo.data.fraction")])
              for r in rows[1:]}
    assert combos == {("0.1", "0.5"), ("0.1", "1.0"), ("0.5", "0.5"), ("0.5", "1.0")}
    plots = [Path(p) for p in summary["plots"]]
    assert any(p.name.endswith("open_recall_vs_fraction.png") for p in plots)
    assert any(p.name == "reward_accuracy.png" for p in plots)
    assert all(p.stat().st_size > 1000 for p in plots)
    # the shared stages ran once: one SFT, one generation, one judge directory for four jobs
    assert len(list((tmp_path / "root" / "round0").glob("sft-*"))) == 1
    assert len(list((tmp_path / "root" / "round1").glob("judge-*"))) == 1
    assert len(list((tmp_path / "root" / "round1").glob("dpo-*"))) == 4


def test_missing_job_is_marked_not_dropped(tmp_path):
    from stllava_med.report import build_report

    for job, info in ((0, {"stage": "dpo", "out_dir": str(tmp_path), "metrics": {"val": {"loss": 0.5}}}), (1, None)):
        job_dir = tmp_path / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text(f"- dpo.beta={0.1 * (job + 1):.1f}\n")
        if info:
            (job_dir / "run_info.json").write_text(json.dumps(info))
        else:
            (job_dir / "train_dpo.log").write_text("Traceback (most recent call last):\nRuntimeError: CUDA OOM\n")
    result = build_report(tmp_path)
    assert [(r["job"], r["status"]) for r in result["rows"]] == [(0, "ok"), (1, "failed")]
    assert "RuntimeError: CUDA OOM" in result["rows"][1]["reason"]
    assert "| 1 | failed |" in result["markdown"]


def _last_step(out_dir: Path) -> int:
    path = out_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # being written
        return -1


def test_dpo_killed_mid_run_resumes_in_the_same_run_dir(tmp_path, tiny_backbone_path):
    out_dir = tmp_path / "dpo"
    args = ["stllava_med.train_dpo", f"out_dir={out_dir}", "trainer.max_steps=40", "trainer.max_epochs=-1",
            "checkpoint.every_n_steps=2", "data.batch_size=2", "data.num_workers=0", "logger=csv",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "num_threads=1"]
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    killed_after = -1
    while time.time() < deadline and proc.poll() is None:
        killed_after = _last_step(out_dir)
        if killed_after >= 4:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait(timeout=30)
    assert 4 <= killed_after < 40, f"the run was not caught mid-way (last checkpoint step {killed_after})"
    assert not (out_dir / "metrics.json").exists()

    resumed = _python(*args, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # from the newest complete checkpoint of this run: last.ckpt, or a step checkpoint written after it when the
    # kill came between the two saves of a step (resume_checkpoint picks the highest step)
    assert re.search(rf"dpo: resuming from {re.escape(str(out_dir / 'checkpoints'))}/\S+\.ckpt",
                     resumed.stdout + resumed.stderr), (resumed.stdout + resumed.stderr)[-3000:]
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["global_step"] == 40
    steps = [int(float(line.split(",")[header_index])) for header_index, lines in [_step_column(out_dir)]
             for line in lines]
    # the resumed process logged only the steps after the checkpoint: the count continued, it did not restart
    assert min(steps) >= _kill_floor(killed_after) and max(steps) >= 38
    assert len(list(out_dir.rglob("metrics.csv"))) == 2  # the killed run's log is kept beside it


def _step_column(out_dir: Path) -> tuple[int, list[str]]:
    metrics = max(out_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)  # the resumed process's log
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    header = lines[0].split(",")
    return header.index("step"), lines[1:]


def _kill_floor(killed_after: int) -> int:
    return killed_after - 2  # the checkpoint read may lag the newest one by one save interval


@pytest.mark.slow
def test_make_demo_pipeline_completes(tmp_path, tiny_backbone_path):
    out = tmp_path / "demo"
    proc = _python("stllava_med.pipeline", "experiment=demo", f"out_dir={out}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "| stage1 | vqa_rad_sample |" in table and "| dpo_round1 | vqa_rad_sample |" in table
    assert "| stage1 | vqa_rad_sample |" in proc.stdout
    summary = json.loads((out / "pipeline_summary.json").read_text())
    stage1 = summary["evaluations"]["stage1"]["vqa_rad_sample"]
    dpo = summary["evaluations"]["dpo_round1"]["vqa_rad_sample"]
    assert stage1["n_open"] + stage1["n_closed"] == 151 == dpo["n_open"] + dpo["n_closed"]
    # DPO learned its pairs (last-epoch means over 264-295 training pairs; at the start the policy is the reference,
    # so margin and accuracy are exactly 0). The pairs come from sampled answers, so they differ between CPUs;
    # measured on a 2-core runner, seeds 0, 1, 2 (different pair sets) as a stand-in for that: accuracy
    # 0.91, 0.90, 0.91, mean reward margin 1.16, 1.22, 1.28. Both thresholds leave a wide gap.
    train = summary["dpo"]["round1"]["train"]
    assert train["rewards/margins"] > 0.4 and train["rewards/accuracies"] > 0.6, train
    assert (out / "comparison.png").stat().st_size > 1000


def test_pipeline_under_two_process_ddp(tmp_path, tiny_backbone_path):
    """trainer=ddp for SFT and DPO (2 CPU processes, gloo): Lightning re-runs the pipeline command in rank 1; rank 0
    alone decides stage reuse and holds the stage locks, rank 1 joins the two training stages and waits for the
    others. Every stage runs once, nothing deadlocks, rank 0 alone writes and reports."""
    ddp = ['"trainer.accelerator=cpu"', '"trainer.devices=2"', '"trainer.strategy=ddp"',
           '"+trainer.use_distributed_sampler=false"']
    root = tmp_path / "pipe"
    proc = _python("stllava_med.pipeline", "experiment=smoke", f"out_dir={root}", f"hydra.run.dir={tmp_path / 'hydra'}",
                   f'stages.sft.overrides=["experiment=sft_tiny","logger=none","trainer.max_steps=12",{",".join(ddp)}]',
                   f'stages.dpo.overrides=["logger=csv","trainer.max_steps=6",{",".join(ddp)}]', timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert log.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # rank 1 joined SFT and DPO
    assert proc.stdout.count("STLLaVA-Med pipeline") == 1  # rank 0 reports
    summary = json.loads((root / "pipeline_summary.json").read_text())
    assert not any(s["reused"] for s in summary["stages"].values())
    for group, pattern in (("round0", "sft-*"), ("round1", "generate-*"), ("round1", "judge-*"), ("round1", "dpo-*")):
        assert len(list((root / group).glob(pattern))) == 1, (group, pattern)
    assert len(list((root / "eval").glob("evaluate-*"))) == 2
    dpo = summary["dpo"]["round1"]
    assert dpo["global_step"] == 6 and "loss" in dpo["val"]
    assert (Path(dpo["export"]["merged"]) / "config.json").is_file()
