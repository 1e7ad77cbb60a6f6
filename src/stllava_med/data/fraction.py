"""Deterministic, nested data fractions for the data-efficiency ablation (9% / 25% / 50% / 100%).

Each id gets a score in [0, 1) from a seeded SHA-256; a fraction keeps the ids scoring below it. The test
is a threshold on a fixed score, so a smaller fraction is always a subset of a larger one with the same seed
(the 9% subset lies inside the 25% subset, inside 50%), independent of file order, sharding or world size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from stllava_med.utils.io import atomic_write_text

_SCALE = float(1 << 64)


def fraction_score(item_id: str, seed: int = 0) -> float:
    digest = hashlib.sha256(f"{seed}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def in_fraction(item_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether ``item_id`` belongs to the ``fraction`` subset (``fraction >= 1`` keeps everything)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.fraction must be in (0, 1], got {fraction}")
    return fraction >= 1.0 or fraction_score(str(item_id), seed) < fraction


def select_fraction(ids: Iterable[str], fraction: float, seed: int = 0) -> list[str]:
    """The ids of the ``fraction`` subset, in input order."""
    return [i for i in ids if in_fraction(str(i), fraction, seed)]


def write_selected_ids(path: str | Path, ids: Iterable[str]) -> Path:
    """Record which ids a run trained on (one per line), next to its results."""
    return atomic_write_text(path, "".join(f"{i}\n" for i in ids))
