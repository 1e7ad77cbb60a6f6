"""Collation: pairs (loaded images, tokenised conversations) into one batch dict."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stllava_med.chat import IGNORE_INDEX, ChatFormat, pad_sequences, vqa_turns
from stllava_med.chat import encode as encode_conversation
from stllava_med.data.images import image_preparer
from stllava_med.data.pairs.encoding import EncodedPair, StandInImageProcessor, encode_pair, once_processor
from stllava_med.data.preference import PreferencePair, resolve_image
from stllava_med.data.vqa import load_image
from stllava_med.families import processor_family
from stllava_med.utils.io import sha256_file

log = logging.getLogger(__name__)


@dataclass
class PairItem:
    pair: PreferencePair
    shard: Path
    weight: float = 1.0  # 0 for the repeats that pad a slot to the common length


class PairCollator:
    """Loads images and tokenises pairs into one batch dict (the fields: see :mod:`stllava_med.data.pairs`)."""

    def __init__(self, processor: Any, fmt: ChatFormat, *, image_root: str | None = None,
                 image_aspect_ratio: str = "keep") -> None:
        self.processor = processor
        self.fmt = fmt
        self.image_root = image_root
        self.prepare_image = image_preparer(processor, image_aspect_ratio)  # data.image_aspect_ratio
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self.family = processor_family(processor)
        self._once, _ = once_processor(processor)
        # The vision feature cache's index (stllava_med.dpo.vision_cache), set by the DPO stage: a batch whose
        # images all have cached features skips their decoding and processing (no pixel_values; vision_keys).
        self.vision_lookup: Any = None
        self.vision_keep_pixels = False  # true: cached batches keep their pixels (a copy reference encodes them)
        self.image_digests: dict[str, str] = {}  # resolved image path -> content digest
        self._stand_in: StandInImageProcessor | None = None
        self._stand_in_processor: Any = None
        self._stand_in_checked = False

    def image_digest(self, path: Path) -> str:
        key = str(path)
        digest = self.image_digests.get(key)
        if digest is None:
            digest = self.image_digests[key] = sha256_file(path)[:16]
        return digest

    def encode(self, item: PairItem) -> EncodedPair:
        pair = item.pair
        images = [resolve_image(i, item.shard, self.image_root) for i in pair.images]
        image = self.prepare_image(load_image(images[0], record_id=pair.id)) if images else None
        return encode_pair(self._once, self.fmt, pair, image)

    def pixels(self, item: PairItem) -> torch.Tensor:
        """The pixel values of the item's image, from the same processor call as its encoding (the image with the
        prompt alone: the answers' tokens are not needed for the pixels)."""
        pair = item.pair
        path = resolve_image(pair.images[0], item.shard, self.image_root)
        image = self.prepare_image(load_image(path, record_id=pair.id))
        return encode_conversation(self.processor, vqa_turns(pair.prompt), self.fmt, image).pixel_values

    def pixel_batch(self, items: Sequence[PairItem]) -> tuple[torch.Tensor, list[list[int]]]:
        """The pixel values of the items' images (as training batches have them) and each image's pixel shape:
        what the vision feature cache is filled from."""
        each = [self.pixels(item) for item in items]
        pixels = self.family.collate([{"pixel_values": p} for p in each])["pixel_values"]
        return pixels, [list(p.shape[1:]) for p in each]

    def _cached_images(self, items: Sequence[PairItem]) -> list[tuple[str, Any]] | None:
        """(digest, cache entry) of each item's image when every one has cached vision features, else None."""
        lookup = self.vision_lookup
        if lookup is None or not items or any(not item.pair.images for item in items):
            return None
        lookup.refresh()
        found = []
        for item in items:
            digest = self.image_digest(resolve_image(item.pair.images[0], item.shard, self.image_root))
            entry = lookup.get(digest)
            if entry is None:
                return None
            found.append((digest, entry))
        return found

    def _encode_stand_in(self, item: PairItem, pixel_shape: Any) -> EncodedPair:
        """The pair's tokens without its image: the processor sees a 1x1 stand-in, and its image processor
        answers with zeros of the cached image's pixel shape, so the placeholder expands exactly as it would
        (checked against the full encoding on the first pair of each process)."""
        if self._stand_in is None:
            proxy = copy.copy(self.processor)
            proxy.image_processor = self._stand_in = StandInImageProcessor(self.processor.image_processor)
            self._stand_in_processor = proxy
        self._stand_in.pixel_shape = tuple(pixel_shape)
        return encode_pair(self._stand_in_processor, self.fmt, item.pair, self._stand_in.image)

    def _encode_skipping_pixels(self, items: Sequence[PairItem], cached: list[tuple[str, Any]]
                                ) -> list[EncodedPair] | None:
        encoded = [self._encode_stand_in(item, entry.pixel_shape) for item, (_, entry) in zip(items, cached)]
        if not self._stand_in_checked:
            self._stand_in_checked = True
            full = self.encode(items[0])
            same = all(torch.equal(getattr(getattr(full, side), f), getattr(getattr(encoded[0], side), f))
                       for side in ("chosen", "rejected") for f in ("input_ids", "labels", "target_role"))
            if not (same and full.prompt_length == encoded[0].prompt_length):
                log.warning("vision cache: the tokens of a pair encoded without its image differ from the full "
                            "encoding for this processor; images are processed for every batch")
                self.vision_keep_pixels = True
                return None
        return encoded

    def __call__(self, items: Sequence[PairItem]) -> dict[str, Any]:
        cached = self._cached_images(items)
        skip = cached is not None and not self.vision_keep_pixels
        encoded = self._encode_skipping_pixels(items, cached) if skip else None
        if encoded is None:
            skip = False
            encoded = [self.encode(item) for item in items]
        sequences = [e.chosen for e in encoded] + [e.rejected for e in encoded]
        input_ids = pad_sequences([s.input_ids for s in sequences], self.pad_id)
        labels = pad_sequences([s.labels for s in sequences], IGNORE_INDEX)
        attention_mask = pad_sequences([torch.ones_like(s.input_ids) for s in sequences], 0)
        n = len(items)
        length = int(input_ids.shape[1])
        # Per-image outputs (pixels, tiles, grids, sizes) are the same for both answers of a pair: joined once.
        # Per-token outputs (Qwen's mm_token_type_ids, Gemma's token_type_ids) belong to each sequence.
        family = self.family
        with_images = [e for e in encoded if e.chosen.pixel_values is not None]
        if with_images and len(with_images) != n:
            raise ValueError("a batch mixes pairs with and without an image")
        keys = sorted({k for e in encoded for k in e.chosen.extra})
        token_keys = [k for k in keys if family.batch_kind(k) == "token"]
        image_keys = [k for k in keys if k not in token_keys]
        images = family.collate([{"pixel_values": e.chosen.pixel_values} | {k: e.chosen.extra[k] for k in image_keys}
                                 for e in with_images]) if with_images else {}
        if skip:  # the stand-in's zeros: the model reads the cached features instead
            images.pop("pixel_values", None)
        batch: dict[str, Any] = {
            "ids": [item.pair.id for item in items],
            "weight": torch.tensor([item.weight for item in items], dtype=torch.float32),
            "chosen_input_ids": input_ids[:n], "rejected_input_ids": input_ids[n:],
            "chosen_labels": labels[:n], "rejected_labels": labels[n:],
            "chosen_attention_mask": attention_mask[:n], "rejected_attention_mask": attention_mask[n:],
            "prompt_lengths": torch.tensor([e.prompt_length for e in encoded], dtype=torch.long),
            "pixel_values": images.pop("pixel_values", None),
            "image_extra": images,
            "chosen_extra": family.collate([{k: e.chosen.extra[k] for k in token_keys} for e in encoded],
                                           length=length, keys=token_keys),
            "rejected_extra": family.collate([{k: e.rejected.extra[k] for k in token_keys} for e in encoded],
                                             length=length, keys=token_keys),
        }
        if cached is not None:
            batch["vision_keys"] = [digest for digest, _ in cached]
        return batch


def identity_collate(batch: Any) -> Any:
    """``collate_fn`` of DataLoaders over datasets that yield finished items (collated batches, scan results);
    a module-level function so that worker processes can pickle it."""
    return batch
