"""Vision-tower LoRA really trains when enabled (the official code ran the tower under no_grad), and the
tower stays untouched when it is not."""

from __future__ import annotations

import pytest
import torch

from stllava_med.backbone import LoraSettings, load_backbone
from stllava_med.chat import ChatFormat
from stllava_med.data.instruct import vqa_to_conversations
from stllava_med.data.sft_datamodule import SFTDataset, collate_sft
from stllava_med.data.vqa import load_vqa_rad
from stllava_med.sft.module import SFTModule, SFTOptimSettings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]




def _batch(processor, sample_dir, n: int = 2):
    records, _ = load_vqa_rad(sample_dir, "train")
    conversations = vqa_to_conversations(records, dataset="sample", grouping="image", max_qa_per_conversation=3)
    dataset = SFTDataset(conversations[:n], processor, ChatFormat(), sq_ratio=0.5, seed=0, max_length=None)
    return collate_sft([dataset[(i, 0)] for i in range(n)], processor.tokenizer.pad_token_id)


def _module(tiny_backbone_path, vision: bool, checkpointing: bool = False) -> SFTModule:
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, vision=vision)
    backbone = load_backbone({"name_or_path": str(tiny_backbone_path), "name": "tiny", "lora": lora.__dict__},
                             gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    module = SFTModule(backbone.model, SFTOptimSettings(lr=1e-2, projector_lr=1e-3, warmup_ratio=0.0))
    module.model.train()
    module.processor = backbone.processor  # only for the test's batch building
    return module


def _vision_params(module: SFTModule) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.model.named_parameters() if "vision_tower" in n}


@pytest.mark.parametrize(("vision", "checkpointing"), [(True, False), (True, True), (False, False)],
                         ids=["vision_lora_on", "vision_lora_on_grad_checkpointing", "vision_lora_off"])
def test_vision_lora_gradients(tiny_backbone_path, sample_dir, vision, checkpointing):
    module = _module(tiny_backbone_path, vision, checkpointing)
    if checkpointing:
        assert module.model.is_gradient_checkpointing
    batch = _batch(module.processor, sample_dir)
    vision_params = _vision_params(module)
    vision_lora = {n: p for n, p in vision_params.items() if "lora_" in n}
    if not vision:
        assert not vision_lora
        assert all(not p.requires_grad for p in vision_params.values())
        module.compute_stats(batch).loss.backward()
        assert all(p.grad is None for p in vision_params.values()), "a frozen vision parameter received a gradient"
        # the language-model LoRA and the projector do learn
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.model.named_parameters()
                   if "language_model" in n and "lora_B" in n)
        return
    assert vision_lora and all(p.requires_grad for p in vision_lora.values())
    assert all(not p.requires_grad for n, p in vision_params.items() if "lora_" not in n)
    before = {n: p.detach().clone() for n, p in vision_lora.items()}
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        module.compute_stats(batch).loss.backward()
        grads_b = [p.grad for n, p in vision_lora.items() if "lora_B" in n]
        assert all(g is not None for g in grads_b)
        assert sum(float(g.abs().sum()) for g in grads_b) > 0, "vision LoRA B received no gradient"
        if step == 1:  # once B is non-zero, A's gradient flows too: the whole adapter trains
            grads_a = [p.grad for n, p in vision_lora.items() if "lora_A" in n]
            assert sum(float(g.abs().sum()) for g in grads_a if g is not None) > 0
        optimizer.step()
    changed = [n for n, p in vision_lora.items() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(vision_lora), "some vision LoRA weights did not change after two optimizer steps"
