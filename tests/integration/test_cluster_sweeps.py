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
