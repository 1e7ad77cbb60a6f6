"""Prediction files in LLaVA-Med's answer-file layout: the keys ``llava/eval/model_vqa*.py`` write
(``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``) with the question id in the
type the benchmark file gives it (LLaVA-Med's ``run_eval.py`` asserts ``gt ids == pred ids``), plus ours; and
the scorer reads them, and the older files, alike."""

from __future__ import annotations

import json

from stllava_med.data.vqa import VQARecord, load_native, load_slake, load_vqa_rad, load_vqa_rad_public
from stllava_med.eval.vqa import LLAVA_ANSWER_KEYS, answer_row
from stllava_med.score import score_files
from stllava_med.utils.io import write_jsonl

LLAVA_MED_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


def test_loaders_keep_the_question_id_type_of_the_benchmark_file(sample_dir, tmp_path):
    test, _ = load_vqa_rad(sample_dir, "test")
    raw = json.loads((sample_dir / "testset.json").read_text())
    assert test[0].question_id == raw[0]["qid"] - 1 and isinstance(test[0].question_id, int)
    assert test[0].id == str(raw[0]["qid"] - 1)  # ids stay strings inside
    public, _ = load_vqa_rad_public(sample_dir, "test")
    assert isinstance(public[0].question_id, int)
    assert all(isinstance(r.question_id, str) for r in public if r.id.endswith("_rephrase"))
    slake_rows = [{"qid": 11, "img_name": "synpic34515.jpg", "question": "Is this a CT?", "answer": "Yes",
                   "answer_type": "CLOSED", "q_lang": "en"}]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "synpic34515.jpg").write_bytes((sample_dir / "images" / "synpic34515.jpg").read_bytes())
    (tmp_path / "test.json").write_text(json.dumps(slake_rows))
    (slake,), _ = load_slake(tmp_path, "test")
    assert slake.question_id == 11
    # our native JSONL keeps the type through a round trip, and a string id stays a string
    records = [test[0], VQARecord(id="a7", image=test[0].image, question="Q?", answer="no", answer_type="CLOSED",
                                  dataset="x", split="test")]
    write_jsonl(tmp_path / "native.jsonl", [r.to_json() for r in records])
    assert [json.loads(line)["id"] for line in (tmp_path / "native.jsonl").read_text().splitlines()] == \
        [test[0].question_id, "a7"]
    back, _ = load_native(tmp_path / "native.jsonl")
    assert [r.question_id for r in back] == [test[0].question_id, "a7"] and back == records


def test_answer_rows_have_llava_meds_keys_then_ours(sample_dir):
    test, _ = load_vqa_rad(sample_dir, "test")
    row = answer_row(test[0], "yes", model_id="tiny")
    assert list(row)[: len(LLAVA_MED_KEYS)] == LLAVA_MED_KEYS == list(LLAVA_ANSWER_KEYS)
    assert set(row) - set(LLAVA_MED_KEYS) == {"answer", "answer_type", "image"}
    assert row["question_id"] == test[0].question_id and isinstance(row["question_id"], int)
    assert (row["prompt"], row["text"], row["model_id"]) == (test[0].question, "yes", "tiny")
    assert row["metadata"] == {"dataset": "vqa_rad", "split": "test"}
    # the answer id is a function of (model, question, answer): reruns write identical files
    assert row["answer_id"] == answer_row(test[0], "yes", model_id="tiny")["answer_id"]
    assert row["answer_id"] != answer_row(test[0], "no", model_id="tiny")["answer_id"]


def test_a_resumed_file_of_older_rows_is_rewritten_in_the_layout_and_question_order(sample_dir, tmp_path):
    """Rows an earlier version wrote (our keys only, string ids), out of order: reused, not decoded again, and
    the file comes out as LLaVA-Med's scripts want it (their run_eval zips ground truth and answers)."""
    from types import SimpleNamespace

    from stllava_med.chat import ChatFormat
    from stllava_med.eval.vqa import predict

    records = load_vqa_rad(sample_dir, "test")[0][:5]
    old = [{"question_id": r.id, "prompt": r.question, "text": f"answer {r.id}", "answer_type": r.answer_type,
            "answer": r.answer, "image": r.image} for r in reversed(records)]
    path = write_jsonl(tmp_path / "predictions.jsonl", old)
    rows, stats = predict(SimpleNamespace(name="tiny", processor=None), records, ChatFormat(), path, progress=False)
    assert stats["generated"] == 0
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == rows == [answer_row(r, f"answer {r.id}", model_id="tiny") for r in records]


def test_score_reads_new_and_old_answer_files_alike(sample_dir, tmp_path):
    test, _ = load_vqa_rad(sample_dir, "test")
    gt = sample_dir / "testset.json"
    answers = ["yes" if i % 3 else "no" for i in range(len(test))]
    new = write_jsonl(tmp_path / "new.jsonl", [answer_row(r, a, model_id="m") for r, a in zip(test, answers)])
    old = write_jsonl(tmp_path / "old.jsonl", [{"question_id": r.id, "text": a} for r, a in zip(test, answers)])
    assert isinstance(json.loads(new.read_text().splitlines()[0])["question_id"], int)
    assert score_files(gt, new) == score_files(gt, old)
