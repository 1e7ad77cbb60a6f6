"""The vision feature cache (``dpo.vision_cache_dir``): the DPO step's loss and projector / LoRA gradients with
cached features equal those without (exactly in float32; within a stated tolerance in float16), batches skip
the image work, keys, reuse by a second job, torn and corrupted shards, and the claim protocol."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from dpo_support import one_torch_thread, perturb_lora, sample_pairs, tiny_backbone, write_shard  # noqa: F401  (autouse fixture)
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.datamodule import PreferenceDataModule
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.dpo.module import DPOModule
from stllava_med.dpo.reference import AdapterOffReference, PrecomputedReference, ReferenceCache
from stllava_med.dpo.vision_cache import VisionCache, VisionCacheError, VisionIndex, build_cached_vision
from stllava_med.schema import DPOSettings

pytestmark = pytest.mark.integration

# float16 storage of a float32 tower's output: the relative error of one rounding is <= 2**-11 (4.9e-4) per
# feature; measured on the tiny backbone, the loss moves by < 2e-7 and no gradient by more than 6e-4 of its
# largest entry. The tolerances leave a margin above that.
FP16_LOSS_ATOL = 1e-5
FP16_GRAD_RTOL = 5e-3


@pytest.fixture(scope="module")
def backbone(tiny_backbone_path):
    backbone = tiny_backbone(lora=True)
    perturb_lora(backbone.model)  # the policy differs from its reference
    return backbone


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    # 12 pairs over the sample's images, some images shared by several pairs
    return write_shard(tmp_path_factory.mktemp("pairs") / "p.jsonl", sample_pairs(12, stride=3))


def datamodule(backbone, pairs, **kw):
    settings = PreferenceDataSettings(path=str(pairs), batch_size=4, val_fraction=0.0, progress=False, **kw)
    dm = PreferenceDataModule(settings, backbone.processor, ChatFormat())
    dm.setup("fit")
    return dm


def filled(root, backbone, dm, dtype="auto", **kw):
    vision = build_cached_vision(root, backbone.model, dm, dtype=dtype, batch_size=2, progress=False, **kw)
    module = DPOModule(backbone.model, AdapterOffReference(backbone.model), DPOSettings(), {"lr": 1e-4},
                       vision_cache=vision)
    vision.prepare(module.logprobs, torch.device("cpu"))
    return vision, module


def loss_and_grads(module, batch):
    model = module.policy
    model.train()
    model.zero_grad(set_to_none=True)
    out = module.compute(batch)
    loss = out["losses"].mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def compare(backbone, pairs, root, dtype):
    plain_dm = datamodule(backbone, pairs)
    plain = DPOModule(backbone.model, AdapterOffReference(backbone.model), DPOSettings(), {"lr": 1e-4})
    cached_dm = datamodule(backbone, pairs)
    vision, cached = filled(root, backbone, cached_dm, dtype)
    results = []
    for before, after in zip(plain_dm.train_dataset(), cached_dm.train_dataset(), strict=True):
        assert after["pixel_values"] is None and len(after["vision_keys"]) == len(after["ids"])  # no image work
        for key in ("chosen_input_ids", "rejected_input_ids", "chosen_labels", "rejected_labels", "prompt_lengths"):
            assert torch.equal(before[key], after[key]), key  # the stand-in expands the image exactly
        results.append((loss_and_grads(plain, before), loss_and_grads(cached, after)))
    return vision, results


def trainable_names(grads):
    names = [n for n, g in grads.items() if g is not None]
    assert any("multi_modal_projector" in n for n in names) and any("lora_" in n for n in names)
    return names


def test_float32_cache_gives_exactly_the_uncached_loss_and_gradients(backbone, pairs, tmp_path):
    vision, results = compare(backbone, pairs, tmp_path, "float32")
    assert vision.lossless and vision.cache.key_parts["dtype"] == "float32"
    assert vision.computed == len(vision.items) < 12  # each distinct image once, not once per pair
    for (loss, grads), (cached_loss, cached_grads) in results:
        assert torch.equal(loss, cached_loss)
        for name in trainable_names(grads):
            assert torch.equal(grads[name], cached_grads[name]), name


def test_float16_cache_is_within_the_stated_tolerance(backbone, pairs, tmp_path):
    vision, results = compare(backbone, pairs, tmp_path, "float16")
    assert not vision.lossless
    for (loss, grads), (cached_loss, cached_grads) in results:
        assert abs(float(loss - cached_loss)) <= FP16_LOSS_ATOL
        for name in trainable_names(grads):
            scale = float(grads[name].abs().max())
            assert float((grads[name] - cached_grads[name]).abs().max()) <= FP16_GRAD_RTOL * scale, name
    shard = next(vision.cache.dir.glob("features-*.npy"))
    assert vision.cache.index.refresh().shards[shard.name]["dtype"] == "float16"


def test_auto_is_the_towers_dtype_and_a_second_job_computes_nothing(backbone, pairs, tmp_path):
    first, _ = filled(tmp_path, backbone, datamodule(backbone, pairs))
    assert first.cache.key_parts["dtype"] == "float32" and first.lossless  # the tiny tower runs in float32
    second, _ = filled(tmp_path, backbone, datamodule(backbone, pairs, fraction=0.5))  # another sweep job
    assert second.cache.dir == first.cache.dir and second.computed == 0
    lines = (first.cache.dir / "index.jsonl").read_text().splitlines()
    assert sum(len(json.loads(line)["images"]) for line in lines) == len(first.items)  # each image once


def test_auto_keeps_a_float64_tower_exact():
    from stllava_med.dpo.vision_cache import storage_dtype

    assert storage_dtype("auto", torch.float64) == torch.float64  # an exactness run stores what its tower computed
    assert storage_dtype("auto", torch.bfloat16) == torch.bfloat16 and storage_dtype("float16", torch.float64) == torch.float16


def test_key_covers_tower_weights_and_image_processing(backbone, pairs, tmp_path):
    dm = datamodule(backbone, pairs)
    base = build_cached_vision(tmp_path, backbone.model, dm, progress=False).cache.key
    padded = build_cached_vision(tmp_path, backbone.model, datamodule(backbone, pairs, image_aspect_ratio="pad"),
                                 progress=False).cache.key
    half = build_cached_vision(tmp_path, backbone.model, dm, dtype="float16", progress=False).cache.key
    tower = backbone.model.get_base_model().model.vision_tower
    weight = next(tower.parameters())
    with torch.no_grad():
        weight.add_(1e-3)
    try:
        changed = build_cached_vision(tmp_path, backbone.model, dm, progress=False).cache.key
    finally:
        with torch.no_grad():
            weight.sub_(1e-3)
    assert len({base, padded, half, changed}) == 4
    assert build_cached_vision(tmp_path, backbone.model, dm, progress=False).cache.key == base


def test_a_torn_shard_counts_as_absent_and_is_recomputed(backbone, pairs, tmp_path):
    vision, _ = filled(tmp_path, backbone, datamodule(backbone, pairs))
    shard = sorted(vision.cache.dir.glob("features-*.npy"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # torn
    fresh = VisionIndex(vision.cache.dir).refresh()
    lost = {d for d, e in VisionIndex(vision.cache.dir).entries.items() if e.shard == shard.name}
    assert all(d not in fresh for d in lost)
    again, _ = filled(tmp_path, backbone, datamodule(backbone, pairs))
    assert again.computed == len(json.loads(
        next(line for line in (vision.cache.dir / "index.jsonl").read_text().splitlines()
             if json.loads(line)["shard"] == shard.name))["images"])
    assert not again.cache.missing(again.items)


def test_a_changed_shard_is_a_clear_error(backbone, pairs, tmp_path):
    vision, _ = filled(tmp_path, backbone, datamodule(backbone, pairs))
    shard = sorted(vision.cache.dir.glob("features-*.npy"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    reader = VisionCache(tmp_path, vision=vision.cache.key_parts["vision"], images=vision.cache.key_parts["images"],
                         dtype=vision.cache.dtype)
    digest = next(d for d, e in reader.index.refresh().entries.items() if e.shard == shard.name)
    with pytest.raises(VisionCacheError, match="checksum mismatch"):
        reader.load([digest], device="cpu", dtype=torch.float32)


def test_non_finite_features_are_never_cached(backbone, pairs, tmp_path):
    vision = build_cached_vision(tmp_path, backbone.model, datamodule(backbone, pairs), dtype="float16",
                                 progress=False)
    with pytest.raises(VisionCacheError, match="not finite in float16"):
        vision.cache.append(["a", "b"], torch.tensor([[[1.0]], [[1e6]]]), [[3, 2, 2], [3, 2, 2]])  # overflows


def test_concurrent_fillers_compute_every_image_once(backbone, pairs, tmp_path):
    """Two processes' worth of fillers (threads: flock locks are per open file) on a cold cache."""
    vision = [build_cached_vision(tmp_path, backbone.model, datamodule(backbone, pairs), batch_size=1,
                                  progress=False) for _ in range(2)]
    logprobs = DPOModule(backbone.model, AdapterOffReference(backbone.model), DPOSettings(), {"lr": 1e-4}).logprobs
    errors = []

    def fill(v):
        try:
            v.prepare(logprobs, torch.device("cpu"))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    with torch.no_grad():
        threads = [threading.Thread(target=fill, args=(v,)) for v in vision]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert sum(v.computed for v in vision) == len(vision[0].items)
    lines = (vision[0].cache.dir / "index.jsonl").read_text().splitlines()
    written = [d for line in lines for d in json.loads(line)["images"]]
    assert sorted(written) == sorted(vision[0].items)


def test_the_precomputed_reference_pass_reads_the_cached_features(backbone, pairs, tmp_path):
    """Its batches come without pixels; its log-probs equal those of the uncached pass."""
    def reference(dm, root):
        return PrecomputedReference(
            ReferenceCache(root, data_fingerprint=dm.data_fingerprint, reference={"w": "x"}, processor="p",
                           max_length=None),
            AdapterOffReference(backbone.model), dm.digests,
            lambda ids, rank, world: dm.reference_batches(ids, rank=rank, world_size=world), batch_size=4,
            progress=False)

    plain_dm = datamodule(backbone, pairs)
    plain = reference(plain_dm, tmp_path / "plain")
    plain.prepare(torch.device("cpu"))
    dm = datamodule(backbone, pairs)
    cached = reference(dm, tmp_path / "cached")
    vision, module = filled(tmp_path / "vision", backbone, dm, "float32")
    module.reference = cached
    cached.vision = module._vision_features
    assert next(iter(dm.reference_batches()))["pixel_values"] is None
    cached.prepare(torch.device("cpu"))
    assert cached.table == plain.table
