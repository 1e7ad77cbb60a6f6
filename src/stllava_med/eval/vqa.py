"""Zero-shot medical VQA: batched greedy decoding, resumable prediction files, LLaVA-Med metrics.

The prompt is LLaVA-Med's single turn, ``<image>\\n{question}``, rendered through the backbone's chat
template by :mod:`stllava_med.chat` (the same renderer training uses). Predictions are appended to
``predictions.jsonl`` as they are produced, so an interrupted evaluation of a 7B model on PathVQA's 6761
questions continues where it stopped.

Each line is a row of LLaVA-Med's answer files — the keys ``llava/eval/model_vqa.py`` and ``model_vqa_med.py``
write (``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``), ``question_id`` in the
benchmark file's own type — followed by ours (``answer``, ``answer_type``, ``image``). The finished file is in
question order: LLaVA-Med's ``run_eval.py`` asserts that the ground truth's ids equal the answers' ids, in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from stllava_med.backbone import Backbone
from stllava_med.chat import ChatFormat, prompt_text, vqa_turns
from stllava_med.data.images import image_preparer
from stllava_med.data.vqa import ImageError, VQARecord, load_image
from stllava_med.eval.metrics import MedVQAMetrics
from stllava_med.generation import generate_batch
from stllava_med.utils.io import (
    JsonlWriter,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    stable_hash,
    write_jsonl,
)
from stllava_med.utils.sharding import owns_batch

log = logging.getLogger(__name__)

METRIC_KEYS = ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno", "closed_accuracy_strict")


LLAVA_ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


def answer_row(record: VQARecord, text: str, *, model_id: str) -> dict[str, Any]:
    """One line of ``predictions.jsonl``: LLaVA-Med's answer-file keys, then ours. ``answer_id`` (a random
    ``shortuuid`` in LLaVA-Med) is a hash of (model, question, answer), so reruns write identical files."""
    return {
        "question_id": record.question_id,
        "prompt": record.question,
        "text": text,
        "answer_id": stable_hash({"model": model_id, "question": record.id, "text": text}, n=22),
        "model_id": model_id,
        "metadata": {"dataset": record.dataset, "split": record.split},
        "answer": record.answer,
        "answer_type": record.answer_type,
        "image": record.image,
    }


def _done_ids(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    return {str(row["question_id"]): row for row in read_jsonl(path, allow_truncated_tail=True)}


def _rewrite_clean(path: Path, rows: dict[str, dict[str, Any]]) -> None:
    """Drop a torn last line left by a killed run before appending again."""
    write_jsonl(path, rows.values())


def predict(backbone: Backbone, records: Sequence[VQARecord], fmt: ChatFormat, predictions_path: Path, *,
            batch_size: int = 8, max_new_tokens: int = 32, on_bad_image: str = "error", progress: bool = True,
            desc: str = "evaluate", model_id: str | None = None,
            image_aspect_ratio: str = "keep",
            shard: tuple[int, int] = (0, 1)) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Answer every record greedily, appending to ``predictions_path``; records already there are reused.

    Batches are cut from the full record list (batch b: records b*batch_size onwards), records already
    predicted left out of theirs. ``shard = (index, n)`` answers only batches with ``b % n == index``, so each
    batch, and its padding, is the one a single process decodes.

    Returns the predictions (of the shard's records) in record order and run statistics (questions/s, skipped
    images). ``model_id`` (default: the backbone's name) goes into every row."""
    model_id = model_id or str(getattr(backbone, "name", "") or "model")
    prepare_image = image_preparer(backbone.processor, image_aspect_ratio)
    batches = [(b, list(records[start:start + batch_size]))
               for b, start in enumerate(range(0, len(records), batch_size)) if owns_batch(b, shard)]
    records = [r for _, batch in batches for r in batch]
    done = _done_ids(predictions_path)
    if done:
        _rewrite_clean(predictions_path, done)
        log.info("%s: resuming, %d/%d predictions already in %s", desc, len(done), len(records), predictions_path)
    todo_count = sum(1 for r in records if r.id not in done)
    skipped: list[str] = []
    generated = 0
    started = time.perf_counter()
    bar = tqdm(total=len(records), initial=len(records) - todo_count, desc=desc, unit="q", disable=not progress,
               dynamic_ncols=True)
    with JsonlWriter(predictions_path) as writer:
        for _, batch in batches:
            chunk = [r for r in batch if r.id not in done]
            if not chunk:
                continue
            batch_records, images = [], []
            for record in chunk:
                try:
                    images.append(prepare_image(load_image(record.image, record_id=record.id)))
                    batch_records.append(record)
                except ImageError as err:
                    if on_bad_image != "skip":
                        raise
                    skipped.append(str(err))
            if not batch_records:
                bar.update(len(chunk))
                continue
            prompts = [prompt_text(backbone.processor, vqa_turns(r.question), "assistant", fmt) for r in batch_records]
            texts = generate_batch(backbone, prompts, images, max_new_tokens=max_new_tokens)
            for record, text in zip(batch_records, texts):
                row = answer_row(record, text, model_id=model_id)
                writer.write(row)
                done[record.id] = row
            generated += len(batch_records)
            bar.update(len(chunk))
            elapsed = time.perf_counter() - started
            bar.set_postfix(q_per_s=f"{generated / max(elapsed, 1e-9):.2f}")
    bar.close()
    elapsed = time.perf_counter() - started
    if skipped:
        log.warning("%s: skipped %d unreadable images (first: %s)", desc, len(skipped), skipped[0])
    # Rows of an earlier run (older versions wrote only our keys, with string ids) are brought to the layout,
    # and the file is rewritten in question order when a resumed or reordered run left it otherwise.
    rows = [answer_row(r, str(done[r.id]["text"]), model_id=str(done[r.id].get("model_id") or model_id))
            for r in records if r.id in done]
    if rows != [done[r.id] for r in records if r.id in done] or len(rows) != len(done):
        write_jsonl(predictions_path, rows + [row for key, row in done.items() if key not in {r.id for r in records}])
    stats = {"generated": generated, "seconds": round(elapsed, 3),
             "questions_per_s": round(generated / elapsed, 3) if generated and elapsed > 0 else None,
             "skipped_images": len(skipped), "skipped_examples": skipped[:10]}
    return rows, stats


def score_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    metric = MedVQAMetrics()
    if rows:
        metric.update([str(r["text"]) for r in rows], [str(r["answer"]) for r in rows],
                      [str(r["answer_type"]) for r in rows])
    return metric.compute() if rows else {k: 0.0 for k in METRIC_KEYS} | {"n_open": 0, "n_closed": 0}


def markdown_table(results: dict[str, dict[str, Any]], *, title_column: str = "dataset") -> str:
    """A Markdown table: one row per entry, the VQA metrics (×100) and question counts. "closed acc." is
    LLaVA-Med's run_eval_batch.py, "(yes/no)" its run_eval.py, "(strict)" ours (:mod:`stllava_med.eval.metrics`)."""
    header = (f"| {title_column} | open recall | open F1 | closed acc. | closed acc. (yes/no) | closed acc. (strict) "
              "| n open | n closed |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['open_recall']:.2f} | {m['open_f1']:.2f} | {m['closed_accuracy']:.2f} | "
            f"{m['closed_accuracy_yesno']:.2f} | {m['closed_accuracy_strict']:.2f} | {m['n_open']} | {m['n_closed']} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_dataset(backbone: Backbone, records: Sequence[VQARecord], fmt: ChatFormat, out_dir: Path, *,
                     name: str, batch_size: int = 8, max_new_tokens: int = 32, on_bad_image: str = "error",
                     progress: bool = True, extra: dict[str, Any] | None = None,
                     image_aspect_ratio: str = "keep") -> dict[str, Any]:
    """Predict, score and write ``predictions.jsonl``, ``metrics.json`` and ``table.md`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, stats = predict(backbone, records, fmt, out_dir / "predictions.jsonl", batch_size=batch_size,
                          max_new_tokens=max_new_tokens, on_bad_image=on_bad_image, progress=progress,
                          desc=f"evaluate {name}", image_aspect_ratio=image_aspect_ratio)
    return write_dataset_results(rows, stats, records, out_dir, name=name, extra=extra)


def merge_predictions(records: Sequence[VQARecord], shard_files: Sequence[Path]) -> list[dict[str, Any]]:
    """The rows of the shards' prediction files in record order (a record no shard answered — an unreadable
    image under ``on_bad_image=skip`` — is left out, as one process leaves it out)."""
    by_id: dict[str, dict[str, Any]] = {}
    for path in shard_files:
        by_id.update(_done_ids(path))
    return [by_id[r.id] for r in records if r.id in by_id]


def write_dataset_results(rows: Sequence[dict[str, Any]], stats: dict[str, Any], records: Sequence[VQARecord],
                          out_dir: Path, *, name: str, extra: dict[str, Any] | None = None,
                          write_predictions: bool = False) -> dict[str, Any]:
    """Score ``rows`` and write ``metrics.json`` and ``table.md`` (and ``predictions.jsonl``: a merge) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_predictions:
        write_jsonl(out_dir / "predictions.jsonl", rows)
    if not rows:  # metrics of nothing would read 0.00 everywhere, as if the model had answered everything wrong
        from stllava_med.data.vqa import EmptyDataset

        first = f" (first: {stats['skipped_examples'][0]})" if stats.get("skipped_examples") else ""
        raise EmptyDataset(f"{name}: no question was answered, nothing to score: {len(records)} questions, "
                           f"{stats.get('skipped_images', 0)} skipped for unreadable images under "
                           f"eval.on_bad_image=skip{first}")
    metrics = score_rows(rows)
    metrics.update({"dataset": name, "n_questions": len(records), "n_scored": len(rows), **stats, **(extra or {})})
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "table.md", markdown_table({name: metrics}))
    return metrics
