"""Score an existing answer file against ground truth with the LLaVA-Med metrics.

    python -m stllava_med.score gt=<LLaVA-Med test.json | testset.json | SLAKE test.json | native .jsonl> \\
        pred=<answers.jsonl>

``pred`` is a LLaVA answer file: one ``{"question_id": ..., "text": ...}`` per line (our predictions.jsonl
is one too). Prints exactly one JSON object: open_recall, open_f1, closed_accuracy (LLaVA-Med's
run_eval_batch.py), closed_accuracy_yesno (its run_eval.py), closed_accuracy_strict (ours), n_open, n_closed. Refuses (exit status 2) when the id sets differ, naming missing and extra ids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from stllava_med.data.vqa import load_ground_truth
from stllava_med.utils import config as _config  # noqa: F401  (registers resolvers)
from stllava_med.utils.io import read_jsonl

# score_vqa's module holds the torchmetrics metric (torch): imported in score_files, not at start-up.

OUTPUT_KEYS = ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno", "closed_accuracy_strict",
               "n_open", "n_closed")


class IdMismatch(ValueError):
    pass


def _preview(ids: list[str], n: int = 10) -> str:
    shown = ", ".join(ids[:n])
    return shown + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def score_files(gt: str | Path, pred: str | Path, *, language: str | None = "en") -> dict[str, Any]:
    from stllava_med.eval.metrics import score_vqa

    records = load_ground_truth(gt, language=language)
    predictions: dict[str, str] = {}
    for line_no, row in enumerate(read_jsonl(pred), start=1):
        if "question_id" not in row or "text" not in row:
            raise ValueError(f"{pred}:{line_no}: an answer line needs 'question_id' and 'text' (has {sorted(row)})")
        qid = str(row["question_id"])
        if qid in predictions:
            raise ValueError(f"{pred}:{line_no}: duplicate question_id {qid!r}")
        predictions[qid] = str(row["text"])
    gt_ids = {r.id for r in records}
    missing = sorted(gt_ids - predictions.keys(), key=_natural)
    extra = sorted(predictions.keys() - gt_ids, key=_natural)
    if missing or extra:
        parts = [f"prediction ids do not match ground truth ({len(gt_ids)} questions in {gt}, "
                 f"{len(predictions)} answers in {pred})"]
        if missing:
            parts.append(f"missing {len(missing)}: {_preview(missing)}")
        if extra:
            parts.append(f"extra {len(extra)}: {_preview(extra)}")
        raise IdMismatch("; ".join(parts))
    result = score_vqa([predictions[r.id] for r in records], [r.answer for r in records],
                       [r.answer_type for r in records])
    return {k: result[k] for k in OUTPUT_KEYS}


def _natural(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.isdigit() else (1, value)


@hydra.main(version_base="1.3", config_path=_config.conf_dir(), config_name="score")
def main(cfg: DictConfig) -> None:
    try:
        result = score_files(str(cfg.gt), str(cfg.pred), language=cfg.get("language"))
    except (IdMismatch, ValueError, FileNotFoundError) as err:
        print(f"score: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
