"""The fast K-answer decoder (stllava_med.shared_decoding.decode_shared) samples exactly what the reference does.

Reference: ``sample_sequences(..., shared_prefix=True, drop_finished=False)`` — the same shared prefill and
repeated KV cache, continued by ``generate``'s own sampling loop (itself tested equal to
``generate(num_return_sequences=K)`` in test_selftrain_generate.py). Same seed: the same answers, the same token
counts, and the random stream left in the same state (a stage's later calls draw the same numbers).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

SAMPLING = {"temperature": 1.2, "top_k": 100, "top_p": 0.95}


@pytest.fixture
def batch(tiny_backbone, sample_dir):
    from stllava_med.chat import ChatFormat, prompt_text, vqa_turns
    from stllava_med.data.vqa import load_image

    images = [load_image(p) for p in sorted((sample_dir / "images").glob("*.jpg"))[:4]]
    questions = ["Is this normal?", "Where is the largest lesion located in this image?", "What organ?",
                 "Is there a fracture of the left rib?"]  # prompts of different lengths: left padding
    fmt = ChatFormat(system_prompt="llava_v1")
    prompts = [prompt_text(tiny_backbone.processor, vqa_turns(q), "assistant", fmt) for q in questions]
    # A random-weight model rarely samples EOS: 40 more stop ids make rows end at different steps, so finished
    # rows leave the batch while others continue (what the fast path does differently)
    tokenizer = tiny_backbone.processor.tokenizer
    tiny_backbone.model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(20, 60)]
    return tiny_backbone, prompts, images


def _sample(backbone, prompts, images, seed, drop_finished, **kwargs):
    from stllava_med.generation import sample_sequences
    from stllava_med.shared_decoding import LAST_CALL

    torch.manual_seed(seed)
    texts = sample_sequences(backbone, prompts, images, k=3, max_new_tokens=kwargs.pop("max_new_tokens", 40),
                             drop_finished=drop_finished, **{**SAMPLING, **kwargs})
    return texts, torch.rand(4).tolist(), dict(LAST_CALL) if drop_finished else None


def test_fast_path_samples_equal_reference(batch, monkeypatch):
    from stllava_med.shared_decoding import BufferedLayer

    backbone, prompts, images = batch
    monkeypatch.setattr(BufferedLayer, "CHUNK", 4)  # the cache buffer grows several times within 40 tokens
    compacted = 0
    for seed in range(4):
        fast, fast_after, call = _sample(backbone, prompts, images, seed, True, min_new_tokens=3)
        reference, reference_after, _ = _sample(backbone, prompts, images, seed, False, min_new_tokens=3)
        assert call["decoder"] == "shared"
        assert fast == reference, f"seed {seed}"
        assert fast_after == reference_after  # the random stream advanced the same way
        lengths = call["new_tokens"]
        assert len(lengths) == 12 and min(lengths) >= 3 and max(lengths) <= 40
        compacted += min(lengths) < max(lengths)
    assert compacted >= 3  # rows really ended at different steps
    assert len(set(fast[:3])) > 1  # genuinely sampled


@pytest.mark.parametrize("setting", [{"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.3}],
                         ids=["no_repeat_ngram", "repetition_penalty"])
def test_unsupported_settings_take_generates_loop(batch, setting):
    """A processor the fast loop does not reproduce (no row-wise contract, or per-row state set by generate())
    runs generate()'s own loop from the same cache: same samples."""
    backbone, prompts, images = batch
    fast, fast_after, call = _sample(backbone, prompts, images, 1, True, **setting)
    reference, reference_after, _ = _sample(backbone, prompts, images, 1, False, **setting)
    assert call["decoder"].startswith("generate (logits processor ")
    assert fast == reference and fast_after == reference_after


def test_fast_path_through_a_lora_adapter(tiny_backbone_path, batch):
    """A PEFT-wrapped policy (generation with a trained adapter): the loop calls the model with the adapter on."""
    from stllava_med.backbone import load_backbone

    _, prompts, images = batch
    backbone = load_backbone({"name_or_path": str(tiny_backbone_path), "name": "tiny",
                              "lora": {"enabled": True, "r": 8, "alpha": 16}}, with_lora=True)
    for name, param in backbone.model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so that it changes the samples
            torch.nn.init.normal_(param, std=0.05)
    backbone.model.generation_config.eos_token_id = [backbone.processor.tokenizer.eos_token_id, *range(20, 60)]
    fast, fast_after, call = _sample(backbone, prompts, images, 2, True)
    reference, reference_after, _ = _sample(backbone, prompts, images, 2, False)
    with backbone.model.disable_adapter():
        base, _, _ = _sample(backbone, prompts, images, 2, True)
    assert call["decoder"] == "shared"
    assert fast == reference and fast_after == reference_after
    assert fast != base  # the adapter was on
