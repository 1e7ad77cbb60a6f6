"""Our metric variants reproduce LLaVA-Med's scoring scripts exactly on the real VQA-RAD and SLAKE test files, and
the paper preset's data entries refuse files with other question counts.

The reference below is this test's own transcription of microsoft/LLaVA-Med's scoring code, written from
``llava/eval/run_eval_batch.py`` (closed: ground truth in prediction), ``llava/eval/run_eval.py`` (closed: also a
"yes"/"no" in the prediction; misses counted since #35, commit b9a98a7, left out of the denominator in the
first release ad758b6) and ``llava/eval/eval_metrics/{glossary,evaluate_metrics,utils}.py`` (``normalize_word``,
``calculate_f1score``, ``split_sentence``). It shares no code with ``stllava_med.eval.metrics``. The
predictions are a fixed, seeded file: ground truths, other questions' answers, yes/no sentences, substring traps
("nodule", "normal"), punctuation and number words, and answers long enough to hit the 32-period quirk.

Needs the real benchmark folder (``$MEDVQA_ROOT`` or ../shared/data/medvqa); PathVQA needs LLaVA-Med's own
``pvqa/test.json`` there (under ``llava_med/``) and skips otherwise.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import MEDVQA_DIR, REPO_ROOT, compose

# --------------------------------------------------------------------------------------------------------------
# The reference: LLaVA-Med's scoring, transcribed
# --------------------------------------------------------------------------------------------------------------

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ["a", "an", "the"]
# glossary.py's contractions table, entry for entry ("key=value", whitespace-separated)
_CONTRACTIONS_TABLE = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
"""
_CONTRACTIONS = dict(item.split("=") for item in _CONTRACTIONS_TABLE.split())


def ref_normalize_word(token: str) -> str:
    _token = token
    for p in _PUNCT:
        if (p + " " in token or " " + p in token) or (re.search(_COMMA_STRIP, token) is not None):
            _token = _token.replace(p, "")
        else:
            _token = _token.replace(p, " ")
    # glossary.py: period_strip.sub("", _token, re.UNICODE) -- the flag lands in the count parameter
    token = _PERIOD_STRIP.sub("", _token, count=int(re.UNICODE))
    words = []
    for word in token.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    for i, word in enumerate(words):
        if word in _CONTRACTIONS:
            words[i] = _CONTRACTIONS[word]
    return " ".join(words).replace(",", "")


def ref_split_sentence(sentence: str, n: int) -> dict[str, int]:
    words: dict[str, int] = defaultdict(int)
    tokens = sentence.lower().strip().split()
    for i in range(len(tokens) - n + 1):
        gram = " ".join(tokens[i:i + n])
        if gram:
            words[gram] += 1
    return words


def ref_calculate_f1score(candidate: str, reference: str) -> tuple[float, float, float]:
    candidate = ref_normalize_word(candidate)
    reference = ref_normalize_word(reference)
    candidate_words = ref_split_sentence(candidate, 1)
    reference_words = ref_split_sentence(reference, 1)
    word_set = set(candidate_words) | set(reference_words)
    tp = fp = fn = 0
    for word in word_set:
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words and word not in reference_words:
            fp += candidate_words[word]
        elif word not in candidate_words and word in reference_words:
            fn += reference_words[word]
    if len(candidate_words) == 0 or len(reference_words) == 0:
        return 0, 0, 0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    if tp == 0:
        return 0, 0, 0
    return 2 * precision * recall / (precision + recall), precision, recall


def ref_evaluate(gt: list[dict], pred: list[dict]) -> dict[str, float]:
    """run_eval_batch.py's and run_eval.py's evaluate() loops, side by side, on one id-aligned file pair."""
    assert [g["id"] for g in gt] == [p["question_id"] for p in pred]  # both scripts assert this
    f1s, recalls, batch_hits, yesno_hits, yesno_hits_first_release = [], [], [], [], []
    per_question = {}
    for gt_item, pred_item in zip(gt, pred):
        gt_value = ref_normalize_word(gt_item["conversations"][1]["value"].lower())
        pred_value = ref_normalize_word(pred_item["text"].lower())
        if gt_item["answer_type"] == "OPEN":
            f1, _, recall = ref_calculate_f1score(pred_value, gt_value)
            f1s.append(f1)
            recalls.append(recall)
            per_question[gt_item["id"]] = (f1, recall)
        elif gt_item["answer_type"] == "CLOSED":
            batch_hits.append(1 if gt_value in pred_value else 0)          # run_eval_batch.py
            if "yes" in pred_value or "no" in pred_value:                  # run_eval.py (after #35)
                yesno_hits.append(1 if gt_value in pred_value else 0)
                if gt_value in pred_value:                                 # run_eval.py (ad758b6)
                    yesno_hits_first_release.append(1)
            else:
                yesno_hits.append(0)
                yesno_hits_first_release.append(0)
            per_question[gt_item["id"]] = (batch_hits[-1], yesno_hits[-1])
    return {
        "open_recall": sum(recalls) / len(recalls) * 100,
        "open_f1": sum(f1s) / len(f1s) * 100,
        "closed_accuracy": sum(batch_hits) / len(batch_hits) * 100,
        "closed_accuracy_yesno": sum(yesno_hits) / len(yesno_hits) * 100,
        "closed_accuracy_yesno_first_release": sum(yesno_hits_first_release) / len(yesno_hits_first_release) * 100,
        "n_open": len(recalls),
        "n_closed": len(batch_hits),
        "per_question": per_question,
    }


# --------------------------------------------------------------------------------------------------------------
# The real files, in LLaVA-Med's test.json layout, and a fixed prediction file
# --------------------------------------------------------------------------------------------------------------

# LLaVA-Med's directory names (run_eval_batch.py's dataset list) and our data entries
BENCHMARKS = {"vqa_rad": ("vqa_rad", "images"), "slake": ("Slake1.0", "imgs"), "pathvqa": ("pvqa", "images")}
PAPER_COUNTS = {"vqa_rad": (451, 179, 272), "slake": (1061, 645, 416), "pathvqa": (6761, 3370, 3391)}


def _llava_med_rows(benchmark: str) -> list[dict]:
    """LLaVA-Med's test.json for a benchmark: its own file when one is under $MEDVQA_ROOT/llava_med/, else rebuilt
    from the raw files as SOURCES.md describes (VQA-RAD: MEVF testset.json, id = qid - 1; SLAKE: the English
    questions of Slake1.0 test.json, id = qid)."""
    own = MEDVQA_DIR / "llava_med" / BENCHMARKS[benchmark][0] / "test.json"
    if own.is_file():
        return json.loads(own.read_text())
    if benchmark == "vqa_rad" and (MEDVQA_DIR / "vqa_rad" / "testset.json").is_file():
        raw = json.loads((MEDVQA_DIR / "vqa_rad" / "testset.json").read_text())
        return [{"id": r["qid"] - 1, "image": r["image_name"], "answer_type": r["answer_type"],
                 "conversations": [{"from": "human", "value": f"{r['question']}\n<image>"},
                                   {"from": "gpt", "value": r["answer"]}]} for r in raw]
    if benchmark == "slake" and (MEDVQA_DIR / "slake" / "test.json").is_file():
        raw = [r for r in json.loads((MEDVQA_DIR / "slake" / "test.json").read_text()) if r["q_lang"] == "en"]
        return [{"id": r["qid"], "image": r["img_name"], "answer_type": r["answer_type"],
                 "conversations": [{"from": "human", "value": f"{r['question']}\n<image>"},
                                   {"from": "gpt", "value": r["answer"]}]} for r in raw]
    pytest.skip(f"{benchmark}: no test data under {MEDVQA_DIR} (LLaVA-Med's {own.relative_to(MEDVQA_DIR)} is not "
                "there; PathVQA is not in this project's shared data)")


def _image_source(benchmark: str) -> Path:
    own = MEDVQA_DIR / "llava_med" / BENCHMARKS[benchmark][0] / BENCHMARKS[benchmark][1]
    return own if own.is_dir() else MEDVQA_DIR / {"vqa_rad": "vqa_rad/images", "slake": "slake/imgs"}[benchmark]


def _fixed_predictions(rows: list[dict], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    answers = [r["conversations"][1]["value"] for r in rows]

    def other() -> str:
        return rng.choice(answers)

    templates = [
        lambda gt: gt,
        lambda gt: f"{gt}.",
        lambda gt: gt.upper() + "!",
        lambda gt: "Yes.",
        lambda gt: "No, there is none.",
        lambda gt: f"Yes, {gt}.",
        lambda gt: f"The answer is {other()}.",
        lambda gt: f"There is no {gt} in this image",
        lambda gt: "normal",
        lambda gt: "nodule",
        lambda gt: f" ({gt}(seen",          # "(" touches a space only at the start: deleted, not spaced, everywhere
        lambda gt: " ".join([f"{gt}."] * 40),                    # past the 32-period cap of one normalisation pass
        lambda gt: f"The image shows {other()}. " * 20 + f"Answer: {gt}.",
        lambda gt: "",
        lambda gt: f"{gt}, not {other()}",
        lambda gt: "two x-rays; theres 1,000 ml and it isnt clear",
        lambda gt: f"an {other()} / {gt}",
    ]
    return [{"question_id": row["id"], "text": rng.choice(templates)(answers[i])} for i, row in enumerate(rows)]


@pytest.fixture(params=["vqa_rad", "slake"])
def scored_files(request, tmp_path):
    benchmark = request.param
    rows = _llava_med_rows(benchmark)
    gt = tmp_path / benchmark / "test.json"
    gt.parent.mkdir(parents=True)
    gt.write_text(json.dumps(rows))
    predictions = _fixed_predictions(rows)
    pred = tmp_path / benchmark / "test-answer-file.jsonl"
    pred.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return benchmark, gt, pred, rows, predictions


def test_every_metric_variant_is_llava_meds_on_the_real_files(scored_files):
    from stllava_med.eval.metrics import closed_correct, closed_correct_yesno, open_f1_precision_recall
    from stllava_med.score import score_files

    benchmark, gt, pred, rows, predictions = scored_files
    reference = ref_evaluate(rows, predictions)
    ours = score_files(gt, pred)
    total, n_open, n_closed = PAPER_COUNTS[benchmark]
    assert (ours["n_open"], ours["n_closed"]) == (reference["n_open"], reference["n_closed"]) == (n_open, n_closed)
    for key in ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-12, abs=1e-12), key
    # question by question, not only on average
    for row, prediction in zip(rows, predictions):
        text, answer = prediction["text"], row["conversations"][1]["value"]
        if row["answer_type"] == "OPEN":
            f1, _, recall = open_f1_precision_recall(text, answer)
            assert (f1, recall) == reference["per_question"][row["id"]], (text, answer)
        else:
            assert (int(closed_correct(text, answer)), int(closed_correct_yesno(text, answer))) == \
                reference["per_question"][row["id"]], (text, answer)
    # the variants measure different things on this file (so the comparison above can tell them apart)
    assert len({round(ours[k], 9) for k in ("closed_accuracy", "closed_accuracy_yesno", "closed_accuracy_strict")}) == 3
    assert reference["closed_accuracy_yesno_first_release"] != pytest.approx(ours["closed_accuracy_yesno"])
    print(f"\n{benchmark}: ours {json.dumps(ours)}\n{benchmark}: LLaVA-Med (transcribed) "
          f"{json.dumps({k: v for k, v in reference.items() if k != 'per_question'})}")


def test_score_cli_reports_every_variant(scored_files):
    benchmark, gt, pred, rows, predictions = scored_files
    if benchmark != "vqa_rad":
        pytest.skip("one CLI run is enough (VQA-RAD)")
    proc = subprocess.run([sys.executable, "-m", "stllava_med.score", f"gt={gt}", f"pred={pred}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result) == ["open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno",
                            "closed_accuracy_strict", "n_open", "n_closed"]
    reference = ref_evaluate(rows, predictions)
    for key in ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno"):
        assert result[key] == pytest.approx(reference[key], rel=1e-12), key


# --------------------------------------------------------------------------------------------------------------
# The paper preset's data entries: counts asserted, and refused when they differ
# --------------------------------------------------------------------------------------------------------------


def _paper_medvqa_dir(tmp_path: Path, benchmarks: list[str], edit=None) -> Path:
    """A medvqa folder in the layout conf/data/llava_med_*.yaml expect: <dir>/llava_med/<LLaVA-Med name>/test.json
    and the images beside it (linked to the real ones)."""
    root = tmp_path / "medvqa"
    for benchmark in benchmarks:
        rows = _llava_med_rows(benchmark)
        if edit:
            rows = edit(rows)
        folder = root / "llava_med" / BENCHMARKS[benchmark][0]
        folder.mkdir(parents=True)
        (folder / "test.json").write_text(json.dumps(rows))
        (folder / BENCHMARKS[benchmark][1]).symlink_to(_image_source(benchmark), target_is_directory=True)
    return root


def _paper_specs(root: Path, extra: list[str] | None = None) -> dict:
    from stllava_med.data.vqa import dataset_specs

    cfg = compose("evaluate", ["experiment=stllava_med_paper_eval", f"paths.medvqa_dir={root}", *(extra or [])])
    from omegaconf import OmegaConf

    return dataset_specs(OmegaConf.to_container(cfg.data.sets, resolve=True))


def test_paper_preset_loads_the_real_files_with_the_paper_counts(tmp_path):
    from stllava_med.data.vqa import load_vqa

    root = _paper_medvqa_dir(tmp_path, ["vqa_rad", "slake"])
    specs = _paper_specs(root)
    assert list(specs) == ["llava_med_vqa_rad", "llava_med_slake", "llava_med_pathvqa"]
    for benchmark in ("vqa_rad", "slake"):
        records, report = load_vqa(specs[f"llava_med_{benchmark}"])
        n_open = sum(r.answer_type == "OPEN" for r in records)
        assert (len(records), n_open, len(records) - n_open) == PAPER_COUNTS[benchmark]
        assert report.kept == report.read == PAPER_COUNTS[benchmark][0]  # every image is there
    # a smoke subset of the right file still passes: the counts are checked before limit
    limited = _paper_specs(root, ["data.sets.llava_med_vqa_rad.limit=24"])["llava_med_vqa_rad"]
    assert len(load_vqa(limited)[0]) == 24


@pytest.mark.parametrize("benchmark", ["vqa_rad", "slake"])
def test_paper_preset_refuses_a_file_with_other_counts(tmp_path, benchmark):
    from stllava_med.data.vqa import CountMismatch, load_vqa

    def drop_first_closed(rows):
        index = next(i for i, r in enumerate(rows) if r["answer_type"] == "CLOSED")
        return rows[:index] + rows[index + 1:]

    root = _paper_medvqa_dir(tmp_path, [benchmark], edit=drop_first_closed)
    name = f"llava_med_{benchmark}"
    total, n_open, n_closed = PAPER_COUNTS[benchmark]
    with pytest.raises(CountMismatch) as err:
        load_vqa(_paper_specs(root)[name])
    message = str(err.value)
    path = root / "llava_med" / BENCHMARKS[benchmark][0] / "test.json"
    assert str(path) in message
    assert f"has {total - 1} questions ({n_open} open / {n_closed - 1} closed)" in message
    assert f"expected {total} ({n_open} open / {n_closed} closed)" in message
    assert f"data.sets.{name}.expect_counts=null" in message
    # the opt-out for custom subsets
    records, _ = load_vqa(_paper_specs(root, [f"data.sets.{name}.expect_counts=null"])[name])
    assert len(records) == total - 1


def test_paper_preset_refuses_skipped_images(tmp_path):
    """Questions skipped for missing images change the counts too: the paper's numbers are over every question."""
    from stllava_med.data.vqa import CountMismatch, load_vqa

    root = _paper_medvqa_dir(tmp_path, ["vqa_rad"])
    rows = json.loads((root / "llava_med/vqa_rad/test.json").read_text())
    rows[0]["image"] = "absent.jpg"
    (root / "llava_med/vqa_rad/test.json").write_text(json.dumps(rows))
    spec = _paper_specs(root, ["data.sets.llava_med_vqa_rad.on_missing_image=skip"])["llava_med_vqa_rad"]
    with pytest.raises(CountMismatch, match=r"has 450 questions .* skipped \{'missing_image': 1\} of 451 read"):
        load_vqa(spec)


def test_pathvqa_counts(tmp_path):
    """LLaVA-Med's PathVQA test.json: 6761 = 3370 open / 3391 closed (skips where the file is absent)."""
    from stllava_med.data.vqa import load_vqa

    rows = _llava_med_rows("pathvqa")  # skips with the reason when absent
    n_open = sum(r["answer_type"] == "OPEN" for r in rows)
    assert (len(rows), n_open, len(rows) - n_open) == PAPER_COUNTS["pathvqa"]
    records, _ = load_vqa(_paper_specs(MEDVQA_DIR)["llava_med_pathvqa"])
    assert len(records) == 6761


def test_expect_counts_must_be_complete_and_consistent():
    from stllava_med.schema import ExpectedCounts

    assert ExpectedCounts.from_config(None, "x") is None
    assert ExpectedCounts.from_config({"total": 3, "open": 1, "closed": 2}, "x") == ExpectedCounts(3, 1, 2)
    with pytest.raises(ValueError, match=r"x needs \['closed'\]"):
        ExpectedCounts.from_config({"total": 3, "open": 1}, "x")
    with pytest.raises(ValueError, match="open 1 \\+ closed 1 != total 3"):
        ExpectedCounts.from_config({"total": 3, "open": 1, "closed": 1}, "x")
    with pytest.raises(ValueError, match="unknown config key"):
        ExpectedCounts.from_config({"total": 3, "open": 1, "closed": 2, "clsoed": 2}, "x")
