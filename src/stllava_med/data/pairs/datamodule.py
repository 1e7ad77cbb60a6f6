"""``PreferenceDataModule``: the scan, the validation split and the training fraction, and the loaders over them
for :class:`stllava_med.dpo.module.DPOModule` (the guarantees are listed in :mod:`stllava_med.data.pairs`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from stllava_med.chat import ChatFormat
from stllava_med.data.fraction import fraction_score, in_fraction, write_selected_ids
from stllava_med.data.pairs.collate import PairCollator, PairItem, identity_collate
from stllava_med.data.pairs.scan import ScanEntry, ScanResult, scan_pairs
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.data.pairs.sources import prepare_shards
from stllava_med.data.pairs.stream import PreferenceBatches, PreferenceLoader, StreamPlan
from stllava_med.data.preference import iter_lines, parse_pair_line, resolve_image
from stllava_med.utils.io import atomic_write_json, stable_hash
from stllava_med.utils.runtime import worker_ignores_sigterm

log = logging.getLogger(__name__)


# The scan runs in the main process when its files hold fewer pairs than this per dataloader worker: the scan
# measures a pair in ~1.5 ms there, and starting a worker (fork, its first full encode, the result queue) costs
# ~0.15 s, so workers only pay off on larger files. The scan's result does not depend on who scans.
SCAN_PAIRS_PER_WORKER = 256


def scan_settings(settings: PreferenceDataSettings, shards: Sequence[Path]) -> PreferenceDataSettings:
    """``settings`` for scanning ``shards``: no workers for small files (:data:`SCAN_PAIRS_PER_WORKER`)."""
    if settings.num_workers == 0:
        return settings
    enough = SCAN_PAIRS_PER_WORKER * settings.num_workers
    lines = 0
    for shard in shards:
        with open(shard, "rb") as fh:
            for line in fh:
                lines += bool(line.strip())
                if lines >= enough:
                    return settings
    return dataclasses.replace(settings, num_workers=0)


class PreferenceDataModule(LightningDataModule):
    """Train / validation streams of preference pairs for :class:`stllava_med.dpo.module.DPOModule`."""

    def __init__(self, settings: PreferenceDataSettings, processor: Any, fmt: ChatFormat, *,
                 out_dir: str | os.PathLike | None = None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.processor = processor
        self.fmt = fmt
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._rank = rank
        self._world_size = world_size
        self.collator = PairCollator(processor, fmt, image_root=settings.image_root,
                                     image_aspect_ratio=settings.image_aspect_ratio)
        self.train_scan: ScanResult | None = None
        self.val_scan: ScanResult | None = None
        self.train_entries: list[ScanEntry] = []
        self.val_entries: list[ScanEntry] = []
        self.summary: dict[str, Any] = {}
        self.conversions: list[dict[str, Any]] = []  # one report per converted (non-native) input file
        self._train_loader: PreferenceLoader | None = None
        self._loader_state: dict[str, int] | None = None

    # ---- rank / world ------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        trainer = self._trainer_or_none()
        return int(trainer.global_rank) if trainer is not None else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        trainer = self._trainer_or_none()
        return int(trainer.world_size) if trainer is not None else 1

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    # ---- scanning and splitting ------------------------------------------------------------------------

    def _shards(self, spec: str | list[str]) -> list[Path]:
        """Our JSONL shards for ``spec``: as they are, or converted once from TRL / official / Parquet files
        (:mod:`stllava_med.data.pairs.sources`); the conversion reports go into the data summary."""
        settings = self.settings
        cache_dir = settings.convert_cache_dir or (self.out_dir / "converted_pairs" if self.out_dir else None)
        prepared = prepare_shards(spec, fmt=settings.format, cache_dir=cache_dir, image_root=settings.image_root,
                                  on_bad_pair=settings.on_bad_pair)
        self.conversions.extend(prepared.conversions)
        return prepared.shards

    def _scan(self) -> None:
        settings = self.settings
        self.conversions = []
        train_shards = self._shards(settings.path)
        self.train_scan = scan_pairs(train_shards, self.processor, self.fmt, scan_settings(settings, train_shards),
                                     cache_dir=settings.scan_cache_dir, desc="scan pairs")
        if settings.val_path:
            val_shards = self._shards(settings.val_path)
            self.val_scan = scan_pairs(val_shards, self.processor, self.fmt, scan_settings(settings, val_shards),
                                       cache_dir=settings.scan_cache_dir, desc="scan validation pairs")

    def prepare_data(self) -> None:
        # Local rank 0 scans first (and fills the shared scan cache); the others then read it in setup().
        if self.settings.scan_cache_dir and self.train_scan is None:
            self._scan()

    def setup(self, stage: str | None = None) -> None:
        if self.train_scan is not None:
            return
        self._scan()
        assert self.train_scan is not None
        settings = self.settings
        if self.val_scan is not None:
            pool = self.train_scan.entries
            self.val_entries = list(self.val_scan.entries)
            clash = {e.id for e in pool} & {e.id for e in self.val_entries}
            if clash:
                raise ValueError(f"data.val_path shares {len(clash)} pair ids with data.path, e.g. {sorted(clash)[:3]}")
        else:
            pool, self.val_entries = [], []
            for entry in self.train_scan.entries:
                is_val = settings.val_fraction > 0 and fraction_score("val\x00" + entry.id, settings.fraction_seed) < settings.val_fraction
                (self.val_entries if is_val else pool).append(entry)
        self.train_entries = [e for e in pool if in_fraction(e.id, settings.fraction, settings.fraction_seed)]
        if not self.train_entries:
            raise ValueError(f"no training pair left (data.path={settings.path}, fraction={settings.fraction}, "
                             f"skipped: {self.train_scan.report['skipped']})")
        self.summary = self._summary(pool)
        if self.out_dir is not None and self.rank == 0:
            write_selected_ids(self.out_dir / "selected_ids.txt", [e.id for e in self.train_entries])
            write_selected_ids(self.out_dir / "val_ids.txt", [e.id for e in self.val_entries])
            atomic_write_json(self.out_dir / "data_summary.json", self.summary)
        log.info("preference data: %d training pairs (fraction %.3g of %d), %d validation pairs; skipped %s",
                 len(self.train_entries), settings.fraction, len(pool), len(self.val_entries),
                 self.summary["scan"]["skipped"] or "none")

    def _summary(self, pool: list[ScanEntry]) -> dict[str, Any]:
        def stats(entries: list[ScanEntry]) -> dict[str, Any]:
            if not entries:
                return {"pairs": 0}
            lengths = sorted(e.length for e in entries)
            answers = sorted(e.chosen_tokens for e in entries) + sorted(e.rejected_tokens for e in entries)
            return {"pairs": len(entries), "max_length": lengths[-1], "median_length": lengths[len(lengths) // 2],
                    "mean_prompt_tokens": sum(e.prompt_tokens for e in entries) / len(entries),
                    "mean_answer_tokens": sum(answers) / len(answers)}

        assert self.train_scan is not None
        scan = dict(self.train_scan.report)
        if self.val_scan is not None:
            scan = {"train": scan, "val": self.val_scan.report, "skipped": {
                **Counter(self.train_scan.report["skipped"]) + Counter(self.val_scan.report["skipped"])}}
        # pairs a conversion skipped (data.on_bad_pair=skip) count with the scan's, so that nothing goes unreported
        converted_skips = Counter()
        for report in self.conversions:
            converted_skips.update(report.get("skipped") or {})
        if converted_skips:
            scan = {**scan, "skipped": dict(Counter(scan["skipped"]) + converted_skips)}
        return {"path": self.settings.path, "val_path": self.settings.val_path, "format": self.settings.format,
                "converted": [{k: r.get(k) for k in ("source", "format", "read", "kept", "skipped", "shards", "key",
                                                      "reused")} for r in self.conversions],
                "fraction": self.settings.fraction,
                "fraction_seed": self.settings.fraction_seed, "max_length": self.settings.max_length,
                "pool": len(pool), "train": stats(self.train_entries), "val": stats(self.val_entries), "scan": scan,
                "data_fingerprint": self.data_fingerprint}

    @property
    def data_fingerprint(self) -> str:
        assert self.train_scan is not None
        parts = [self.train_scan.fingerprint] + ([self.val_scan.fingerprint] if self.val_scan is not None else [])
        return stable_hash(parts, n=16)

    @property
    def digests(self) -> dict[str, str]:
        """Content digest of every pair this run uses (training selection and validation)."""
        return {e.id: e.digest for e in (*self.train_entries, *self.val_entries)}

    def _plan(self, scan: ScanResult, entries: Sequence[ScanEntry]) -> StreamPlan:
        lines: list[list[int]] = [[] for _ in scan.shards]
        for entry in entries:
            lines[entry.shard].append(entry.line)
        return StreamPlan(shards=[Path(s) for s in scan.shards], lines=[sorted(x) for x in lines])

    # ---- loaders ---------------------------------------------------------------------------------------

    def train_dataset(self, *, rank: int | None = None, world_size: int | None = None) -> PreferenceBatches:
        assert self.train_scan is not None, "call setup() first"
        return PreferenceBatches(
            self._plan(self.train_scan, self.train_entries), self.collator, batch_size=self.settings.batch_size,
            num_workers=self.settings.num_workers, rank=self.rank if rank is None else rank,
            world_size=self.world_size if world_size is None else world_size, shuffle=True,
            seed=self.settings.seed, shuffle_buffer=self.settings.shuffle_buffer,
        )

    def val_dataset(self, *, rank: int | None = None, world_size: int | None = None) -> PreferenceBatches:
        scan = self.val_scan or self.train_scan
        assert scan is not None, "call setup() first"
        return PreferenceBatches(
            self._plan(scan, self.val_entries), self.collator,
            batch_size=self.settings.val_batch_size or self.settings.batch_size,
            num_workers=self.settings.num_workers, rank=self.rank if rank is None else rank,
            world_size=self.world_size if world_size is None else world_size, shuffle=False,
        )

    def train_dataloader(self) -> PreferenceLoader:
        dataset = self.train_dataset()
        dataset.check_every_slot_has_pairs("training pairs")
        loader = PreferenceLoader(dataset, num_workers=self.settings.num_workers,
                                  pin_memory=torch.cuda.is_available())
        trainer = self._trainer_or_none()
        if trainer is not None:  # the accumulation windows the loader annotates (``window_pairs``)
            loader.accumulate = lambda: trainer.accumulate_grad_batches
            loader.epoch_batches = lambda: (len(loader) if trainer.num_training_batches == float("inf")
                                            else int(trainer.num_training_batches))
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
            self._loader_state = None  # once: a reloaded loader (reload_dataloaders_every_n_epochs) starts fresh
        self._train_loader = loader
        return loader

    # Lightning restores a datamodule's state before it first builds the train loader. Its own hand-over of
    # loader states (``fit_loop`` "combined_loader") comes too late whenever ``configure_optimizers`` asks for
    # ``estimated_stepping_batches`` (ours does, for the schedule): that builds the loader before the loops are
    # restored. So the loader's position travels in the datamodule's checkpoint entry.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = state_dict.get("train_loader")
        if self._loader_state is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._loader_state)
            self._loader_state = None

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_entries:
            return []
        dataset = self.val_dataset()
        dataset.check_every_slot_has_pairs("validation pairs")
        return DataLoader(dataset, batch_size=None, num_workers=self.settings.num_workers,
                          collate_fn=identity_collate, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=worker_ignores_sigterm if self.settings.num_workers else None)

    def _groups(self) -> list[tuple[ScanResult, list[ScanEntry]]]:
        """Every pair of this run (training selection and validation), with the scan that holds it."""
        assert self.train_scan is not None, "call setup() first"
        if self.val_scan is not None:
            return [(self.train_scan, self.train_entries), (self.val_scan, self.val_entries)]
        return [(self.train_scan, [*self.train_entries, *self.val_entries])]

    def vision_items(self) -> dict[str, PairItem]:
        """One pair item per distinct image (by content digest) of this run's pairs, for the vision feature
        cache; the collator's path -> digest map is filled on the way (each image file is hashed once)."""
        items: dict[str, PairItem] = {}
        for scan, entries in self._groups():
            plan = self._plan(scan, entries)
            for shard, lines in zip(plan.shards, plan.lines):
                wanted = set(lines)
                for lineno, text in iter_lines(shard):
                    if lineno not in wanted:
                        continue
                    pair = parse_pair_line(text, f"{shard}:{lineno}")
                    if pair.images:
                        path = resolve_image(pair.images[0], shard, self.settings.image_root)
                        items.setdefault(self.collator.image_digest(path), PairItem(pair, shard))
        return items

    def reference_batches(self, ids: set[str] | None = None, *, rank: int = 0, world_size: int = 1,
                          batch_size: int | None = None) -> PreferenceBatches:
        """Every pair of this run (training selection and validation, optionally only ``ids``), in file order,
        sharded over ``world_size`` ranks without padding: what the reference pre-computation walks over."""
        assert self.train_scan is not None, "call setup() first"
        groups: list[tuple[ScanResult, list[ScanEntry]]] = []
        if self.val_scan is not None:
            groups = [(self.train_scan, self.train_entries), (self.val_scan, self.val_entries)]
        else:
            groups = [(self.train_scan, [*self.train_entries, *self.val_entries])]
        shards: list[Path] = []
        lines: list[list[int]] = []
        for scan, entries in groups:
            plan = self._plan(scan, [e for e in entries if ids is None or e.id in ids])
            shards.extend(plan.shards)
            lines.extend(plan.lines)
        return PreferenceBatches(StreamPlan(shards=shards, lines=lines), self.collator,
                                 batch_size=batch_size or self.settings.val_batch_size or self.settings.batch_size,
                                 num_workers=1, rank=rank, world_size=world_size, shuffle=False, pad_slots=False)
