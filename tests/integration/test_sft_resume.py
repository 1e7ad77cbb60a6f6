"""Rerunning an interrupted stage-1 command resumes from last.ckpt — at an epoch boundary and mid-epoch — and
ends with exactly the weights of an uninterrupted run. The data mixes the VQA sample with a LLaVA-Med
instruct file, so the instruct path runs through the entry point too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from killable_run import attempts, read_batches, run_stage
from stllava_med.train_sft import run_train_sft

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]




class CrashAt(Callback):
    """Simulates a node failure right after optimizer step ``step`` (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated failure at step {self.step}")


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches.append(list(batch["uids"]))


def _instruct_file(tmp_path: Path, sample_dir: Path) -> Path:
    images = sorted(p.name for p in (sample_dir / "images").iterdir())[:8]
    rows = [{"id": f"PMC{index:04d}_F1", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat type of imaging study is this?"},
        {"from": "gpt", "value": "This is a radiograph from a clinical case report."},
        {"from": "human", "value": "Is any abnormality visible?"},
        {"from": "gpt", "value": "The figure caption describes a focal abnormality."},
    ]} for index, name in enumerate(images)]
    path = tmp_path / "llava_med_instruct_sample.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def _overrides(instruct: Path, sample_dir: Path, out_dir: Path,
               schedule: tuple[str, ...] = ("trainer.max_steps=14", "trainer.max_epochs=-1", "checkpoint.every_n_steps=2",
                                            "export.merged=true")) -> list[str]:
    return [
        "logger=none", "trainer.enable_progress_bar=false", "data=[vqa_rad_sample_train,llava_med_instruct]",
        f"data.sets.llava_med_instruct.path={instruct}", f"data.sets.llava_med_instruct.image_folder={sample_dir / 'images'}",
        "data.fraction=0.25", "data.val_fraction=0", "data.batch_size=4", "data.cache_images=true",
        *schedule, "optim.lr=5e-3", "num_threads=1", f"out_dir={out_dir}",
    ]


def _ckpt_step(out_dir: Path) -> int:
    return int(torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])


def test_resume_after_interruption(tmp_path, sample_dir, compose_config, tiny_backbone_path):
    instruct = _instruct_file(tmp_path, sample_dir)
    reference_batches = RecordBatches()
    reference = run_train_sft(compose_config("sft", _overrides(instruct, sample_dir, tmp_path / "straight")),
                              callbacks=[reference_batches])
    selected = (tmp_path / "straight" / "selected_ids.txt").read_text().split()
    assert any(uid.startswith("llava_med_instruct/") for uid in selected)
    per_epoch = -(-len(selected) // 4)
    assert 3 <= per_epoch <= 10, "the schedule below assumes an epoch of 3 to 10 batches"

    cfg = compose_config("sft", _overrides(instruct, sample_dir, tmp_path / "interrupted"))
    out_dir = tmp_path / "interrupted"
    # 1st attempt dies on the first step of epoch 2: the last checkpoint is the end of epoch 1
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_train_sft(cfg, callbacks=[CrashAt(per_epoch + 1)])
    assert _ckpt_step(out_dir) == per_epoch
    # 2nd attempt resumes there, then dies mid-epoch after a step-numbered checkpoint (every 2 steps)
    crash = per_epoch + 3
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_train_sft(cfg, callbacks=[CrashAt(crash)])
    mid_epoch = _ckpt_step(out_dir)
    assert per_epoch < mid_epoch < crash
    # 3rd attempt: the same command finishes the run
    resumed_batches = RecordBatches()
    resumed = run_train_sft(cfg, callbacks=[resumed_batches])
    assert resumed["resumed_from"] == str(out_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"] == 14
    # only the untrained steps ran, on exactly the batches the uninterrupted run used for them
    assert resumed_batches.batches == reference_batches.batches[mid_epoch:]
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    interrupted = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == interrupted.keys()
    for name in straight:
        torch.testing.assert_close(interrupted[name], straight[name], rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------------
# A killed process (SIGKILL, no Python exception handling, no checkpoint on the way out) under
# trainer.max_epochs: the default of conf/sft.yaml. With max_epochs set, the optimizer's schedule asks Lightning
# for ``estimated_stepping_batches``, which builds the train loader before the loops are restored; the sampler
# position must reach it all the same (it travels in the datamodule's checkpoint entry).
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # five processes, about a minute
def test_sigkill_mid_epoch_resumes_exactly_under_max_epochs(tmp_path, sample_dir, compose_config, tiny_backbone_path):
    import signal

    instruct = _instruct_file(tmp_path, sample_dir)

    def overrides(out_dir: Path) -> list[str]:
        # two whole epochs (no max_steps), as conf/sft.yaml's max_epochs runs; every step checkpointed
        return _overrides(instruct, sample_dir, out_dir, ("trainer.max_steps=-1", "trainer.max_epochs=2",
                                                          "checkpoint.every_n_steps=1", "export.merged=false"))

    cfg = compose_config("sft", overrides(tmp_path / "x"))
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.checkpoint.every_n_steps) == (2, -1, 1)

    straight = tmp_path / "straight"
    run_stage("sft", overrides(straight), tmp_path / "straight.jsonl")
    reference = read_batches(tmp_path / "straight.jsonl")
    per_epoch = sum(b["epoch"] == 0 for b in reference)
    assert 4 <= per_epoch <= 10 and len(reference) == 2 * per_epoch
    assert [b["step"] for b in reference] == list(range(1, 2 * per_epoch + 1))
    # a fresh order each epoch, so that restarting an epoch from its first batch could not go unnoticed
    assert [b["ids"] for b in reference[:per_epoch]] != [b["ids"] for b in reference[per_epoch:]]

    out_dir = tmp_path / "killed"
    log = tmp_path / "killed.jsonl"
    # killed in epoch 0 (after the checkpoint of step 1), at the start of epoch 1 (the checkpoint is epoch 0's
    # last step) and in epoch 1
    kills = [2, per_epoch + 1, per_epoch + 3]
    for kill_at in kills:
        assert run_stage("sft", overrides(out_dir), log, kill_at=kill_at) == -signal.SIGKILL
        assert _ckpt_step(out_dir) == kill_at - 1
    run_stage("sft", overrides(out_dir), log)  # the same command again finishes the run
    # each attempt went on right after its checkpoint, on the batches the uninterrupted run trained there
    runs = attempts(read_batches(log))
    assert [(a[0]["step"], a[-1]["step"]) for a in runs] == list(zip([1, *kills], [*kills, 2 * per_epoch]))
    for attempt in runs:
        assert [b["step"] for b in attempt] == list(range(attempt[0]["step"], attempt[-1]["step"] + 1))
        for batch in attempt:
            assert batch == reference[batch["step"] - 1]

    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["resumed_from"] == str(out_dir / "checkpoints" / "last.ckpt")
    assert summary["global_step"] == 2 * per_epoch
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys() and any("multi_modal_projector" in k for k in expected)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
