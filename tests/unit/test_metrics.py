"""Hand-worked checks of the LLaVA-Med medical-VQA metric definitions and quirks."""

from __future__ import annotations

import re
import warnings
from collections import Counter

import pytest
import torch

from stllava_med.data.answers import normalize_answer_type
from stllava_med.eval.metrics import (
    _CONTRACTIONS,
    MedVQAMetrics,
    closed_correct,
    closed_correct_strict,
    closed_correct_yesno,
    normalize_answer,
    open_f1_precision_recall,
    score_vqa,
    split_words,
)

# --------------------------------------------------------------------------- #
# normalize_answer
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # "-" never touches a space -> replaced by a space, so the word splits.
        ("Left-sided effusion", "left sided effusion"),
        # " -" occurs -> "-" is deleted (the gap collapses on re-join).
        ("yes - left", "yes left"),
        # "," is followed by a space -> deleted; ")" followed by space -> deleted;
        # "(" never touches a space -> space.
        ("Yes, it is", "yes it is"),
        ("(right) lung", "right lung"),
        # "/" is inside a token -> space; "-" touches a space -> deleted.
        ("x/y - z", "x y z"),
        # "?" at the end touches no space -> becomes a trailing space, stripped by split.
        ("yes?", "yes"),
        # Apostrophes are not punctuation here.
        ("don't", "don't"),
    ],
)
def test_punctuation_delete_vs_space(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_digit_comma_digit_switches_every_mark_to_delete() -> None:
    # Without the "1,000" the "/" would become a space ("mg dl").
    assert normalize_answer("1,000 mg/dl") == "1000 mgdl"
    assert normalize_answer("mg/dl") == "mg dl"
    # The trigger anywhere in the text affects marks elsewhere.
    assert normalize_answer("left-sided, 2,5") == "leftsided 25"


def test_punctuation_condition_uses_text_on_entry_not_rewritten_text() -> None:
    # ";" -> space gives "ct -scan x-ray"; "-" is still judged on the original
    # text (no "- " / " -"), so every "-" becomes a space, as in the VQA tool.
    assert normalize_answer("ct;-scan x-ray") == "ct scan x ray"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2.5 cm.", "2.5 cm"),  # period before a digit kept, trailing one removed
        (".5", ".5"),
        ("5.", "5"),
        ("e.g. 3", "eg 3"),
        ("Yes.", "yes"),
    ],
)
def test_periods(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_at_most_32_periods_removed_quirk() -> None:
    # re.UNICODE (32) is passed as the `count` argument in the reference code.
    assert normalize_answer("." * 40) == "." * 8
    assert normalize_answer("." * 32) == ""


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two lesions", "2 lesions"),
        ("none", "0"),
        ("zero one two three four five six seven eight nine ten", "0 1 2 3 4 5 6 7 8 9 10"),
        ("eleven", "eleven"),  # not in the table
        ("twofold", "twofold"),  # whole words only
    ],
)
def test_number_words(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The left lung", "left lung"),
        ("a mass in an organ", "mass in organ"),
        ("abnormal anterior theca", "abnormal anterior theca"),  # only whole words
        ("the", ""),
    ],
)
def test_articles(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("dont know", "don't know"),
        ("It isnt", "it isn't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("youve", "you've"),
        ("somebody'd", "somebodyd"),  # reversed entry in the reference table
        ("Im", "im"),  # upper-case key never matches lower-cased text
    ],
)
def test_contractions(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_contraction_table_is_complete() -> None:
    # The VQA-v2 table has exactly 120 entries; guard against accidental edits.
    assert len(_CONTRACTIONS) == 120
    assert _CONTRACTIONS["aint"] == "ain't"
    assert _CONTRACTIONS["wouldn'tve"] == "wouldn't've"


def test_whitespace_case_and_non_strings() -> None:
    assert normalize_answer("  LEFT \t  Lung\n") == "left lung"
    assert normalize_answer(3) == "3"  # type: ignore[arg-type]
    assert normalize_answer(None) == "0"  # type: ignore[arg-type]  # str(None) -> "none" -> "0"
    assert normalize_answer("") == ""


def test_split_words_counts_multiplicity() -> None:
    assert split_words("left left lung") == Counter({"left": 2, "lung": 1})
    assert split_words("") == Counter()


# --------------------------------------------------------------------------- #
# open questions
# --------------------------------------------------------------------------- #


def test_open_f1_partial_overlap() -> None:
    # tp = upper + lobe = 2, fp = left = 1, fn = right = 1
    f1, precision, recall = open_f1_precision_recall("left upper lobe", "right upper lobe")
    assert precision == pytest.approx(2 / 3)
    assert recall == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 / 3)


def test_open_f1_asymmetric() -> None:
    # "The lung" -> "lung"; tp = 1, fp = 0, fn = left + mass = 2
    # p = 1, r = 1/3, f1 = 2 * (1/3) / (4/3) = 1/2
    f1, precision, recall = open_f1_precision_recall("The lung", "left lung mass")
    assert precision == pytest.approx(1.0)
    assert recall == pytest.approx(1 / 3)
    assert f1 == pytest.approx(0.5)


def test_open_f1_prediction_multiplicity_quirk() -> None:
    # C = {left: 2, lung: 1}, R = {left: 1, lung: 1}: tp = 2 + 1 = 3 (prediction
    # counts, not min), fp = fn = 0 -> perfect score.  A min-based F1 would give
    # tp = 2, fp = 1, p = 2/3.
    assert open_f1_precision_recall("left left lung", "left lung") == pytest.approx((1.0, 1.0, 1.0))
    # Repeats in the ground truth are not required either.
    assert open_f1_precision_recall("lung", "lung lung") == pytest.approx((1.0, 1.0, 1.0))
    # fp counts with prediction multiplicity: tp = 1, fp = 2 -> p = 1/3, r = 1, f1 = 1/2.
    f1, precision, recall = open_f1_precision_recall("liver liver lung", "lung")
    assert (f1, precision, recall) == pytest.approx((0.5, 1 / 3, 1.0))


def test_open_f1_normalises_both_sides() -> None:
    assert open_f1_precision_recall("Two nodules.", "2 nodules") == pytest.approx((1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    ("prediction", "ground_truth"),
    [
        ("", "liver"),
        ("liver", ""),
        ("the", "liver"),  # normalises to empty
        ("kidney", "liver"),  # no overlap
    ],
)
def test_open_f1_degenerate_cases_are_zero(prediction: str, ground_truth: str) -> None:
    assert open_f1_precision_recall(prediction, ground_truth) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- #
# closed questions
# --------------------------------------------------------------------------- #


def test_closed_substring_quirk_vs_strict() -> None:
    assert closed_correct("nodule", "no") is True
    assert closed_correct_strict("nodule", "no") is False


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "lenient", "strict"),
    [
        ("No, there is none.", "no", True, True),
        ("Yes.", "YES", True, True),
        ("yes", "no", False, False),
        ("there is no effusion", "no", True, False),  # strict needs the GT first
        ("no", "no effusion", False, False),  # prediction shorter than GT
        ("No effusion is seen", "no effusion", True, True),
        ("unknown", "no", True, False),
        ("the left side", "left", True, True),  # article dropped before comparing
    ],
)
def test_closed_examples(prediction: str, ground_truth: str, lenient: bool, strict: bool) -> None:
    assert closed_correct(prediction, ground_truth) is lenient
    assert closed_correct_strict(prediction, ground_truth) is strict


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "batch", "yesno"),
    [
        ("CT scan", "ct", True, False),           # the GT is there, but no yes/no: a miss for run_eval.py
        ("It is a CT, not an MRI", "ct", True, True),  # "not" contains "no"
        ("normal chest", "normal", True, True),   # "normal" contains "no" (and the GT)
        ("yes", "no", False, False),
        ("No.", "no", True, True),
        ("", "yes", False, False),
    ],
)
def test_closed_yesno_requires_a_yes_or_no_substring(prediction: str, ground_truth: str, batch: bool,
                                                      yesno: bool) -> None:
    assert closed_correct(prediction, ground_truth) is batch
    assert closed_correct_yesno(prediction, ground_truth) is yesno


def test_closed_yesno_counts_misses_in_the_denominator() -> None:
    # run_eval.py after microsoft/LLaVA-Med#35: a wrong answer that says yes/no is a 0, not left out
    result = score_vqa(["yes", "no", "CT"], ["no", "no", "ct"], ["CLOSED"] * 3)
    assert result["closed_accuracy_yesno"] == pytest.approx(100 / 3)
    assert result["closed_accuracy"] == pytest.approx(200 / 3)


def test_open_scores_normalise_twice_like_llava_med() -> None:
    # 40 sentences: one normalisation pass removes only 32 periods (the re.UNICODE-as-count quirk); LLaVA-Med
    # normalises in run_eval*.py and again in calculate_f1score, so all 40 "lung." become "lung"
    prediction = " ".join(["lung."] * 40)
    assert normalize_answer(prediction).split().count("lung.") == 8
    f1, precision, recall = open_f1_precision_recall(prediction, "lung")
    assert (f1, precision, recall) == (1.0, 1.0, 1.0)


def test_closed_empty_ground_truth() -> None:
    assert closed_correct("yes", "") is True  # "" is a substring of anything
    assert closed_correct_strict("yes", "") is False


# --------------------------------------------------------------------------- #
# answer types
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("OPEN", "OPEN"), ("open", "OPEN"), ("CLOSED ", "CLOSED"), (" closed", "CLOSED")],
)
def test_normalize_answer_type(raw: str, expected: str) -> None:
    assert normalize_answer_type(raw) == expected


@pytest.mark.parametrize("bad", ["other", "", "yes/no", None])
def test_normalize_answer_type_rejects_unknown(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        normalize_answer_type(bad)


# --------------------------------------------------------------------------- #
# MedVQAMetrics
# --------------------------------------------------------------------------- #

# Hand-worked batch:
#   open 1: recall 2/3, f1 2/3     open 2: recall 1/3, f1 1/2     open 3: 0, 0
#   closed: lenient hits 3/4, strict hits 2/4
PREDICTIONS = [
    "left upper lobe",
    "No, there is none.",
    "The lung",
    "nodule",
    "",
    "yes",
    "Yes.",
]
ANSWERS = ["right upper lobe", "no", "left lung mass", "No", "liver", "no", "yes"]
TYPES = ["OPEN", "CLOSED", "open", "CLOSED", " OPEN", "closed", "closed "]

EXPECTED = {
    "open_recall": 100 * (2 / 3 + 1 / 3 + 0) / 3,
    "open_f1": 100 * (2 / 3 + 1 / 2 + 0) / 3,
    "closed_accuracy": 75.0,
    "closed_accuracy_yesno": 75.0,
    "closed_accuracy_strict": 50.0,
    "n_open": 3,
    "n_closed": 4,
}


def _assert_scores(result: dict[str, float | int], expected: dict[str, float | int]) -> None:
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert type(result["n_open"]) is int
    assert type(result["n_closed"]) is int
    for key in ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno", "closed_accuracy_strict"):
        assert type(result[key]) is float, key


def test_metric_mixed_batch() -> None:
    metric = MedVQAMetrics()
    metric.update(PREDICTIONS, ANSWERS, TYPES)
    _assert_scores(metric.compute(), EXPECTED)


def test_score_vqa_matches_metric() -> None:
    _assert_scores(score_vqa(PREDICTIONS, ANSWERS, TYPES), EXPECTED)


def test_metric_two_chunks_equal_one() -> None:
    metric = MedVQAMetrics()
    metric.update(PREDICTIONS[:3], ANSWERS[:3], TYPES[:3])
    metric.update(PREDICTIONS[3:], ANSWERS[3:], TYPES[3:])
    _assert_scores(metric.compute(), EXPECTED)


def test_metric_forward_returns_batch_and_accumulates() -> None:
    metric = MedVQAMetrics()
    batch = metric(PREDICTIONS[:2], ANSWERS[:2], TYPES[:2])
    # open: recall 2/3, f1 2/3; closed: "No, there is none." vs "no" -> hit both ways
    _assert_scores(
        batch,
        {
            "open_recall": 200 / 3,
            "open_f1": 200 / 3,
            "closed_accuracy": 100.0,
            "closed_accuracy_yesno": 100.0,
            "closed_accuracy_strict": 100.0,
            "n_open": 1,
            "n_closed": 1,
        },
    )
    metric(PREDICTIONS[2:], ANSWERS[2:], TYPES[2:])
    _assert_scores(metric.compute(), EXPECTED)


def test_metric_only_closed_gives_zero_open_scores() -> None:
    result = score_vqa(["yes", "no"], ["yes", "yes"], ["CLOSED", "CLOSED"])
    _assert_scores(
        result,
        {
            "open_recall": 0.0,
            "open_f1": 0.0,
            "closed_accuracy": 50.0,
            "closed_accuracy_yesno": 50.0,
            "closed_accuracy_strict": 50.0,
            "n_open": 0,
            "n_closed": 2,
        },
    )


def test_metric_reset() -> None:
    metric = MedVQAMetrics()
    metric.update(PREDICTIONS, ANSWERS, TYPES)
    assert metric.compute()["n_open"] == 3
    metric.reset()
    with warnings.catch_warnings():
        # torchmetrics warns that compute() runs before any update(); expected here.
        warnings.simplefilter("ignore", UserWarning)
        empty = metric.compute()
    _assert_scores(
        empty,
        {
            "open_recall": 0.0,
            "open_f1": 0.0,
            "closed_accuracy": 0.0,
            "closed_accuracy_yesno": 0.0,
            "closed_accuracy_strict": 0.0,
            "n_open": 0,
            "n_closed": 0,
        },
    )
    metric.update(PREDICTIONS, ANSWERS, TYPES)
    _assert_scores(metric.compute(), EXPECTED)


def test_metric_states_are_float64_sums() -> None:
    metric = MedVQAMetrics()
    assert set(metric.metric_state) == {
        "open_recall_sum",
        "open_f1_sum",
        "n_open",
        "closed_hits",
        "closed_yesno_hits",
        "closed_strict_hits",
        "n_closed",
    }
    metric.update(PREDICTIONS, ANSWERS, TYPES)
    for name, value in metric.metric_state.items():
        assert isinstance(value, torch.Tensor)
        assert value.dtype == torch.float64, name
    assert metric.closed_hits.item() == 3
    assert metric.closed_yesno_hits.item() == 3
    assert metric.closed_strict_hits.item() == 2


def test_metric_merge_state_simulating_two_ranks() -> None:
    rank0, rank1 = MedVQAMetrics(), MedVQAMetrics()
    rank0.update(PREDICTIONS[:4], ANSWERS[:4], TYPES[:4])
    rank1.update(PREDICTIONS[4:], ANSWERS[4:], TYPES[4:])
    rank0.merge_state(rank1)
    _assert_scores(rank0.compute(), EXPECTED)


def test_metric_manual_state_sum_simulating_all_reduce() -> None:
    rank0, rank1 = MedVQAMetrics(), MedVQAMetrics()
    rank0.update(PREDICTIONS[::2], ANSWERS[::2], TYPES[::2])
    rank1.update(PREDICTIONS[1::2], ANSWERS[1::2], TYPES[1::2])
    # What a DDP all-reduce with dist_reduce_fx="sum" produces, done by hand ...
    summed = {name: rank0.metric_state[name] + rank1.metric_state[name] for name in rank0.metric_state}
    single = MedVQAMetrics()
    single.update(PREDICTIONS, ANSWERS, TYPES)
    for name, value in single.metric_state.items():
        assert summed[name].item() == pytest.approx(value.item()), name
    # ... and through merge_state's dict path.
    rank0.merge_state(dict(rank1.metric_state))
    _assert_scores(rank0.compute(), EXPECTED)


def test_metric_rejects_length_mismatch() -> None:
    metric = MedVQAMetrics()
    with pytest.raises(ValueError, match="same length"):
        metric.update(["yes", "no"], ["yes"], ["CLOSED", "CLOSED"])


def test_metric_rejects_unknown_answer_type() -> None:
    metric = MedVQAMetrics()
    with pytest.raises(ValueError, match="'other'"):
        metric.update(["yes"], ["yes"], ["other"])


def test_metric_rejects_bare_string() -> None:
    metric = MedVQAMetrics()
    with pytest.raises(TypeError, match="predictions"):
        metric.update("yes", ["yes", "n", "o"], ["CLOSED", "CLOSED", "CLOSED"])  # type: ignore[arg-type]
