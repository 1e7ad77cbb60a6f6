"""The stage-1 export (adapter and merged model + processor) reloads with the trained model's logits."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from stllava_med.backbone import export_merged, load_backbone, load_processor
from stllava_med.chat import ChatFormat
from stllava_med.data.instruct import vqa_to_conversations
from stllava_med.data.sft_datamodule import SFTDataModule, SFTDataset, SFTDataSettings, collate_sft
from stllava_med.data.vqa import load_vqa_rad
from stllava_med.sft.module import SFTModule, SFTOptimSettings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]




def _logits(model, batch) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_export_reloads_with_identical_logits(tiny_backbone_path, sample_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "vision": True}
    backbone = load_backbone({"name_or_path": str(tiny_backbone_path), "name": "tiny", "lora": lora})
    records, _ = load_vqa_rad(sample_dir, "train")
    conversations = vqa_to_conversations(records, dataset="s", max_qa_per_conversation=4)[:8]
    datamodule = SFTDataModule(conversations, [], backbone.processor, ChatFormat(),
                               SFTDataSettings(batch_size=4, max_length=None, cache_images=True))
    module = SFTModule(backbone.model, SFTOptimSettings(lr=1e-2, projector_lr=1e-2, warmup_ratio=0.0))
    trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    model = module.model
    # the adapter really moved away from the base (else the comparison below would prove nothing)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(float(p.abs().sum()) > 0 for p in lora_b)

    dataset = SFTDataset(conversations[:3], backbone.processor, ChatFormat(), sq_ratio=0.5, seed=0, max_length=None)
    batch = collate_sft([dataset[(i, 0)] for i in range(3)], backbone.processor.tokenizer.pad_token_id)
    live = _logits(model, batch)
    with model.disable_adapter():
        base = _logits(model, batch)
    assert (live - base).abs().max() > 1e-3

    merged_dir = export_merged(model, backbone.processor, tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    torch.testing.assert_close(_logits(merged, batch), live, rtol=1e-5, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reloaded = load_backbone({"name_or_path": str(tiny_backbone_path), "name": "tiny",
                              "adapter_path": str(tmp_path / "adapter")})
    torch.testing.assert_close(_logits(reloaded.model, batch), live, rtol=0, atol=1e-6)
    processor = load_processor(str(merged_dir))
    assert processor.chat_template == backbone.processor.chat_template
    assert processor.tokenizer.get_vocab() == backbone.processor.tokenizer.get_vocab()
    # the live model was not modified by merging a copy
    torch.testing.assert_close(_logits(model, batch), live, rtol=0, atol=0)
