"""The family suite: one tiny real model per supported family, built once per session (seconds each).

``family`` parametrises a test over every family; ``family_path`` is its saved HF directory and
``family_backbone`` a freshly loaded :class:`stllava_med.backbone.Backbone` of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from families.builders import FAMILIES, build

_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def family_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def built(family: str, root: Path) -> Path:
    if family not in _BUILT:
        _BUILT[family] = build(family, root / family, seed=0)
    return _BUILT[family]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture()
def family_path(family, family_root) -> Path:
    return built(family, family_root)


@pytest.fixture()
def family_backbone(family_path):
    from stllava_med.backbone import load_backbone

    return load_backbone({"name_or_path": str(family_path), "name": family_path.name})


def mixed_images() -> list[Image.Image]:
    """Images of different sizes and aspect ratios: different tile counts (LLaVA-NeXT, Idefics3) and grids
    (Qwen2.5-VL) in one batch. Deterministic content, so logits are reproducible."""
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = [(40, 30), (20, 60), (64, 64), (90, 30)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for (w, h) in sizes]
