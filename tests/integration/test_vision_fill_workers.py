"""The vision feature cache's fill with dataloader workers (``data.num_workers``): the images are decoded and
processed in worker processes while the tower runs, and the cache holds exactly what a fill in one process
writes — the same images, the same pixel shapes, bitwise the same features — so training batches (which read
it) are identical. The fill's pixels are those of the pairs' own encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpo_support import one_torch_thread, perturb_lora, sample_pairs, tiny_backbone, write_shard  # noqa: F401  (autouse fixture)
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.datamodule import PreferenceDataModule
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.dpo.module import DPOModule
from stllava_med.dpo.reference import AdapterOffReference
from stllava_med.dpo.vision_cache import build_cached_vision
from stllava_med.schema import DPOSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backbone(tiny_backbone_path):
    backbone = tiny_backbone(lora=True)
    perturb_lora(backbone.model)
    return backbone


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    # 12 pairs, some images shared by several pairs: 3 chunks of 2 images and a shorter one per claim
    return write_shard(tmp_path_factory.mktemp("pairs") / "p.jsonl", sample_pairs(12, stride=3))


def datamodule(backbone, pairs, workers):
    settings = PreferenceDataSettings(path=str(pairs), batch_size=4, val_fraction=0.0, progress=False,
                                      num_workers=workers)
    dm = PreferenceDataModule(settings, backbone.processor, ChatFormat())
    dm.setup("fit")
    return dm


def fill(root, backbone, dm):
    vision = build_cached_vision(root, backbone.model, dm, batch_size=2, progress=False)
    module = DPOModule(backbone.model, AdapterOffReference(backbone.model), DPOSettings(), {"lr": 1e-4},
                       vision_cache=vision)
    vision.prepare(module.logprobs, torch.device("cpu"))
    return vision, module


def cached(vision):
    """Every cached image: its pixel shape and its stored feature row (as stored: bytes compare)."""
    vision.cache.index.refresh()
    out = {}
    for digest, entry in vision.cache.index.entries.items():
        out[digest] = (entry.pixel_shape, np.array(vision.cache._array(entry.shard)[entry.row]))
    return out


def test_the_fill_pixels_are_those_of_the_pairs_encoding(backbone, pairs):
    dm = datamodule(backbone, pairs, 0)
    collator = dm.collator
    items = list(dm.vision_items().values())
    pixels, shapes = collator.pixel_batch(items[:3])
    for row, item in enumerate(items[:3]):
        encoded = collator.encode(item)  # both answers, as a training batch encodes the pair
        assert torch.equal(pixels[row], encoded.chosen.pixel_values[0])
        assert torch.equal(encoded.chosen.pixel_values, encoded.rejected.pixel_values)
        assert shapes[row] == list(encoded.chosen.pixel_values.shape[1:])


def test_a_fill_with_workers_writes_exactly_what_one_process_writes(backbone, pairs, tmp_path):
    serial_dm, parallel_dm = datamodule(backbone, pairs, 0), datamodule(backbone, pairs, 2)
    serial, _ = fill(tmp_path / "serial", backbone, serial_dm)
    parallel, module = fill(tmp_path / "workers", backbone, parallel_dm)
    assert parallel.workers == 2 and serial.workers == 0
    assert parallel.cache.key == serial.cache.key  # the workers are not part of the key: the same cache
    assert parallel.computed == serial.computed == len(parallel.items) > 2
    want, got = cached(serial), cached(parallel)
    assert set(got) == set(want) == set(parallel.items)
    for digest, (shape, row) in want.items():
        assert got[digest][0] == shape
        assert got[digest][1].dtype == row.dtype and got[digest][1].tobytes() == row.tobytes(), digest
    # each index line records the checksum of its shard, and the shards hold what the lines say
    for line in (parallel.cache.dir / "index.jsonl").read_text().splitlines():
        info = json.loads(line)
        assert parallel.cache._array(info["shard"]).shape[0] == len(info["images"])
    # training batches read the cache (no image work): the features they get are the serial fill's
    batches = list(serial_dm.train_dataset())
    assert batches and all(b["pixel_values"] is None for b in batches)
    for batch in batches:
        assert torch.equal(serial.features(batch, module.logprobs), parallel.features(batch, module.logprobs))
