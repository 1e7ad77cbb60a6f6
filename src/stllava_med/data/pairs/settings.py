"""``data.*`` of the DPO stage (``conf/data/*`` with ``conf/dpo.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stllava_med.data.pairs.sources import PAIR_FORMATS
from stllava_med.utils.config import check_keys


@dataclass
class PreferenceDataSettings:
    path: str | list[str] = ""
    val_path: str | list[str] | None = None
    val_ratio: float = 0.05
    fraction: float = 1.0
    fraction_seed: int = 0
    seed: int = 0  # shuffle
    batch_size: int = 4
    val_batch_size: int | None = None
    max_length: int | None = 2048
    num_workers: int = 0
    shuffle_buffer: int = 1000
    image_root: str | None = None
    on_bad_pair: str = "error"
    scan_cache_dir: str | None = None
    progress: bool = True
    format: str = "auto"  # auto | native | trl | official (see stllava_med.data.pairs.sources)
    convert_cache_dir: str | None = None  # foreign files converted here; None: <run dir>/converted_pairs

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **overrides: Any) -> PreferenceDataSettings:
        values = dict(cfg or {})
        check_keys(values, cls.__dataclass_fields__, "data")
        for key in ("path", "val_path"):
            if isinstance(values.get(key), list | tuple):
                values[key] = [str(p) for p in values[key]]
        values.update(overrides)
        settings = cls(**values)
        if not settings.path:
            raise ValueError("data.path is required: preference pairs (a file, a directory or a glob of our JSONL "
                             "shards, or TRL / official files)")
        if settings.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {settings.batch_size}")
        if not 0.0 <= settings.val_ratio < 1.0:
            raise ValueError(f"data.val_ratio must be in [0, 1), got {settings.val_ratio}")
        if settings.format not in PAIR_FORMATS:
            raise ValueError(f"data.format must be one of {PAIR_FORMATS}, not {settings.format!r}")
        return settings
