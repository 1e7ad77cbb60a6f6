"""Bad input at the byte and pixel level, and backbones that are not what the config says: every case is our
error naming the file, record and field, or a counted skip where the user asked for skip.

Cases from the "nothing silently wrong" issue: non-UTF-8 bytes in pair shards and instruct / VQA files,
malformed and wrong-typed pair lines under ``data.on_bad_pair=skip``, a non-integer VQA-RAD ``qid``, an image over
the pixel limit (the decompression-bomb guard, made a setting: ``max_image_pixels``), SFT's ``data.on_bad_image``
for unreadable images, a backbone directory that does not exist and a text-only model. The bad files are made
here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import compose
from dpo_support import sample_pairs, write_shard
from stllava_med.backbone import backbone_config
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.scan import scan_pairs
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.data.preference import BadPairError, resolve_shards
from stllava_med.data.vqa import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageError,
    load_image,
    load_vqa,
    set_max_image_pixels,
)
from stllava_med.schema import SFTData
from stllava_med.utils.io import load_json, read_jsonl
from stllava_med.utils.runtime import apply_image_limit

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "data" / "vqa_rad_sample"


@pytest.fixture(scope="module")
def processor(tiny_backbone_path):
    from stllava_med.backbone import load_processor

    return load_processor(str(tiny_backbone_path))


@pytest.fixture
def pixel_limit():
    """Set a pixel limit for one test; PIL's default again afterwards."""
    yield set_max_image_pixels
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)


def _scan(processor, path: Path, policy: str):
    return scan_pairs(resolve_shards(path), processor, ChatFormat(),
                      PreferenceDataSettings(path=str(path), on_bad_pair=policy, progress=False, num_workers=0))


def _replace_line(path: Path, lineno: int, raw: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = raw
    path.write_bytes(b"\n".join(lines))


# --------------------------------------------------------------------------------------------------------------
# Pair shards: bytes, JSON, types
# --------------------------------------------------------------------------------------------------------------


def test_non_utf8_pair_line_located_or_counted(processor, tmp_path):
    rows = sample_pairs(3)
    path = write_shard(tmp_path / "pairs.jsonl", rows)
    line = json.dumps(rows[1]).encode()
    at = line.index(b'"chosen"') + 11
    _replace_line(path, 2, line[:at] + b"\xff\xfe" + line[at:])  # Latin-1 / UTF-16 debris in the middle of a line
    with pytest.raises(BadPairError) as err:
        _scan(processor, path, "error")
    assert str(err.value) == (f"{path}:2: not UTF-8 text (byte 0xff at column {at + 1}) (set data.on_bad_pair=skip "
                              "to skip such lines, counted)")
    skipped = _scan(processor, path, "skip")
    assert skipped.report["skipped"] == {"malformed": 1}
    assert (skipped.report["read"], skipped.report["kept"]) == (3, 2)
    assert [e.line for e in skipped.entries] == [1, 3]  # the lines after the bad one are read too


@pytest.mark.parametrize("mangle,message", [
    (lambda row: json.dumps(row)[:-7].encode(), "malformed JSON ("),
    (lambda row: json.dumps({**row, "chosen_score": "high"}).encode(), "field 'chosen_score' must be a number, got str"),
    (lambda row: json.dumps({**row, "chosen": 17}).encode(), "field 'chosen'"),
    (lambda row: json.dumps([row]).encode(), ""),
])
def test_malformed_and_wrong_typed_pair_lines_can_be_skipped(processor, tmp_path, mangle, message):
    rows = sample_pairs(3)
    path = write_shard(tmp_path / "pairs.jsonl", rows)
    _replace_line(path, 3, mangle(rows[2]))
    with pytest.raises(BadPairError) as err:
        _scan(processor, path, "error")
    assert str(err.value).startswith(f"{path}:3") and message in str(err.value)
    assert str(err.value).endswith("(set data.on_bad_pair=skip to skip such lines, counted)")
    skipped = _scan(processor, path, "skip")
    assert skipped.report["skipped"] == {"malformed": 1} and skipped.report["kept"] == 2
    assert skipped.report["skip_examples"][0].startswith(f"malformed: {path}:3")


# --------------------------------------------------------------------------------------------------------------
# JSON / JSONL files of the other readers
# --------------------------------------------------------------------------------------------------------------


def test_non_utf8_json_and_jsonl_name_file_line_and_column(tmp_path):
    whole = tmp_path / "instruct.json"
    whole.write_bytes(b'[\n  {"id": "a",\n   "conversations": "caf\xe9"}\n]\n')  # Latin-1 e-acute
    with pytest.raises(ValueError) as err:
        load_json(whole)
    assert str(err.value) == f"{whole}: not UTF-8 text at line 3, column 25 (byte 0xe9); save the file as UTF-8"

    lines = tmp_path / "set.jsonl"
    lines.write_bytes(b'{"a": 1}\n{"b": "\xc3"}\n')  # a UTF-8 sequence cut short
    with pytest.raises(ValueError) as err:
        list(read_jsonl(lines))
    assert str(err.value) == f"{lines}:2: not UTF-8 text (byte 0xc3 at column 8); save the file as UTF-8"


def test_a_torn_multibyte_tail_is_the_torn_tail_a_resumable_reader_tolerates(tmp_path):
    lines = tmp_path / "progress.jsonl"
    lines.write_bytes('{"a": "é"}\n{"b": "é'.encode()[:-1])  # a killed writer stopped inside "é"
    assert list(read_jsonl(lines, allow_truncated_tail=True)) == [{"a": "é"}]
    with pytest.raises(ValueError, match="progress.jsonl:2: not UTF-8 text"):
        list(read_jsonl(lines))


def test_a_raw_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    lines = tmp_path / "set.jsonl"
    lines.write_text(json.dumps({"q": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(read_jsonl(lines)) == [{"q": "a\u2028b"}]


def test_vqa_rad_qid_must_be_an_integer(tmp_path):
    rows = json.loads((SAMPLE / "testset.json").read_text())[:3]
    rows[1]["qid"] = "abc"
    (tmp_path / "testset.json").write_text(json.dumps(rows))
    (tmp_path / "images").symlink_to(SAMPLE / "images")
    with pytest.raises(ValueError) as err:
        load_vqa({"format": "vqa_rad", "root": str(tmp_path), "split": "test", "name": "rad"})
    assert str(err.value) == f"{tmp_path / 'testset.json'}: record 1: field 'qid' must be an integer, got str 'abc'"
    rows[1]["qid"] = str(rows[1]["qid"] if rows[1]["qid"] != "abc" else 7)  # digits in a string are an id
    (tmp_path / "testset.json").write_text(json.dumps(rows))
    records, _ = load_vqa({"format": "vqa_rad", "root": str(tmp_path), "split": "test", "name": "rad"})
    assert records[1].id == "6"


# --------------------------------------------------------------------------------------------------------------
# Images over the pixel limit (PIL's decompression-bomb guard, as a setting)
# --------------------------------------------------------------------------------------------------------------


def test_an_image_over_max_image_pixels_is_an_image_error(tmp_path, pixel_limit):
    image = tmp_path / "big.png"
    Image.new("L", (120, 100)).save(image)  # 12000 pixels
    pixel_limit(11_999)
    with pytest.raises(ImageError) as err:
        load_image(image, record_id="r1")
    assert str(err.value).startswith(f"record 'r1': image {image} is larger than max_image_pixels=11999 (")
    assert "raise the limit: max_image_pixels=<pixels> (or null for none)" in str(err.value)
    pixel_limit(12_000)
    assert load_image(image).size == (120, 100)
    pixel_limit(None)
    assert load_image(image).size == (120, 100)
    # far over the limit PIL raises instead of warning: the same error
    pixel_limit(1000)
    with pytest.raises(ImageError, match="is larger than max_image_pixels=1000"):
        load_image(image)


def test_an_image_over_the_limit_in_a_pair_is_located_or_skipped(processor, tmp_path, pixel_limit):
    rows = sample_pairs(3)
    with Image.open(rows[1]["images"][0]) as img:
        pixels = img.size[0] * img.size[1]
    path = write_shard(tmp_path / "pairs.jsonl", rows)
    pixel_limit(pixels - 1)
    with pytest.raises(BadPairError) as err:
        _scan(processor, path, "error")
    assert f"{path}:1 (pair {rows[0]['id']!r}): bad image: record {rows[0]['id']!r}: image " in str(err.value)
    assert "is larger than max_image_pixels=" in str(err.value)
    skipped = _scan(processor, path, "skip")
    assert skipped.report["skipped"] == {"bad_image": 3} and skipped.report["kept"] == 0


def test_max_image_pixels_is_a_stage_setting_applied_at_start(pixel_limit):
    cfg = compose("dpo", ["max_image_pixels=5000"])
    apply_image_limit(cfg)
    assert Image.MAX_IMAGE_PIXELS == 5000
    apply_image_limit(compose("evaluate", ["max_image_pixels=null"]))
    assert Image.MAX_IMAGE_PIXELS is None
    apply_image_limit(compose("sft", []))
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    with pytest.raises(ValueError, match="max_image_pixels must be a positive number of pixels or null, not 0"):
        apply_image_limit(compose("generate", ["max_image_pixels=0"]))


# --------------------------------------------------------------------------------------------------------------
# SFT: data.on_bad_image
# --------------------------------------------------------------------------------------------------------------


def test_sft_on_bad_image_skip_decodes_every_image_and_counts_the_unreadable(tmp_path):
    from stllava_med.train_sft import load_sft_records

    images = sorted((SAMPLE / "images").glob("*.jpg"))[:3]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(images[1].read_bytes()[: images[1].stat().st_size // 2])  # the header reads
    rows = [{"id": f"q{i}", "image": str(image), "question": "Is there a fracture?", "answer": "no",
             "answer_type": "CLOSED"} for i, image in enumerate([images[0], truncated, images[2]])]
    rows.append({**rows[0], "id": "q3", "image": str(tmp_path / "gone.jpg")})
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = {"mine": {"format": "native", "path": str(path)}}

    with pytest.raises(ImageError, match="gone.jpg"):  # error (the default): the missing image fails at load
        load_sft_records(SFTData(sets=sets, vqa_grouping="single"))
    records, reports = load_sft_records(SFTData(sets=sets, vqa_grouping="single", on_bad_image="skip"))
    assert [r.id for r in records] == ["q0", "q2"]
    assert reports["mine"]["skipped"] == {"missing_image": 1, "bad_image": 1}
    assert reports["mine"]["conversations"] == 2
    assert any(f"q1: cannot read image {truncated}" in e for e in reports["mine"]["skip_examples"])
    with pytest.raises(ValueError, match="data.on_bad_image must be error or skip, not 'ignore'"):
        SFTData.from_config({"on_bad_image": "ignore"})


# --------------------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------------------


def test_a_backbone_directory_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "checkpoints" / "llava-med-sft"
    with pytest.raises(FileNotFoundError) as err:
        backbone_config(str(missing))
    assert str(err.value).startswith(f"backbone.name_or_path={missing}: no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="the directory holds no config.json"):
        backbone_config(str(empty))


def test_a_text_only_model_is_refused_as_not_image_text_to_text(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError) as err:
        backbone_config(str(tmp_path / "llm"))
    assert str(err.value).startswith(f"backbone.name_or_path={tmp_path / 'llm'}: a 'llama' model (LlamaForCausalLM) "
                                     "is not an image-text-to-text model")


def test_the_tiny_backbone_passes_the_backbone_checks(tiny_backbone_path):
    assert backbone_config(str(tiny_backbone_path)).model_type == "llava"
