"""A DPO run killed with SIGKILL (mid-epoch 0, one micro-batch into a resumed run, at the start of epoch 1,
mid-epoch 1) under trainer.max_epochs, with gradient accumulation, resumes by rerunning the same command: on
exactly the micro-batches an uninterrupted run trained on, to bit-identical weights.

With max_epochs set, the schedule's ``estimated_stepping_batches`` builds the train loader before Lightning
restores its loops, so the stream's position travels in the datamodule's checkpoint entry; the accumulation
windows the loader annotates (``window_pairs``) must line up with Lightning's after the resume."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from dpo_support import one_torch_thread, sample_pairs, write_shard  # noqa: F401  (autouse fixture)
from killable_run import attempts, read_batches, run_stage, run_stage_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # six processes, about a minute

PAIRS, BATCH, ACCUMULATE = 16, 2, 2   # 8 micro-batches, 4 optimizer steps an epoch


def test_sigkill_resumes_exactly_under_max_epochs_with_accumulation(tmp_path, tiny_backbone_path):
    shard = write_shard(tmp_path / "pairs.jsonl", sample_pairs(PAIRS, stride=29))

    def overrides(out_dir):
        return [f"data.path={shard}", f"out_dir={out_dir}", f"data.batch_size={BATCH}", "data.num_workers=0",
                "data.val_fraction=0", "data.progress=false", f"data.scan_cache_dir={tmp_path}/scan",
                f"dpo.reference_cache_dir={tmp_path}/reference", "trainer.enable_progress_bar=false",
                "trainer.max_steps=-1", "trainer.max_epochs=2", f"trainer.accumulate_grad_batches={ACCUMULATE}",
                "checkpoint.every_n_steps=1", "optim.lr=2e-3", "optim.projector_lr=2e-3", "export.merged=false",
                "logger=none", "num_threads=1"]

    cfg = compose("dpo", overrides(tmp_path / "x"))
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches) == (2, -1, ACCUMULATE)

    straight = tmp_path / "straight"
    run_stage("dpo", overrides(straight), tmp_path / "straight.jsonl")
    reference = read_batches(tmp_path / "straight.jsonl")
    per_epoch = PAIRS // BATCH
    steps = 2 * per_epoch // ACCUMULATE
    assert [(b["epoch"], b["batch"]) for b in reference] == [(e, i) for e in range(2) for i in range(per_epoch)]
    assert reference[-1]["step"] == steps
    # a fresh order each epoch, so that restarting an epoch from its first batch could not go unnoticed
    assert [b["ids"] for b in reference[:per_epoch]] != [b["ids"] for b in reference[per_epoch:]]

    out_dir = tmp_path / "killed"
    log = tmp_path / "killed.jsonl"
    # (how the process dies, the step of the checkpoint it leaves): after step 2 of epoch 0; as the second
    # micro-batch of a resumed run starts (the first one, inside a window, must not have been checkpointed);
    # after epoch 1's first step (the checkpoint: the end of epoch 0); after epoch 1's third step
    half = steps // 2
    kills = [(2, 1), ((0, 3), 1), (half + 1, half), (half + 3, half + 2)]
    for kill_at, checkpointed in kills:
        assert run_stage("dpo", overrides(out_dir), log, kill_at=kill_at) == -signal.SIGKILL
        checkpoint = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == checkpointed, kill_at
    run_stage("dpo", overrides(out_dir), log)  # the same command again finishes the run

    # each process went on with the micro-batch after its checkpoint's step, on what the uninterrupted run
    # trained there, and died where it was killed
    position = {(b["epoch"], b["batch"]): i for i, b in enumerate(reference)}
    runs = attempts(read_batches(log))
    spans = [(position[(a[0]["epoch"], a[0]["batch"])], position[(a[-1]["epoch"], a[-1]["batch"])]) for a in runs]
    starts = [0] + [checkpointed * ACCUMULATE for _, checkpointed in kills]
    ends = [position[kill_at] - 1 if isinstance(kill_at, tuple) else kill_at * ACCUMULATE - 1
            for kill_at, _ in kills] + [len(reference) - 1]
    assert spans == list(zip(starts, ends))
    for attempt, (start, end) in zip(runs, spans):
        assert attempt == reference[start:end + 1]

    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["global_step"] == steps
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys() and any("multi_modal_projector" in k for k in expected)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def test_sigterm_at_the_last_batch_of_the_final_validation_exits_143_and_the_rerun_exports(tmp_path,
                                                                                           tiny_backbone_path):
    """Lightning stops a validation at the batch after a SIGTERM, never after its last one: the stage itself
    must notice, or it exports and exits 0 while the scheduler is about to kill it."""
    shard = write_shard(tmp_path / "pairs.jsonl", sample_pairs(12, stride=29))
    out_dir = tmp_path / "run"
    overrides = [f"data.path={shard}", f"out_dir={out_dir}", "data.batch_size=2", "data.num_workers=0",
                 "data.val_fraction=0.34", "data.progress=false", f"data.scan_cache_dir={tmp_path}/scan",
                 f"dpo.reference_cache_dir={tmp_path}/reference", "trainer.enable_progress_bar=false",
                 "trainer.max_steps=3", "export.merged=false", "logger=none", "num_threads=1"]
    stopped = run_stage_process("dpo", overrides, tmp_path / "batches.jsonl", sigterm_in_final_validation=True)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM during the final validation (training had finished" in stopped.stderr
    assert not (out_dir / "metrics.json").exists() and not (out_dir / "adapter").exists()
    final = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 3

    rerun = run_stage_process("dpo", overrides, tmp_path / "batches.jsonl")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out_dir / "metrics.json").read_text())["global_step"] == 3
    assert (out_dir / "adapter" / "adapter_config.json").is_file()
    assert len(read_batches(tmp_path / "batches.jsonl")) == 3  # the rerun trained nothing again
