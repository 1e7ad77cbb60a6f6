"""Nothing silently wrong at the input boundaries: every bad record made here is either a located error (file,
record / line, field) or, where the user asked for skip, a counted skip. Preference pairs through the real length
scan (the tiny backbone's processor), VQA records through the real loaders, evaluation scoring, and the judge CLI on
a generation directory that has not finished."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpo_support import sample_pairs, write_shard  # noqa: E402
from stllava_med.chat import ChatFormat  # noqa: E402
from stllava_med.data.pairs.scan import scan_pairs  # noqa: E402
from stllava_med.data.pairs.settings import PreferenceDataSettings  # noqa: E402
from stllava_med.data.preference import BadPairError, resolve_shards  # noqa: E402
from stllava_med.data.vqa import EmptyDataset, load_vqa  # noqa: E402
from stllava_med.eval.vqa import write_dataset_results  # noqa: E402
from stllava_med.selftrain.records import Candidate, candidate_id  # noqa: E402
from stllava_med.utils.io import sha256_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "data" / "vqa_rad_sample"


@pytest.fixture(scope="module")
def processor(tiny_backbone_path):
    from stllava_med.backbone import load_processor

    return load_processor(str(tiny_backbone_path))


def _scan(processor, path: Path, policy: str):
    return scan_pairs(resolve_shards(path), processor, ChatFormat(),
                      PreferenceDataSettings(path=str(path), on_bad_pair=policy, progress=False, num_workers=0))


# --------------------------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,reason,message", [
    ({"images": []}, "no_image", "no image: field 'images' is empty (text-only pairs are not trained)"),
    ({"chosen": "Yes.", "rejected": "  yes. "}, "chosen_equals_rejected",
     "chosen equals rejected: fields 'chosen' and 'rejected' are the same text up to case and whitespace"),
    ({"chosen": "Left  lung", "rejected": "left lung"}, "chosen_equals_rejected", "chosen equals rejected"),
])
def test_bad_pair_located_error_or_counted_skip(processor, tmp_path, change, reason, message):
    rows = sample_pairs(3)
    rows[1].update(change)
    path = write_shard(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(BadPairError) as err:
        _scan(processor, path, "error")
    assert str(err.value).startswith(f"{path}:2 (pair {rows[1]['id']!r}): {message}")
    assert "data.on_bad_pair=skip" in str(err.value)
    skipped = _scan(processor, path, "skip")
    assert skipped.report["skipped"] == {reason: 1}
    assert skipped.report["read"] == 3 and skipped.report["kept"] == 2
    assert rows[1]["id"] not in {e.id for e in skipped.entries}


def test_truncated_image_skipped_and_counted_at_the_scan(processor, tmp_path):
    rows = sample_pairs(3)
    source = Path(rows[2]["images"][0])
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])  # the header reads, the pixels do not
    rows[2]["images"] = [str(truncated)]
    path = write_shard(tmp_path / "pairs.jsonl", rows)
    skipped = _scan(processor, path, "skip")
    assert skipped.report["skipped"] == {"bad_image": 1}
    assert skipped.report["kept"] == 2
    assert f"{path}:3 (pair {rows[2]['id']!r}): bad image: record {rows[2]['id']!r}: cannot read image {truncated}" \
        in skipped.report["skip_examples"][0]


# --------------------------------------------------------------------------------------------------------------
# VQA records
# --------------------------------------------------------------------------------------------------------------

def _native(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _good(i: int) -> dict:
    image = sorted((SAMPLE / "images").glob("*.jpg"))[i]
    return {"id": f"q{i}", "image": str(image), "question": "Is there a fracture?", "answer": "no",
            "answer_type": "CLOSED"}


@pytest.mark.parametrize("field,value,message", [
    ("answer", None, "field 'answer' must be a non-empty string, got null"),
    ("question", "", "field 'question' is empty"),
    ("question", 17, "field 'question' must be a non-empty string, got int 17"),
    ("answer", "  ", "field 'answer' is empty"),
    ("answer", True, "field 'answer' must be a non-empty string, got bool True"),
])
def test_native_vqa_record_located_error(tmp_path, field, value, message):
    rows = [_good(0), {**_good(1), field: value}]
    path = _native(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        load_vqa({"format": "native", "path": str(path), "name": "mine"})
    assert str(err.value) == f"{path}: line 2: {message}"


def test_vqa_rad_record_answer_null_located(tmp_path):
    rows = json.loads((SAMPLE / "testset.json").read_text())[:3]
    rows[2]["answer"] = None
    (tmp_path / "testset.json").write_text(json.dumps(rows))
    (tmp_path / "images").symlink_to(SAMPLE / "images")
    with pytest.raises(ValueError) as err:
        load_vqa({"format": "vqa_rad", "root": str(tmp_path), "split": "test", "name": "rad"})
    assert str(err.value) == f"{tmp_path / 'testset.json'}: record 2: field 'answer' must be a non-empty string, got null"


def test_numeric_answer_is_its_text(tmp_path):
    path = _native(tmp_path, [{**_good(0), "answer": 2, "answer_type": "OPEN"}])
    records, _ = load_vqa({"format": "native", "path": str(path)})
    assert records[0].answer == "2"


@pytest.mark.parametrize("limit", [0, -1, "5", True, 1.5])
def test_limit_must_be_at_least_one(tmp_path, limit):
    path = _native(tmp_path, [_good(0), _good(1)])
    with pytest.raises(ValueError) as err:
        load_vqa({"format": "native", "path": str(path), "name": "mine", "limit": limit})
    assert str(err.value) == (f"data.sets.mine.limit must be an integer >= 1, or null for every question; got "
                              f"{limit!r}")


def test_limit_one_and_null(tmp_path):
    path = _native(tmp_path, [_good(0), _good(1)])
    assert len(load_vqa({"format": "native", "path": str(path), "limit": 1})[0]) == 1
    assert len(load_vqa({"format": "native", "path": str(path), "limit": None})[0]) == 2


def test_empty_evaluation_set_says_what_was_dropped(tmp_path):
    rows = [{**_good(0), "image": str(tmp_path / "gone-0.jpg")}, {**_good(1), "image": str(tmp_path / "gone-1.jpg")}]
    path = _native(tmp_path, rows)
    with pytest.raises(EmptyDataset) as err:
        load_vqa({"format": "native", "path": str(path), "name": "mine", "on_missing_image": "skip"})
    assert str(err.value).startswith(f"{path}: data.sets.mine holds no questions: 2 read, 2 missing image skipped "
                                     f"(e.g. missing_image: q0 -> {tmp_path / 'gone-0.jpg'}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyDataset, match=rf"^{empty}: data.sets.blank holds no questions: the file has no records$"):
        load_vqa({"format": "native", "path": str(empty), "name": "blank"})


def test_nothing_scored_is_an_error_not_zeros(tmp_path):
    records, _ = load_vqa({"format": "native", "path": str(_native(tmp_path, [_good(0), _good(1)]))})
    stats = {"generated": 0, "skipped_images": 2, "skipped_examples": ["record 'q0': cannot read image /x.jpg"]}
    with pytest.raises(EmptyDataset) as err:
        write_dataset_results([], stats, records, tmp_path / "out", name="mine")
    assert str(err.value) == ("mine: no question was answered, nothing to score: 2 questions, 2 skipped for "
                              "unreadable images under eval.on_bad_image=skip (first: record 'q0': cannot read "
                              "image /x.jpg)")
    assert not (tmp_path / "out" / "metrics.json").exists()


# --------------------------------------------------------------------------------------------------------------
# The judge on a generation run that has not finished
# --------------------------------------------------------------------------------------------------------------


def _generation_dir(tmp_path: Path, *, images_done: int, summary: dict | None) -> Path:
    run = tmp_path / "gen"
    (run / "candidates").mkdir(parents=True)
    images = sorted((SAMPLE / "images").glob("*.jpg"))[:3]
    candidates, progress = [], []
    for image in images[:images_done]:
        sha = sha256_file(image)
        question = "Is there an abnormality?"
        candidates.append(Candidate(id=candidate_id(sha, question), image=str(image), image_sha256=sha,
                                    question=question, answers=["yes", "no"], question_source="dataset",
                                    reference_answer="yes", answer_type="CLOSED").to_json())
        progress.append({"image_id": sha, "questions": 1, "candidates": 1, "answers": 2})
    (run / "candidates" / "candidates-00000.jsonl").write_text("".join(json.dumps(c) + "\n" for c in candidates))
    (run / "progress.jsonl").write_text("".join(json.dumps(p) + "\n" for p in progress))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _judge(candidates: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stllava_med.judge", f"candidates={candidates}", "expert=reference",
                           f"out_dir={out_dir}", f"hydra.run.dir={out_dir}-hydra", "print_summary=false",
                           "judge.progress=false", *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the judge CLI, three times
@pytest.mark.parametrize("images_done,summary,message", [
    (2, None, "is an unfinished generation run: no summary.json (stopped, or still running); progress.jsonl has 2 "
              "images done"),
    (2, {"complete": False, "images": 3, "images_done": 2}, "summary.json: complete=false, 2 of 3 images done"),
    (3, {"complete": True, "images": 2, "images_done": 2},
     "progress.jsonl has 3 images done, {run}/summary.json counted 2 of 2: a later run of this directory was "
     "stopped or is still running"),
])
def test_judge_refuses_unfinished_generation(tmp_path, images_done, summary, message):
    run = _generation_dir(tmp_path, images_done=images_done, summary=summary)
    refused = _judge(run, tmp_path / "judge")
    assert refused.returncode == 1
    assert message.format(run=run) in refused.stderr
    assert "judge.allow_partial=true" in refused.stderr
    assert not (tmp_path / "judge").exists()  # refused before the run directory
    partial = _judge(run / "candidates", tmp_path / "judge", "judge.allow_partial=true")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "judging a partial generation (judge.allow_partial=true)" in partial.stdout + partial.stderr
    assert json.loads((tmp_path / "judge" / "summary.json").read_text())["judged"] == images_done


@pytest.mark.slow
def test_judge_takes_a_finished_generation(tmp_path):
    run = _generation_dir(tmp_path, images_done=2, summary={"complete": True, "images": 2, "images_done": 2})
    done = _judge(run, tmp_path / "judge")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "partial" not in done.stdout + done.stderr


def test_instruct_limit_zero_refused():
    from stllava_med.data.instruct import load_conversations

    with pytest.raises(ValueError, match=r"^data.sets.inst.limit must be an integer >= 1, or null for every "
                                         r"question; got 0$"):
        load_conversations("inst", {"format": "llava_med_instruct", "path": str(SAMPLE / "trainset.json"),
                                            "image_folder": str(SAMPLE / "images"), "limit": 0})
