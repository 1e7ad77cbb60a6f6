"""``python -m stllava_med.train_dpo`` through ``run_train_dpo``: config keys, a real run with its exports, the
precomputed reference, and resuming a crashed run to the same weights as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from conftest import compose
from dpo_support import one_torch_thread, sample_pairs, write_shard  # noqa: F401  (autouse fixture)
from stllava_med.train_dpo import run_train_dpo
from stllava_med.utils.config import resolve_out_dir

pytestmark = pytest.mark.integration


def overrides(tmp_path, shard, out_dir, *extra):
    return [f"data.path={shard}", f"out_dir={out_dir}", "data.batch_size=4", "data.num_workers=0",
            "data.val_fraction=0.25", "data.progress=false", f"data.scan_cache_dir={tmp_path}/scan",
            f"dpo.reference_cache_dir={tmp_path}/reference", "trainer.enable_progress_bar=false",
            "trainer.max_steps=4", "trainer.max_epochs=2", "checkpoint.every_n_steps=1", "optim.lr=2e-3", "optim.projector_lr=2e-3",
            "num_threads=1", *extra]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("pairs") / "p.jsonl", sample_pairs(16, stride=29))


def test_sweep_keys_compose_and_the_paper_experiment():
    cfg = compose("dpo", ["backbone=tiny", "backbone.name_or_path=/models/stage1", "data.path=/pairs/*.jsonl",
                          "data.fraction=0.25", "data.batch_size=2", "dpo.beta=0.5", "dpo.loss_type=ipo",
                          "dpo.reference=precomputed", "trainer.max_steps=10", "trainer.max_epochs=2", "seed=3",
                          "out_dir=/runs/x"])
    assert (cfg.backbone.name_or_path, cfg.data.path, cfg.data.fraction, cfg.data.batch_size) == (
        "/models/stage1", "/pairs/*.jsonl", 0.25, 2)
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.reference) == (0.5, "ipo", "precomputed")
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs, cfg.seed, cfg.out_dir) == (10, 2, 3, "/runs/x")
    paper = compose("dpo", ["experiment=stllava_med_paper"])
    assert (paper.dpo.loss_type, paper.dpo.beta) == ("sigmoid", 0.1)
    assert (paper.backbone.lora.r, paper.backbone.lora.alpha) == (128, 256)
    assert (paper.optim.lr, paper.optim.projector_lr, paper.optim.warmup_ratio) == (5e-6, 2e-5, 0.03)
    assert (paper.trainer.max_epochs, paper.data.batch_size, paper.trainer.accumulate_grad_batches) == (1, 4, 16)
    assert paper.data.max_length == 2048


def test_run_directory_is_a_function_of_the_config():
    a = compose("dpo", ["dpo.beta=0.2"])
    assert resolve_out_dir(a, "dpo") == resolve_out_dir(compose("dpo", ["dpo.beta=0.2"]), "dpo")
    assert resolve_out_dir(a, "dpo") != resolve_out_dir(compose("dpo", ["dpo.beta=0.3"]), "dpo")
    # watching a run differently does not move it
    assert resolve_out_dir(a, "dpo") == resolve_out_dir(compose("dpo", ["dpo.beta=0.2", "data.num_workers=7",
                                                                        "logger=tensorboard"]), "dpo")


def test_a_run_trains_validates_and_exports(tmp_path, shard, tiny_backbone_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stllava_med.backbone import load_backbone
    from stllava_med.chat import ChatFormat
    from stllava_med.data.pairs.datamodule import PreferenceDataModule
    from stllava_med.data.pairs.settings import PreferenceDataSettings
    from stllava_med.dpo.logps import LogProbs

    out = tmp_path / "run"
    cfg = compose("dpo", overrides(tmp_path, shard, out, "dpo.reference=precomputed"))
    summary = run_train_dpo(cfg)
    pairs = summary["pairs"]
    # the validation split is a seeded hash of pair ids at val_fraction 0.25: some of the 16 pairs, not all
    assert summary["global_step"] == 4 and pairs["train"] + pairs["val"] == 16 and pairs["skipped"] == {}
    assert 1 <= pairs["val"] <= 8
    assert summary["reference_cache"]["computed_now"] == 16  # train + val, images included
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen_per_token", "padding_ratio"):
        assert key in summary["val"] and key in summary["train"]
    assert summary["train"]["pairs_per_s"] > 0
    assert json.loads((out / "metrics.json").read_text())["val"] == summary["val"]
    assert len((out / "selected_ids.txt").read_text().split()) == pairs["train"]
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "config.yaml").is_file()
    assert (out / "logs" / "csv" / "version_0" / "metrics.csv").is_file()

    # the merged export loads with the Auto classes and computes what policy + adapter compute
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    processor = AutoProcessor.from_pretrained(out / "merged")
    adapted = load_backbone({"name_or_path": str(tiny_backbone_path), "adapter_path": str(out / "adapter")})
    settings = PreferenceDataSettings(path=str(shard), batch_size=4, val_fraction=0.0, progress=False)
    dm = PreferenceDataModule(settings, processor, ChatFormat())
    dm.setup("fit")
    batch = next(iter(dm.train_dataset()))
    with torch.no_grad():
        from_merged = LogProbs(merged.eval())(batch)
        from_adapter = LogProbs(adapted.model.eval())(batch)
        base = LogProbs(load_backbone({"name_or_path": str(tiny_backbone_path)}).model.eval())(batch)
    torch.testing.assert_close(from_merged.chosen, from_adapter.chosen, atol=1e-4, rtol=0)
    assert (from_merged.chosen - base.chosen).abs().max() > 1e-3  # training moved the model

    # rerunning the finished command resumes at its end: no further training
    again = run_train_dpo(cfg)
    assert again["global_step"] == 4 and again["reference_cache"]["computed_now"] == 0


class CrashAt(Callback):
    """Simulates a killed job: raises before the training batch ``batch_idx`` of the first epoch."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            raise RuntimeError("simulated crash")


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, shard, tiny_backbone_path):
    quick = ("export.merged=false", "data.val_fraction=0")  # the adapter is enough to compare
    straight = tmp_path / "straight"
    run_train_dpo(compose("dpo", overrides(tmp_path, shard, straight, *quick)))
    crashed = tmp_path / "crashed"
    cfg = compose("dpo", overrides(tmp_path, shard, crashed, *quick))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train_dpo(cfg, callbacks=[CrashAt(2)])
    checkpoint = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    summary = run_train_dpo(cfg)  # the same command again
    assert summary["global_step"] == 4
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    resumed = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys() and any("multi_modal_projector" in k for k in expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_ddp_on_two_cpu_processes(tmp_path, tiny_backbone_path):
    """A real two-process DDP run (gloo): equal steps on both ranks, the reference pre-computation split
    between them (every pair computed once), metrics synced, one export."""
    import os
    import subprocess
    import sys

    shard = write_shard(tmp_path / "p.jsonl", sample_pairs(30, stride=13))
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "stllava_med.train_dpo", f"data.path={shard}", f"out_dir={out}",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
               "+trainer.use_distributed_sampler=false", "trainer.max_steps=3", "data.batch_size=3",
               "data.num_workers=1", "data.val_fraction=0.2", "dpo.reference=precomputed",
               f"dpo.reference_cache_dir={tmp_path}/reference", f"data.scan_cache_dir={tmp_path}/scan",
               "num_threads=1", "trainer.enable_progress_bar=false", "data.progress=false",
               f"hydra.run.dir={tmp_path}/hydra"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tiny_backbone_path.parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            cwd=tiny_backbone_path.parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 3 and "loss" in summary["val"]
    pairs = summary["pairs"]["train"] + summary["pairs"]["val"]
    cache_lines = [json.loads(line) for line in next((tmp_path / "reference").glob("*/logps.jsonl")).read_text().splitlines()]
    assert sorted(row["id"] for row in cache_lines) == sorted({row["id"] for row in cache_lines})  # no pair twice
    assert len(cache_lines) == pairs == 30
    assert (out / "merged" / "config.json").is_file()
