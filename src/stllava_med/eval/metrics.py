"""LLaVA-Med medical-VQA metrics (open recall / F1, closed accuracy).

The numbers reported for LLaVA-Med on VQA-RAD, SLAKE and PathVQA come from a
small script whose answer normalisation is the VQA-v2 evaluation tool's
``processPunctuation`` + ``processDigitArticle`` (via ViLT).  Our scores are
only comparable to the published ones if we reproduce that normalisation
*including its quirks*, so every quirk is kept on purpose and documented where
it happens.

Closed accuracy comes in three variants, each under its own name:

* ``closed_accuracy`` -- LLaVA-Med's ``llava/eval/run_eval_batch.py`` (the
  script behind its three-benchmark table): the normalised ground truth is a
  substring of the normalised prediction (``"no"`` matches ``"nodule"``).
* ``closed_accuracy_yesno`` -- LLaVA-Med's ``llava/eval/run_eval.py`` (one
  dataset at a time): the same substring test, and the prediction must also
  contain ``"yes"`` or ``"no"`` (again as substrings of the normalised text,
  so ``"normal"`` or ``"nodule"`` qualify).  Misses count in the denominator:
  that is the script as fixed in microsoft/LLaVA-Med#35 (Dec 2023, commit
  b9a98a7); its first release (ad758b6) left a miss that contained yes/no out
  of the denominator altogether, which inflates the number.
* ``closed_accuracy_strict`` -- ours: the prediction starts with the ground
  truth's words.

Open recall / F1 are ``calculate_f1score`` of ``eval_metrics/evaluate_metrics.py``
on text that ``run_eval*.py`` has already normalised once: the answer is
normalised twice (see :func:`open_f1_precision_recall`).

Everything here is pure: strings in, numbers out, no file I/O, so the same
code can run inside a Lightning loop (through :class:`MedVQAMetrics`) or in an
offline scoring script (through :func:`score_vqa`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
import torchmetrics

from stllava_med.data.answers import normalize_answer_type

__all__ = [
    "MedVQAMetrics",
    "closed_correct",
    "closed_correct_strict",
    "closed_correct_yesno",
    "normalize_answer",
    "open_f1_precision_recall",
    "score_vqa",
    "split_words",
]

# Order matters: the VQA tool walks this list and each mark is either deleted
# or turned into a space.  Note that "." and "'" are *not* in the list; periods
# get their own rule below and apostrophes survive (so "don't" stays intact).
_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# A thousands separator ("1,000") anywhere in the text switches *every* mark
# to "delete" mode, so that "1,000" becomes "1000" rather than "1 000".
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")

# The original pattern is "(?!<=\d)(\.)(?!\d)".  Its first group was meant to
# be a negative look-*behind* but is written as a negative look-ahead for the
# literal "<=" + digit, which can never match in front of a ".", so the
# effective rule is simply "delete every period not followed by a digit"
# ("2.5 cm." -> "2.5 cm", ".5" stays ".5").  We keep the pattern verbatim so
# the behaviour is byte-identical to the reference.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")

# The reference calls ``period_strip.sub("", text, re.UNICODE)``: the third
# positional argument of ``Pattern.sub`` is ``count``, and ``re.UNICODE == 32``,
# so at most 32 periods are ever removed.  Reproduced deliberately.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The VQA-v2 evaluation contractions table, reproduced entry for entry.  Known
# oddities are kept because they are part of the reference behaviour:
#   * "Id've", "I'dve", "Im", "Ive" have upper-case keys, but the text is
#     lower-cased first, so these four entries can never fire ("im" stays "im").
#   * "somebody'd" maps to "somebodyd" (the reverse of every other entry).
#   * "let's" and "she's" map to themselves.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _process_punctuation(text: str) -> str:
    """Apply the VQA tool's punctuation rule, then its period rule.

    A mark that touches a space anywhere in the text (``"yes, it is"``) is
    deleted everywhere; a mark only ever found inside a token
    (``"left-sided"``) is turned into a space everywhere, so the two halves
    become separate words.

    The adjacency test is made against the text as it was on *entry* to this
    step, not against the partially rewritten text, because that is what both
    the VQA-v2 tool and LLaVA-Med's copy do (``p + " " in inText`` while
    writing to ``outText``).  The difference is only visible when an earlier
    mark's replacement creates a new space next to a later mark, e.g.
    ``"ct;-scan x-ray"`` gives ``"ct scan x ray"`` here, whereas re-testing
    the rewritten text would give ``"ct scan xray"``.
    """
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma_digit:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way LLaVA-Med's medical-VQA evaluation does
    (``normalize_word(text.lower())`` of its ``eval_metrics/glossary.py``).

    Steps: lower-case (not strip: the punctuation rule looks for marks next to
    a space, and the reference tests the text as it is, so a leading space
    counts); punctuation rule (see
    :func:`_process_punctuation`); drop periods not followed by a digit (at
    most 32 of them, a reference quirk); split on whitespace; map number words
    ``"none"``..``"ten"`` to digits; drop the articles ``a``/``an``/``the``;
    expand apostrophe-less contractions (``"dont"`` -> ``"don't"``); join
    with single spaces; delete any remaining commas.

    Non-string inputs are passed through ``str()`` so that a stray number or
    ``None`` in a JSON file does not crash a long evaluation run (note that
    ``None`` therefore becomes ``"0"`` via the ``"none"`` number word).
    """
    text = _process_punctuation(str(text).lower())
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    words = [word for word in words if word not in _ARTICLES]
    words = [_CONTRACTIONS.get(word, word) for word in words]
    return " ".join(words).replace(",", "")


def split_words(normalized: str) -> Counter[str]:
    """Return the multiset of whitespace tokens of an already-normalised answer.

    A ``Counter`` rather than a ``set`` because the open-question scores are
    multiplicity-sensitive (see :func:`open_f1_precision_recall`).
    """
    return Counter(normalized.split())


def open_f1_precision_recall(prediction: str, ground_truth: str) -> tuple[float, float, float]:
    """Word-level ``(f1, precision, recall)`` of an open-ended answer.

    Both sides are normalised with :func:`normalize_answer` *twice*, as in
    LLaVA-Med: ``run_eval.py`` / ``run_eval_batch.py`` normalise prediction and
    ground truth, then ``calculate_f1score`` normalises its arguments again.
    The second pass changes nothing except where the first hit the 32-period
    cap (a long, many-sentence answer: the second pass removes up to 32 more
    periods, so ``"lung."`` becomes ``"lung"``).  For a word found
    on both sides the true-positive count is the word's multiplicity in the
    *prediction* (not ``min`` of the two counts, as in SQuAD-style F1): this is
    how LLaVA-Med computes it, so repeating a correct word is never penalised
    ("left left lung" vs "left lung" scores 1.0) and repeats in the ground
    truth are not required.  Words only in the prediction are false positives
    and words only in the ground truth are false negatives, each counted with
    its own multiplicity.

    Returns ``(0.0, 0.0, 0.0)`` when either side normalises to nothing or when
    there is no overlap.
    """
    pred_words = split_words(normalize_answer(normalize_answer(prediction)))
    gt_words = split_words(normalize_answer(normalize_answer(ground_truth)))
    if not pred_words or not gt_words:
        return 0.0, 0.0, 0.0

    tp = fp = fn = 0
    for word in pred_words.keys() | gt_words.keys():
        if word in pred_words and word in gt_words:
            tp += pred_words[word]
        elif word in pred_words:
            fp += pred_words[word]
        else:
            fn += gt_words[word]
    if tp == 0:
        return 0.0, 0.0, 0.0

    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    return f1, precision, recall


def closed_correct(prediction: str, ground_truth: str) -> bool:
    """LLaVA-Med's closed-question hit: normalised GT is a *substring* of the prediction.

    Kept for comparability with published numbers even though it is lenient:
    ``"nodule"`` counts as a correct ``"no"``, and a prediction containing both
    "yes" and "no" is correct for either.  An empty ground truth is a
    substring of everything and therefore counts as a hit.
    """
    return normalize_answer(ground_truth) in normalize_answer(prediction)


def closed_correct_yesno(prediction: str, ground_truth: str) -> bool:
    """LLaVA-Med ``run_eval.py``'s closed-question hit: :func:`closed_correct`
    *and* the normalised prediction contains ``"yes"`` or ``"no"`` (substrings:
    ``"normal"``, ``"not"`` and ``"know"`` contain ``"no"``).  A prediction
    without either is a miss even when it contains the ground truth (an
    ``"x-ray"`` closed answer is only right next to a yes/no).  Misses are
    counted (the script after microsoft/LLaVA-Med#35)."""
    pred = normalize_answer(prediction)
    return ("yes" in pred or "no" in pred) and normalize_answer(ground_truth) in pred


def closed_correct_strict(prediction: str, ground_truth: str) -> bool:
    """Stricter closed-question hit: the prediction must *start with* the GT words.

    Compares whole words, so ``"nodule"`` is not a ``"no"``, while a verbose
    but correct ``"No, there is none."`` still matches ``"no"``.  An empty
    ground truth is treated as unanswerable (``False``) rather than as a free
    hit.
    """
    gt_words = normalize_answer(ground_truth).split()
    if not gt_words:
        return False
    pred_words = normalize_answer(prediction).split()
    return pred_words[: len(gt_words)] == gt_words


class MedVQAMetrics(torchmetrics.Metric):
    """Accumulates LLaVA-Med open/closed VQA scores over batches and ranks.

    Only sums and counts are stored, all reduced with ``"sum"``, so the metric
    is exact under DDP and under :meth:`merge_state`; per-sample strings never
    need to be gathered.

    :meth:`compute` returns a plain ``dict`` of Python numbers with the keys
    ``open_recall``, ``open_f1``, ``closed_accuracy``,
    ``closed_accuracy_yesno``, ``closed_accuracy_strict`` (percentages, ``0.0`` when there is no
    question of that type) and ``n_open``, ``n_closed`` (ints).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    open_recall_sum: torch.Tensor
    open_f1_sum: torch.Tensor
    n_open: torch.Tensor
    closed_hits: torch.Tensor
    closed_yesno_hits: torch.Tensor
    closed_strict_hits: torch.Tensor
    n_closed: torch.Tensor

    _STATE_NAMES: tuple[str, ...] = (
        "open_recall_sum",
        "open_f1_sum",
        "n_open",
        "closed_hits",
        "closed_yesno_hits",
        "closed_strict_hits",
        "n_closed",
    )

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in self._STATE_NAMES:
            # float64 so that summing per-sample recalls over large test sets
            # does not drift; counts are exact in float64 up to 2**53.
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        predictions: Sequence[str],
        answers: Sequence[str],
        answer_types: Sequence[str],
    ) -> None:
        """Score one batch of predictions against ground-truth answers.

        All three sequences must have the same length.  A bare ``str`` is
        rejected because it is itself a sequence and would otherwise be scored
        character by character.
        """
        for name, seq in (("predictions", predictions), ("answers", answers), ("answer_types", answer_types)):
            if isinstance(seq, str):
                raise TypeError(f"{name} must be a sequence of strings, not a single string")
        if not (len(predictions) == len(answers) == len(answer_types)):
            raise ValueError(
                "predictions, answers and answer_types must have the same length, got "
                f"{len(predictions)}, {len(answers)} and {len(answer_types)}"
            )

        open_recall = open_f1 = 0.0
        n_open = closed_hits = closed_yesno_hits = closed_strict_hits = n_closed = 0
        for prediction, answer, answer_type in zip(predictions, answers, answer_types, strict=True):
            if normalize_answer_type(answer_type) == "OPEN":
                f1, _, recall = open_f1_precision_recall(prediction, answer)
                open_recall += recall
                open_f1 += f1
                n_open += 1
            else:
                closed_hits += int(closed_correct(prediction, answer))
                closed_yesno_hits += int(closed_correct_yesno(prediction, answer))
                closed_strict_hits += int(closed_correct_strict(prediction, answer))
                n_closed += 1

        self.open_recall_sum += open_recall
        self.open_f1_sum += open_f1
        self.n_open += n_open
        self.closed_hits += closed_hits
        self.closed_yesno_hits += closed_yesno_hits
        self.closed_strict_hits += closed_strict_hits
        self.n_closed += n_closed

    def compute(self) -> dict[str, float | int]:
        """Turn the accumulated sums into percentages (Python numbers, not tensors)."""
        n_open = int(self.n_open.item())
        n_closed = int(self.n_closed.item())

        def percent(total: torch.Tensor, count: int) -> float:
            return 100.0 * float(total.item()) / count if count > 0 else 0.0

        return {
            "open_recall": percent(self.open_recall_sum, n_open),
            "open_f1": percent(self.open_f1_sum, n_open),
            "closed_accuracy": percent(self.closed_hits, n_closed),
            "closed_accuracy_yesno": percent(self.closed_yesno_hits, n_closed),
            "closed_accuracy_strict": percent(self.closed_strict_hits, n_closed),
            "n_open": n_open,
            "n_closed": n_closed,
        }


def score_vqa(
    predictions: Sequence[str],
    answers: Sequence[str],
    answer_types: Sequence[str],
) -> dict[str, float | int]:
    """One-shot scoring of a whole prediction set (same keys as :meth:`MedVQAMetrics.compute`).

    Goes through :class:`MedVQAMetrics` so offline scripts and the training
    loop can never disagree on the definitions.
    """
    metric = MedVQAMetrics()
    metric.update(predictions, answers, answer_types)
    return metric.compute()
