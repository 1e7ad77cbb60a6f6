"""What a researcher sees and what a sweeper gets: ``--help`` per entry point, a console where every line is
printed once with no known-harmless library warnings, loggers that record the run's config (TensorBoard,
W&B offline), a finished run that says it logged nothing new, and a real Optuna sweep over ``dpo.beta``."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, compose
from dpo_support import sample_pairs, write_shard

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src"),
       "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("pairs") / "p.jsonl", sample_pairs(16, stride=29))


def tiny_dpo(tmp_path: Path, shard: Path, *extra: str) -> list[str]:
    return [f"data.path={shard}", "data.batch_size=4", "data.num_workers=0", "data.val_fraction=0.25",
            "data.progress=false", f"data.scan_cache_dir={tmp_path}/scan", f"dpo.reference_cache_dir={tmp_path}/ref",
            "trainer.max_steps=2", "num_threads=1", "export.merged=false", *extra]


# --------------------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------------------

HYDRA_STAGES = {"train_sft": ["backbone", "data", "trainer", "logger", "experiment"],
                "train_dpo": ["backbone", "trainer", "logger", "experiment"],
                "evaluate": ["backbone", "data"], "generate": ["backbone", "data"], "judge": ["expert", "backbone"],
                "pipeline": ["backbone", "expert", "experiment"], "score": []}


@pytest.mark.parametrize("entry", sorted(HYDRA_STAGES))
def test_help_describes_the_stage_its_groups_and_examples(entry):
    proc = _python(f"stllava_med.{entry}", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert text.startswith(f"usage: python -m stllava_med.{entry}") and "== Examples ==" in text
    assert "Powered by Hydra" not in text and "hydra/job_logging" not in text  # not Hydra's default listing
    for group in HYDRA_STAGES[entry]:
        assert re.search(rf"^  {group}: \w", text, re.M), (entry, group)
    listed = set(re.findall(r"^  (\w+): ", text, re.M))
    assert listed <= {*HYDRA_STAGES[entry], "hydra"}, (entry, listed)  # the stage's groups only
    if entry != "score":
        assert f"python -m stllava_med.{entry} -m " in text and "hydra/launcher=submitit_slurm" in text


@pytest.mark.parametrize("entry", ["report", "merge"])
def test_plain_entry_points_answer_help(entry):
    proc = _python(f"stllava_med.{entry}", "--help", timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m stllava_med.{entry}"), proc.stderr
    assert _python(f"stllava_med.{entry}", timeout=60).returncode == 2  # still refuses a missing argument


# --------------------------------------------------------------------------------------------------------------
# The console of a tiny run, and what TensorBoard records
# --------------------------------------------------------------------------------------------------------------


def _message(line: str) -> str:
    line = re.sub(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - ", "", line)  # Hydra's format
    return re.sub(r"^(INFO|WARNING|ERROR): ", "", line)  # Lightning's own handler


# TensorBoard is an optional extra (tensorboard); the CSV logger writes the same hparams.yaml, so a machine
# without it still checks the console and the recorded config
HPARAMS_LOGGER = "tensorboard" if importlib.util.find_spec("tensorboard") else "csv"


def test_a_tiny_run_prints_each_line_once_and_tensorboard_records_the_config(tmp_path, shard, tiny_backbone_path):
    out = tmp_path / "run"
    proc = _python("stllava_med.train_dpo", *tiny_dpo(tmp_path, shard, f"out_dir={out}", f"logger={HPARAMS_LOGGER}",
                                                      "dpo.beta=0.2", "trainer.max_epochs=-1",
                                                      f"hydra.run.dir={tmp_path}/hydra"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    lines = [line for line in re.split(r"[\r\n]", console) if line.strip()]
    messages = Counter(_message(line) for line in lines if line.startswith("[") or line.startswith("INFO: "))
    assert not [m for m, n in messages.items() if n > 1], messages.most_common(3)
    assert not any(line.startswith("INFO: ") for line in lines)  # Lightning's second handler is gone
    for noise in ("`weights_only` was not set", "is_gradient_checkpointing", "LeafSpec", "seamless cloud logging",
                  "IterableDataset` has `__len__`"):
        assert noise not in console, noise
    assert "Step 2/2" in console and "/-2" not in console  # a step-bounded run shows steps, not "Epoch 0/-2"
    # the closing summary: one aligned key | value table
    table = proc.stdout[proc.stdout.index(f"train_dpo — {out}"):].split("\n\n")[0].splitlines()
    rows = [line for line in table[1:] if " | " in line]
    assert any(r.split("|")[0].strip() == "val/loss" for r in rows)
    assert len({r.index("|") for r in rows}) == 1
    assert "dpo: objective val/rewards/accuracies = " in console

    hparams = yaml.safe_load(next((out / "logs" / HPARAMS_LOGGER).rglob("hparams.yaml")).read_text())
    assert hparams["dpo.beta"] == 0.2 and hparams["trainer.max_steps"] == 2 and hparams["run_name"] == "dpo-tiny"
    assert not any(k.startswith("hydra") for k in hparams)


# --------------------------------------------------------------------------------------------------------------
# W&B offline: the run's config, name and group
# --------------------------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full / last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_runs_carry_config_name_and_sweep_group(tmp_path, shard, tiny_backbone_path):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install -e '.[wandb]')")
    sweep = tmp_path / "beta-sweep"
    proc = _python("stllava_med.train_dpo", "-m", *tiny_dpo(tmp_path, shard, "logger=wandb", "dpo.beta=0.2,0.3",
                                                            f"out_dir={tmp_path}/runs/" + "${dpo.beta}",
                                                            "trainer.enable_progress_bar=false",
                                                            f"hydra.sweep.dir={sweep}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for beta in ("0.2", "0.3"):
        runs = list((tmp_path / "runs" / beta / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs  # one W&B run per job: the first job's run was finished, not reattached
        run = config = None
        for record in _wandb_records(runs[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "config":
                config = {u.key: u.value_json for u in record.config.update} | (config or {})
        assert run is not None and config is not None
        assert run.display_name == f"dpo-tiny dpo.beta={beta}"  # the run name plus the swept key
        assert run.run_group == sweep.name
        assert config["dpo.beta"] == beta and config["run_name"] == '"dpo-tiny"'


# --------------------------------------------------------------------------------------------------------------
# A finished run and a new logger
# --------------------------------------------------------------------------------------------------------------


def test_a_finished_run_says_the_new_logger_got_nothing(tmp_path, tiny_backbone_path, caplog):
    from stllava_med.train_sft import run_train_sft

    out = tmp_path / "sft"
    base = ["experiment=sft_tiny", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "export.merged=false",
            "data.val_fraction=0", f"out_dir={out}", "print_summary=false"]
    first = run_train_sft(compose("sft", [*base, "logger=none"]))
    with caplog.at_level(logging.INFO, logger="stllava_med"):
        again = run_train_sft(compose("sft", [*base, "logger=csv"]))
    assert again == first
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "is complete" in warned and "nothing was logged to logger=csv" in warned and "out_dir=" in warned
    assert not (out / "logs" / "tensorboard").exists()


def test_a_run_without_its_objective_metric_finishes_with_exit_code_0(tmp_path, tiny_backbone_path):
    """train_sft data.val_fraction=0 has no val/loss (the default objective): a plain run warns and succeeds;
    only a sweep, whose sweeper needs the number, fails on it."""
    proc = _python("stllava_med.train_sft", "experiment=sft_tiny", "trainer.max_steps=2", "export.merged=false",
                   "data.val_fraction=0", "trainer.enable_progress_bar=false", f"out_dir={tmp_path / 'sft'}",
                   "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "objective='val/loss' is not a metric of this run" in proc.stderr + proc.stdout
    assert (tmp_path / "sft" / "metrics.json").is_file()


def test_a_finished_dpo_run_says_training_was_not_logged_again(tmp_path, shard, tiny_backbone_path, caplog):
    from stllava_med.train_dpo import run_train_dpo

    base = tiny_dpo(tmp_path, shard, f"out_dir={tmp_path / 'dpo'}", "trainer.enable_progress_bar=false",
                    "print_summary=false")
    first = run_train_dpo(compose("dpo", [*base, "logger=none"]))
    with caplog.at_level(logging.INFO, logger="stllava_med"):
        again = run_train_dpo(compose("dpo", [*base, "logger=csv"]))
    assert again["global_step"] == first["global_step"] == 2
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "is complete" in warned and "no training metric is logged to logger=csv" in warned
    assert "out_dir=" in warned


# --------------------------------------------------------------------------------------------------------------
# Optuna
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_optuna_sweep_over_beta_gets_a_float_per_trial(tmp_path, shard, tiny_backbone_path):
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("the Optuna sweeper is not installed (pip install -e '.[sweep]')")
    sweep = tmp_path / "optuna"
    storage = tmp_path / "study.db"  # a study that outlives the sweep's process (resumable, inspectable)
    proc = _python("stllava_med.train_dpo", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                   f"hydra.sweeper.storage=sqlite:///{storage}", "hydra.sweeper.study_name=beta",
                   "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0", "dpo.beta=interval(0.05,0.5)",
                   *tiny_dpo(tmp_path, shard, "logger=csv", "trainer.enable_progress_bar=false",
                             f"out_dir={tmp_path}/runs/" + "${dpo.beta}", f"hydra.sweep.dir={sweep}"),
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "objective_direction is" not in proc.stdout + proc.stderr  # the sweep maximises, as the config says
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna" and isinstance(result["best_value"], float)
    assert 0.05 <= result["best_params"]["dpo.beta"] <= 0.5
    import optuna

    study = optuna.load_study(study_name="beta", storage=f"sqlite:///{storage}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.best_value == result["best_value"]
    # the sweeper's results file keeps the best trial only; each trial's value is in its job's run_info.json
    trials = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1"]
    values = []
    for job in trials:
        info = yaml.safe_load((job / "run_info.json").read_text())
        assert info["objective"]["key"] == "val/rewards/accuracies" and info["objective"]["direction"] == "maximize"
        values.append(info["objective"]["value"])
    assert all(isinstance(v, float) for v in values) and result["best_value"] == max(values)
