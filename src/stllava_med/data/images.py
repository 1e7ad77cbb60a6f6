"""Image preparation before the processor: ``image_aspect_ratio`` (``keep`` | ``pad``).

``pad`` is LLaVA's ``expand2square`` (the official training's ``--image_aspect_ratio pad``): a non-square image is
pasted, centred, onto a square canvas as wide as its longer side, filled with the processor's mean colour
(``int(mean * 255)`` per channel: (122, 116, 104) for CLIP), so the processor's resize and centre crop then see
the whole image instead of cropping its long side. ``keep`` hands the image to the processor as it is (the
official generation and evaluation scripts). Every stage that loads images applies it through
:func:`image_preparer`: SFT (``data.image_aspect_ratio``), DPO (``data.image_aspect_ratio``, in the collator and
the length scan), generation (``generate.image_aspect_ratio``) and evaluation (``eval.image_aspect_ratio``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

IMAGE_ASPECT_RATIOS = ("keep", "pad")


def mean_colour(processor: Any) -> tuple[int, ...]:
    """The processor's image mean as 0-255 integers, truncated as LLaVA does (``int(x * 255)``)."""
    image_processor = getattr(processor, "image_processor", processor)
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise ValueError(f"{type(image_processor).__name__} has no image_mean: image_aspect_ratio=pad needs one")
    if isinstance(mean, int | float):
        mean = [mean] * 3
    return tuple(int(float(x) * 255) for x in mean)


def pad_to_square(image: Image.Image, fill: Sequence[int]) -> Image.Image:
    """``image`` centred on a square canvas of its longer side, the rest ``fill``; square images unchanged.
    The offset of the shorter side is ``(long - short) // 2``, as in LLaVA's expand2square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    colour: Any = tuple(fill)[: len(image.getbands())]
    if len(colour) == 1:
        colour = colour[0]
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return canvas


def image_preparer(processor: Any, image_aspect_ratio: str = "keep") -> Callable[[Any], Any]:
    """What a stage applies to every loaded image before the processor sees it (identity for ``keep``)."""
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, not {image_aspect_ratio!r}")
    if image_aspect_ratio == "keep":
        return _keep
    fill = mean_colour(processor)
    return _Pad(fill)


def _keep(image: Any) -> Any:
    return image


class _Pad:
    """Picklable (DataLoader workers) padding callable."""

    def __init__(self, fill: tuple[int, ...]) -> None:
        self.fill = fill

    def __call__(self, image: Any) -> Any:
        return None if image is None else pad_to_square(image, self.fill)
