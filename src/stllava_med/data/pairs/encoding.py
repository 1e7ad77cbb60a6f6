"""One preference pair through the chat template: both conversations, their shared prompt length, and the image
processed once for the two of them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from stllava_med.chat import IGNORE_INDEX, ChatFormat, Encoded, encode, vqa_turns
from stllava_med.data.preference import PreferencePair


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    prompt_length: int  # tokens shared by both sequences before the first answer token

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


def _first_target(labels: torch.Tensor) -> int:
    positions = (labels != IGNORE_INDEX).nonzero()
    return int(positions[0, 0]) if positions.numel() else int(labels.shape[0])


class OnceImageProcessor:
    """Stands in for a processor's image processor and remembers its last result, so that the chosen and the
    rejected conversation of a pair (the same image object, encoded one after the other) process the image
    once. Everything else is delegated."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._key: Any = None
        self._value: Any = None

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        flat = images if isinstance(images, list | tuple) else [images]
        key = (tuple(id(i) for i in flat), args, repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key != self._key:
            self._value = self.inner(images, *args, **kwargs)
            self._key = key
        # a fresh mapping each time: processors pop keys from the result (Idefics3 drops rows / cols)
        return copy.copy(self._value)

    def forget(self) -> None:
        self._key = self._value = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class StandInImageProcessor:
    """Stands in for a processor's image processor when a pair's image needs no pixels (its vision features
    are cached): given :attr:`image` (a 1x1 stand-in), it returns zeros of :attr:`pixel_shape`, the shape the
    real image's processing had, so that the processor expands the image placeholder exactly as for the real
    image; any other image goes to the real image processor. Everything else is delegated."""

    def __init__(self, inner: Any) -> None:
        from PIL import Image

        self.inner = inner
        self.image = Image.new("RGB", (1, 1))
        self.pixel_shape: tuple[int, ...] = ()

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        flat = images
        while isinstance(flat, list | tuple) and len(flat) == 1:
            flat = flat[0]
        if flat is not self.image:
            return self.inner(images, *args, **kwargs)
        from transformers import BatchFeature

        return BatchFeature({"pixel_values": torch.zeros((1, *self.pixel_shape))})

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)


def once_processor(processor: Any) -> tuple[Any, OnceImageProcessor | None]:
    inner = getattr(processor, "image_processor", None)
    if inner is None:
        return processor, None
    proxy = copy.copy(processor)
    once = OnceImageProcessor(inner)
    proxy.image_processor = once
    return proxy, once


def encode_pair(processor: Any, fmt: ChatFormat, pair: PreferencePair, image: Any | None) -> EncodedPair:
    """Tokenise both conversations (image placeholders expanded by the processor, targets on the answer).

    ``processor`` may be the proxy of :func:`once_processor`, which processes the shared image once."""
    try:
        chosen = encode(processor, vqa_turns(pair.prompt, pair.chosen), fmt, image)
        rejected = encode(processor, vqa_turns(pair.prompt, pair.rejected), fmt, image)
    finally:
        forget = getattr(getattr(processor, "image_processor", None), "forget", None)
        if callable(forget):
            forget()  # never let a later image with a recycled id() hit the cache
    bound = min(_first_target(chosen.labels), _first_target(rejected.labels))
    same = chosen.input_ids[:bound] == rejected.input_ids[:bound]
    prompt_length = bound if bool(same.all()) else int((~same).nonzero()[0, 0])
    if prompt_length == 0:
        raise ValueError(f"pair {pair.id!r}: chosen and rejected share no prompt tokens")
    return EncodedPair(chosen=chosen, rejected=rejected, prompt_length=prompt_length)
