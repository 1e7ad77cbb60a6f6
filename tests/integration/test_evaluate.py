"""Zero-shot evaluation end to end on the tiny backbone: the real entry point, resumable predictions,
and the scorer CLI on its output (including its refusal of mismatched id sets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, compose
from stllava_med.eval.metrics import score_vqa

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src")}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_backbone_path):
    out = tmp_path_factory.mktemp("eval")
    proc = _run("stllava_med.evaluate", "data.sets.vqa_rad_sample.limit=40", "eval.batch_size=16",
                "eval.max_new_tokens=8", f"out_dir={out}", "eval.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_the_run_directory_records_the_overrides_that_made_it(eval_run):
    import yaml

    out, _ = eval_run
    recorded = yaml.safe_load((out / "config_overrides.yaml").read_text())
    assert recorded["overrides"] == ["data.sets.vqa_rad_sample.limit=40", "eval.batch_size=16", "eval.max_new_tokens=8",
                                     f"out_dir={out}", "eval.progress=false"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["eval"]["batch_size"] == 16 and config["data"]["sets"]["vqa_rad_sample"]["limit"] == 40


def test_cli_writes_predictions_metrics_and_table(eval_run, sample_dir):
    from stllava_med.data.vqa import load_vqa_rad

    out, proc = eval_run
    rows = [json.loads(line) for line in (out / "vqa_rad_sample" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    # LLaVA-Med's answer-file keys first (llava/eval/model_vqa.py), then ours; ids as testset.json has them
    # (qid - 1, integers), in question order: what LLaVA-Med's run_eval.py asserts against its test.json
    assert list(rows[0]) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata", "answer",
                             "answer_type", "image"]
    assert [r["question_id"] for r in rows] == [r.question_id for r in load_vqa_rad(sample_dir, "test")[0][:40]]
    assert all(isinstance(r["question_id"], int) for r in rows) and rows[0]["model_id"] == "tiny"
    metrics = json.loads((out / "vqa_rad_sample" / "metrics.json").read_text())
    expected = score_vqa([r["text"] for r in rows], [r["answer"] for r in rows], [r["answer_type"] for r in rows])
    for key in ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_strict", "n_open", "n_closed"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["n_open"] + metrics["n_closed"] == 40 and metrics["questions_per_s"] > 0
    table = (out / "table.md").read_text()
    assert "| vqa_rad_sample |" in table and "open recall" in table
    assert "| vqa_rad_sample |" in proc.stdout
    assert (out / "config.yaml").is_file()


def test_rerun_resumes_from_predictions(eval_run, tiny_backbone_path):
    from stllava_med.evaluate import run_evaluate

    out, _ = eval_run
    pred = out / "vqa_rad_sample" / "predictions.jsonl"
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join(lines[:25]) + "\n" + lines[25][:20])  # a killed run: 25 lines + a torn one
    cfg = compose("evaluate", ["data.sets.vqa_rad_sample.limit=40", "eval.batch_size=16", "eval.max_new_tokens=8",
                               f"out_dir={out}", "eval.progress=false", "print_table=false"])
    results = run_evaluate(cfg, out)
    assert results["vqa_rad_sample"]["generated"] == 15  # only the missing questions were decoded
    again = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [r["question_id"] for r in again] == [json.loads(line)["question_id"] for line in lines]
    assert again == [json.loads(line) for line in lines]  # greedy decoding: identical answers


def test_score_cli_matches_and_refuses_mismatched_ids(eval_run, sample_dir, tmp_path):
    out, _ = eval_run
    pred = out / "vqa_rad_sample" / "predictions.jsonl"
    gt = tmp_path / "gt.jsonl"
    from stllava_med.data.vqa import load_vqa_rad
    from stllava_med.utils.io import write_jsonl

    records, _ = load_vqa_rad(sample_dir, "test")
    write_jsonl(gt, [r.to_json() for r in records[:40]])
    proc = _run("stllava_med.score", f"gt={gt}", f"pred={pred}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert list(result) == ["open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno", "closed_accuracy_strict",
                            "n_open", "n_closed"]
    metrics = json.loads((out / "vqa_rad_sample" / "metrics.json").read_text())
    assert result["open_f1"] == pytest.approx(metrics["open_f1"])
    # against the full sample test file, 111 ids are missing; an unknown id is extra
    with open(pred, "a") as fh:
        fh.write(json.dumps({"question_id": "no-such-id", "text": "yes"}) + "\n")
    refused = _run("stllava_med.score", f"gt={sample_dir / 'testset.json'}", f"pred={pred}")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "missing 111" in refused.stderr and "extra 1: no-such-id" in refused.stderr
