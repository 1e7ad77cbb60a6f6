"""Reference modes: the precomputed on-disk cache against on-the-fly reference log-probs, cache keys and
reuse, and corrupt caches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_support import TINY_PATH, one_torch_thread, perturb_lora, sample_pairs, tiny_backbone, write_shard  # noqa: F401  (autouse fixture)
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.datamodule import PreferenceDataModule
from stllava_med.data.pairs.scan import processor_fingerprint
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.dpo.reference import (
    AdapterOffReference,
    CopyReference,
    PrecomputedReference,
    ReferenceCache,
    ReferenceCacheError,
    reference_fingerprint,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_backbone_path):
    backbone = tiny_backbone(lora=True)
    perturb_lora(backbone.model)  # the policy differs from its reference
    path = write_shard(tmp_path_factory.mktemp("pairs") / "p.jsonl", sample_pairs(10))
    settings = PreferenceDataSettings(path=str(path), batch_size=4, val_fraction=0.2, progress=False)
    dm = PreferenceDataModule(settings, backbone.processor, ChatFormat())
    dm.setup("fit")
    return backbone, dm


def make_cache(root, dm, max_length=2048, data=None):
    return ReferenceCache(root, data_fingerprint=data or dm.data_fingerprint,
                          reference=reference_fingerprint(str(TINY_PATH), settings={"dtype": "float32"}),
                          processor=processor_fingerprint(dm.processor, dm.fmt), max_length=max_length)


def precomputed(cache, source, dm):
    return PrecomputedReference(cache, source, dm.digests,
                                lambda ids, rank, world: dm.reference_batches(ids, rank=rank, world_size=world),
                                batch_size=4, progress=False)


def test_precomputed_equals_on_the_fly_reference(setup, tmp_path):
    backbone, dm = setup
    on_the_fly = AdapterOffReference(backbone.model)
    reference = precomputed(make_cache(tmp_path, dm), AdapterOffReference(backbone.model), dm)
    backbone.model.train()
    reference.prepare(torch.device("cpu"))
    assert backbone.model.training  # the pass restores the mode it found
    assert reference.computed == len(dm.train_entries) + len(dm.val_entries) == 10
    for dataset in (dm.train_dataset(), dm.val_dataset()):
        for batch in dataset:
            cached = reference.logps(batch)  # served as float64 (lossless); the step casts to the policy's dtype
            live = on_the_fly.logps(batch)
            torch.testing.assert_close(cached[0].to(live[0].dtype), live[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(cached[1].to(live[1].dtype), live[1], atol=1e-5, rtol=0)
            with torch.no_grad():  # and the reference really is the adapter-free model, not the policy
                policy = on_the_fly.logprobs(batch)
            assert (policy.chosen - live[0]).abs().max() > 1e-3


def test_a_second_job_reuses_the_cache(setup, tmp_path):
    backbone, dm = setup
    first = precomputed(make_cache(tmp_path, dm), AdapterOffReference(backbone.model), dm)
    first.prepare(torch.device("cpu"))
    second = precomputed(make_cache(tmp_path, dm), None, dm)  # no model needed: everything is cached
    second.prepare(torch.device("cpu"))
    assert second.computed == 0 and second.table == first.table
    assert json.loads((first.cache.dir / "meta.json").read_text())["max_length"] == 2048


def test_cache_key_covers_data_weights_processor_and_max_length(setup, tmp_path):
    _, dm = setup
    base = make_cache(tmp_path, dm)
    assert make_cache(tmp_path, dm).key == base.key
    assert make_cache(tmp_path, dm, max_length=1024).key != base.key
    assert make_cache(tmp_path, dm, data="other-data").key != base.key
    other_weights = ReferenceCache(tmp_path, data_fingerprint=dm.data_fingerprint,
                                   reference={"weights": "x", "load": {"dtype": "float32"}},
                                   processor=processor_fingerprint(dm.processor, dm.fmt), max_length=2048)
    assert other_weights.key != base.key
    other_template = ReferenceCache(tmp_path, data_fingerprint=dm.data_fingerprint,
                                    reference=base.key_parts["reference"],
                                    processor=processor_fingerprint(dm.processor, ChatFormat(system_prompt="Be brief.")),
                                    max_length=2048)
    assert other_template.key != base.key


def test_non_finite_cached_logps_are_a_clear_error(setup, tmp_path):
    backbone, dm = setup
    reference = precomputed(make_cache(tmp_path, dm), AdapterOffReference(backbone.model), dm)
    reference.prepare(torch.device("cpu"))
    lines = reference.cache.path.read_text().splitlines()
    row = json.loads(lines[3])
    row["ref_rejected_logps"] = math.nan
    lines[3] = json.dumps(row)
    reference.cache.path.write_text("\n".join(lines) + "\n")
    again = precomputed(make_cache(tmp_path, dm), AdapterOffReference(backbone.model), dm)
    with pytest.raises(ReferenceCacheError, match=rf"logps.jsonl:4: pair '{row['id']}' has non-finite cached"):
        again.prepare(torch.device("cpu"))


def test_non_finite_reference_outputs_are_never_cached(setup, tmp_path):
    _, dm = setup
    cache = make_cache(tmp_path, dm)
    with pytest.raises(ReferenceCacheError, match="non-finite log-probs for pairs"):
        cache.append(["a", "b"], {"a": "x", "b": "y"}, torch.tensor([-1.0, float("-inf")]), torch.tensor([-2.0, -3.0]))
    assert not cache.path.exists()


def test_copy_reference_is_frozen_and_matches_adapter_off_at_the_same_weights(setup):
    backbone, dm = setup
    copy = CopyReference(tiny_backbone(lora=False).model)
    assert not any(p.requires_grad for p in copy.model.parameters()) and not copy.model.training
    batch = next(iter(dm.train_dataset()))
    copy_logps = copy.logps(batch)
    adapter_off = AdapterOffReference(backbone.model).logps(batch)
    torch.testing.assert_close(copy_logps[0], adapter_off[0], atol=1e-5, rtol=0)


def test_ranks_split_the_precomputation_and_read_the_same_cache(setup, tmp_path):
    """Two simulated DDP ranks (threads with a real barrier, each with its own copy of the reference)."""
    import threading

    _, dm = setup
    barrier = threading.Barrier(2)
    ranks = [precomputed(make_cache(tmp_path, dm), CopyReference(tiny_backbone(lora=False).model), dm)
             for _ in range(2)]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            ranks[rank].prepare(torch.device("cpu"), rank=rank, world_size=2, barrier=barrier.wait)
        except BaseException as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    # each rank claimed a share (at most half of what was free when it claimed), together every pair once
    assert sum(r.computed for r in ranks) == 10 and min(r.computed for r in ranks) > 0
    assert len(make_cache(tmp_path, dm).path.read_text().splitlines()) == 10
    assert ranks[0].table == ranks[1].table and len(ranks[0].table) == 10


def test_float64_reference_log_probs_are_computed_stored_and_served_without_rounding(setup, tmp_path):
    """A float64 run (the benchmarks' exactness runs) keeps float64 end to end: the output layer's log-softmax is
    not cut to float32, and the cache stores and serves the values exactly (it used to round them to float32)."""
    import copy

    backbone, dm = setup
    model = copy.deepcopy(backbone.model).double()
    live = AdapterOffReference(model)
    reference = precomputed(make_cache(tmp_path, dm), AdapterOffReference(model), dm)
    reference.prepare(torch.device("cpu"))
    for batch in dm.train_dataset():
        expected = live.logps(batch)
        assert expected[0].dtype == torch.float64
        served = reference.logps(batch)
        assert torch.equal(served[0], expected[0]) and torch.equal(served[1], expected[1])
        # and the values carry more than float32's precision (a float32 round trip would change them)
        assert not torch.equal(expected[0].float().double(), expected[0])
