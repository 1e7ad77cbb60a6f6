"""The tiny backbone is a real, deterministic HF model; LoRA and QLoRA work on CPU, and the bitsandbytes
CPU repacking trap is caught by the guard."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import tiny_spec
from stllava_med.backbone import (
    LoraSettings,
    apply_lora,
    export_merged,
    load_backbone,
    unpack_bnb_cpu_weights,
)
from stllava_med.tiny import build_tiny_backbone, ensure_tiny_backbone

pytestmark = pytest.mark.integration


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_build_is_deterministic_and_loads_with_auto_classes(tmp_path, tiny_backbone_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    rebuilt = build_tiny_backbone(tmp_path / "again", tiny_spec())
    assert _digest(rebuilt) == _digest(tiny_backbone_path)
    assert (rebuilt / "tokenizer.json").read_text() == (tiny_backbone_path / "tokenizer.json").read_text()
    other_seed = build_tiny_backbone(tmp_path / "seed1", tiny_spec(seed=1))
    assert _digest(other_seed) != _digest(tiny_backbone_path)
    model = AutoModelForImageTextToText.from_pretrained(rebuilt)
    processor = AutoProcessor.from_pretrained(rebuilt)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.eos_token == "</s>" and processor.chat_template


def test_stale_cache_is_rebuilt(tmp_path):
    path = ensure_tiny_backbone(tmp_path / "tiny", tiny_spec())
    first = _digest(path)
    assert ensure_tiny_backbone(path, tiny_spec()) == path and _digest(path) == first  # reused
    ensure_tiny_backbone(path, tiny_spec(seed=5))  # another recipe: rebuilt in place
    assert _digest(path) != first


def test_mistyped_path_is_not_silently_built(tmp_path, tiny_backbone_path):
    cfg = {"name_or_path": str(tmp_path / "typo"), "tiny": {"path": str(tiny_backbone_path)}}
    with pytest.raises(OSError):
        load_backbone(cfg)
    assert not (tmp_path / "typo").exists()


def test_lora_targets_language_model_and_optionally_vision(tiny_backbone_path):
    base = load_backbone({"name_or_path": str(tiny_backbone_path)}).model
    lm_only = apply_lora(base, LoraSettings(enabled=True, r=4, alpha=8))
    names = [n for n, p in lm_only.named_parameters() if p.requires_grad]
    assert any("language_model" in n and "lora_A" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)  # trained as modules_to_save
    base = load_backbone({"name_or_path": str(tiny_backbone_path)}).model
    with_vision = apply_lora(base, LoraSettings(enabled=True, r=4, alpha=8, vision=True))
    assert any("vision_tower" in n and "lora_A" in n for n, _ in with_vision.named_parameters())
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(load_backbone({"name_or_path": str(tiny_backbone_path)}).model,
                   LoraSettings(enabled=True, target_modules=r".*nonexistent_module"))


def test_merged_export_matches_adapter_logits(tmp_path, tiny_backbone_path):
    from transformers import AutoModelForImageTextToText

    bb = load_backbone({"name_or_path": str(tiny_backbone_path), "lora": {"enabled": True, "r": 4, "alpha": 8}})
    with torch.no_grad():  # make the adapter non-trivial
        for name, param in bb.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ids = torch.randint(10, 500, (2, 9))
    bb.model.eval()
    with torch.no_grad():
        expected = bb.model(input_ids=ids).logits
    export_merged(bb.model, bb.processor, tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def _lora_b_grads(model, ids) -> int:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    return sum(1 for g in grads if g is not None and g.abs().sum() > 0), len(grads)


def test_qlora_cpu_repacking_trap_and_guard(tiny_backbone_path):
    pytest.importorskip("bitsandbytes")
    bb = load_backbone({"name_or_path": str(tiny_backbone_path), "quantization": "4bit",
                        "bnb_compute_dtype": "float32", "lora": {"enabled": True, "r": 4, "alpha": 8}})
    ids = torch.randint(10, 500, (2, 12))
    with_grad, total = _lora_b_grads(bb.model, ids)
    assert total > 0 and with_grad == total
    bb.model.eval()
    with torch.no_grad():
        bb.model(input_ids=ids)  # a validation-style forward
    repacked = unpack_bnb_cpu_weights(bb.model)
    if repacked == 0:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, the trap cannot occur here")
    # Reproduce the trap: repack again, train without the guard -> LoRA layers lose their gradients.
    bb.model.eval()
    with torch.no_grad():
        bb.model(input_ids=ids)
    broken, _ = _lora_b_grads(bb.model, ids)
    assert broken < total
    assert unpack_bnb_cpu_weights(bb.model) == repacked
    restored, _ = _lora_b_grads(bb.model, ids)
    assert restored == total
