"""Generation inputs without a model: image folders and lists, grouping labelled questions by image, shard
writing and the cleanup of a killed run's debris."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from stllava_med.selftrain.generate import (
    GenerationSettings,
    ShardWriter,
    discard_unfinished,
    list_images,
    read_progress,
    tasks_from_paths,
    tasks_from_records,
)


def test_folders_lists_and_duplicate_images(tmp_path, sample_dir):
    source = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for path in source:
        shutil.copy(path, folder / path.name)
    shutil.copy(source[0], tmp_path / "imgs" / "copy_of_first.jpg")  # same bytes, another name
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    found = list_images(tmp_path / "imgs")
    assert len(found) == 4 and all(p.endswith(".jpg") for p in found)
    tasks, skipped = tasks_from_paths(found)
    assert len(tasks) == 3 and skipped == []  # one task per distinct image content
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/nested/{source[1].name}\n\n{source[2]}\nimgs/missing.jpg\n")
    listed = list_images(listing)
    assert listed[0] == str(tmp_path / "imgs" / "nested" / source[1].name) and len(listed) == 3
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        tasks_from_paths(listed)
    tasks, skipped = tasks_from_paths(listed, on_bad_image="skip")
    assert len(tasks) == 2 and len(skipped) == 1 and "missing.jpg" in skipped[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a folder, a list file nor an image"):
        list_images(tmp_path / "nowhere")


def test_labelled_questions_grouped_per_image_deduplicated_and_capped(sample_dir):
    image_a, image_b = sorted((sample_dir / "images").glob("*.jpg"))[:2]

    def rec(i, image, question):
        return SimpleNamespace(id=str(i), image=str(image), question=question, answer=f"a{i}", answer_type="OPEN")

    records = [rec(0, image_a, "Is it normal?"), rec(1, image_b, "Where?"), rec(2, image_a, "is it  NORMAL?"),
               rec(3, image_a, "What organ?"), rec(4, image_a, "Which side?")]
    tasks = tasks_from_records(records, questions_per_image=2)
    assert [t.path for t in tasks] == [str(image_a), str(image_b)]
    assert [q.record_id for q in tasks[0].questions] == ["0", "3"]  # the repeat dropped, then capped at 2
    assert [q.record_id for q in tasks_from_records(records)[0].questions] == ["0", "3", "4"]


def test_shards_roll_and_unfinished_images_are_discarded(tmp_path):
    writer = ShardWriter(tmp_path / "candidates", shard_size=2)
    for i in range(3):
        writer.write({"id": f"c{i}", "image_sha256": "done" if i < 2 else "unfinished"})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "candidates").iterdir()) == ["candidates-00000.jsonl",
                                                                            "candidates-00001.jsonl"]
    (tmp_path / "progress.jsonl").write_text(json.dumps({"image_id": "done"}) + '\n{"image_id": "unfin')
    done = read_progress(tmp_path)
    assert list(done) == ["done"]
    assert discard_unfinished(tmp_path, done) == 1
    assert (tmp_path / "candidates" / "candidates-00001.jsonl").read_text() == ""
    assert (tmp_path / "progress.jsonl").read_text() == json.dumps({"image_id": "done"}) + "\n"
    resumed = ShardWriter(tmp_path / "candidates", shard_size=2)  # continues the last shard
    resumed.write({"id": "c9", "image_sha256": "x"})
    resumed.close()
    assert resumed.path.name == "candidates-00001.jsonl"


def test_settings_come_from_config_with_paper_defaults():
    settings = GenerationSettings.from_config({"question": {"max_new_tokens": 8}, "questions_per_image": -1,
                                               "question_source": "dataset"})
    assert (settings.question.temperature, settings.question.top_k, settings.question.top_p) == (1.2, 300, 0.95)
    assert settings.question.max_new_tokens == 8
    assert (settings.answer.temperature, settings.answer.top_k, settings.answer.top_p) == (1.2, 100, 0.95)
    assert settings.questions_per_image == 0  # -1: every question of the image
    with pytest.raises(ValueError, match="question_source"):
        GenerationSettings(question_source="web")
