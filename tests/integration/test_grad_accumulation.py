"""Gradient accumulation changes nothing: the same examples as batch 4 x accumulation 1, batch 2 x 2 and
batch 1 x 4 give the same gradients, the same optimizer steps and the same logged losses, in a real Lightning
Trainer (float64, so that the comparison is not at the mercy of float32 kernels).

SFT: the training loss is normalised by the target tokens of the whole accumulation window
(:func:`stllava_med.sft.losses.window_normalised_loss`); a token mean per micro-batch would weight a
micro-batch with few target tokens as much as one with many; under DDP the count is summed over the ranks
(two gloo processes here). DPO: the same with real pairs (an epoch's short last window was weighted by half
before)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger

from dpo_support import perturb_lora, sample_pairs, tiny_backbone, write_shard
from stllava_med.chat import ChatFormat
from stllava_med.data.instruct import vqa_to_conversations
from stllava_med.data.sft_datamodule import SFTDataModule, SFTDataSettings
from stllava_med.data.vqa import load_vqa_rad
from stllava_med.sft.losses import count_targets
from stllava_med.sft.module import SFTModule, SFTOptimSettings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

SPLITS = [(4, 1), (2, 2), (1, 4)]  # (batch size, accumulate_grad_batches): 4 examples per optimizer step


class MemoryLogger(Logger):
    """What Lightning hands to a logger, kept in memory: ``{step: {name: value}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.setdefault(int(step or 0), {}).update({k: float(v) for k, v in metrics.items()})


class StepGradients(Callback):
    """The accumulated gradient of every trainable parameter at each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.uids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if "uids" in batch:
            self.uids.append(list(batch["uids"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.requires_grad and p.grad is not None})


def _trainer(accumulate: int, steps: int, *callbacks: Callback) -> tuple[Trainer, MemoryLogger]:
    logger = MemoryLogger()
    trainer = Trainer(accelerator="cpu", devices=1, precision="64-true", max_steps=steps, max_epochs=1,
                      accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks))
    return trainer, logger


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _scale(tensors: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in tensors.values())


# --------------------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------------------


def sft_conversations(sample_dir: Path) -> list:
    """Six multi-turn conversations (windows of 4 and 2 with four examples a step) with different numbers of
    target tokens."""
    records, _ = load_vqa_rad(sample_dir, "train")
    return vqa_to_conversations(records, dataset="s", grouping="image", max_qa_per_conversation=3)[:6]


@pytest.fixture(scope="module")
def conversations(sample_dir):
    return sft_conversations(sample_dir)


def _sft_backbone():
    backbone = tiny_backbone(r=4, dropout=0.0)
    perturb_lora(backbone.model)  # fresh LoRA B is zero, which would leave LoRA A without a gradient
    return backbone


def _sft_run(conversations, batch_size: int, accumulate: int):
    backbone = _sft_backbone()
    datamodule = SFTDataModule(conversations, [], backbone.processor, ChatFormat(),
                               SFTDataSettings(batch_size=batch_size, max_length=None, cache_images=True,
                                               shuffle=False, sq_ratio=0.5, seed=0))
    module = SFTModule(backbone.model, SFTOptimSettings(lr=1e-3, projector_lr=1e-3, warmup_ratio=0.0))
    grads = StepGradients()
    trainer, logger = _trainer(accumulate, 2, grads)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 and len(grads.grads) == 2
    return {"grads": grads.grads, "weights": _trainable(module), "logged": logger.steps, "uids": grads.uids,
            "epoch_loss": float(trainer.callback_metrics["train/loss"])}


@pytest.fixture(scope="module")
def sft_runs(conversations, tiny_backbone_path):
    return {split: _sft_run(conversations, *split) for split in SPLITS}


def test_sft_accumulation_gives_the_gradients_and_losses_of_one_big_batch(sft_runs, conversations):
    reference = sft_runs[(4, 1)]
    for split, run in sft_runs.items():
        # the same six conversations in the same order, as windows of 4 and 2
        assert [u for b in run["uids"] for u in b] == [c.uid for c in conversations], split
        for step in range(2):
            grads, expected = run["grads"][step], reference["grads"][step]
            assert _max_diff(grads, expected) <= 1e-12 * _scale(expected), (split, step)
        assert _max_diff(run["weights"], reference["weights"]) <= 1e-12, split
        # what the logger got at each step: the token mean of the step's window
        for step in range(2):
            logged, expected = run["logged"][step]["train/loss_step"], reference["logged"][step]["train/loss_step"]
            assert abs(logged - expected) <= 1e-12, (split, step)
        # the epoch's token mean (torchmetrics keeps its running sums in float32)
        assert run["epoch_loss"] == pytest.approx(reference["epoch_loss"], rel=2e-6, abs=0), split


def test_sft_logged_loss_is_the_window_token_mean_and_per_batch_means_differ(sft_runs, conversations):
    """The logged step loss is the token mean over the window's conversations, computed here one conversation
    at a time; and the comparison above has teeth: averaging per-micro-batch token means (what Lightning does
    with a per-batch mean loss) gives a clearly different gradient on these conversations."""
    from stllava_med.data.sft_datamodule import SFTDataset, collate_sft

    backbone = _sft_backbone()  # the runs' initial weights
    model = backbone.model.double().train()
    module = SFTModule(model)
    dataset = SFTDataset(conversations, backbone.processor, ChatFormat(), sq_ratio=0.5, seed=0, max_length=None)
    pad = backbone.processor.tokenizer.pad_token_id
    singles = [collate_sft([dataset[(i, 0)]], pad) for i in range(4)]
    counts = [int(count_targets(b["labels"])) for b in singles]
    assert len(set(counts)) > 1, f"the conversations need different numbers of target tokens, got {counts}"

    def grads_of(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward(retain_graph=True)
        return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    stats = [module.compute_stats(b) for b in singles]
    window_mean = sum(float(s.loss_sum) for s in stats) / sum(counts)
    for run in sft_runs.values():
        assert abs(run["logged"][0]["train/loss_step"] - window_mean) <= 1e-12
    token_mean = grads_of(sum(s.loss_sum for s in stats) / sum(counts))
    assert _max_diff(token_mean, sft_runs[(4, 1)]["grads"][0]) <= 1e-12 * _scale(token_mean)
    per_batch_mean = grads_of(sum(s.loss for s in stats) / 4)
    assert _max_diff(per_batch_mean, token_mean) > 1e-2 * _scale(token_mean)


# --------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------


def _dpo_run(shard, batch_size: int, accumulate: int, steps: int):
    from stllava_med.data.pairs.datamodule import PreferenceDataModule
    from stllava_med.data.pairs.settings import PreferenceDataSettings
    from stllava_med.dpo.module import DPOModule, DPOSettings
    from stllava_med.dpo.reference import AdapterOffReference

    backbone = tiny_backbone(r=4, dropout=0.0)
    perturb_lora(backbone.model)  # the policy starts away from the reference: the loss has a real gradient
    settings = PreferenceDataSettings(path=str(shard), progress=False, batch_size=batch_size, val_fraction=0.0)
    datamodule = PreferenceDataModule(settings, backbone.processor, ChatFormat())
    module = DPOModule(backbone.model, AdapterOffReference(backbone.model), DPOSettings(),
                       {"lr": 1e-3, "projector_lr": 1e-3, "warmup_ratio": 0.0})
    grads = StepGradients()
    trainer, logger = _trainer(accumulate, steps, grads)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == steps and len(grads.grads) == steps
    return {"grads": grads.grads, "weights": _trainable(module), "logged": logger.steps,
            "epoch_loss": float(trainer.callback_metrics["train/loss_epoch"])}


@pytest.mark.parametrize("pairs", [8, 6], ids=["full_windows", "short_last_window"])
def test_dpo_accumulation_gives_the_gradients_and_losses_of_one_big_batch(tmp_path, pairs, tiny_backbone_path):
    shard = write_shard(tmp_path / "pairs.jsonl", sample_pairs(pairs, stride=29))
    runs = {split: _dpo_run(shard, *split, steps=2) for split in SPLITS}
    reference = runs[(4, 1)]
    for split, run in runs.items():
        for step in range(2):
            grads, expected = run["grads"][step], reference["grads"][step]
            assert _max_diff(grads, expected) <= 1e-12 * _scale(expected), (split, step)
        assert _max_diff(run["weights"], reference["weights"]) <= 1e-12, split
        assert run["epoch_loss"] == pytest.approx(reference["epoch_loss"], rel=2e-6, abs=0), split


# --------------------------------------------------------------------------------------------------------------
# SFT under DDP: the window's target tokens are counted over both ranks
# --------------------------------------------------------------------------------------------------------------

_DDP_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/integration")
import torch
from lightning.pytorch import Callback, Trainer
from test_grad_accumulation import StepGradients, _sft_backbone, sft_conversations
from conftest import SAMPLE_DIR
from stllava_med.chat import ChatFormat
from stllava_med.data.sft_datamodule import SFTDataModule, SFTDataSettings
from stllava_med.sft.module import SFTModule, SFTOptimSettings

torch.set_num_threads(1)

class StepLoss(Callback):
    def __init__(self):
        self.losses, self.step = [], 0
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            self.step = trainer.global_step
            self.losses.append(float(trainer.callback_metrics["train/loss_step"]))

backbone = _sft_backbone()
datamodule = SFTDataModule(sft_conversations(SAMPLE_DIR), [], backbone.processor, ChatFormat(),
                           SFTDataSettings(batch_size=1, max_length=None, cache_images=True, shuffle=False,
                                           sq_ratio=0.5, seed=0))
module = SFTModule(backbone.model, SFTOptimSettings(lr=1e-3, projector_lr=1e-3, warmup_ratio=0.0))
grads, losses = StepGradients(), StepLoss()
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, precision="64-true",
                  max_steps=2, max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  num_sanity_val_steps=0, callbacks=[grads, losses])
trainer.fit(module, datamodule=datamodule)
torch.save({"grads": grads.grads, "uids": grads.uids, "losses": losses.losses},
           f"{sys.argv[2]}.rank{trainer.global_rank}")
"""


def test_sft_ddp_accumulation_counts_the_window_over_ranks(sft_runs, conversations, tmp_path, tiny_backbone_path):
    """Two ranks x batch 1 x accumulation 2 (gloo) train on the four conversations of batch 4 x 1's first step,
    then on the two of its second: the same gradients and logged window losses, which needs the window's
    target-token count summed over the ranks."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_RUN)
    out = tmp_path / "ddp"
    tests_dir = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script), str(tests_dir), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    uids = [c.uid for c in conversations]
    # rank r trains conversations r, r+2, r+4: window 1 is conversations 0-3, window 2 conversations 4-5
    assert [u for b in ranks[0]["uids"] for u in b] == uids[0::2]
    assert [u for b in ranks[1]["uids"] for u in b] == uids[1::2]
    reference = sft_runs[(4, 1)]
    for rank in ranks:
        assert len(rank["grads"]) == 2
        for step in range(2):
            grads, expected = rank["grads"][step], reference["grads"][step]
            assert _max_diff(grads, expected) <= 1e-12 * _scale(expected), step
        expected_losses = [reference["logged"][step]["train/loss_step"] for step in range(2)]
        assert rank["losses"] == pytest.approx(expected_losses, rel=0, abs=1e-12)
