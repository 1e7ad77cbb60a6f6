"""Streaming over DDP ranks x dataloader workers: each (rank, worker) slot's pairs of an epoch, shuffled and
padded to a common length, and the train loader that resumes mid-epoch."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stllava_med.data.pairs.collate import PairCollator, PairItem, identity_collate
from stllava_med.data.preference import BadPairError, PreferencePair, iter_lines, parse_pair_line
from stllava_med.utils.runtime import settle_dataloader, worker_ignores_sigterm


@dataclass
class StreamPlan:
    """Which lines of which shards a split streams (sorted line numbers per shard)."""

    shards: list[Path]
    lines: list[list[int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(lines) for lines in self.lines)


class PreferenceBatches(IterableDataset):
    """Yields collated batches for one (rank, worker) slot; see :mod:`stllava_med.data.pairs` for the
    guarantees.

    ``rank`` / ``world_size`` are injectable (tests simulate DDP without a process group)."""

    def __init__(self, plan: StreamPlan, collator: PairCollator, *, batch_size: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1000, pad_slots: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.plan = plan
        self.collator = collator
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.pad_slots = pad_slots
        self.epoch = 0
        self.skip_batches = 0

    @property
    def slots(self) -> int:
        return self.world_size * self.num_workers

    def check_every_slot_has_pairs(self, what: str) -> None:
        """A rank without a single real pair would never log a metric, and the others would wait for it at
        the end of the epoch: refuse such a split up front."""
        if 0 < self.plan.size < self.slots:
            raise ValueError(f"{what}: {self.plan.size} pairs cannot feed {self.world_size} ranks x "
                             f"{self.num_workers} dataloader workers; lower data.num_workers or use more pairs")

    @property
    def items_per_slot(self) -> int:
        return math.ceil(self.plan.size / self.slots) if self.plan.size else 0

    def batches_per_worker(self) -> int:
        return math.ceil(self.items_per_slot / self.batch_size) if self.pad_slots else -1

    def __len__(self) -> int:
        """Batches this rank yields per epoch (all its workers together)."""
        if not self.pad_slots:
            raise TypeError("an unpadded stream has no fixed length")
        return self.num_workers * self.batches_per_worker()

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.plan.shards)))
        if self.shuffle:
            random.Random(hash_seed(self.seed, self.epoch, "shards")).shuffle(order)
        return order

    def slot_items(self, slot: int) -> Iterator[tuple[int, int, bool]]:
        """(shard index, line, real?) of one slot in this epoch, before shuffling and batching."""
        total = self.plan.size
        mine: list[tuple[int, int]] = []
        k = 0
        for shard_index in self._shard_order():
            for line in self.plan.lines[shard_index]:
                if k % self.slots == slot:
                    mine.append((shard_index, line))
                k += 1
        for shard_index, line in mine:
            yield shard_index, line, True
        if self.pad_slots and total:
            padding = self.items_per_slot - len(mine)
            source = mine or [self._global_item(slot % total)]
            for j in range(padding):
                shard_index, line = source[j % len(source)]
                yield shard_index, line, False

    def _global_item(self, k: int) -> tuple[int, int]:
        for shard_index in self._shard_order():
            lines = self.plan.lines[shard_index]
            if k < len(lines):
                return shard_index, lines[k]
            k -= len(lines)
        raise IndexError(k)

    def _read(self, positions: Sequence[tuple[int, int]]) -> Iterator[tuple[int, PreferencePair]]:
        """Parse the pairs at ``positions`` (grouped by shard, lines ascending), streaming each shard once."""
        start = 0
        while start < len(positions):
            shard_index = positions[start][0]
            end = start
            while end < len(positions) and positions[end][0] == shard_index:
                end += 1
            wanted = [line for _, line in positions[start:end]]
            shard = self.plan.shards[shard_index]
            found = 0
            lines = iter_lines(shard)
            for target in wanted:
                for lineno, text in lines:
                    if lineno == target:
                        yield shard_index, parse_pair_line(text, f"{shard}:{lineno}")
                        found += 1
                        break
            if found != len(wanted):
                raise BadPairError(f"{shard}: {len(wanted) - found} scanned lines vanished (was the shard changed?)")
            start = end

    def slot_stream(self, slot: int) -> Iterator[PairItem]:
        """The items of one slot in this epoch's order: its real pairs through the shuffle buffer (at most
        ``shuffle_buffer`` parsed pairs in memory), then its zero-weight padding."""
        real = [(s, ln) for s, ln, is_real in self.slot_items(slot) if is_real]
        padding = [(s, ln) for s, ln, is_real in self.slot_items(slot) if not is_real]
        rng = random.Random(hash_seed(self.seed, self.epoch, slot))
        buffer: list[PairItem] = []
        for shard_index, pair in self._read(real):
            item = PairItem(pair, self.plan.shards[shard_index], 1.0)
            if not self.shuffle:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
        for s, ln in padding:
            for shard_index, pair in self._read([(s, ln)]):
                yield PairItem(pair, self.plan.shards[shard_index], 0.0)

    def slot_batches(self, slot: int) -> Iterator[list[PairItem]]:
        batch: list[PairItem] = []
        for item in self.slot_stream(slot):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"PreferenceBatches was built for {self.num_workers} workers but runs in {workers}")
        # The DataLoader takes batches from its workers in turn, starting with worker 0, and all slots have
        # equally many: after ``skip_batches`` global batches the next one is slot ``skip mod workers``'s, so a
        # resumed worker takes over the slot that keeps the original order, minus that slot's
        # ceil((skip - role) / workers) batches already trained on. Skipped batches are read (the shuffle
        # buffer needs them) but their images are never loaded.
        role = (worker + self.skip_batches) % workers
        slot = self.rank * self.num_workers + role
        skip = max(0, math.ceil((self.skip_batches - role) / workers))
        for index, items in enumerate(self.slot_batches(slot)):
            if index >= skip:
                yield self.collator(items)


def hash_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


class PreferenceLoader(DataLoader):
    """A DataLoader over :class:`PreferenceBatches` that knows its epoch and how far it got.

    Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict()`` before iterating a resumed
    run, so the interrupted epoch continues with the same order, minus the batches already trained on.

    Every batch comes annotated for loss normalisation under gradient accumulation: ``window_pairs``, the real
    pairs (total weight) of all batches of its accumulation window on this rank, which the loader looks ahead
    over. Lightning's windows are the epoch's batches ``[k*A, (k+1)*A)`` with ``A = accumulate()``
    (``trainer.accumulate_grad_batches``), the last one of an epoch possibly shorter."""

    accumulate: Callable[[], int] | None = None
    epoch_batches: Callable[[], int] | None = None  # batches an epoch trains on (trainer.limit_train_batches)

    def __init__(self, dataset: PreferenceBatches, *, num_workers: int, pin_memory: bool = False) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         collate_fn=identity_collate, worker_init_fn=worker_ignores_sigterm if num_workers else None)
        self._next_epoch = 0
        self._epoch = 0
        self._consumed = 0
        self._skip = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        dataset: PreferenceBatches = self.dataset  # type: ignore[assignment]
        self._epoch = self._next_epoch
        self._next_epoch += 1
        dataset.epoch = self._epoch
        dataset.skip_batches = self._skip
        self._consumed = self._skip
        self._skip = 0
        per_epoch = len(self)
        if self.epoch_batches is not None:
            per_epoch = min(per_epoch, int(self.epoch_batches()))
        accumulate = max(1, int(self.accumulate())) if self.accumulate is not None else 1
        batches = super().__iter__()
        try:
            while self._consumed < per_epoch:
                end = min((self._consumed // accumulate + 1) * accumulate, per_epoch)
                window = list(itertools.islice(batches, end - self._consumed))
                if not window:
                    return
                pairs = torch.stack([batch["weight"].sum() for batch in window]).sum()
                for batch in window:
                    batch["window_pairs"] = pairs
                    self._consumed += 1  # batches handed to the trainer (the state), not the ones read ahead
                    yield batch
        finally:  # the next loader's fork must not meet this one's threads on their way out
            settle_dataloader(batches)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self):
            self._next_epoch, self._skip = epoch + 1, 0
        else:
            self._next_epoch, self._skip = epoch, consumed
