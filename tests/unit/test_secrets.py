"""Secrets never reach a file: a literal secret on the command line or in a config file is refused before Hydra
writes anything (no job directory, no .hydra/, no run directory), an interpolation of an environment variable is
allowed, and Hydra's own files are redacted as a last guard. Real CLI runs of the judge (torch-free, ~1 s each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stllava_med.utils.secrets import SecretInConfig, check_argv, find_secrets, redact_hydra_files

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-THIS-MUST-NOT-LEAK-123"


def _judge(tmp_path: Path, *args: str, multirun: bool = False) -> subprocess.CompletedProcess:
    where = [f"hydra.sweep.dir={tmp_path}/hydra"] if multirun else [f"hydra.run.dir={tmp_path}/hydra"]
    return subprocess.run([sys.executable, "-m", "stllava_med.judge", *(["-m"] if multirun else []),
                           f"candidates={tmp_path}/none.jsonl", "expert=reference", f"out_dir={tmp_path}/run",
                           *where, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "hydra").exists(), "Hydra wrote its job directory"
    assert not (tmp_path / "run").exists(), "the run directory was created"


def _no_leak(result: subprocess.CompletedProcess) -> None:
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("override,key", [
    (f"+expert.api_key={SECRET}", "expert.api_key"),
    (f"+hf_token={SECRET}", "hf_token"),
    (f"+hydra.job.env_set.OPENAI_API_KEY={SECRET}", "hydra.job.env_set.OPENAI_API_KEY"),
    (f"+expert.db_password={SECRET}", "expert.db_password"),
])
def test_command_line_secret_refused_before_any_file(tmp_path, override, key):
    result = _judge(tmp_path, override)
    assert result.returncode == 2, result.stderr
    assert f"command line: {key.lstrip('+')} must not be given" in result.stderr
    assert "expert.api_key_env" in result.stderr  # where the key goes instead
    _no_leak(result)
    _nothing_written(tmp_path)


def _leaky_experiment(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "leak.yaml").write_text(f"# @package _global_\nexpert:\n  api_key: {SECRET}\n")
    return conf


@pytest.mark.parametrize("multirun", [False, True])
def test_config_file_secret_refused_before_hydra_writes(tmp_path, multirun):
    conf = _leaky_experiment(tmp_path)
    args = [f"hydra.searchpath=[file://{conf}]", "experiment=leak"] + (["seed=1,2"] if multirun else [])
    result = _judge(tmp_path, *args, multirun=multirun)
    assert result.returncode == 2, result.stderr
    assert "judge config (set in a YAML file): expert.api_key must not be given" in result.stderr
    _no_leak(result)
    _nothing_written(tmp_path)


def test_interpolated_secret_is_allowed():
    check_argv(["+expert.api_key=${oc.env:OPENAI_API_KEY}", "expert.api_key_env=MY_KEY", "expert.max_tokens=5"])
    cfg = OmegaConf.create({"expert": {"api_key": "${oc.env:OPENAI_API_KEY}", "api_key_env": "X", "max_tokens": 5,
                                       "backbone": {"hf_token": None}}})
    assert find_secrets(cfg) == []


def test_find_secrets_nested_and_in_lists():
    cfg = OmegaConf.create({"a": {"b": [{"my_secret": "x"}, 3]}, "token": "t", "tokens": 7, "max_tokens": 3})
    assert sorted(find_secrets(cfg)) == ["a.b.0.my_secret", "token"]
    with pytest.raises(SecretInConfig, match=r"^x: a\.b\.0\.my_secret must not be given .*\(and token\)$"):
        from stllava_med.utils.secrets import check_config

        check_config(cfg, "x")


def test_malformed_secret_override_refused_without_echo():
    with pytest.raises(SecretInConfig, match="command line: expert.api_key must not be given") as err:
        check_argv([f"expert.api_key={SECRET}'unbalanced"])
    assert SECRET not in str(err.value)


def test_hydra_files_redacted(tmp_path):
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(f"expert:\n  api_key: {SECRET}\n  model: m\n")
    (hydra_dir / "overrides.yaml").write_text(f"- +expert.api_key={SECRET}\n- seed=1\n")
    (hydra_dir / "hydra.yaml").write_text("hydra:\n  job:\n    name: judge\n")
    changed = redact_hydra_files(hydra_dir)
    assert sorted(p.name for p in changed) == ["config.yaml", "overrides.yaml"]
    for path in hydra_dir.iterdir():
        assert SECRET not in path.read_text(), path
    assert OmegaConf.load(hydra_dir / "config.yaml").expert.model == "m"
    assert list(OmegaConf.load(hydra_dir / "overrides.yaml")) == ["+expert.api_key=<redacted>", "seed=1"]
