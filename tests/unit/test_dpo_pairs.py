"""Preference pair files: shard resolution, our schema, TRL and official STLLaVA-Med formats, the converter,
bad pairs, and the ground-truth pair builder behind the committed sample shard."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dpo_support import REPO_ROOT, SAMPLE_PAIRS, sample_pairs, write_shard
from stllava_med.convert_pairs import main as convert_main
from stllava_med.data.preference import (
    BadPairError,
    PreferencePair,
    SkipReport,
    convert_records,
    iter_pairs,
    pair_from_stllava,
    pair_from_trl,
    pair_problem,
    resolve_shards,
    vqa_ground_truth_pairs,
)

IMAGES = REPO_ROOT / "data" / "vqa_rad_sample" / "images"
IMAGE = IMAGES / "synpic34515.jpg"


# ---- shards --------------------------------------------------------------------------------------------------


def test_resolve_shards_file_directory_glob_and_list(tmp_path):
    a = write_shard(tmp_path / "d" / "a.jsonl", sample_pairs(2))
    b = write_shard(tmp_path / "d" / "b.jsonl", sample_pairs(2, start=2))
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    assert resolve_shards(a) == [a.resolve()]
    assert resolve_shards(tmp_path / "d") == [a.resolve(), b.resolve()]
    assert resolve_shards(str(tmp_path / "d" / "*.jsonl")) == [a.resolve(), b.resolve()]
    assert resolve_shards([str(b), str(a), str(b)]) == [b.resolve(), a.resolve()]  # order kept, no duplicates
    assert resolve_shards(f"{b},{a}") == [b.resolve(), a.resolve()]


def test_resolve_shards_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no"):
        resolve_shards(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="matched no file"):
        resolve_shards(str(tmp_path / "*.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_shards(tmp_path / "missing.jsonl")


def test_pairs_stream_with_their_shard_and_line(tmp_path):
    rows = sample_pairs(3)
    shard = write_shard(tmp_path / "p.jsonl", rows)
    streamed = list(iter_pairs([shard]))
    assert [p.id for p, _, _ in streamed] == [r["id"] for r in rows]
    assert [line for _, _, line in streamed] == [1, 2, 3]
    assert streamed[0][0] == PreferencePair.from_json(rows[0])
    assert PreferencePair.from_json(streamed[0][0].to_json()) == streamed[0][0]


def test_malformed_and_incomplete_records_name_file_and_line(tmp_path):
    shard = tmp_path / "bad.jsonl"
    shard.write_text(json.dumps(sample_pairs(1)[0]) + "\n{not json\n")
    with pytest.raises(BadPairError, match=r"bad.jsonl:2: malformed JSON"):
        list(iter_pairs([shard]))
    row = sample_pairs(1)[0]
    del row["rejected"]
    shard.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['rejected'\]"):
        list(iter_pairs([shard]))


def test_pair_problems():
    base = PreferencePair(id="x", images=[str(IMAGE)], prompt="Is there a mass?", chosen="Yes", rejected="No")
    assert pair_problem(base, [IMAGE]) is None
    assert pair_problem(replace(base, chosen="  "), [IMAGE]) == "empty_chosen"
    assert pair_problem(replace(base, rejected=""), [IMAGE]) == "empty_rejected"
    assert pair_problem(replace(base, prompt=""), [IMAGE]) == "empty_prompt"
    assert pair_problem(replace(base, rejected="Yes "), [IMAGE]) == "chosen_equals_rejected"
    assert pair_problem(base, [IMAGE.with_name("nope.jpg")]) == "missing_image"
    assert pair_problem(replace(base, images=[str(IMAGE)] * 2), [IMAGE] * 2) == "too_many_images"


# ---- foreign formats -----------------------------------------------------------------------------------------


def test_trl_string_and_conversational_records():
    plain = pair_from_trl({"images": [str(IMAGE)], "prompt": "<image>\nIs there a mass?", "chosen": "Yes",
                           "rejected": "No"}, "t", index=3)
    assert (plain.id, plain.prompt, plain.chosen, plain.rejected) == ("trl-3", "Is there a mass?", "Yes", "No")
    chat = pair_from_trl({
        "image": {"path": str(IMAGE), "bytes": None},
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a mass?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}],
        "rejected": [{"role": "assistant", "content": "No"}],
    }, "t")
    assert chat.images == [str(IMAGE)] and chat.prompt == "Is there a mass?" and chat.rejected == "No"


def test_trl_embedded_image_bytes_are_written_out(tmp_path):
    data = IMAGE.read_bytes()
    pair = pair_from_trl({"images": [{"bytes": data, "path": None}], "prompt": "Q?", "chosen": "a", "rejected": "b"},
                         "t", images_dir=tmp_path / "images")
    written = Path(pair.images[0])
    assert written.parent == tmp_path / "images" and written.read_bytes() == data and written.suffix == ".jpg"
    with pytest.raises(ValueError, match="give an images directory"):
        pair_from_trl({"images": [{"bytes": data}], "prompt": "Q?", "chosen": "a", "rejected": "b"}, "t")


def official(question="<image>\nIs there a mass?", chosen="Yes, in the liver.", rejected="No.", image="synpic34515.jpg"):
    return {"id": 7, "image": image,
            "chosen_conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": chosen}],
            "reject_conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": rejected}]}


def test_official_stllava_record():
    pair = pair_from_stllava(official(), "o")
    assert (pair.id, pair.images, pair.prompt, pair.chosen, pair.rejected) == (
        "7", ["synpic34515.jpg"], "Is there a mass?", "Yes, in the liver.", "No.")
    with pytest.raises(ValueError, match="different questions"):
        row = official()
        row["reject_conversations"][0]["value"] = "<image>\nAnother question?"
        pair_from_stllava(row, "o")
    with pytest.raises(ValueError, match="'human' then 'gpt'"):
        row = official()
        row["chosen_conversations"].reverse()
        pair_from_stllava(row, "o")


def test_convert_official_json_resolves_images_and_counts_bad_pairs(tmp_path):
    rows = [official(), {**official(), "id": 8, "image": "missing.jpg"},
            {**official(chosen="Same", rejected="Same"), "id": 9},
            {**official(), "id": 10, "chosen_conversations": official()["chosen_conversations"] * 2,
             "reject_conversations": official()["reject_conversations"] * 2}]
    source = tmp_path / "dpo.json"
    source.write_text(json.dumps(rows))
    with pytest.raises(BadPairError, match=r"dpo.json: record 1 \(id '8'\): missing image"):
        list(convert_records(source, "stllava", image_root=IMAGES))
    report = SkipReport()
    pairs = list(convert_records(source, "stllava", image_root=IMAGES, on_bad_pair="skip", report=report))
    assert [p.id for p in pairs] == ["7"] and pairs[0].images == [str(IMAGE.resolve())]
    assert dict(report.skipped) == {"missing_image": 1, "chosen_equals_rejected": 1, "multi_turn": 1}
    assert report.read == 4 and report.kept == 1


def test_converter_cli_writes_shards_from_trl_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"images": [str(IMAGE)], "prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}",
                "id": f"q{i}"} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = pa.table({"images": [[{"bytes": IMAGE.read_bytes(), "path": None}]],
                      "prompt": ["From parquet?"], "chosen": ["a"], "rejected": ["b"], "id": ["pq0"]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    assert convert_main(["trl", str(tmp_path / "in.jsonl"), str(tmp_path / "in.parquet"), "--out", str(out),
                         "--shard-size", "4", "--relative-images"]) == 0
    shards = resolve_shards(out)
    assert [s.name for s in shards] == ["pairs-00000.jsonl", "pairs-00001.jsonl"]
    pairs = [p for p, _, _ in iter_pairs(shards)]
    assert [p.id for p in pairs] == ["q0", "q1", "q2", "q3", "q4", "pq0"]
    assert not Path(pairs[0].images[0]).is_absolute()
    assert (out / pairs[0].images[0]).resolve() == IMAGE.resolve()
    assert (out / pairs[-1].images[0]).read_bytes() == IMAGE.read_bytes()
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["kept"] == 6 and report["read"] == 6


# ---- ground-truth pairs from VQA-RAD (the committed sample shard) ---------------------------------------------


def test_ground_truth_pairs_are_real_and_deterministic():
    from stllava_med.data.vqa import load_vqa_rad

    records, _ = load_vqa_rad(REPO_ROOT / "data" / "vqa_rad_sample", "train")
    pairs = vqa_ground_truth_pairs(records, seed=0)
    assert pairs == vqa_ground_truth_pairs(records, seed=0)
    assert len(pairs) >= 0.95 * len(records)
    by_id = {f"vqa_rad-{r.id}": r for r in records}
    for pair in pairs:
        record = by_id[pair.id]
        assert pair.chosen == str(record.answer).strip() and pair.prompt == record.question
        assert pair.chosen.lower() != pair.rejected.lower()
        if pair.chosen.lower() in ("yes", "no"):
            assert {pair.chosen.lower(), pair.rejected.lower()} == {"yes", "no"}
    assert len({p.rejected for p in pairs}) > 50  # open questions get varied wrong findings


def test_committed_sample_shard_is_the_builders_output(tmp_path):
    assert convert_main(["vqa-rad", str(REPO_ROOT / "data" / "vqa_rad_sample"), "--split", "train",
                         "--out", str(tmp_path)]) == 0
    assert (tmp_path / "train-00000.jsonl").exists()
    rebuilt = [json.loads(line) for line in (tmp_path / "train-00000.jsonl").read_text().splitlines()]
    committed = [json.loads(line) for line in SAMPLE_PAIRS.read_text().splitlines()]
    # image paths are relative to the shard directory; compare what they point at
    for row, shard_dir in ((rebuilt, tmp_path), (committed, SAMPLE_PAIRS.parent)):
        for pair in row:
            pair["images"] = [str((shard_dir / p).resolve()) for p in pair["images"]]
            pair.pop("source")
    assert rebuilt == committed
