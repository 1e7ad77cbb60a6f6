"""Which human turns become questioner turns: a seeded, per-example, per-epoch draw.

STLLaVA-Med renders each human turn after the first as a questioner turn with probability ``sq_ratio``; the
questioner's text is then a training target, so the model learns to ask about the image. The draw is a pure
function of (seed, epoch, example uid, turn index), never of a global random state, so it is the same in
every DataLoader worker, on every rank, after a resume, and differs from epoch to epoch as the paper's online
sampling does.
"""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def turn_uniform(seed: int, epoch: int, uid: str, turn: int) -> float:
    """A uniform number in [0, 1) fixed by its arguments."""
    digest = hashlib.sha256(f"sq\x00{seed}\x00{epoch}\x00{uid}\x00{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def questioner_draws(uid: str, n_human_turns: int, sq_ratio: float, *, seed: int, epoch: int) -> list[bool]:
    """``draws[k]`` is True when the k-th human turn is rendered as a questioner turn; ``draws[0]`` (the turn
    that carries the image and the instruction) is always False."""
    if not 0.0 <= sq_ratio <= 1.0:
        raise ValueError(f"sft.sq_ratio must be in [0, 1], got {sq_ratio}")
    return [k > 0 and turn_uniform(seed, epoch, uid, k) < sq_ratio for k in range(n_human_turns)]
