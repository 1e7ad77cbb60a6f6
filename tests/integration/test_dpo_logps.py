"""The fast log-prob paths against the model's own forward, on real pairs and the tiny LLaVA (LoRA active).

- shared image encoding (each image encoded once, written into chosen and rejected) equals separate encoding
  (the HF forward over 2B sequences, images encoded per sequence) to 1e-5;
- prefix sharing (image + prompt once, answers from its KV cache) equals the plain path to 1e-4, gradients
  included.
"""

from __future__ import annotations

import pytest
import torch

from dpo_support import one_torch_thread, perturb_lora, sample_pairs, tiny_backbone, write_shard  # noqa: F401  (autouse fixture)
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.datamodule import PreferenceDataModule
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.dpo.logps import LogProbs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_backbone_path):
    backbone = tiny_backbone(lora=True)
    perturb_lora(backbone.model)  # an active adapter, so a path that silently drops LoRA would differ
    with torch.no_grad():  # and a trained projector that differs from the base one
        for name, param in backbone.model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.01 * torch.randn_like(param))
    rows = sample_pairs(40)
    # varied prompt and answer lengths in one batch (padding on both sides of the shared prefix)
    rows[0]["chosen"] = "The mass is in the right upper lobe, with a small effusion."
    rows[1]["prompt"] = "Where is the abnormality, and is it enhancing after contrast?"
    path = write_shard(tmp_path_factory.mktemp("pairs") / "p.jsonl", rows)
    settings = PreferenceDataSettings(path=str(path), batch_size=6, val_fraction=0.0, progress=False)
    dm = PreferenceDataModule(settings, backbone.processor, ChatFormat())
    dm.setup("fit")
    batch = dm.collator([item for item in dm.train_dataset().slot_stream(0)][:6])
    assert len(set(batch["prompt_lengths"].tolist())) > 1
    return backbone, batch


def test_shared_image_encoding_equals_separate_encoding(setup):
    backbone, batch = setup
    logprobs = LogProbs(backbone.model)
    assert logprobs.fast
    with torch.no_grad():
        separate = logprobs.generic(batch)
        shared = logprobs(batch, prefix_sharing=False)
    torch.testing.assert_close(shared.chosen, separate.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.rejected, separate.rejected, atol=1e-5, rtol=0)
    assert torch.equal(shared.chosen_tokens, separate.chosen_tokens)
    assert (shared.chosen != shared.rejected).all()


def test_prefix_sharing_equals_plain_path_with_gradients(setup):
    backbone, batch = setup
    logprobs = LogProbs(backbone.model)
    trainable = [(n, p) for n, p in backbone.model.named_parameters() if p.requires_grad]
    results = {}
    for name, sharing in (("plain", False), ("prefix", True)):
        backbone.model.zero_grad()
        out = logprobs(batch, prefix_sharing=sharing)
        weights = torch.linspace(0.5, 1.5, out.chosen.shape[0])
        ((out.chosen * weights).sum() - (out.rejected * weights.flip(0)).sum()).backward()
        results[name] = (out, {n: p.grad.clone() for n, p in trainable if p.grad is not None})
    (plain, plain_grads), (prefix, prefix_grads) = results["plain"], results["prefix"]
    torch.testing.assert_close(prefix.chosen, plain.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(prefix.rejected, plain.rejected, atol=1e-4, rtol=0)
    assert torch.equal(prefix.rejected_tokens, plain.rejected_tokens)
    assert set(prefix_grads) == set(plain_grads) and any("lora_A" in n for n in prefix_grads)
    assert any("multi_modal_projector" in n for n in prefix_grads)  # gradients reach the image features
    for name, grad in plain_grads.items():
        torch.testing.assert_close(prefix_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
    # the saving is real: fewer sequence positions through the language model
    assert prefix.positions < plain.positions


def test_gradient_checkpointing_turns_prefix_sharing_off_only_where_it_must(setup):
    backbone, batch = setup
    model = backbone.model
    logprobs = LogProbs(model)
    with torch.no_grad():
        expected = logprobs(batch, prefix_sharing=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model.train()
        assert logprobs.gradient_checkpointing and not logprobs.prefix_sharing  # the layers drop the KV cache
        trained = logprobs(batch)
        assert trained.chosen.requires_grad
        with torch.no_grad():  # reference passes build no graph: the layers keep the cache, sharing stays on
            assert logprobs.prefix_sharing
            reference = logprobs(batch)
    finally:
        model.gradient_checkpointing_disable()
    for out in (trained, reference):
        torch.testing.assert_close(out.chosen.detach(), expected.chosen, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.rejected.detach(), expected.rejected, atol=1e-4, rtol=0)
    assert reference.positions < trained.positions
