"""benchmarks/device_check.py --dry-run: every part of the GPU check runs on the tiny backbone on the CPU.

The GPU run itself (a LLaVA-1.5-7B-shaped model, benchmarks/device_check.sh) needs a CUDA device; this keeps its
code working without one. TRL's side of the DPO part is skipped, with the reason in the JSON, when trl is absent.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_device_check_dry_run(repo_root, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "device_check.py"), "--dry-run",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    parts = figures["parts"]
    assert set(parts) == {"dpo", "logps", "sampling", "sft", "qlora"}
    assert proc.returncode == 0 and figures["passed"], json.dumps(parts, indent=1)[-4000:]
    dpo = parts["dpo"]
    assert dpo["ours"]["tokens_per_s"] > 0 and len(dpo["ours"]["losses"]) == dpo["ours"]["steps"] == 4
    if importlib.util.find_spec("trl") is None:
        assert "not installed" in dpo["trl"]["skipped"]
    else:  # same LoRA initialisation, order and schedule: the fp32 losses agree
        assert dpo["same_lora_init"] and dpo["max_step_loss_gap"] < 1e-3
    assert parts["logps"]["relative"] <= parts["logps"]["tolerance"]
    assert parts["sampling"]["fast_equals_reference"] and parts["sampling"]["decoder"] == "shared"
    assert parts["sft"]["lora_layers_with_gradients"] == parts["sft"]["lora_layers"] > 0
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert parts["qlora"]["linear4bit_modules"] > 0
        assert parts["qlora"]["lora_layers_with_gradients"] == parts["qlora"]["lora_layers"] > 0
