"""DPO metric names: where a quantity is one TRL's ``DPOTrainer`` logs, it has TRL's name, and the consumers
(pipeline table and summary, report plot) read the new names and those of runs finished before the rename."""

from __future__ import annotations

import inspect
import re

import pytest

from stllava_med.dpo.module import METRIC_NAMES
from stllava_med.pipeline import comparison_table, reward_accuracy
from stllava_med.report import _REWARD_ACC

SHARED_WITH_TRL = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                   "logps/rejected")


def test_our_names_are_trls():
    assert set(SHARED_WITH_TRL) <= set(METRIC_NAMES)
    assert "rewards/accuracy" not in METRIC_NAMES and "rewards/margin" not in METRIC_NAMES


def test_the_names_are_the_ones_the_installed_trl_logs():
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer", reason="`trl` is not installed (pip install -e '.[bench]')")
    logged = set(re.findall(r'self\._metrics\[mode\]\["([^"]+)"\]', inspect.getsource(dpo_trainer)))
    assert set(SHARED_WITH_TRL) <= logged, logged


def test_pipeline_reads_new_and_pre_rename_summaries():
    new = {"train": {"rewards/accuracies": 0.75}, "val": {"rewards/accuracies": 0.5}}
    old = {"train": {"rewards/accuracy": 0.25}, "val": {}}
    assert (reward_accuracy(new, "train"), reward_accuracy(new, "val")) == (0.75, 0.5)
    assert (reward_accuracy(old, "train"), reward_accuracy(old, "val")) == (0.25, None)
    metrics = {"open_recall": 1.0, "open_f1": 2.0, "closed_accuracy": 3.0, "closed_accuracy_strict": 4.0,
               "n_open": 5, "n_closed": 6}
    table = comparison_table({"dpo_round0": {"vqa": metrics}, "dpo_round1": {"vqa": metrics}},
                             {"round0": new, "round1": old})
    assert "| 0.75 / 0.50 |" in table and "| 0.25 / — |" in table


def test_report_plots_reward_accuracy_from_either_csv_column():
    for column in ("train/rewards/accuracies_step", "train/rewards/accuracy_step", "train/rewards/accuracies_epoch"):
        assert _REWARD_ACC.match(column)
    assert not _REWARD_ACC.match("train/rewards/margins_step")
