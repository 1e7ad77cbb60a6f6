"""QLoRA stage 1 on CPU: after a validation pass (an eval-mode, no-grad forward that makes bitsandbytes
repack its 4-bit weights on AVX512-BF16 CPUs), the language-model LoRA must keep receiving gradients; the
adapter is exported, and the merge into a 4-bit base is refused with a recorded reason."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch import Callback

from stllava_med.train_sft import run_train_sft
from stllava_med.training import BnbCpuGuard

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]




class LanguageLoraGradients(Callback):
    def __init__(self) -> None:
        self.per_step: list[float] = []
        self.guard: BnbCpuGuard | None = None
        self.validations = 0
        self.packed_steps = 0

    def on_fit_start(self, trainer, module) -> None:
        self.guard = next((c for c in trainer.callbacks if isinstance(c, BnbCpuGuard)), None)

    def on_validation_end(self, trainer, module) -> None:
        self.validations += 1

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        # every layer's LoRA B: gradients reach the first layers only through the later layers' 4-bit
        # matmuls, which is exactly what breaks after a repack (the last layer's LoRA would still learn)
        grads = [p.grad for n, p in module.named_parameters() if "language_model" in n and "lora_B" in n]
        self.per_step.append(min(float(g.abs().sum()) if g is not None else 0.0 for g in grads))
        # a packed (inference-layout) 4-bit weight here means this step's forward ran through the kernel
        # without input gradients: earlier layers got truncated gradients, silently
        import bitsandbytes as bnb

        packed = sum(1 for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)
                     and getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        self.packed_steps += int(packed > 0)


def test_qlora_keeps_learning_after_validation(tmp_path, compose_config, tiny_backbone_path):
    probe = LanguageLoraGradients()
    cfg = compose_config("sft", [
        "logger=none", "trainer.enable_progress_bar=false", "backbone.quantization=4bit", "data.fraction=0.15",
        "data.val_fraction=0.1", "data.batch_size=4", "data.cache_images=true", "trainer.max_epochs=2",
        # validate mid-epoch: an epoch-end checkpoint happens to restore the layout, a mid-epoch pass does not
        "trainer.val_check_interval=2", "checkpoint.every_n_steps=1000",
        "optim.lr=5e-3", "num_threads=1", f"out_dir={tmp_path / 'run'}",
    ])
    summary = run_train_sft(cfg, callbacks=[probe])
    assert probe.guard is not None, "a quantised backbone must train with BnbCpuGuard"
    assert probe.guard.restored > 0, "validation did not repack the 4-bit weights: the test lost its point"
    assert probe.validations >= 2 and len(probe.per_step) == summary["global_step"] > 4
    assert all(total > 0 for total in probe.per_step), probe.per_step
    assert probe.packed_steps == 0, f"{probe.packed_steps} training steps ran on repacked 4-bit weights"
    assert summary["export"]["merged"] is None and "4-bit" in summary["export"]["merged_skipped"]
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == cfg.backbone.lora.r
