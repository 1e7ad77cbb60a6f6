"""Preference files the ecosystem reads: our shards load (and concatenate) with ``datasets`` in a stable schema,
``convert_pairs --to trl`` writes exactly TRL's conversational vision preference format, older shards still
read, and the DPO data's format detection and one-time conversion of TRL / official / Parquet files.

The ``datasets`` / ``trl`` checks skip, saying so, when those packages (the ``bench`` extra) are absent."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from dpo_support import REPO_ROOT, SAMPLE_PAIRS, pair_files, write_shard
from stllava_med.convert_pairs import main as convert_main
from stllava_med.data.preference import (
    PAIR_SCHEMA,
    PreferencePair,
    convert_records,
    iter_pairs,
    pair_from_trl,
    pair_to_trl,
    resolve_shards,
)

IMAGES = REPO_ROOT / "data" / "vqa_rad_sample" / "images"
IMAGE = IMAGES / "synpic34515.jpg"


def _datasets():
    return pytest.importorskip("datasets", reason="`datasets` is not installed (pip install -e '.[bench]')")


def load_json_dataset(files, cache_dir):
    datasets = _datasets()
    datasets.disable_progress_bars()
    return datasets.load_dataset("json", data_files=[str(f) for f in files], split="train",
                                 cache_dir=str(cache_dir))


def scored_pairs(n: int) -> list[PreferencePair]:
    """Pairs as the judge writes them: scores, an expert, provenance in ``meta`` (keys unlike the sample's)."""
    return [PreferencePair(id=f"judged-{i}", images=[str(IMAGE)], prompt=f"Is there a finding {i}?",
                           chosen="Yes, in the liver.", rejected="No.", chosen_score=8.0, rejected_score=3.0 + i,
                           judge="openai:gpt-4o", source="selftrain/round0",
                           meta={"candidate_id": f"c{i}", "margin": 5.0 - i, "scores": [8.0, 3.0 + i]})
            for i in range(3)]


def imported_pairs(n: int) -> list[PreferencePair]:
    """Pairs without a score or a judge (what the TRL and official converters give)."""
    return [PreferencePair(id=f"trl-{i}", images=[str(IMAGE)], prompt=f"Question {i}?", chosen="a", rejected="b",
                           source="trl") for i in range(n)]


def write_pairs(path: Path, pairs) -> Path:
    return write_shard(path, [p.to_json() for p in pairs])


# ---- our shard lines ------------------------------------------------------------------------------------------


def test_every_line_has_every_key_in_one_type():
    line = imported_pairs(1)[0].to_json()
    assert list(line) == list(PAIR_SCHEMA)
    assert math.isnan(line["chosen_score"]) and math.isnan(line["rejected_score"])
    assert (line["judge"], line["meta"]) == ("", "{}")
    scored = scored_pairs(1)[0]
    line = scored.to_json()
    assert (line["chosen_score"], line["rejected_score"]) == (8.0, 3.0)
    assert json.loads(line["meta"]) == scored.meta
    # the line reads back to the pair, unknowns to None, meta to its object
    for pair in (scored, imported_pairs(1)[0]):
        back = PreferencePair.from_json(json.loads(json.dumps(pair.to_json())))
        assert back == pair and back.meta == pair.meta
        assert (back.chosen_score, back.judge) == (pair.chosen_score, pair.judge)


def test_older_lines_still_read():
    old = {"id": "x", "images": ["../images/a.jpg"], "prompt": "Q?", "chosen": "a", "rejected": "b",
           "chosen_score": None, "rejected_score": None, "judge": "ground_truth", "source": None,
           "meta": {"answer_type": "CLOSED"}}
    pair = PreferencePair.from_json(old)
    assert (pair.chosen_score, pair.source, pair.meta) == (None, None, {"answer_type": "CLOSED"})
    minimal = PreferencePair.from_json({k: old[k] for k in ("id", "images", "prompt", "chosen", "rejected")})
    assert (minimal.chosen_score, minimal.judge, minimal.meta) == (None, None, {})
    assert PreferencePair.from_json({**old, "chosen_score": 7}).chosen_score == 7.0
    with pytest.raises(ValueError, match="field 'chosen_score' must be a number"):
        PreferencePair.from_json({**old, "chosen_score": "high"})
    with pytest.raises(ValueError, match="field 'meta' must be a JSON object"):
        PreferencePair.from_json({**old, "meta": "[1, 2]"})


def test_the_native_reader_points_trl_records_at_the_converter():
    with pytest.raises(ValueError, match=r"missing field\(s\) \['id'\] \(this looks like TRL"):
        PreferencePair.from_json({"images": [str(IMAGE)], "prompt": "Q?", "chosen": "a", "rejected": "b"})


def test_committed_sample_shard_is_in_the_stable_schema():
    rows = [json.loads(line) for line in SAMPLE_PAIRS.read_text().splitlines()]
    assert all(list(row) == list(PAIR_SCHEMA) for row in rows)
    assert all(isinstance(row["meta"], str) and math.isnan(row["chosen_score"]) for row in rows)


# ---- datasets ---------------------------------------------------------------------------------------------------


def test_shards_of_different_writers_load_and_concatenate_with_datasets(tmp_path):
    """A ground-truth shard (no scores), a judged one (scores, other meta keys) and an imported one (no judge):
    one dataset in either order, with the documented column types."""
    datasets = _datasets()
    ground = SAMPLE_PAIRS
    judged = write_pairs(tmp_path / "judged" / "pairs-00000.jsonl", scored_pairs(3))
    imported = write_pairs(tmp_path / "imported" / "pairs-00000.jsonl", imported_pairs(2))
    for order in ([ground, judged, imported], [imported, judged, ground]):
        ds = load_json_dataset(order, tmp_path / "hf")
        assert len(ds) == 625 + 3 + 2
        assert ds.features == datasets.Features({
            "id": datasets.Value("string"), "images": datasets.List(datasets.Value("string")),
            "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"), "chosen_score": datasets.Value("float64"),
            "rejected_score": datasets.Value("float64"), "judge": datasets.Value("string"),
            "source": datasets.Value("string"), "meta": datasets.Value("string")})
        by_id = {row["id"]: row for row in ds}
        assert by_id["judged-1"]["chosen_score"] == 8.0 and math.isnan(by_id["trl-0"]["chosen_score"])
        assert json.loads(by_id["judged-1"]["meta"])["candidate_id"] == "c1"
        # a row of the dataset is a line our reader takes
        assert PreferencePair.from_json(by_id["judged-1"]) == scored_pairs(3)[1]
    # loaded apart, they concatenate too
    parts = [load_json_dataset([f], tmp_path / "hf") for f in (ground, judged, imported)]
    assert len(datasets.concatenate_datasets(parts)) == 630


def test_the_sample_shard_loads_with_datasets_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = load_json_dataset([SAMPLE_PAIRS], tmp_path / "hf")
    ours = [p for p, _, _ in iter_pairs([SAMPLE_PAIRS])]
    assert [PreferencePair.from_json(row) for row in ds] == ours
    # its image paths are relative to the shard (the folder moves with its images); --to trl makes them absolute
    assert all((SAMPLE_PAIRS.parent / row["images"][0]).is_file() for row in ds)


# ---- TRL output -------------------------------------------------------------------------------------------------


def test_pair_to_trl_is_trls_conversational_vision_preference_record():
    pair = PreferencePair(id="p", images=[str(IMAGE)], prompt="Is there a mass?", chosen="Yes", rejected="No")
    assert pair_to_trl(pair) == {
        "id": "p",
        "images": [str(IMAGE)],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a mass?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "No"}]}],
    }
    # and it reads back to the same pair
    assert pair_from_trl(pair_to_trl(pair), "t") == dataclasses.replace(pair, source="trl")


def convert_sample_to_trl(out: Path) -> list[dict]:
    assert convert_main(["native", str(SAMPLE_PAIRS.parent), "--to", "trl", "--out", str(out),
                         "--shard-size", "400"]) == 0
    return [json.loads(line) for shard in resolve_shards(out) for line in shard.read_text().splitlines()]


def test_convert_to_trl_writes_absolute_images_and_loads_in_trls_pipeline(tmp_path, monkeypatch):
    rows = convert_sample_to_trl(tmp_path / "trl")
    assert [s.name for s in resolve_shards(tmp_path / "trl")] == ["pairs-00000.jsonl", "pairs-00001.jsonl"]
    assert len(rows) == 625 and all(set(row) == {"id", "images", "prompt", "chosen", "rejected"} for row in rows)
    assert all(Path(row["images"][0]).is_absolute() and Path(row["images"][0]).is_file() for row in rows)
    report = json.loads((tmp_path / "trl" / "conversion_report.json").read_text())
    assert (report["to"], report["kept"], report["skipped"]) == ("trl", 625, {})
    # the TRL rows convert back to exactly the pairs we started from
    back = list(convert_records(resolve_shards(tmp_path / "trl")[0], "trl"))
    ours = {p.id: p for p, _, _ in iter_pairs([SAMPLE_PAIRS])}
    assert all((p.prompt, p.chosen, p.rejected) == (ours[p.id].prompt, ours[p.id].chosen, ours[p.id].rejected)
               for p in back)

    monkeypatch.chdir(tmp_path)  # absolute paths: loads from anywhere
    ds = load_json_dataset(resolve_shards(tmp_path / "trl"), tmp_path / "hf")
    assert len(ds) == 625
    trl_data = pytest.importorskip("trl.data_utils", reason="`trl` is not installed (pip install -e '.[bench]')")
    example = ds[0]
    assert trl_data.is_conversational(example)
    # what DataCollatorForVisionPreference does with each example: one image placeholder per image
    prompt = trl_data.prepare_multimodal_messages(example["prompt"], images=example["images"])
    assert [part["type"] for part in prompt[0]["content"]] == ["image", "text"]
    assert prompt[0]["content"][0]["image"] == example["images"][0]


def test_convert_to_trl_refuses_relative_images(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_main(["native", str(SAMPLE_PAIRS), "--to", "trl", "--relative-images", "--out", str(tmp_path)])
    assert "--relative-images is for native shards" in capsys.readouterr().err


def test_official_is_the_name_of_the_stllava_format(tmp_path):
    row = {"id": 7, "image": IMAGE.name,
           "chosen_conversations": [{"from": "human", "value": "<image>\nIs there a mass?"},
                                    {"from": "gpt", "value": "Yes."}],
           "reject_conversations": [{"from": "human", "value": "<image>\nIs there a mass?"},
                                    {"from": "gpt", "value": "No."}]}
    (tmp_path / "dpo.json").write_text(json.dumps([row]))
    assert convert_main(["official", str(tmp_path / "dpo.json"), "--image-root", str(IMAGES),
                         "--out", str(tmp_path / "out")]) == 0
    (pair,) = [p for p, _, _ in iter_pairs(resolve_shards(tmp_path / "out"))]
    assert (pair.id, pair.images, pair.prompt) == ("7", [str(IMAGE.resolve())], "Is there a mass?")


# ---- the DPO data: foreign files given as data.path ----------------------------------------------------------


def test_formats_are_detected_per_file(tmp_path):
    from stllava_med.data.pairs.sources import detect_format

    files = pair_files(tmp_path)
    assert {name: detect_format(path) for name, path in files.items()} == {
        "native": "native", "trl": "trl", "parquet": "trl", "official": "official"}
    assert detect_format(SAMPLE_PAIRS) == "native"
    plain = write_shard(tmp_path / "plain.jsonl", [{"image": str(IMAGE), "prompt": "Q?", "chosen": "a", "rejected": "b"}])
    assert detect_format(plain) == "trl"


def test_foreign_files_are_converted_once_into_the_cache(tmp_path):
    from stllava_med.data.pairs.sources import prepare_shards

    files = pair_files(tmp_path)
    cache = tmp_path / "cache"
    native = [p for p, _, _ in iter_pairs([files["native"]])]
    expected = [(p.id, p.prompt, p.chosen, p.rejected) for p in native]
    for name in ("trl", "parquet", "official"):
        prepared = prepare_shards(str(files[name]), cache_dir=cache)
        (shard,) = prepared.shards
        assert shard.parent.parent == cache and prepared.conversions[0]["format"] != "native"
        pairs = [p for p, _, _ in iter_pairs([shard])]
        assert [(p.id, p.prompt, p.chosen, p.rejected) for p in pairs] == expected, name
        assert all(Path(p.images[0]).is_absolute() and Path(p.images[0]).is_file() for p in pairs)
        again = prepare_shards(str(files[name]), cache_dir=cache)
        assert again.shards == prepared.shards and again.conversions[0]["reused"] is True
    # the embedded bytes became files with the same content
    parquet = [p for p, _, _ in iter_pairs(prepare_shards(str(files["parquet"]), cache_dir=cache).shards)]
    assert Path(parquet[0].images[0]).read_bytes() == Path(native[0].images[0]).read_bytes()
    # our own JSONL is streamed where it is
    assert prepare_shards(str(files["native"]), cache_dir=cache).shards == [files["native"].resolve()]
    assert prepare_shards(str(files["native"]), cache_dir=cache).conversions == []
    # a named format is taken as given; a changed file is converted again
    assert prepare_shards(str(files["trl"]), fmt="trl", cache_dir=cache).shards == \
        prepare_shards(str(files["trl"]), cache_dir=cache).shards
    before = prepare_shards(str(files["trl"]), cache_dir=cache).shards
    write_shard(files["trl"], [pair_to_trl(p) for p in native[:2]])
    after = prepare_shards(str(files["trl"]), cache_dir=cache)
    assert after.shards != before and after.conversions[0]["kept"] == 2
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]  # nothing half-written left behind


def test_unknown_data_format_is_refused(tmp_path):
    from stllava_med.data.pairs.sources import prepare_shards

    with pytest.raises(ValueError, match="data.format must be one of"):
        prepare_shards(str(SAMPLE_PAIRS), fmt="csv", cache_dir=tmp_path)
