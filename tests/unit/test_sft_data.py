"""Stage-1 data without a model: the LLaVA-Med instruct loader, VQA sets as conversations, hold-out and nested
fractions, the self-questioning draw statistics and the resumable sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stllava_med.data.instruct import (
    InstructRecord,
    load_conversations,
    load_instruct,
    vqa_to_conversations,
)
from stllava_med.data.sft_datamodule import EpochSampler, split_and_select, write_selection
from stllava_med.data.vqa import ImageError, load_vqa_rad
from stllava_med.sft.questioning import questioner_draws

IMAGE = "synpic100176.jpg"


def _instruct_rows() -> list[dict]:
    return [
        {"id": "PMC1_fig1", "image": IMAGE, "conversations": [
            {"from": "human", "value": "<image>\nWhat imaging modality is shown?"},
            {"from": "gpt", "value": "An axial CT scan of the abdomen."},
            {"from": "human", "value": "Is there free fluid?"},
            {"from": "gpt", "value": "No free fluid is visible."}]},
        {"id": "PMC2_fig3", "image": "synpic13385.jpg", "conversations": [
            {"from": "human", "value": "Describe the findings.\n<image>"},
            {"from": "gpt", "value": "A chest radiograph with clear lungs."}]},
    ]


def _write(tmp_path: Path, rows, name: str = "instruct.json") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------------------------------------------
# LLaVA-Med instruct format
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["instruct.json", "instruct.jsonl"])
def test_load_instruct_json_and_jsonl(tmp_path, sample_dir, name):
    path = _write(tmp_path, _instruct_rows(), name)
    records, report = load_instruct(path, sample_dir / "images", dataset="llava_med_instruct")
    assert [r.id for r in records] == ["PMC1_fig1", "PMC2_fig3"]
    assert report.read == 2 and report.kept == 2
    first = records[0]
    assert first.uid == "llava_med_instruct/PMC1_fig1"
    assert first.image == str(sample_dir / "images" / IMAGE)
    assert first.n_pairs == 2
    # the placeholder leaves the text wherever it stood; the renderer places the image itself
    assert first.messages[0].text == "What imaging modality is shown?"
    assert records[1].messages[0].text == "Describe the findings."
    assert [t.role for t in first.turns()] == ["user", "assistant", "user", "assistant"]
    assert [t.role for t in first.turns([False, True])] == ["user", "assistant", "questioner", "assistant"]
    # round trip through the published format
    again = InstructRecord.from_json(first.to_json(sample_dir / "images"), where="x",
                                     image_folder=sample_dir / "images", dataset="llava_med_instruct")
    assert again == first


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.pop("image"), "record 0: missing field 'image'"),
    (lambda r: r.pop("id"), "record 0: missing field 'id'"),
    (lambda r: r.update(conversations=[]), "record 0: field 'conversations' must be a non-empty list"),
    (lambda r: r["conversations"][1].update({"from": "human"}), "field 'conversations[1].from' is 'human'"),
    (lambda r: r["conversations"][2].update({"from": "system"}), "field 'conversations[2].from' must be 'human' or 'gpt'"),
    (lambda r: r["conversations"][0].update(value="What is shown?"), "field 'conversations[0].value' must hold exactly one <image>"),
    (lambda r: r["conversations"][2].update(value="<image>\nAnd here?"), "field 'conversations[2].value' has an <image>"),
    (lambda r: r["conversations"][3].update(value="  "), "field 'conversations[3].value' is empty"),
    (lambda r: r["conversations"][3].update(value=7), "field 'conversations[3].value' must be a string"),
    (lambda r: r["conversations"].pop(), "ends with a human turn"),
])
def test_instruct_errors_name_file_record_and_field(tmp_path, sample_dir, mutate, message):
    rows = _instruct_rows()
    mutate(rows[0])
    path = _write(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        load_instruct(path, sample_dir / "images")
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_instruct_jsonl_errors_name_the_line(tmp_path, sample_dir):
    rows = _instruct_rows()
    rows[1]["conversations"][0]["from"] = "gpt"
    path = _write(tmp_path, rows, "instruct.jsonl")
    with pytest.raises(ValueError, match=r"instruct\.jsonl: line 2: field 'conversations\[0\]\.from'"):
        load_instruct(path, sample_dir / "images")


def test_instruct_duplicate_ids_and_missing_images(tmp_path, sample_dir):
    rows = _instruct_rows()
    rows[1]["id"] = rows[0]["id"]
    with pytest.raises(ValueError, match=r"record 1: field 'id': duplicate id 'PMC1_fig1' \(first at .*record 0\)"):
        load_instruct(_write(tmp_path, rows), sample_dir / "images")
    rows = _instruct_rows()
    rows[1]["image"] = "missing.jpg"
    path = _write(tmp_path, rows)
    with pytest.raises(ImageError, match=r"record 1: record 'PMC2_fig3': field 'image': image not found"):
        load_instruct(path, sample_dir / "images")
    records, report = load_instruct(path, sample_dir / "images", on_missing_image="skip")
    assert [r.id for r in records] == ["PMC1_fig1"]
    assert report.skipped["missing_image"] == 1 and report.read == 2 and report.kept == 1


def test_load_conversations_dispatches_on_format(tmp_path, sample_dir):
    path = _write(tmp_path, _instruct_rows())
    spec = {"format": "llava_med_instruct", "path": str(path), "image_folder": str(sample_dir / "images")}
    records, _ = load_conversations("mine", spec)
    assert [r.uid for r in records] == ["mine/PMC1_fig1", "mine/PMC2_fig3"]
    with pytest.raises(ValueError, match="data.mine: missing 'image_folder'"):
        load_conversations("mine", {"format": "llava_med_instruct", "path": str(path)})


# --------------------------------------------------------------------------------------------------------------
# VQA sets as conversations
# --------------------------------------------------------------------------------------------------------------


def test_vqa_grouped_by_image_keeps_every_question_once(sample_dir):
    records, _ = load_vqa_rad(sample_dir, "train")
    grouped = vqa_to_conversations(records, dataset="rad", grouping="image", max_qa_per_conversation=10)
    assert sum(c.n_pairs for c in grouped) == len(records) == 625
    assert all(1 <= c.n_pairs <= 10 for c in grouped)
    assert len({c.uid for c in grouped}) == len(grouped)
    ids = [q for c in grouped for q in c.meta["question_ids"]]
    assert sorted(ids) == sorted(r.id for r in records)
    by_id = {r.id: r for r in records}
    for conversation in grouped:  # one image per conversation, questions paired with their own answers
        questions = [by_id[q] for q in conversation.meta["question_ids"]]
        assert {q.image for q in questions} == {conversation.image}
        assert [m.text for m in conversation.messages[0::2]] == [q.question.strip() for q in questions]
        assert [m.text for m in conversation.messages[1::2]] == [q.answer.strip() for q in questions]
    multi = [c for c in grouped if c.n_pairs > 1]
    assert len(multi) > 0.8 * len(grouped)  # enough second human turns to teach asking
    unlimited = vqa_to_conversations(records, dataset="rad", grouping="image", max_qa_per_conversation=None)
    assert len(unlimited) == len({r.image for r in records}) == 61
    single = vqa_to_conversations(records, dataset="rad", grouping="single")
    assert len(single) == 625 and all(c.n_pairs == 1 for c in single)
    assert vqa_to_conversations(records, dataset="rad") == grouped  # deterministic


# --------------------------------------------------------------------------------------------------------------
# Hold-out and nested fractions
# --------------------------------------------------------------------------------------------------------------


def _conversations(n: int) -> list[InstructRecord]:
    from stllava_med.data.instruct import Message

    return [InstructRecord(id=str(i), image="x.jpg", dataset="d",
                           messages=(Message("human", "q?"), Message("gpt", "a"))) for i in range(n)]


def test_fractions_are_nested_and_disjoint_from_validation(tmp_path):
    records = _conversations(2000)
    subsets = {}
    val_sets = set()
    for fraction in (0.09, 0.25, 0.5, 1.0):
        train, val = split_and_select(records, fraction=fraction, val_fraction=0.05)
        subsets[fraction] = {r.uid for r in train}
        val_sets.add(frozenset(r.uid for r in val))
        assert not subsets[fraction] & {r.uid for r in val}
    assert len(val_sets) == 1  # the same validation conversations for every fraction
    assert subsets[0.09] < subsets[0.25] < subsets[0.5] < subsets[1.0]
    n_train = len(subsets[1.0])
    assert abs(len(subsets[0.25]) - 0.25 * n_train) < 4 * math.sqrt(n_train * 0.25 * 0.75)
    # independent of input order
    shuffled_train, _ = split_and_select(list(reversed(records)), fraction=0.25, val_fraction=0.05)
    assert {r.uid for r in shuffled_train} == subsets[0.25]
    paths = write_selection(tmp_path, *split_and_select(records, fraction=0.09, val_fraction=0.05))
    assert set(Path(paths["train_ids"]).read_text().split()) == subsets[0.09]
    with pytest.raises(ValueError, match="data.fraction"):
        split_and_select(records, fraction=0.0)


# --------------------------------------------------------------------------------------------------------------
# Self-questioning draws
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq_ratio", [0.5, 0.3])
def test_sq_ratio_statistics(sq_ratio):
    draws = [questioner_draws(f"d/{i}", 11, sq_ratio, seed=0, epoch=0) for i in range(2000)]
    assert not any(d[0] for d in draws), "the first human turn (image + instruction) is never a questioner turn"
    later = [x for d in draws for x in d[1:]]
    rate = sum(later) / len(later)
    sigma = math.sqrt(sq_ratio * (1 - sq_ratio) / len(later))
    assert abs(rate - sq_ratio) < 5 * sigma, (rate, sq_ratio)
    # turns are drawn independently: P(turn 1 and turn 2 both ask) ~= sq_ratio^2
    both = sum(d[1] and d[2] for d in draws) / len(draws)
    assert abs(both - sq_ratio**2) < 5 * math.sqrt(sq_ratio**2 * (1 - sq_ratio**2) / len(draws))


def test_sq_draws_reproducible_per_example_and_epoch():
    assert questioner_draws("d/7", 8, 0.5, seed=3, epoch=2) == questioner_draws("d/7", 8, 0.5, seed=3, epoch=2)
    epochs = [questioner_draws(f"d/{i}", 8, 0.5, seed=0, epoch=0) for i in range(500)]
    next_epoch = [questioner_draws(f"d/{i}", 8, 0.5, seed=0, epoch=1) for i in range(500)]
    other_seed = [questioner_draws(f"d/{i}", 8, 0.5, seed=1, epoch=0) for i in range(500)]
    agree = sum(a == b for x, y in zip(epochs, next_epoch) for a, b in zip(x[1:], y[1:])) / (500 * 7)
    assert 0.4 < agree < 0.6  # a fresh draw every epoch, as the paper's online sampling
    assert epochs != other_seed
    assert questioner_draws("d/1", 5, 0.0, seed=0, epoch=0) == [False] * 5
    assert questioner_draws("d/1", 5, 1.0, seed=0, epoch=0) == [False] + [True] * 4
    with pytest.raises(ValueError, match="sq_ratio"):
        questioner_draws("d/1", 5, 1.5, seed=0, epoch=0)


# --------------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------------


def test_epoch_sampler_shuffles_per_epoch_shards_and_resumes():
    sampler = EpochSampler(10, seed=0)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first] and {e for _, e in second} == {1}
    assert list(EpochSampler(10, seed=0)) == first  # deterministic
    # ranks see disjoint shards of equal length covering everything
    shards = [list(EpochSampler(10, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert {i for s in shards for i, _ in s} == set(range(10))
    # a resume skips what was trained on; Lightning's set_epoch for that same epoch keeps the skip
    sampler.resume(1, 4)
    sampler.set_epoch(1)
    assert list(sampler) == second[4:]
    assert list(sampler) == second  # the skip applies once
    sampler.resume(1, 4)
    sampler.set_epoch(2)  # a new epoch clears it
    assert len(list(sampler)) == 10


def test_full_vqa_rad_train_as_conversations(medvqa_dir):
    spec = {"format": "vqa_rad", "root": str(medvqa_dir / "vqa_rad"), "split": "train"}
    conversations, report = load_conversations("vqa_rad_train", spec)
    assert report.kept == 3064 == sum(c.n_pairs for c in conversations)
    images = {c.image for c in conversations}
    assert len(conversations) >= len(images) and all(c.n_pairs <= 10 for c in conversations)
    # most conversations have a second human turn, i.e. something to learn to ask
    assert sum(c.n_pairs > 1 for c in conversations) > 0.8 * len(conversations)
