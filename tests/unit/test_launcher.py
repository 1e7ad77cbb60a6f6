"""Launcher <-> trainer consistency: the SLURM launcher's nodes / tasks / GPUs follow the trainer by
interpolation, and a multirun whose explicit launcher values contradict the trainer is refused before
anything is submitted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO_ROOT
from stllava_med.utils.launch import LauncherMismatch, check_launcher, launcher_problems


def launcher(config_name: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    import stllava_med.utils.config  # noqa: F401  (registers resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=["hydra/launcher=submitit_slurm", *overrides],
                      return_hydra_config=True)
        return {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in ("nodes", "tasks_per_node", "gpus_per_node")}


@pytest.mark.parametrize(("overrides", "expected"), [
    (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], (2, 4, 4)),
    (["trainer=ddp"], (1, 4, 4)),
    (["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"], (4, 8, 8)),
    (["trainer=ddp", "trainer.devices=[0,1]"], (1, 2, 2)),
    (["trainer=gpu"], (1, 1, 1)),
    (["trainer=fsdp", "trainer.num_nodes=3"], (3, 8, 8)),
    (["trainer=cpu"], (1, 1, 0)),
    (["trainer=ddp", "trainer.devices=4", "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=1"], (1, 4, 4)),
])
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_launcher_follows_the_trainer(stage, overrides, expected):
    values = launcher(stage, overrides)
    assert (values["nodes"], values["tasks_per_node"], values["gpus_per_node"]) == expected


def test_stages_without_a_trainer_and_the_pipeline_get_one_task():
    for name in ("pipeline", "evaluate", "generate"):
        assert launcher(name, []) == {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1}


def test_cfg_hydra_shows_the_interpolation():
    proc = subprocess.run([sys.executable, "-m", "stllava_med.train_dpo", "hydra/launcher=submitit_slurm",
                           "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "--cfg", "hydra"],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nodes: ${oc.select:trainer.num_nodes,1}" in proc.stdout
    assert "tasks_per_node: ${device_count:${oc.select:trainer.devices,1}}" in proc.stdout


def test_problems_name_each_contradiction():
    trainer = {"accelerator": "gpu", "devices": 4, "num_nodes": 2}
    assert launcher_problems({"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}, trainer) == []
    problems = launcher_problems({"nodes": 1, "tasks_per_node": 2, "gpus_per_node": 8}, trainer)
    assert len(problems) == 3 and "hydra.launcher.nodes=1 but trainer.num_nodes=2" in problems[0]
    # GPUs requested per task or through gres are not second-guessed
    assert launcher_problems({"nodes": 2, "tasks_per_node": 4, "gpus_per_task": 1}, trainer) == []
    with pytest.raises(LauncherMismatch, match="cannot size a SLURM job"):
        launcher_problems({"nodes": 1}, {"devices": "auto"})


@pytest.mark.parametrize(("name", "args", "message"), [
    ("dpo", ["trainer=ddp", "trainer.devices=4", "hydra.launcher.tasks_per_node=2", "dpo.beta=0.1,0.2"],
     "hydra.launcher.tasks_per_node=2 but trainer.devices=4"),
    ("sft", ["trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=1"],
     "hydra.launcher.nodes=1 but trainer.num_nodes=2"),
    ("dpo", ["trainer=cpu", "hydra.launcher.gpus_per_node=1"], "uses 0 GPU(s) per node"),
    ("dpo", ["trainer=ddp", "trainer.devices=2,4"], "cannot sweep trainer.devices"),
    ("pipeline", ['stages.dpo.overrides=["trainer=ddp"]', "stages.dpo.dpo.beta=0.1,0.5"],
     "stages.dpo.trainer.devices=4"),
])
def test_contradictions_are_refused(name, args, message):
    with pytest.raises(LauncherMismatch, match=re.escape(message)):
        check_launcher(name, ["hydra/launcher=submitit_slurm", *args], config_dir=str(CONF_DIR))


def test_matching_values_and_other_launchers_pass():
    check_launcher("dpo", ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                           "hydra.launcher.tasks_per_node=4", "dpo.beta=0.1,0.2"], config_dir=str(CONF_DIR))
    check_launcher("pipeline", ["hydra/launcher=submitit_slurm", 'stages.sft.overrides=["trainer=ddp"]',
                                'stages.dpo.overrides=["trainer=ddp"]', "hydra.launcher.tasks_per_node=4",
                                "hydra.launcher.gpus_per_node=4"], config_dir=str(CONF_DIR))
    # the local launcher runs one process per job whatever the trainer: nothing to check
    check_launcher("dpo", ["hydra/launcher=submitit_local", "trainer=ddp", "trainer.devices=2,4"],
                   config_dir=str(CONF_DIR))


def test_the_entry_point_refuses_before_submitting(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "stllava_med.train_dpo", "-m", "hydra/launcher=submitit_slurm",
                           "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.nodes=1",
                           "dpo.beta=0.1,0.2", f"hydra.sweep.dir={sweep}"],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Error: the SLURM launcher contradicts the trainer: hydra.launcher.nodes=1 but trainer.num_nodes=2" in proc.stderr
    assert not sweep.exists()  # nothing was submitted (no sbatch on PATH either: it would have failed later)
