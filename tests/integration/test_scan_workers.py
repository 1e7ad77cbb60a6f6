"""The pair scan with dataloader workers: small files are scanned in the main process (starting workers would cost
more than they save), larger ones by ``data.num_workers`` workers; the scan is the same either way."""

from __future__ import annotations

import dataclasses

import pytest

from dpo_support import one_torch_thread, sample_pairs, tiny_backbone, write_shard  # noqa: F401  (autouse fixture)
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.datamodule import SCAN_PAIRS_PER_WORKER, scan_settings
from stllava_med.data.pairs.scan import scan_pairs
from stllava_med.data.pairs.settings import PreferenceDataSettings

pytestmark = pytest.mark.integration


def test_small_files_are_scanned_here_larger_ones_by_workers(tmp_path):
    rows = sample_pairs()
    small = write_shard(tmp_path / "small.jsonl", rows[:8])
    settings = PreferenceDataSettings(path=str(small), num_workers=2, progress=False)
    assert scan_settings(settings, [small]).num_workers == 0
    assert scan_settings(dataclasses.replace(settings, num_workers=0), [small]).num_workers == 0
    enough = SCAN_PAIRS_PER_WORKER * 2
    copies = [dict(r, id=f"{r['id']}-{k}") for k in range(enough // len(rows) + 1) for r in rows][:enough]
    large = write_shard(tmp_path / "large.jsonl", copies)
    assert scan_settings(settings, [large]).num_workers == 2
    assert scan_settings(settings, [small, large]).num_workers == 2
    assert scan_settings(settings, [write_shard(tmp_path / "less.jsonl", copies[:-1])]).num_workers == 0


def test_the_scan_is_the_same_with_and_without_workers(tmp_path, tiny_backbone_path):
    processor = tiny_backbone(lora=False).processor
    shard = write_shard(tmp_path / "p.jsonl", sample_pairs(24))
    settings = PreferenceDataSettings(path=str(shard), progress=False, max_length=4096)
    here = scan_pairs([shard], processor, ChatFormat(), settings)
    workers = scan_pairs([shard], processor, ChatFormat(), dataclasses.replace(settings, num_workers=2))
    assert here.to_json() == workers.to_json() and len(here.entries) == 24
