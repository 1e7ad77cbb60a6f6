"""``benchmarks/bench_sweep.py --dry-run``: the sweep benchmark's plumbing (8 pairs, the β × fraction grid with
TRL and with ours, every job in the test's process tree) runs, both sides start from the same LoRA
initialisation, our later jobs reuse the caches, the per-step losses agree, and the FLOP count runs. Not a timing test: the
figures it prints are not checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_the_sweep_benchmark_dry_run():
    pytest.importorskip("trl", reason="`trl` is not installed (pip install -e '.[bench]')")
    pytest.importorskip("datasets", reason="`datasets` is not installed (pip install -e '.[bench]')")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sweep.py"), "--dry-run", "--count-flops"],
                          capture_output=True, text=True, cwd=REPO, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = proc.stdout
    assert "identical LoRA initialisation for all jobs: yes" in out
    # the first job fills the caches; the two later jobs of the same fraction compute nothing
    assert re.search(r"ours β=0\.5 fraction=0\.25: .*vision features computed 0, reference log-probs 0", out)
    assert re.search(r"ours β=0\.5 fraction=1\.0: .*vision features computed 0, reference log-probs 0", out)
    gaps = [float(g) for g in re.findall(r"\| ([0-9.]+e[-+][0-9]+) \|\n", out)]
    assert len(gaps) == 4 and max(gaps) < 1e-4, out  # the same losses as TRL, step by step
    assert re.search(r"SWEEP [0-9.]+x TRL's total sweep time", out)
    # the FLOP count: TRL runs two full sequences per pair for the policy and again for its reference, the vision
    # tower four times; ours the prefix once, and the later jobs neither tower nor reference: well over 2x
    flop_ratio = float(re.search(r"SWEEP FLOPS TRL's sweep counts ([0-9.]+)x our FLOPs", out).group(1))
    assert flop_ratio > 2.0, out
