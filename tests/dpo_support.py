"""Helpers for the DPO tests: small shards of real preference pairs (the bundled VQA-RAD sample's ground
truth, see ``stllava_med.data.preference.vqa_ground_truth_pairs``) and tiny-backbone loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PAIRS = REPO_ROOT / "data" / "vqa_rad_sample" / "preference" / "train-00000.jsonl"
TINY_PATH = REPO_ROOT / "data" / "backbones" / "tiny"


def sample_pairs(n: int | None = None, *, start: int = 0, stride: int = 1) -> list[dict[str, Any]]:
    """``n`` pairs of the committed sample shard (from line ``start``, every ``stride``-th), image paths made
    absolute."""
    rows = []
    with open(SAMPLE_PAIRS, encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            if index < start or (index - start) % stride:
                continue
            if n is not None and len(rows) >= n:
                break
            row = json.loads(line)
            row["images"] = [str((SAMPLE_PAIRS.parent / p).resolve()) for p in row["images"]]
            rows.append(row)
    return rows


def write_shard(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_files(tmp_path: Path, n: int = 4, *, stride: int = 1) -> dict[str, Path]:
    """The same ``n`` sample pairs as our JSONL, TRL JSONL, TRL Parquet (embedded image bytes) and the official
    STLLaVA-Med JSON (absolute image paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stllava_med.data.preference import PreferencePair, pair_to_trl

    rows = sample_pairs(n, stride=stride)
    pairs = [PreferencePair.from_json(r) for r in rows]
    files = {"native": write_shard(tmp_path / "native.jsonl", rows),
             "trl": write_shard(tmp_path / "trl.jsonl", [pair_to_trl(p) for p in pairs])}
    trl_rows = [pair_to_trl(p) for p in pairs]
    for row in trl_rows:
        row["images"] = [{"bytes": Path(row["images"][0]).read_bytes(), "path": None}]
    files["parquet"] = tmp_path / "trl.parquet"
    pq.write_table(pa.Table.from_pylist(trl_rows), files["parquet"])
    official = [{"id": p.id, "image": p.images[0],
                 "chosen_conversations": [{"from": "human", "value": "<image>\n" + p.prompt},
                                          {"from": "gpt", "value": p.chosen}],
                 "reject_conversations": [{"from": "human", "value": "<image>\n" + p.prompt},
                                          {"from": "gpt", "value": p.rejected}]} for p in pairs]
    files["official"] = tmp_path / "official.json"
    files["official"].write_text(json.dumps(official))
    return files


def tiny_backbone(*, lora: bool = True, quantization: str | None = None, r: int = 8, dropout: float = 0.0,
                  seed: int = 0):
    """The project's tiny LLaVA (built on first use), with a fresh LoRA adapter when ``lora``."""
    import sys

    import torch

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import tiny_spec
    from stllava_med.backbone import load_backbone
    from stllava_med.tiny import ensure_tiny_backbone

    ensure_tiny_backbone(TINY_PATH, tiny_spec())
    torch.manual_seed(seed)
    cfg = {"name_or_path": str(TINY_PATH), "name": "tiny", "quantization": quantization,
           "bnb_compute_dtype": "float32",
           "lora": {"enabled": lora, "r": r, "alpha": 2 * r, "dropout": dropout}}
    return load_backbone(cfg)


def perturb_lora(model, scale: float = 0.05, seed: int = 0) -> None:
    """Give LoRA B non-zero values (fresh adapters are zero, which would hide adapter-state bugs)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run no faster on two threads, and on a shared CPU two OpenMP threads can wait on each
    other for a long time; restored afterwards so other test files keep their setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
