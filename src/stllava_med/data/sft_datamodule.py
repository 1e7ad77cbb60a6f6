"""Stage-1 data: conversations → self-questioning renderings → padded batches with exact target masks.

* :func:`split_and_select` holds out a deterministic validation set and applies ``data.fraction`` with the
  nested subsets of :mod:`stllava_med.data.fraction` (keyed on ``<dataset>/<conversation id>``).
* :class:`SFTDataset` renders one conversation per item; which human turns become questioner turns is drawn
  per example and per epoch by :func:`stllava_med.sft.questioning.questioner_draws`.
* :class:`EpochSampler` shuffles with (seed, epoch), shards by rank itself, and together with
  :class:`ResumableDataLoader` lets Lightning resume *inside* an epoch on exactly the batches that were not
  yet trained on (the loader reports the trainer's progress, not its own prefetch position).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from stllava_med.chat import IGNORE_INDEX, ChatFormat, SequenceTooLong, encode, pad_sequences
from stllava_med.data.fraction import fraction_score, in_fraction, write_selected_ids
from stllava_med.data.images import image_preparer
from stllava_med.data.instruct import InstructRecord
from stllava_med.data.vqa import load_image
from stllava_med.families import BY_NAME, processor_family
from stllava_med.schema import SFTData, SFTSettings
from stllava_med.sft.losses import count_targets
from stllava_med.sft.questioning import questioner_draws
from stllava_med.utils.runtime import settle_dataloader, worker_ignores_sigterm

log = logging.getLogger(__name__)

ON_TOO_LONG = ("drop_turns", "error")


class ConversationTooLong(ValueError):
    """A conversation does not fit ``data.max_length`` (even with one pair when dropping turns)."""


# --------------------------------------------------------------------------------------------------------------
# Selection: validation hold-out and nested fractions
# --------------------------------------------------------------------------------------------------------------


def split_and_select(records: Sequence[InstructRecord], *, fraction: float = 1.0, fraction_seed: int = 0,
                     val_fraction: float = 0.0, val_seed: int = 0) -> tuple[list[InstructRecord], list[InstructRecord]]:
    """(train, val). Validation conversations are held out first, by a score independent of the fraction's,
    so every fraction of a sweep is validated on the same conversations and never trains on them; the
    fraction then keeps the training conversations whose score lies below it (9% ⊂ 25% ⊂ 50% ⊂ 100%)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    val = [r for r in records if val_fraction > 0 and fraction_score(f"val\x00{r.uid}", val_seed) < val_fraction]
    held_out = {r.uid for r in val}
    train = [r for r in records if r.uid not in held_out and in_fraction(r.uid, fraction, fraction_seed)]
    if not train:
        raise ValueError(f"no training conversation left (data.fraction={fraction}, data.val_fraction={val_fraction}, "
                         f"{len(records)} conversations loaded)")
    return train, val


def write_selection(out_dir: Path, train: Sequence[InstructRecord], val: Sequence[InstructRecord]) -> dict[str, str]:
    """``selected_ids.txt`` (training conversations, one uid a line) and ``val_ids.txt`` in the run dir."""
    return {"train_ids": str(write_selected_ids(out_dir / "selected_ids.txt", [r.uid for r in train])),
            "val_ids": str(write_selected_ids(out_dir / "val_ids.txt", [r.uid for r in val]))}


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


class SFTDataset(Dataset):
    """One rendered, tokenised conversation per item. Items are addressed by ``(index, epoch)`` (what
    :class:`EpochSampler` yields) so the self-questioning draw never depends on worker-local state; a plain
    integer index uses ``fixed_epoch`` (validation) or epoch 0."""

    def __init__(self, records: Sequence[InstructRecord], processor: Any, fmt: ChatFormat, *, sq_ratio: float,
                 seed: int, max_length: int | None, on_too_long: str = "drop_turns", cache_images: bool = False,
                 fixed_epoch: int | None = None, image_aspect_ratio: str = "keep") -> None:
        if on_too_long not in ON_TOO_LONG:
            raise ValueError(f"data.on_too_long must be one of {ON_TOO_LONG}, not {on_too_long!r}")
        if not 0.0 <= sq_ratio <= 1.0:
            raise ValueError(f"sft.sq_ratio must be in [0, 1], got {sq_ratio}")
        self.records = list(records)
        self.processor = processor
        self.fmt = fmt
        self.sq_ratio = float(sq_ratio)
        self.seed = int(seed)
        self.max_length = max_length
        self.on_too_long = on_too_long
        self.cache_images = cache_images
        self.fixed_epoch = fixed_epoch
        self.prepare_image = image_preparer(processor, image_aspect_ratio)  # data.image_aspect_ratio (pad / keep)
        self._images: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def questioner_draws(self, index: int, epoch: int) -> list[bool]:
        record = self.records[index]
        return questioner_draws(record.uid, record.n_pairs, self.sq_ratio, seed=self.seed, epoch=epoch)

    def _image(self, record: InstructRecord) -> Any:
        image = self._images.get(record.image)
        if image is None:
            image = self.prepare_image(load_image(record.image, record_id=record.uid))
            if self.cache_images:
                self._images[record.image] = image
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, epoch = key
        else:
            index, epoch = key, (self.fixed_epoch or 0)
        record = self.records[index]
        draws = self.questioner_draws(index, epoch)
        image = self._image(record)
        keep = record.n_pairs
        while True:
            turns = record.truncated(keep).turns(draws)
            try:
                encoded = encode(self.processor, turns, self.fmt, image, max_length=self.max_length)
                break
            except SequenceTooLong as err:
                if self.on_too_long == "error" or keep == 1:
                    hint = "" if keep == 1 else " (data.on_too_long=drop_turns drops trailing question/answer pairs)"
                    raise ConversationTooLong(
                        f"conversation {record.uid} ({record.image}): {err} with {keep} question/answer "
                        f"pair(s){hint}; raise data.max_length") from err
                keep -= 1
        if keep < record.n_pairs:
            log.debug("%s: dropped %d trailing pairs to fit max_length=%s", record.uid, record.n_pairs - keep,
                      self.max_length)
        return {
            "uid": record.uid,
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "target_role": encoded.target_role,
            "pixel_values": encoded.pixel_values,
            "extra": encoded.extra,
            "family": processor_family(self.processor).name,
            "questioner_turns": sum(draws[:keep]),
            "dropped_pairs": record.n_pairs - keep,
        }


def collate_sft(items: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad token tensors; every processor output (pixel values, tiles, grids, per-token type ids) joins
    the batch by its real shape, as the examples' model family says (:meth:`Family.collate`)."""
    input_ids = pad_sequences([i["input_ids"] for i in items], pad_token_id)
    attention_mask = pad_sequences([torch.ones_like(i["input_ids"]) for i in items], 0)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad_sequences([i["labels"] for i in items], IGNORE_INDEX),
        "target_role": pad_sequences([i["target_role"] for i in items], 0),
        "uids": [i["uid"] for i in items],
        "questioner_turns": torch.tensor(sum(i["questioner_turns"] for i in items)),
        "dropped_pairs": torch.tensor(sum(i["dropped_pairs"] for i in items)),
    }
    family = BY_NAME[items[0]["family"]]
    with_pixels = sum(i["pixel_values"] is not None for i in items)
    if with_pixels not in (0, len(items)):
        raise ValueError("a batch mixes conversations with and without an image")
    outputs = [({"pixel_values": i["pixel_values"]} if i["pixel_values"] is not None else {}) | i["extra"]
               for i in items]
    batch.update(family.collate(outputs, length=int(input_ids.shape[1])))
    return batch


# --------------------------------------------------------------------------------------------------------------
# Sampling and resumable loading
# --------------------------------------------------------------------------------------------------------------


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)``: a (seed, epoch) permutation, sharded by rank (padded so every rank has the
    same number of items), starting ``skip`` items in after a mid-epoch resume."""

    def __init__(self, num_items: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if num_items <= 0:
            raise ValueError("the sampler needs at least one item")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        # the full epoch, also while a skip is pending: Lightning counts a resumed epoch's batches itself
        return math.ceil(self.num_items / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this at every epoch start, including the resumed one: keep a pending skip then.
        if epoch != self.epoch:
            self.epoch = epoch
            self.skip = 0

    def resume(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        per_rank = math.ceil(self.num_items / self.world_size)
        order += order[: per_rank * self.world_size - self.num_items]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip
        self.skip = 0
        return iter([(index, epoch) for index in self.order(epoch)[skip:]])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch (its ``_Stateful`` protocol). The state is the trainer's
    own progress (epoch, batches trained on in it), not this loader's position, which runs ahead by the
    batches Lightning and the workers prefetch.

    Every batch comes annotated for loss normalisation under gradient accumulation: ``window_targets`` (the
    target tokens of all batches of its accumulation window on this rank, which the loader looks ahead over)
    and ``window_index`` (the batch's position in that window). Lightning's windows are the epoch's batches
    ``[k*A, (k+1)*A)`` with ``A = accumulate()`` (``trainer.accumulate_grad_batches``), the last one of an
    epoch possibly shorter; after a resume inside a window only its untrained batches remain in it."""

    progress: Callable[[], tuple[int, int]] | None = None
    accumulate: Callable[[], int] | None = None
    epoch_batches: Callable[[], int] | None = None  # batches an epoch trains on (trainer.limit_train_batches)

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {}
        epoch, batches_done = self.progress()
        return {"epoch": int(epoch), "batches_done": int(batches_done), "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state:
            return
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler)
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"cannot resume mid-epoch with data.batch_size={self.batch_size}: the checkpoint was "
                             f"written with batch size {state['batch_size']}")
        sampler.skip = 0
        per_epoch = math.ceil(len(sampler) / int(self.batch_size or 1))
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= per_epoch:
            sampler.resume(epoch + 1, 0)
        else:
            sampler.resume(epoch, done * int(self.batch_size or 1))

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        # A generator: nothing (not the sampler, not the workers) starts before the first batch is asked for,
        # so a resumed position set after Lightning's first iter() call still applies.
        sampler = self.sampler
        batch_size = int(self.batch_size or 1)
        first = sampler.skip // batch_size if isinstance(sampler, EpochSampler) else 0  # epoch batch index
        per_epoch = min(len(self), int(self.epoch_batches())) if self.epoch_batches is not None else len(self)
        accumulate = max(1, int(self.accumulate())) if self.accumulate is not None else 1
        batches = super().__iter__()
        index = first
        try:
            while index < per_epoch:
                end = min((index // accumulate + 1) * accumulate, per_epoch)
                window = []
                for _ in range(end - index):
                    try:
                        window.append(next(batches))
                    except StopIteration:
                        break
                if not window:
                    return
                targets = sum(int(count_targets(batch["labels"])) for batch in window)
                for position, batch in enumerate(window):
                    batch["window_targets"] = torch.tensor(targets)
                    batch["window_index"] = position
                    yield batch
                index = end
        finally:  # the next loader's fork must not meet this one's threads on their way out
            settle_dataloader(batches)


# --------------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SFTDataSettings(SFTData):
    """What the datamodule runs with: ``data.*`` of the SFT stage (:class:`stllava_med.schema.SFTData`, where
    its defaults live) plus the two values it takes from elsewhere in the config."""

    sq_ratio: float = SFTSettings.sq_ratio   # sft.sq_ratio
    seed: int = 0                            # the run's seed (the questioner draws, the shuffle)


class SFTDataModule(LightningDataModule):
    """Receives built records and the processor; never reads configs or paths."""

    def _worker_init(self) -> Callable[[int], None] | None:
        return worker_ignores_sigterm if self.settings.num_workers else None

    def __init__(self, train_records: Sequence[InstructRecord], val_records: Sequence[InstructRecord],
                 processor: Any, fmt: ChatFormat, settings: SFTDataSettings) -> None:
        super().__init__()
        if not train_records:
            raise ValueError("SFTDataModule needs at least one training conversation")
        self.train_records = list(train_records)
        self.val_records = list(val_records)
        self.processor = processor
        self.fmt = fmt
        self.settings = settings
        self.train_set: SFTDataset | None = None
        self.val_set: SFTDataset | None = None
        self.train_sampler: EpochSampler | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._loader_state: dict[str, int] | None = None
        pad = processor.tokenizer.pad_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_token_id = int(pad)

    def _dataset(self, records: Sequence[InstructRecord], fixed_epoch: int | None) -> SFTDataset:
        s = self.settings
        return SFTDataset(records, self.processor, self.fmt, sq_ratio=s.sq_ratio, seed=s.seed, max_length=s.max_length,
                          on_too_long=s.on_too_long, cache_images=s.cache_images, fixed_epoch=fixed_epoch,
                          image_aspect_ratio=s.image_aspect_ratio)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._dataset(self.train_records, None)
            # Validation renders with one fixed draw, so its metrics compare across epochs and runs.
            self.val_set = self._dataset(self.val_records, 0) if self.val_records else None

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        if trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError("stage 1 shards its data by rank itself: set trainer.use_distributed_sampler=false "
                             "(conf/trainer/ddp.yaml does)")
        return trainer.global_rank, trainer.world_size

    def _collate(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        # a partial, not a bound method: spawned workers would otherwise pickle the DataModule and its trainer
        return functools.partial(collate_sft, pad_token_id=self.pad_token_id)

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _epoch_batches(self) -> int:
        limit = self.trainer.num_training_batches
        return len(self._train_loader) if limit == float("inf") else int(limit)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_set is not None
        rank, world = self._rank()
        self.train_sampler = EpochSampler(len(self.train_set), seed=self.settings.seed, shuffle=self.settings.shuffle,
                                          rank=rank, world_size=world)
        loader = ResumableDataLoader(self.train_set, batch_size=self.settings.batch_size, sampler=self.train_sampler,
                                     collate_fn=self._collate(), num_workers=self.settings.num_workers,
                                     pin_memory=self.settings.pin_memory, worker_init_fn=self._worker_init(),
                                     persistent_workers=False)  # workers must see each epoch's sampler state
        if self.trainer is not None:
            trainer = self.trainer
            loader.progress = self._progress
            loader.accumulate = lambda: trainer.accumulate_grad_batches
            loader.epoch_batches = self._epoch_batches
        self._train_loader = loader
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
            self._loader_state = None  # once: a reloaded loader (reload_dataloaders_every_n_epochs) starts fresh
        return loader

    # The sampler position travels in the datamodule's checkpoint entry, which Lightning restores before the
    # train loader is first built. Lightning's own hand-over of loader states (the fit loop's
    # "combined_loader") only reaches a loader built after the loops are restored: with trainer.max_epochs set,
    # ``configure_optimizers`` asks for ``estimated_stepping_batches`` (the schedule's length), which builds
    # the loader earlier, and a resumed run would restart its epoch from the first batch.
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is None or self._train_loader.progress is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        if not state:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._loader_state = dict(state)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_set is None:
            return []
        rank, world = self._rank()
        sampler = EpochSampler(len(self.val_set), seed=0, shuffle=False, rank=rank, world_size=world)
        return DataLoader(self.val_set, batch_size=self.settings.val_batch_size or self.settings.batch_size,
                          sampler=sampler, collate_fn=self._collate(), num_workers=self.settings.num_workers,
                          pin_memory=self.settings.pin_memory, worker_init_fn=self._worker_init())
