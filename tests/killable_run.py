"""A training stage run in its own process, which can be killed with SIGKILL right after a given optimizer step:
no exception handling, no checkpoint on the way out, as when a node dies. The resume tests of both training
stages rerun the same command and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent

_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from lightning.pytorch import Callback
from conftest import compose
stage = sys.argv[2]
run = getattr(__import__(f"stllava_med.train_{stage}", fromlist=["run"]), f"run_train_{stage}")

class Record(Callback):
    # one line per trained batch, written before the next one starts: what this process trained on
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(os.environ["BATCH_LOG"], "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                 "batch": batch_idx, "ids": list(batch.get("uids") or batch.get("ids"))}) + "\\n")
        if trainer.global_step == int(os.environ.get("KILL_AT_STEP", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)  # before this step's checkpoint is written

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if f"{trainer.current_epoch},{batch_idx}" == os.environ.get("KILL_AT_BATCH"):
            os.kill(os.getpid(), signal.SIGKILL)  # after everything the previous batch's end wrote

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        # SIGTERM_IN_FINAL_VALIDATION: a real SIGTERM as the final validation (after fit) ends its last batch
        last = batch_idx == trainer.num_val_batches[dataloader_idx] - 1
        if os.environ.get("SIGTERM_IN_FINAL_VALIDATION") and trainer.state.fn == "validate" and last:
            os.kill(os.getpid(), signal.SIGTERM)

run(compose(stage, json.loads(sys.argv[3])), callbacks=[Record()])
"""


def run_stage(stage: str, overrides: list[str], batch_log: Path, kill_at: int | tuple[int, int] | None = None) -> int:
    """:func:`run_stage_process`'s return code."""
    return run_stage_process(stage, overrides, batch_log, kill_at).returncode


def run_stage_process(stage: str, overrides: list[str], batch_log: Path, kill_at: int | tuple[int, int] | None = None,
                      *, sigterm_in_final_validation: bool = False) -> subprocess.CompletedProcess:
    """Run ``train_<stage>`` with ``overrides`` (appending a line per trained batch to ``batch_log``), killed
    with SIGKILL at the end of the first batch after which ``global_step == kill_at``, or with ``kill_at=(epoch,
    batch_idx)`` as that batch starts, or with SIGTERM as the final validation's last batch ends; the finished
    process. A run that is not to be killed must succeed."""
    env = {**os.environ, "BATCH_LOG": str(batch_log), "OMP_NUM_THREADS": "1"}
    for name in ("KILL_AT_STEP", "KILL_AT_BATCH", "SIGTERM_IN_FINAL_VALIDATION"):
        env.pop(name, None)
    if sigterm_in_final_validation:
        env["SIGTERM_IN_FINAL_VALIDATION"] = "1"
    if isinstance(kill_at, tuple):
        env["KILL_AT_BATCH"] = f"{kill_at[0]},{kill_at[1]}"
    elif kill_at is not None:
        env["KILL_AT_STEP"] = str(kill_at)
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(TESTS_DIR), stage, json.dumps(overrides)], env=env,
                          capture_output=True, text=True, timeout=600)
    if kill_at is None and not sigterm_in_final_validation and done.returncode != 0:
        raise AssertionError(f"train_{stage} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def read_batches(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def attempts(trained: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The batch log of successive processes split per process (where the step count goes back)."""
    starts = [0] + [i for i in range(1, len(trained))
                    if (trained[i]["epoch"], trained[i]["batch"]) <= (trained[i - 1]["epoch"], trained[i - 1]["batch"])]
    return [trained[begin:end] for begin, end in zip(starts, starts[1:] + [len(trained)])]
