"""Which checkpoint a rerun resumes from (stllava_med.training.resume_checkpoint): the newest COMPLETE one among
last.ckpt, last.prev.ckpt, the step checkpoints and Lightning's hpc_ckpt_*.ckpt; a checkpoint missing trainable
tensors or loop state, or a truncated file, is skipped with a warning. And the trainable-only filter: a checkpoint
saved while peft's disable_adapter has requires_grad off (the DPO adapter-off reference pass) keeps every
trainable tensor. Real Lightning checkpoints of a small LoRA module on CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from peft import LoraConfig, get_peft_model
from torch import nn

from stllava_med.training import (
    TrainableOnlyCheckpoints,
    build_trainer,
    checkpoint_problem,
    previous_path,
    resume_checkpoint,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))


class LoraModule(TrainableOnlyCheckpoints, LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.policy = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["proj", "head"], lora_dropout=0.0))

    def training_step(self, batch, batch_idx):
        return self.policy(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)}


def _loader():
    torch.manual_seed(1)  # two batches an epoch: every checkpoint of these runs is at an epoch end (a plain
    data = torch.utils.data.TensorDataset(torch.randn(4, 4))  # DataLoader cannot resume mid-epoch)
    return torch.utils.data.DataLoader(data, batch_size=2)


class FirstStep(Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step = trainer.global_step if self.step is None else self.step


def _fit(out_dir: Path, steps: int, every: int | None = None) -> LoraModule:
    module, first = LoraModule(), FirstStep()
    trainer = build_trainer({"max_steps": steps, "accelerator": "cpu", "enable_progress_bar": False,
                             "enable_model_summary": False, "num_sanity_val_steps": 0}, out_dir,
                            checkpoint_every_n_steps=every, callbacks=[first])
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=resume_checkpoint(out_dir, module.trainable_names()))
    module.first_step = first.step
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, frozenset[str]]:
    out_dir = tmp_path_factory.mktemp("run")
    module = _fit(out_dir, 4, every=2)  # step0000002.ckpt, step0000004.ckpt, last.ckpt at 2 then 4
    return out_dir, module.trainable_names()


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    (out / "checkpoints").mkdir(parents=True)
    for path in (run_dir / "checkpoints").iterdir():
        (out / "checkpoints" / path.name).write_bytes(path.read_bytes())
    return out


def _step(path: str | Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_a_run_leaves_last_and_the_one_it_replaced_all_complete(run):
    out_dir, names = run
    last = out_dir / "checkpoints" / "last.ckpt"
    assert names and all("lora_" in n for n in names) and len(names) == 4
    assert _step(last) == 4 and previous_path(last) == out_dir / "checkpoints" / "last.prev.ckpt"
    assert _step(previous_path(last)) == 2  # replaced, kept
    assert not list((out_dir / "checkpoints").glob(".*"))  # no temporary file left
    for path in (out_dir / "checkpoints").glob("*.ckpt"):
        assert checkpoint_problem(path, names) == (None, _step(path)), path
    assert resume_checkpoint(out_dir, names) == str(last)


def test_a_checkpoint_missing_trainable_tensors_is_skipped_for_the_newest_complete(run, tmp_path, caplog):
    out_dir = _copy(run[0], tmp_path)
    last = out_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    dropped = sorted(checkpoint["state_dict"])[0]
    del checkpoint["state_dict"][dropped]
    torch.save(checkpoint, last)
    problem, step = checkpoint_problem(last, run[1])
    assert step == 4 and problem.startswith("lacks 1 of the 4 trainable tensors") and dropped in problem
    with caplog.at_level(logging.WARNING, logger="stllava_med.training"):
        chosen = resume_checkpoint(out_dir, run[1])
    assert chosen == str(out_dir / "checkpoints" / "step0000004.ckpt")  # same step, complete
    assert f"not resuming from {last} (step 4): lacks 1" in caplog.text
    assert "the newest complete checkpoint, not" in caplog.text
    # without the step checkpoint: the previous last.ckpt
    (out_dir / "checkpoints" / "step0000004.ckpt").unlink()
    assert resume_checkpoint(out_dir, run[1]) == str(out_dir / "checkpoints" / "last.prev.ckpt")


def test_a_truncated_or_weights_only_checkpoint_is_skipped(run, tmp_path, caplog):
    out_dir = _copy(run[0], tmp_path)
    folder = out_dir / "checkpoints"
    last = folder / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # killed mid-write by something that writes in place
    problem, step = checkpoint_problem(last, run[1])
    assert problem.startswith("unreadable") and step == -1
    weights = torch.load(folder / "step0000004.ckpt", map_location="cpu", weights_only=False)
    torch.save({"state_dict": weights["state_dict"], "global_step": 4}, folder / "step0000004.ckpt")
    assert checkpoint_problem(folder / "step0000004.ckpt", run[1])[0].startswith("no optimizer_states")
    with caplog.at_level(logging.WARNING, logger="stllava_med.training"):
        assert resume_checkpoint(out_dir, run[1]) == str(folder / "last.prev.ckpt")
    assert "unreadable" in caplog.text
    for path in folder.glob("*.ckpt"):
        path.write_bytes(b"")
    assert resume_checkpoint(out_dir, run[1]) is None


def test_lightnings_hpc_checkpoint_is_a_candidate_and_an_incomplete_one_is_set_aside(run, tmp_path):
    out_dir = _copy(run[0], tmp_path)
    hpc = out_dir / "hpc_ckpt_1.ckpt"
    checkpoint = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    checkpoint["global_step"] = 5
    torch.save(checkpoint, hpc)
    assert resume_checkpoint(out_dir, run[1]) == str(hpc)  # newer step
    checkpoint["state_dict"] = {}  # what the requires_grad filter wrote during an adapter-off pass
    torch.save(checkpoint, hpc)
    assert resume_checkpoint(out_dir, run[1]) == str(out_dir / "checkpoints" / "last.ckpt")
    assert hpc.is_file()  # a complete checkpoint is resumed explicitly: Lightning never picks this one
    for path in (out_dir / "checkpoints").glob("*.ckpt"):
        path.unlink()
    assert resume_checkpoint(out_dir, run[1]) is None
    # Lightning, given no path under SLURM, would load the newest hpc_ckpt_*.ckpt by itself: it is renamed
    assert not hpc.exists() and (out_dir / "hpc-ckpt-1.incomplete.ckpt").is_file()
    assert not list(out_dir.glob("hpc_ckpt_*"))


def test_a_save_inside_disable_adapter_keeps_every_trainable_tensor(tmp_path):
    module = LoraModule()
    names = module.trainable_names()
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=_loader())
    with module.policy.disable_adapter():  # peft turns requires_grad off on every adapter tensor meanwhile
        assert not any(p.requires_grad for p in module.parameters())
        trainer.save_checkpoint(tmp_path / "inside.ckpt")
    saved = torch.load(tmp_path / "inside.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert set(saved) == names
    for name, tensor in module.state_dict().items():
        if name in names:
            assert torch.equal(saved[name], tensor), name


def test_a_requeued_fit_resumes_at_the_newest_complete_step(run, tmp_path):
    """The fallback in use: the newest last.ckpt is torn, the run resumes at step 2 (last.prev.ckpt) and ends with
    the weights of the uninterrupted run."""
    out_dir = _copy(run[0], tmp_path)
    for name in ("last.ckpt", "step0000004.ckpt"):
        os.truncate(out_dir / "checkpoints" / name, 100)
    resumed = _fit(out_dir, 4, every=2)
    straight = _fit(tmp_path / "straight", 4)
    assert resumed.first_step == 2 and straight.first_step == 0
    assert _step(out_dir / "checkpoints" / "last.ckpt") == 4
    for (name, ours), theirs in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(ours, theirs), name
