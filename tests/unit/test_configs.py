"""Every primary config composes with every option of every group it uses, resolves, and yields a
deterministic run directory that ignores bookkeeping keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose
from stllava_med.utils.config import config_fingerprint, resolve_out_dir

# score needs gt=/pred= from the command line; it is composed with them below.
PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "score")
GROUPS = ["backbone", "data", "trainer", "logger", "expert", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []


def _uses(primary: str, group: str) -> bool:
    text = (CONF_DIR / f"{primary}.yaml").read_text()
    return re.search(rf"^\s*-\s*(override\s+)?(optional\s+)?{group}\s*:", text, re.M) is not None


def _resolve(cfg):
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    return container


@pytest.mark.parametrize("primary", PRIMARY)
def test_primary_config_composes_and_resolves(primary):
    _resolve(compose(primary))


ENTRY_TO_PRIMARY = {"train_sft": "sft", "train_dpo": "dpo"}


def _experiment_targets(option: str) -> set[str]:
    """An experiment file names the command it is for (``python -m stllava_med.<entry>``)."""
    text = (CONF_DIR / "experiment" / f"{option}.yaml").read_text()
    return {ENTRY_TO_PRIMARY.get(e, e) for e in re.findall(r"stllava_med\.(\w+)", text)}


def _applies(primary: str, group: str, option: str) -> bool:
    return group != "experiment" or primary in _experiment_targets(option)


CASES = [(p, g, o) for p in PRIMARY for g in GROUPS if _uses(p, g) for o in _options(g) if _applies(p, g, o)]


def test_every_experiment_names_a_primary_that_uses_experiments():
    for option in _options("experiment"):
        targets = _experiment_targets(option)
        assert targets and all(t in PRIMARY and _uses(t, "experiment") for t in targets), (option, targets)


@pytest.mark.parametrize(("primary", "group", "option"), CASES, ids=[f"{p}-{g}={o}" for p, g, o in CASES])
def test_every_group_option_composes(primary, group, option):
    _resolve(compose(primary, [f"{group}={option}"]))


def test_multi_dataset_selection_is_namespaced():
    cfg = compose("evaluate", ["data=[vqa_rad,slake]"])
    assert set(cfg.data.sets) == {"vqa_rad", "slake"} and cfg.data.sets.slake.language == "en"


def test_score_composes_with_paths():
    cfg = compose("score", ["gt=a.json", "pred=b.jsonl"])
    assert cfg.gt == "a.json" and cfg.pred == "b.jsonl"


def test_tiny_backbone_yaml_matches_the_test_fixture_recipe():
    from conftest import tiny_spec
    from stllava_med.tiny import tiny_spec_from_config

    cfg = compose("evaluate")
    assert tiny_spec_from_config(_resolve(cfg)["backbone"]["tiny"]) == tiny_spec()


def test_run_dir_is_deterministic_and_ignores_bookkeeping():
    a = compose("evaluate")
    b = compose("evaluate", ["eval.progress=false", "print_table=false"])
    c = compose("evaluate", ["eval.max_new_tokens=7"])
    assert config_fingerprint(a) == config_fingerprint(compose("evaluate"))
    assert config_fingerprint(a) != config_fingerprint(c)
    assert resolve_out_dir(a, "evaluate").parent.name == "evaluate"
    assert resolve_out_dir(compose("evaluate", ["out_dir=/tmp/x"]), "evaluate") == Path("/tmp/x")
    # progress bars and printing do not change results, so they do not change the run directory
    assert config_fingerprint(a) == config_fingerprint(b)


def test_secrets_are_redacted_in_saved_configs(tmp_path):
    from stllava_med.utils.config import save_config

    cfg = OmegaConf.create({"expert": {"api_key": "sk-secret-123", "api_key_env": "OPENAI_API_KEY"}})
    text = save_config(cfg, tmp_path).read_text()
    assert "sk-secret-123" not in text and "api_key_env: OPENAI_API_KEY" in text


@pytest.mark.parametrize("launcher", ["basic", "submitit_local", "submitit_slurm"])
def test_launchers_compose(launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("evaluate", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith({"basic": "BasicLauncher", "submitit_local": "LocalLauncher",
                                           "submitit_slurm": "SlurmLauncher"}[launcher])
    if launcher == "submitit_slurm":
        for field in ("partition", "account", "qos", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                      "mem_gb", "timeout_min", "setup", "array_parallelism"):
            assert field in launcher_cfg
        assert launcher_cfg.max_num_timeout > 0  # preempted jobs are resubmitted
