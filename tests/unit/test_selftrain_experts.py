"""Expert plumbing without a network: reply validation, position randomisation, the reference scores,
Retry-After parsing, image data URLs, secrets refused in configs."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from email.utils import formatdate

import numpy as np
import pytest
from PIL import Image

from stllava_med.selftrain.experts.base import (
    InvalidResponse,
    ItemError,
    map_back,
    parse_scores,
    presentation_order,
    render_prompt,
    response_schema,
)
from stllava_med.selftrain.experts.openai_expert import image_data_url, parse_retry_after
from stllava_med.selftrain.experts.reference import ReferenceExpert, infer_answer_type, reference_score
from stllava_med.selftrain.records import Candidate


def reply(*entries: tuple[int, object, str]) -> str:
    return json.dumps({"scores": [{"answer": a, "score": s, "rationale": r} for a, s, r in entries]})


def test_parse_scores_orders_by_answer_number_not_by_list_position():
    scores, rationales = parse_scores(reply((2, 3, "weak"), (1, 9, "good")), 2)
    assert scores == [9.0, 3.0]
    assert rationales == ["good", "weak"]


def test_parse_scores_accepts_fenced_json_and_numeric_strings():
    text = "```json\n" + reply((1, "7", "ok"), (2, 4.0, "meh")) + "\n```"
    assert parse_scores(text, 2)[0] == [7.0, 4.0]


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty reply"),
    ("not json {", "malformed JSON"),
    (json.dumps([1, 2]), "not an object with a 'scores' list"),
    (reply((1, 5, "a")), "expected 2 scores, got 1"),
    (reply((1, 5, "a"), (1, 6, "b")), "answer 1 scored twice"),
    (reply((1, 11, "a"), (2, 6, "b")), "outside 1-10"),
    (reply((1, 0, "a"), (2, 6, "b")), "outside 1-10"),
    (reply((1, "high", "a"), (2, 6, "b")), "not a number"),
    (reply((1, True, "a"), (2, 6, "b")), "not a number"),
    (reply((3, 5, "a"), (2, 6, "b")), "not between 1 and 2"),
])
def test_parse_scores_rejects_invalid_replies_with_the_reason(text, message):
    with pytest.raises(InvalidResponse, match=re.escape(message)):
        parse_scores(text, 2)


def test_lenient_parsing_finds_the_object_inside_prose():
    text = "Sure! Here is my verdict: " + reply((1, 8, "x"), (2, 2, "y")) + " Hope this helps."
    with pytest.raises(InvalidResponse):
        parse_scores(text, 2)
    assert parse_scores(text, 2, lenient=True)[0] == [8.0, 2.0]


def test_presentation_order_is_a_reproducible_permutation_that_varies_per_key_and_attempt():
    orders = {tuple(presentation_order(4, key=f"k{i}", attempt=0)) for i in range(40)}
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len(orders) > 5  # genuinely shuffled, not the identity every time
    assert presentation_order(4, key="k1", attempt=0) == presentation_order(4, key="k1", attempt=0)
    retries = {tuple(presentation_order(4, key="k1", attempt=a)) for a in range(10)}
    assert len(retries) > 1


def test_map_back_inverts_the_presentation():
    answers = ["a0", "a1", "a2", "a3"]
    order = [2, 0, 3, 1]
    presented = [answers[i] for i in order]
    assert map_back(presented, order) == answers
    with pytest.raises(ValueError, match="not a permutation"):
        map_back([1, 2], [0, 0])


def test_prompt_lists_every_answer_and_the_schema_bounds_them():
    prompt = render_prompt("Is there a fracture?", ["Yes.", "No fracture is seen."])
    assert "[Question]\nIs there a fracture?" in prompt
    assert "[Answer 1]\nYes.\n[End of Answer 1]" in prompt
    assert "[Answer 2]\nNo fracture is seen.\n[End of Answer 2]" in prompt
    assert "exactly one entry for each of the 2 answers" in prompt
    item = response_schema(3)["properties"]["scores"]["items"]["properties"]
    assert item["answer"]["enum"] == [1, 2, 3]
    assert item["score"]["enum"] == list(range(1, 11))


def test_reference_scores_open_questions_by_token_f1_and_closed_by_correctness():
    assert reference_score("left lung", "left lung", "OPEN")[0] == 10.0
    assert reference_score("heart", "left lung", "OPEN")[0] == 1.0
    half = reference_score("left kidney", "left lung", "OPEN")[0]  # F1 = 0.5
    assert half == pytest.approx(1 + 9 * 0.5)
    assert reference_score("Yes, there is.", "yes", "CLOSED")[0] == 10.0
    assert reference_score("no", "yes", "CLOSED")[0] == 1.0
    # lenient is LLaVA-Med's substring test: a hedge counts; strict does not reward it
    assert reference_score("nodule", "no", "CLOSED", closed_match="lenient")[0] == 10.0
    assert reference_score("nodule", "no", "CLOSED", closed_match="strict")[0] == 1.0
    assert infer_answer_type("Yes") == "CLOSED" and infer_answer_type("left lung") == "OPEN"


def _candidate(**overrides) -> Candidate:
    values = dict(id="c1", image="x.png", image_sha256="0" * 64, question="Where is the mass?",
                  answers=["left lung", "right kidney", "left"], question_source="dataset",
                  reference_answer="left lung", answer_type="OPEN")
    values.update(overrides)
    return Candidate(**values)


def test_reference_expert_judges_in_candidate_order_and_refuses_unlabelled_candidates():
    expert = ReferenceExpert()
    result = asyncio.run(expert.judge(_candidate(), key="k", attempt=0))
    assert result.order == [0, 1, 2]
    assert result.scores[0] == 10.0 and result.scores[1] == 1.0
    assert result.scores[2] == pytest.approx(1 + 9 * (2 * 1.0 * 0.5 / 1.5))  # precision 1, recall 0.5
    assert "F1" in result.rationales[0]
    with pytest.raises(ItemError, match="no ground-truth answer"):
        asyncio.run(expert.judge(_candidate(reference_answer=None), key="k", attempt=0))


def test_retry_after_in_seconds_milliseconds_and_http_dates():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3600000"}) == 600.0  # capped
    date = formatdate(timeval=__import__("time").time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"retry-after": date}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_image_data_url_passes_jpeg_through_and_converts_other_formats(tmp_path, sample_dir):
    jpeg = next((sample_dir / "images").glob("*.jpg"))
    url = image_data_url(jpeg)
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == jpeg.read_bytes()
    tiff = tmp_path / "scan.tif"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(tiff)  # 16-bit grayscale
    converted = image_data_url(tiff)
    assert converted.startswith("data:image/png;base64,")
    small = image_data_url(jpeg, max_side=32)
    with Image.open(__import__("io").BytesIO(base64.b64decode(small.split(",", 1)[1]))) as img:
        assert max(img.size) == 32
    with pytest.raises(ItemError, match="cannot read image"):
        image_data_url(tmp_path / "missing.png")


def test_build_expert_refuses_inline_keys_and_needs_one_for_the_real_api(monkeypatch):
    from omegaconf import OmegaConf

    from conftest import compose
    from stllava_med.judge import build_expert

    openai = OmegaConf.to_container(compose("judge", ["expert=openai"]).expert, resolve=True)  # conf/expert/openai.yaml
    with pytest.raises(ValueError, match="environment variable"):
        build_expert({**openai, "api_key": "sk-inline"})
    monkeypatch.delenv("STLLAVA_TEST_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="STLLAVA_TEST_ABSENT_KEY"):
        build_expert({**openai, "api_key_env": "STLLAVA_TEST_ABSENT_KEY"})
    monkeypatch.setenv("STLLAVA_TEST_PRESENT_KEY", "sk-test-0123456789")
    with pytest.raises(ValueError, match=r"expert\.timeout_s is missing"):  # defaults live in conf/expert only
        build_expert({k: v for k, v in openai.items() if k != "timeout_s"} | {"api_key_env": "STLLAVA_TEST_PRESENT_KEY"})
    expert = build_expert({**openai, "api_key_env": "STLLAVA_TEST_PRESENT_KEY"})
    assert "sk-test" not in repr(expert) and "sk-test" not in str(vars(expert).get("identity"))
    with pytest.raises(ValueError, match="unknown expert kind"):
        build_expert({"kind": "oracle"})
