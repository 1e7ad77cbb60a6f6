"""PreferenceDataModule on real pairs and the tiny backbone's processor: exactly-once sharding over simulated
DDP ranks x dataloader workers, per-epoch shuffling, mid-epoch resume, nested fractions, length validation,
bad pairs, collation."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from dpo_support import SAMPLE_PAIRS, one_torch_thread, sample_pairs, write_shard  # noqa: F401  (autouse fixture)
from stllava_med.chat import IGNORE_INDEX, ChatFormat
from stllava_med.data.pairs.datamodule import PreferenceDataModule
from stllava_med.data.pairs.encoding import encode_pair
from stllava_med.data.pairs.scan import PairLengths, PairMeasurer, scan_pairs
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.data.pairs.stream import PreferenceBatches, PreferenceLoader
from stllava_med.data.preference import BadPairError, iter_pairs, resolve_image, resolve_shards
from stllava_med.data.vqa import load_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def processor(tiny_backbone_path):
    from stllava_med.backbone import load_processor

    return load_processor(str(tiny_backbone_path))


def datamodule(processor, path, tmp_path=None, **overrides):
    settings = PreferenceDataSettings(path=str(path), progress=False, **{"batch_size": 3, "val_fraction": 0.0, **overrides})
    dm = PreferenceDataModule(settings, processor, ChatFormat(), out_dir=tmp_path)
    dm.setup("fit")
    return dm


def real_ids(batches):
    return [i for b in batches for i, w in zip(b["ids"], b["weight"].tolist()) if w == 1.0]


def test_two_ranks_two_workers_see_every_pair_exactly_once(processor, tmp_path):
    rows = sample_pairs(23)
    write_shard(tmp_path / "shards" / "a.jsonl", rows[:9])
    write_shard(tmp_path / "shards" / "b.jsonl", rows[9:])
    dm = datamodule(processor, tmp_path / "shards", num_workers=2, shuffle_buffer=4)
    per_rank = []
    for rank in range(2):
        loader = PreferenceLoader(dm.train_dataset(rank=rank, world_size=2), num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)  # the length Lightning plans with is what comes out
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])  # DDP ranks run the same number of steps
    seen = Counter(real_ids(per_rank[0]) + real_ids(per_rank[1]))
    assert set(seen) == {r["id"] for r in rows} and set(seen.values()) == {1}
    padding = sum(int((b["weight"] == 0).sum()) for batches in per_rank for b in batches)
    assert padding == 4 * 6 - 23  # every slot padded to ceil(23 / 4) = 6 items


def test_each_epoch_reshuffles_the_same_pairs(processor, tmp_path):
    write_shard(tmp_path / "p.jsonl", sample_pairs(12))
    dm = datamodule(processor, tmp_path / "p.jsonl", shuffle_buffer=5)
    loader = PreferenceLoader(dm.train_dataset(), num_workers=0)
    epoch0, epoch1 = real_ids(list(loader)), real_ids(list(loader))
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again = PreferenceLoader(dm.train_dataset(), num_workers=0)
    assert real_ids(list(again)) == epoch0  # seeded: the same order for the same epoch


def test_loader_resumes_mid_epoch_without_repeating(processor, tmp_path):
    write_shard(tmp_path / "p.jsonl", sample_pairs(14))
    dm = datamodule(processor, tmp_path / "p.jsonl", num_workers=2)
    full = [b["ids"] for b in PreferenceLoader(dm.train_dataset(), num_workers=2)]
    interrupted = PreferenceLoader(dm.train_dataset(), num_workers=2)
    iterator = iter(interrupted)
    done = [next(iterator)["ids"] for _ in range(3)]
    state = interrupted.state_dict()
    del iterator
    assert state == {"epoch": 0, "consumed": 3}
    resumed = PreferenceLoader(dm.train_dataset(), num_workers=2)
    resumed.load_state_dict(state)
    assert done + [b["ids"] for b in resumed] == full
    finished = PreferenceLoader(dm.train_dataset(), num_workers=2)
    finished.load_state_dict({"epoch": 0, "consumed": len(finished)})  # epoch ended: the next one starts
    assert [b["ids"] for b in finished] != full


def test_fractions_are_nested_and_validation_is_fixed(processor, tmp_path):
    write_shard(tmp_path / "p.jsonl", sample_pairs(80))
    selected = {}
    for fraction in (0.25, 0.5, 1.0):
        out = tmp_path / f"run{fraction}"
        datamodule(processor, tmp_path / "p.jsonl", out, fraction=fraction, val_fraction=0.1)
        selected[fraction] = set((out / "selected_ids.txt").read_text().split())
        val = set((out / "val_ids.txt").read_text().split())
        assert val and not (val & selected[fraction])
        assert json.loads((out / "data_summary.json").read_text())["train"]["pairs"] == len(selected[fraction])
        selected.setdefault("val", val)
        assert val == selected["val"]
    assert selected[0.25] < selected[0.5] < selected[1.0]
    assert 0.1 < len(selected[0.25]) / len(selected[1.0]) < 0.45


def test_fast_length_measurement_equals_the_processor(processor):
    measurer = PairMeasurer(processor, ChatFormat(), check_every=10**9)
    for pair, shard, _ in list(iter_pairs(resolve_shards(SAMPLE_PAIRS)))[:25]:
        images = [resolve_image(i, shard) for i in pair.images]
        measured = measurer.measure(pair, images)
        assert measurer.fast
        assert measured == PairLengths.of(encode_pair(processor, ChatFormat(), pair, load_image(images[0])))


def test_too_long_pairs_are_dropped_and_counted_never_truncated(processor, tmp_path):
    rows = sample_pairs(6)
    rows[1]["chosen"] = "The lesion is in the left upper lobe of the lung. " * 6
    write_shard(tmp_path / "p.jsonl", rows)
    full = datamodule(processor, tmp_path / "p.jsonl")
    prompt_tokens = min(e.prompt_tokens for e in full.train_entries)
    lengths = {e.id: e.length for e in full.train_entries}
    limit = sorted(lengths.values())[-2]  # only the long pair exceeds it
    dm = datamodule(processor, tmp_path / "p.jsonl", max_length=limit)
    assert dm.summary["scan"]["skipped"] == {"too_long": 1}
    assert rows[1]["id"] not in {e.id for e in dm.train_entries}
    tight = scan_pairs(resolve_shards(tmp_path / "p.jsonl"), processor, ChatFormat(),
                       PreferenceDataSettings(path="-", max_length=prompt_tokens, progress=False))
    # image + prompt alone reach max_length: truncating would cut image tokens, so these are dropped too
    assert tight.report["skipped"]["prompt_too_long"] >= 1 and not tight.entries
    batch = next(iter(dm.train_dataset()))
    assert max(int(m.sum()) for m in batch["chosen_attention_mask"]) <= limit


@pytest.mark.parametrize("field, value, reason", [
    ("images", ["/nonexistent/scan.jpg"], "missing image"),
    ("chosen", " ", "empty chosen"),
    ("rejected", None, "chosen equals rejected"),
])
def test_bad_pairs_are_errors_or_counted_skips(processor, tmp_path, field, value, reason):
    rows = sample_pairs(4)
    rows[2][field] = rows[2]["chosen"] if value is None else value
    write_shard(tmp_path / "p.jsonl", rows)
    with pytest.raises(BadPairError, match=rf"p.jsonl:3 \(pair '{rows[2]['id']}'\): {reason}"):
        datamodule(processor, tmp_path / "p.jsonl")
    dm = datamodule(processor, tmp_path / "p.jsonl", on_bad_pair="skip")
    assert dm.summary["scan"]["skipped"] == {reason.replace(" ", "_"): 1}
    assert len(dm.train_entries) == 3


def test_duplicate_ids_are_bad_pairs(processor, tmp_path):
    rows = sample_pairs(3)
    rows[2]["id"] = rows[0]["id"]
    write_shard(tmp_path / "p.jsonl", rows)
    with pytest.raises(BadPairError, match="duplicate id"):
        datamodule(processor, tmp_path / "p.jsonl")


def test_collation_targets_only_answers_and_shares_image_and_prompt(processor, tmp_path):
    rows = sample_pairs(5)
    write_shard(tmp_path / "p.jsonl", rows)
    dm = datamodule(processor, tmp_path / "p.jsonl", batch_size=5)
    batch = next(iter(dm.train_dataset()))
    by_id = {r["id"]: r for r in rows}
    tokenizer = processor.tokenizer
    assert batch["pixel_values"].shape[0] == 5  # one image per pair, shared by chosen and rejected
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    for row, pair_id in enumerate(batch["ids"]):
        n = int(batch["prompt_lengths"][row])
        for side in ("chosen", "rejected"):
            ids, labels = batch[f"{side}_input_ids"][row], batch[f"{side}_labels"][row]
            assert torch.equal(ids[:n], batch["chosen_input_ids"][row, :n])  # shared prompt
            assert (labels[:n] == IGNORE_INDEX).all()  # no target in the image or question
            target = tokenizer.decode(labels[labels != IGNORE_INDEX])
            assert target == by_id[pair_id][side] + tokenizer.eos_token
            assert int((ids == image_id).sum()) == 64


def test_more_slots_than_pairs_is_refused_before_it_can_hang_ddp(processor, tmp_path):
    write_shard(tmp_path / "p.jsonl", sample_pairs(3))
    dm = datamodule(processor, tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="3 pairs cannot feed 2 ranks x 2 dataloader workers"):
        PreferenceBatches(dm.train_dataset().plan, dm.collator, batch_size=2, num_workers=2, rank=0,
                          world_size=2).check_every_slot_has_pairs("training pairs")
