"""Every loader on real files: the bundled sample, the full benchmark folder (skipped when absent), and
PathVQA / LLaVA-Med files written in their published formats from real records and images."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stllava_med.data.vqa import (
    ImageError,
    VQARecord,
    dataset_specs,
    load_ground_truth,
    load_llava_med,
    load_native,
    load_pathvqa,
    load_slake,
    load_vqa,
    load_vqa_rad,
    load_vqa_rad_public,
    write_llava_med_eval,
)
from stllava_med.utils.io import write_jsonl


def test_vqa_rad_sample_counts_and_ids(sample_dir):
    test, report = load_vqa_rad(sample_dir, "test")
    train, _ = load_vqa_rad(sample_dir, "train")
    assert (len(test), len(train)) == (151, 625)
    assert Counter(r.answer_type for r in test) == {"CLOSED": 97, "OPEN": 54}
    assert report.kept == report.read == 151
    raw = json.loads((sample_dir / "testset.json").read_text())
    assert test[0].id == str(raw[0]["qid"] - 1)  # LLaVA-Med's id convention
    assert test[0].question == raw[0]["question"] and test[0].image.endswith(raw[0]["image_name"])


def test_trailing_space_answer_type_is_normalised(sample_dir):
    train, _ = load_vqa_rad(sample_dir, "train")
    raw = {str(r["qid"] - 1): r for r in json.loads((sample_dir / "trainset.json").read_text())}
    odd = [r for r in train if raw[r.id]["answer_type"] == "CLOSED "]
    assert len(odd) == 2 and all(r.answer_type == "CLOSED" for r in odd)


def test_vqa_rad_public_file(sample_dir):
    test, _ = load_vqa_rad_public(sample_dir, "test")
    train, _ = load_vqa_rad_public(sample_dir, "train", include_rephrase=False)
    raw = json.loads((sample_dir / "VQA_RAD Dataset Public.json").read_text())
    n_test_rows = sum(r["phrase_type"].startswith("test") for r in raw)
    n_test_rephrase = sum(r["phrase_type"].startswith("test") and r.get("question_rephrase") not in (None, "NULL")
                          for r in raw)
    assert len(test) == n_test_rows + n_test_rephrase
    assert len(train) == len(raw) - n_test_rows
    assert any(r.id.endswith("_rephrase") for r in test)


def test_full_benchmarks_when_present(medvqa_dir):
    rad, _ = load_vqa_rad(medvqa_dir / "vqa_rad", "test")
    assert len(rad) == 451 and Counter(r.answer_type for r in rad) == {"OPEN": 179, "CLOSED": 272}
    slake, _ = load_slake(medvqa_dir / "slake", "test", language="en")
    assert len(slake) == 1061 and Counter(r.answer_type for r in slake) == {"OPEN": 645, "CLOSED": 416}
    both, _ = load_slake(medvqa_dir / "slake", "test", language=None)
    assert len(both) == 2094
    public, _ = load_vqa_rad_public(medvqa_dir / "vqa_rad", "all", include_rephrase=False)
    assert len(public) == 2248


def test_missing_image_error_or_counted_skip(tmp_path, sample_dir):
    root = tmp_path / "rad"
    shutil.copytree(sample_dir, root)
    victim = json.loads((root / "testset.json").read_text())[0]
    (root / "images" / victim["image_name"]).unlink()
    with pytest.raises(ImageError, match=rf"record '{victim['qid'] - 1}'.*{victim['image_name']}"):
        load_vqa_rad(root, "test")
    kept, report = load_vqa_rad(root, "test", on_missing_image="skip")
    n_on_image = sum(r["image_name"] == victim["image_name"] for r in json.loads((root / "testset.json").read_text()))
    assert report.skipped["missing_image"] == n_on_image and len(kept) == 151 - n_on_image


def test_malformed_json_names_file_and_position(tmp_path):
    (tmp_path / "testset.json").write_text('[{"qid": 1, "image_name": "a.jpg",\n "answer": }]')
    with pytest.raises(ValueError, match=r"testset\.json: malformed JSON at line 2, column"):
        load_vqa_rad(tmp_path, "test")


def test_unknown_answer_type_and_missing_field_are_errors(tmp_path, sample_dir):
    rows = json.loads((sample_dir / "testset.json").read_text())[:3]
    rows[1]["answer_type"] = "MAYBE"
    (tmp_path / "testset.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"testset\.json: record 1: field 'answer_type'.*MAYBE"):
        load_vqa_rad(tmp_path, "test", on_missing_image="ignore")
    del rows[1]["answer_type"]
    rows[2].pop("question")
    rows[1]["answer_type"] = "OPEN"
    (tmp_path / "testset.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"record 2: missing field 'question'"):
        load_vqa_rad(tmp_path, "test", on_missing_image="ignore")


def test_slake_format_with_language_filter(tmp_path, sample_dir):
    # a SLAKE-format file built from real VQA-RAD records and images (same fields as Slake1.0 test.json)
    records, _ = load_vqa_rad(sample_dir, "test")
    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    shutil.copy(records[0].image, tmp_path / "imgs" / "xmlab1" / "source.jpg")
    rows = [{"img_id": 1, "img_name": "xmlab1/source.jpg", "question": r.question, "answer": r.answer,
             "q_lang": lang, "location": "Chest", "modality": "CT", "answer_type": r.answer_type,
             "base_type": "vqa", "triple": ["vhead", "_", "_"], "qid": i, "content_type": "Organ"}
            for i, (r, lang) in enumerate(zip(records[:6], ["en", "zh"] * 3))]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    en, _ = load_slake(tmp_path, "test", language="en")
    assert [r.id for r in en] == ["0", "2", "4"] and en[0].meta["q_lang"] == "en"


def test_pathvqa_parquet(tmp_path, sample_dir):
    records, _ = load_vqa_rad(sample_dir, "test")
    rows = records[:5]
    table = pa.table({
        "image": [{"bytes": Path(r.image).read_bytes(), "path": None} for r in rows],
        "question": [r.question for r in rows],
        "answer": ["yes", "no", "adenocarcinoma", "Yes", "the liver"],
    })
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    loaded, report = load_pathvqa(tmp_path, "test", image_cache=tmp_path / "cache")
    assert report.read == 5 and [r.answer_type for r in loaded] == ["CLOSED", "CLOSED", "OPEN", "CLOSED", "OPEN"]
    assert all((tmp_path / "cache").joinpath(r.image.split("/")[-1]).is_file() for r in loaded)
    again, _ = load_pathvqa(tmp_path, "test", image_cache=tmp_path / "cache")  # cached, same paths
    assert [r.image for r in again] == [r.image for r in loaded]
    with pytest.raises(FileNotFoundError, match="no train-"):
        load_pathvqa(tmp_path, "train")


def test_llava_med_format_round_trip(tmp_path, sample_dir):
    records, _ = load_vqa_rad(sample_dir, "test")
    path = write_llava_med_eval(records, tmp_path / "test.json", sample_dir / "images")
    back, _ = load_llava_med(path, sample_dir / "images")
    assert [(r.id, r.question, r.answer, r.answer_type) for r in back] == [
        (r.id, r.question, r.answer, r.answer_type) for r in records]
    assert load_ground_truth(path)[0].id == records[0].id


def test_native_jsonl_and_spec_dispatch(tmp_path, sample_dir):
    records, _ = load_vqa_rad(sample_dir, "test")
    path = write_jsonl(tmp_path / "native.jsonl", [r.to_json() for r in records[:4]])
    loaded, _ = load_native(path)
    assert loaded == records[:4] and VQARecord.from_json(records[0].to_json()) == records[0]
    specs = dataset_specs({"rad": {"format": "native", "path": str(path)}})
    assert list(specs) == ["rad"]
    limited, _ = load_vqa({**specs["rad"], "limit": 2})
    assert len(limited) == 2
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_vqa({"format": "csv"})
