"""Collation: pairs (loaded images, tokenised conversations) into one batch dict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stllava_med.chat import IGNORE_INDEX, ChatFormat, pad_sequences
from stllava_med.data.images import image_preparer
from stllava_med.data.pairs.encoding import EncodedPair, encode_pair, once_processor
from stllava_med.data.preference import PreferencePair, resolve_image
from stllava_med.data.vqa import load_image
from stllava_med.families import processor_family


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

    def encode(self, item: PairItem) -> EncodedPair:
        pair = item.pair
        images = [resolve_image(i, item.shard, self.image_root) for i in pair.images]
        image = self.prepare_image(load_image(images[0], record_id=pair.id)) if images else None
        return encode_pair(self._once, self.fmt, pair, image)

    def __call__(self, items: Sequence[PairItem]) -> dict[str, Any]:
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
        return batch


def identity_collate(batch: Any) -> Any:
    """``collate_fn`` of DataLoaders over datasets that yield finished items (collated batches, scan results);
    a module-level function so that worker processes can pickle it."""
    return batch
