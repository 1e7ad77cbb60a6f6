"""The entry points' shared start and finish (utils/runtime.py): the objective a sweeper optimises, the
summary table, the run config loggers record, the library noise filtered at its source, one console line per
record."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import pytest
from omegaconf import OmegaConf

from stllava_med.utils.config import flat_config, logger_names, run_group, run_label
from stllava_med.utils.runtime import (
    MissingObjective,
    objective,
    quiet_known_noise,
    single_console,
    summary_table,
)


def test_objective_returns_the_named_metric_as_a_float():
    cfg = OmegaConf.create({"objective": "val/loss", "objective_direction": "minimize"})
    value = objective(cfg, "sft", {"val/loss": 0.25, "train/loss": 1})
    assert value == 0.25 and isinstance(value, float)
    assert objective(OmegaConf.create({"objective": None}), "sft", {"val/loss": 1.0}) is None


def test_a_missing_objective_names_the_available_keys():
    cfg = OmegaConf.create({"objective": "val/rewards/accuracy"})
    with pytest.raises(MissingObjective) as err:
        objective(cfg, "dpo", {"val/rewards/accuracies": 0.5, "train/loss": 0.6, "note": "text", "flag": True})
    message = str(err.value)
    assert "objective='val/rewards/accuracy'" in message and "dpo" in message
    assert "train/loss, val/rewards/accuracies" in message  # numbers only, sorted
    assert "note" not in message and "flag" not in message and "objective=null" in message


def test_stage_objective_metrics():
    from stllava_med.evaluate import objective_metrics as evaluate_metrics
    from stllava_med.pipeline import objective_metrics as pipeline_metrics
    from stllava_med.train_dpo import objective_metrics as dpo_metrics

    results = {"vqa_rad": {"closed_accuracy": 60.0, "open_recall": 10.0}, "slake": {"closed_accuracy": 70.0}}
    flat = evaluate_metrics(results)
    assert flat["closed_accuracy"] == 60.0 and flat["slake/closed_accuracy"] == 70.0  # bare = first dataset
    assert dpo_metrics({"train": {"loss": 0.6}, "val": {"rewards/accuracies": 0.75}}) == {
        "train/loss": 0.6, "val/rewards/accuracies": 0.75}
    pipeline = pipeline_metrics({"evaluations": {"stage1": {"vqa_rad": {"closed_accuracy": 50.0}},
                                                 "dpo_round1": {"vqa_rad": {"closed_accuracy": 55.0}}},
                                 "dpo": {"round1": {"train": {"loss": 0.4}, "val": {}}}})
    assert pipeline["closed_accuracy"] == 55.0  # the final DPO model's
    assert pipeline["stage1/vqa_rad/closed_accuracy"] == 50.0 and pipeline["dpo/round1/train/loss"] == 0.4


def test_stage_configs_name_a_default_objective(compose_config):
    expected = {"sft": ("val/loss", "minimize"), "dpo": ("val/rewards/accuracies", "maximize"),
                "evaluate": ("closed_accuracy", "maximize"), "pipeline": ("closed_accuracy", "maximize")}
    for name, (key, direction) in expected.items():
        cfg = compose_config(name)
        assert (cfg.objective, cfg.objective_direction) == (key, direction), name
    # the paper's stage 1 has no validation split: its objective is the training loss
    assert compose_config("sft", ["experiment=stllava_med_paper_stage1"]).objective == "train/loss"


def test_objective_keys_do_not_move_the_run_directory(compose_config):
    from stllava_med.utils.config import config_fingerprint

    base = config_fingerprint(compose_config("dpo"))
    assert config_fingerprint(compose_config("dpo", ["objective=val/loss", "objective_direction=minimize",
                                                     "print_summary=false"])) == base


def test_summary_table_is_aligned():
    text = summary_table("dpo — /runs/x", {"global step": 4, "val/loss": 0.693147, "merged": None, "n": 12})
    lines = text.splitlines()
    assert lines[0] == "dpo — /runs/x" and "merged" not in text
    assert len({line.index("|") for line in lines[1:] if "|" in line}) == 1  # one column of bars
    assert "val/loss    | 0.6931" in text


def test_flat_config_redacts_secrets_and_drops_hydra():
    cfg = OmegaConf.create({"dpo": {"beta": 0.1}, "expert": {"api_key": "sk-123", "api_key_env": "OPENAI_API_KEY"},
                            "hydra": {"run": {"dir": "x"}}, "data": {"path": ["a", "b"]}})
    flat = flat_config(cfg)
    assert flat["dpo.beta"] == 0.1 and flat["data.path"] == ["a", "b"]
    assert flat["expert.api_key"] == "<redacted>" and flat["expert.api_key_env"] == "OPENAI_API_KEY"
    assert not any(k.startswith("hydra") for k in flat)


def test_logger_names_and_labels_outside_hydra():
    assert logger_names({"csv": {"_target_": "x"}, "wandb": {"_target_": "y"}, "none": None}) == ["csv", "wandb"]
    assert run_label({"run_name": "dpo-tiny"}) == "dpo-tiny" and run_group({"run_name": "dpo-tiny"}) == "dpo-tiny"


def test_known_noise_is_filtered_by_exact_message(caplog):
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        bnb.warning("something else from bitsandbytes")
    assert [r.getMessage() for r in caplog.records] == ["something else from bitsandbytes"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()  # simplefilter reset the filters: install them again, innermost first
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other deprecation"]


def test_single_console_removes_lightnings_own_handler():
    lightning_logger = logging.getLogger("lightning")
    own = logging.StreamHandler(sys.stderr)
    lightning_logger.addHandler(own)
    root = logging.getLogger()
    ours = logging.StreamHandler(sys.stderr)
    root.addHandler(ours)
    try:
        single_console()
        assert own not in lightning_logger.handlers and lightning_logger.propagate
    finally:
        root.removeHandler(ours)
        lightning_logger.removeHandler(own)


def test_reusing_a_finished_pipeline_stage_says_nothing_reaches_its_logger(tmp_path, caplog):
    from stllava_med.pipeline import run_stage

    stage_dir = tmp_path / "round1" / "dpo-abc"
    stage_dir.mkdir(parents=True)
    (stage_dir / "DONE.json").write_text(json.dumps({"label": "round1/dpo", "dir": str(stage_dir), "summary": {}}))
    with caplog.at_level(logging.INFO, logger="stllava_med"):
        result = run_stage("round1/dpo", stage_dir, lambda d: pytest.fail("a finished stage ran again"),
                           loggers=["wandb"])
    assert result["reused"]
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "nothing is logged to logger=wandb" in message and "out_dir=" in message
