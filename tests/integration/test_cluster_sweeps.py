"""Cluster-grade sweeps: four parallel submitit_local DPO jobs fill one cold reference cache, each pair once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from dpo_support import sample_pairs, write_shard

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src"),
       "OMP_NUM_THREADS": "1"}


def test_four_parallel_sweep_jobs_write_each_reference_entry_once(tmp_path, tiny_backbone_path):
    """Before the claim protocol the same sweep on 625 pairs wrote 2,472 lines (every job computed every pair)."""
    shard = write_shard(tmp_path / "pairs.jsonl", sample_pairs(200, stride=3))
    command = [sys.executable, "-m", "stllava_med.train_dpo", "-m", "hydra/launcher=submitit_local",
               "dpo.beta=0.1,0.2,0.3,0.4", "dpo.reference=precomputed", f"data.path={shard}",
               f"dpo.reference_cache_dir={tmp_path}/reference", f"data.scan_cache_dir={tmp_path}/scan",
               "out_dir=${hydra:runtime.output_dir}/run", f"hydra.sweep.dir={tmp_path}/sweep",
               "trainer.max_steps=2", "data.batch_size=4", "data.val_fraction=0.1", "num_threads=1",
               "data.num_workers=0", "trainer.enable_progress_bar=false", "data.progress=false",
               "export.merged=false"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cache,) = (tmp_path / "reference").glob("*/logps.jsonl")
    ids = [json.loads(line)["id"] for line in cache.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 200
    assert not list(cache.parent.glob("claims/*.json"))  # every claim was released
    runs = sorted((tmp_path / "sweep").glob("*/run/metrics.json"))
    assert len(runs) == 4
    for run in runs:
        summary = json.loads(run.read_text())
        assert summary["pairs"]["train"] + summary["pairs"]["val"] == 200


SLURM_SCRIPTS = sorted((REPO_ROOT / "scripts" / "slurm").glob("*"))


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_slurm_scripts_parse_and_log_where_a_folder_exists(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert ".venv/bin/python" not in text  # the interpreter comes from the environment
    for line in text.splitlines():
        if line.startswith("#SBATCH --output="):  # opened by SLURM before the script runs: no folder to create
            assert "/" not in line.split("=", 1)[1], line
        if line.startswith("#SBATCH"):
            assert "#" not in line[len("#SBATCH"):], line  # no trailing comments on directives


def test_submit_wrapper_makes_the_log_folder_first(tmp_path):
    stub = tmp_path / "sbatch"
    stub.write_text(f'#!/bin/bash\n[ -d logs/slurm ] && echo "$PWD $*" > {tmp_path}/args\n')
    stub.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "slurm" / "submit.sh"), "--nodes=2",
                           "scripts/slurm/train_dpo.sbatch", "dpo.beta=0.1"], cwd=tmp_path,
                          env={**os.environ, "SBATCH": str(stub)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().split() == [
        str(REPO_ROOT), "--output=logs/slurm/%x-%j.out", "--nodes=2", "scripts/slurm/train_dpo.sbatch", "dpo.beta=0.1"]


def _simulated_slurm(tmp_path):
    """``srun`` / ``scontrol`` stubs and an environment's ``python`` on PATH (no .venv path), SLURM's variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = 'echo "$@" > "$STUB_LOG_DIR/srun.args"; while [[ "$1" == --* ]]; do shift; done; exec "$@"'
    for name, body in {"srun": srun, "scontrol": 'echo "scontrol $*" >> "$SLURM_SUBMIT_DIR/scontrol.log"',
                       "python": f'exec {sys.executable} "$@"'}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_") and k != "PYTHON"}
    env.update({"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "stllava-dpo",
                "SLURM_SUBMIT_DIR": str(REPO_ROOT), "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
                "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "node001", "SLURM_CPUS_PER_TASK": "1",
                "STUB_LOG_DIR": str(tmp_path)})
    return env


def test_dpo_sbatch_runs_a_tiny_stage_with_plain_progress_lines(tmp_path, tiny_backbone_path):
    """The script as plain bash under simulated SLURM, its stdout a file as SLURM's .out: a 20-step DPO run ends,
    and the non-terminal stdout got plain progress lines (step/total, rate, ETA) while it ran."""
    shard = write_shard(tmp_path / "pairs.jsonl", sample_pairs(24, stride=7))
    out = tmp_path / "run"
    log_file = tmp_path / "stllava-dpo-4242.out"
    with open(log_file, "w") as fh:
        proc = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "slurm" / "train_dpo.sbatch"), "trainer=cpu", f"data.path={shard}",
             f"out_dir={out}", f"hydra.run.dir={tmp_path}/hydra", f"data.scan_cache_dir={tmp_path}/scan",
             "trainer.max_steps=20", "trainer.max_epochs=-1", "data.batch_size=2", "data.val_fraction=0.2",
             "data.num_workers=0", "num_threads=1", "data.progress=false", "export.merged=false"],
            cwd=tmp_path, env=_simulated_slurm(tmp_path), stdout=fh, stderr=subprocess.STDOUT, timeout=600)
    text = log_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 20
    # a failing rank ends the others (not a barrier wait until the collective timeout)
    assert (tmp_path / "srun.args").read_text().split()[:3] == ["--kill-on-bad-exit=1", "python", "-m"]
    progress = [line for line in text.splitlines() if "stllava_med.progress" in line]
    assert len(progress) >= 5, text[-3000:]
    assert all(" steps/s · " in line and "ETA " in line for line in progress[:-1]), progress
    assert "Step 20/20 (100%)" in progress[-1]
    steps = [int(line.split("Step ", 1)[1].split("/", 1)[0]) for line in progress]
    assert steps == sorted(set(steps))  # one line per step reported, in order


def test_pipeline_sweep_jobs_keep_their_own_outputs_and_a_combined_table(tmp_path, tiny_backbone_path):
    """Two parallel pipeline jobs (β 0.1 / 0.5) sharing a root: each writes its table / plot / summary under
    ``<root>/jobs/<name>-<hash>``; the root's table.md lists the shared stage-1 row once and both DPO models,
    whichever job ended last."""
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "stllava_med.pipeline", "-m", "hydra/launcher=submitit_local",
                           "experiment=smoke", "stages.dpo.dpo.beta=0.1,0.5", f"out_dir={root}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((root / "jobs").iterdir())
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "table.md").read_text().count("| vqa_rad_sample |") == 2
        assert (job / "comparison.png").stat().st_size > 0 and (job / "pipeline_config.yaml").is_file()
    combined = json.loads((root / "pipeline_summary.json").read_text())
    assert len(combined["jobs"]) == 2
    assert set(combined["evaluations"]) == {"stage1", "dpo_round1 [stages.dpo.dpo.beta=0.1]",
                                            "dpo_round1 [stages.dpo.dpo.beta=0.5]"}
    table = (root / "table.md").read_text()
    assert table.count("| stage1 | vqa_rad_sample |") == 1
    for beta in ("0.1", "0.5"):
        row = next(line for line in table.splitlines() if f"[stages.dpo.dpo.beta={beta}] | vqa_rad_sample" in line)
        assert not row.rstrip().endswith("| — |")  # the DPO row carries its own reward accuracy
    assert (root / "comparison.png").stat().st_size > 0
