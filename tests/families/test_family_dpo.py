"""DPO on every family's tiny real model: the log-prob paths, the reference modes, gradients and shared-prefix
sampling, each against the plainest computation there is — every sequence alone through the model's own
forward on its own processor outputs.

The preference batch has images of different sizes and aspect ratios (``mixed_images``: different tile counts
for LLaVA-NeXT and Idefics3, different grids for Qwen2.5-VL) and answers of different lengths, so padding,
per-image concatenation and per-token extras are all exercised. LoRA B weights are perturbed so that the
adapter changes every log-prob (a path that silently dropped it would fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_support import perturb_lora
from families.conftest import mixed_images
from stllava_med.backbone import load_backbone
from stllava_med.chat import IGNORE_INDEX, ChatFormat, encode, prompt_text, vqa_turns
from stllava_med.data.pairs.collate import PairCollator, PairItem
from stllava_med.data.preference import PreferencePair
from stllava_med.data.vqa import load_image
from stllava_med.dpo.logps import LogProbs
from stllava_med.dpo.losses import dpo_loss
from stllava_med.schema import GeneratePrompts

pytestmark = [pytest.mark.families, pytest.mark.usefixtures("one_thread")]

# The builders' names of the families whose DPO log-probs have a fast path (prefix sharing, images encoded once)
# and whose sampling decodes K answers from one shared prefill. A family losing (or gaining) one fails here.
FAST_PATH = {"llava15", "llava_mistral", "llava_next", "qwen2_5_vl", "sq_llava"}
SHARED_PREFIX_SAMPLING = {"llava15", "llava_mistral", "llava_next", "qwen2_5_vl", "sq_llava"}
ATOL = 1e-4

FMT = ChatFormat()
PAIRS = [  # answers of different lengths, on either side
    ("Is there a fracture?", "Yes.", "No, the bones look normal and intact."),
    ("What organ is shown in this image?", "The liver, with a lesion in the right lobe.", "Brain."),
    ("Where is the mass?", "Left upper lobe.", "There is no mass."),
    ("Is this an MRI?", "No", "Yes, it is an axial MRI of the abdomen."),
]


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """A JSONL shard in the project's pair format, one PNG of a different size per pair."""
    root = tmp_path_factory.mktemp("family_pairs")
    rows = []
    for index, ((prompt, chosen, rejected), image) in enumerate(zip(PAIRS, mixed_images())):
        image.save(root / f"image{index}.png")
        rows.append(PreferencePair(id=f"pair-{index}", images=[f"image{index}.png"], prompt=prompt, chosen=chosen,
                                   rejected=rejected, source="tests/families").to_json())
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def items(shard: Path) -> list[PairItem]:
    lines = shard.read_text(encoding="utf-8").splitlines()
    return [PairItem(PreferencePair.from_json(json.loads(line)), shard) for line in lines]


def policy_of(family_path: Path):
    """The family's model with a fresh LoRA adapter (projector as a trained copy), B weights perturbed."""
    torch.manual_seed(0)
    backbone = load_backbone({"name_or_path": str(family_path), "name": family_path.name,
                              "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}})
    perturb_lora(backbone.model)
    return backbone


def base_of(family_path: Path):
    return load_backbone({"name_or_path": str(family_path), "name": family_path.name})


def per_sequence(model, processor, shard: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of every chosen / rejected sequence, each alone: the processor's outputs for
    that one conversation straight into ``model(...)``, log-softmax at the label positions."""
    sums: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for item in items(shard):
        pair = item.pair
        image = load_image(shard.parent / pair.images[0])
        for side in ("chosen", "rejected"):
            encoded = encode(processor, vqa_turns(pair.prompt, getattr(pair, side)), FMT, image)
            assert encoded.pixel_values is not None
            input_ids = encoded.input_ids.unsqueeze(0)
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           pixel_values=encoded.pixel_values, use_cache=False, **encoded.extra).logits
            targets = encoded.labels[1:]
            mask = targets != IGNORE_INDEX
            assert int(mask.sum()) > 0
            logps = torch.log_softmax(logits[0, :-1].float(), dim=-1)[mask]
            sums[side].append(logps.gather(-1, targets[mask].unsqueeze(-1)).sum())
    return torch.stack(sums["chosen"]), torch.stack(sums["rejected"])


def assert_same(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor], what: str,
                atol: float = ATOL) -> None:
    for side, g, e in zip(("chosen", "rejected"), got, expected):
        torch.testing.assert_close(g.detach().float(), e.detach().float(), atol=atol, rtol=0,
                                   msg=lambda m, side=side: f"{what} ({side}): {m}")


def test_every_logprob_path_equals_the_per_sequence_forward(family, family_path, shard):
    backbone = policy_of(family_path)
    model = backbone.model.eval()
    batch = PairCollator(backbone.processor, FMT)(items(shard))
    assert batch["chosen_input_ids"].shape[0] == len(PAIRS)
    lengths = (batch["chosen_labels"] != IGNORE_INDEX).sum(-1).tolist()
    assert len(set(lengths)) > 1  # answers of different lengths: padding inside the batch
    with torch.no_grad():
        expected = per_sequence(model, backbone.processor, shard)
        shared = LogProbs(model, prefix_sharing=True)
        plain = LogProbs(model, prefix_sharing=False)
        assert shared.fast is plain.fast is (family in FAST_PATH)
        results = {"generic": shared.generic(batch)}
        if shared.fast:
            assert shared.prefix_sharing and not plain.prefix_sharing
            results["prefix_sharing"] = shared(batch)
            results["concatenated"] = plain(batch)
            # the shared prefix really ran once: fewer positions than 2B full sequences
            assert results["prefix_sharing"].positions < results["concatenated"].positions
        else:  # no fast path: both settings are the model's own forward
            results["prefix_sharing=True"] = shared(batch)
            results["prefix_sharing=False"] = plain(batch)
        for name, out in results.items():
            assert_same((out.chosen, out.rejected), expected, f"{family} {name}")
            torch.testing.assert_close(out.chosen_tokens, batch["chosen_labels"][:, 1:].ne(IGNORE_INDEX).sum(-1).float())
        # the adapter matters: without it every log-prob moves
        with model.disable_adapter():
            off = per_sequence(model, backbone.processor, shard)
    assert (off[0] - expected[0]).abs().min() > 1e-3 and (off[1] - expected[1]).abs().min() > 1e-3


def test_reference_modes_equal_the_base_model(family, family_path, shard, tmp_path):
    from stllava_med.data.pairs.datamodule import PreferenceDataModule
    from stllava_med.data.pairs.scan import processor_fingerprint
    from stllava_med.data.pairs.settings import PreferenceDataSettings
    from stllava_med.dpo.reference import (
        AdapterOffReference,
        CopyReference,
        PrecomputedReference,
        ReferenceCache,
        reference_fingerprint,
    )

    backbone = policy_of(family_path)
    policy = backbone.model.train()  # references never depend on (or change) the policy's mode
    batch = PairCollator(backbone.processor, FMT)(items(shard))
    base = base_of(family_path)
    with torch.no_grad():
        expected = per_sequence(base.model.eval(), base.processor, shard)
        policy_logps = LogProbs(policy)(batch)
    # the reference is not the policy
    assert (policy_logps.chosen - expected[0]).abs().min() > 1e-3

    settings = [True, False] if family in FAST_PATH else [True]
    for prefix_sharing in settings:
        adapter_off = AdapterOffReference(policy, prefix_sharing=prefix_sharing)
        assert_same(adapter_off.logps(batch), expected, f"{family} adapter_off prefix_sharing={prefix_sharing}")
        copy = CopyReference(base_of(family_path).model, prefix_sharing=prefix_sharing)
        assert not copy.model.training and not any(p.requires_grad for p in copy.model.parameters())
        assert_same(copy.logps(batch), expected, f"{family} copy prefix_sharing={prefix_sharing}")
    assert policy.training

    # precomputed, as train_dpo builds it: the datamodule's scan and reference batches, adapter_off as source
    data = PreferenceDataModule(PreferenceDataSettings(path=str(shard), batch_size=4, val_fraction=0.0, progress=False),
                                backbone.processor, FMT)
    data.setup("fit")
    assert len(data.train_entries) == len(PAIRS) and not data.train_scan.report["skipped"]
    cache = ReferenceCache(tmp_path, data_fingerprint=data.data_fingerprint,
                           reference=reference_fingerprint(str(family_path), settings={"dtype": "float32"}),
                           processor=processor_fingerprint(backbone.processor, FMT), max_length=data.settings.max_length)
    precomputed = PrecomputedReference(
        cache, AdapterOffReference(policy), data.digests,
        lambda ids, rank, world: data.reference_batches(ids, rank=rank, world_size=world, batch_size=3),
        batch_size=3, progress=False)
    precomputed.prepare(torch.device("cpu"))
    assert precomputed.computed == len(PAIRS) and policy.training
    assert_same(precomputed.logps(batch), expected, f"{family} precomputed")


def _lora_gradients(model, logps_fn, batch, reference) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = logps_fn(batch)
    losses, _, _ = dpo_loss(out.chosen, out.rejected, *reference, beta=0.1, loss_type="sigmoid")
    losses.mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


class _PerSequence:
    """The per-sequence forward as a log-prob function (for families without a fast path)."""

    def __init__(self, model, processor, shard: Path) -> None:
        self.model, self.processor, self.shard = model, processor, shard

    def __call__(self, batch):
        from types import SimpleNamespace

        chosen, rejected = per_sequence(self.model, self.processor, self.shard)
        return SimpleNamespace(chosen=chosen, rejected=rejected)


def test_dpo_gradients_through_the_fast_path_equal_the_generic_path(family, family_path, shard):
    from stllava_med.dpo.reference import AdapterOffReference

    backbone = policy_of(family_path)
    model = backbone.model.train()
    batch = PairCollator(backbone.processor, FMT)(items(shard))
    reference = AdapterOffReference(model).logps(batch)
    generic = LogProbs(model)
    expected = _lora_gradients(model, generic.generic, batch, reference)
    assert any("lora_A" in n for n in expected) and any("lora_B" in n for n in expected)
    assert any(generic.family.is_projector_parameter(n) for n in expected)  # the projector copy trains too
    assert max(float(g.abs().max()) for n, g in expected.items() if "lora_B" in n) > 1e-6
    if family in FAST_PATH:
        others = {"prefix_sharing": LogProbs(model, prefix_sharing=True),
                  "concatenated": LogProbs(model, prefix_sharing=False)}
    else:  # the generic path is the only one: check it against each sequence alone instead
        others = {"per_sequence": _PerSequence(model, backbone.processor, shard)}
    for name, fn in others.items():
        got = _lora_gradients(model, fn, batch, reference)
        assert got.keys() == expected.keys(), (name, sorted(set(got) ^ set(expected))[:5])
        for key, grad in expected.items():
            torch.testing.assert_close(got[key], grad, rtol=1e-3, atol=1e-5, msg=lambda m, k=key, n=name: f"{n} {k}: {m}")


def test_shared_prefix_sampling_equals_num_return_sequences(family, family_backbone):
    from stllava_med.chat import Turn
    from stllava_med.generation import sample_sequences, supports_shared_prefix

    backbone = family_backbone
    assert supports_shared_prefix(backbone.model) is (family in SHARED_PREFIX_SAMPLING)
    if family not in SHARED_PREFIX_SAMPLING:
        return  # generation takes generate()'s num_return_sequences (generate.shared_prefix=auto)
    images = mixed_images()[:3]
    questions = ["Is this normal?", "Where is the largest lesion located in this image?", "What organ?"]
    answer_prompts = [prompt_text(backbone.processor, vqa_turns(q), "assistant", FMT) for q in questions]
    question_prompts = [prompt_text(backbone.processor, [Turn("user", GeneratePrompts().describe),
                                                         Turn("assistant", d)], "questioner", FMT)
                        for d in ("A chest X-ray.", "An axial CT of the abdomen with contrast.", "A brain MRI.")]
    sampling = {"temperature": 1.2, "top_k": 100, "top_p": 0.95}
    for prompts, questioner in ((answer_prompts, False), (question_prompts, True)):
        texts = {}
        for shared in (True, False):
            torch.manual_seed(7)
            texts[shared] = sample_sequences(backbone, prompts, images, k=3, max_new_tokens=8, shared_prefix=shared,
                                             questioner=questioner, **sampling)
        assert len(texts[True]) == 9 and texts[True] == texts[False], (questioner, texts)
        assert len(set(texts[True][:3])) > 1  # genuinely sampled, not three copies
