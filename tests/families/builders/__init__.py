"""Tiny, random-weight models of each real family, built offline as HF directories.

Each builder module exposes ``build(path: Path, seed: int = 0) -> Path``: the family's real config,
model and processor classes, a byte-level BPE tokenizer trained offline (``common.train_tokenizer``) with
the family's special tokens, and the family's published chat template (its source is named in the module).
The saved directory loads with ``stllava_med.backbone.load_backbone`` like a hub checkpoint would.
"""

from __future__ import annotations

import importlib
from pathlib import Path

FAMILIES = ("llava15", "llava_mistral", "llava_next", "qwen2_5_vl", "idefics3", "gemma3", "sq_llava")


def build(family: str, path: Path, seed: int = 0) -> Path:
    if family not in FAMILIES:
        raise KeyError(f"no tiny builder for {family!r}; known: {FAMILIES}")
    return importlib.import_module(f"{__name__}.{family}").build(Path(path), seed=seed)
