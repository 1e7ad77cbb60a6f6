"""The package as a wheel: built from the working tree, installed with ``pip install --target`` and run from a
directory outside the repository. The pinned dependencies come from this venv; stllava_med and its Hydra
configs come from the wheel only (the wheel ships conf/ as stllava_med/conf). An installed package writes
its logs under the working directory and reads the bundled sample only through ``paths.data_dir``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# What a wheel is built from; copied so that the build leaves nothing (build/, egg-info) in the checkout.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "src", "conf")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the --target directory it was installed into)."""
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "tree"
    for name in BUILD_INPUTS:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(source, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
          str(tree)], cwd=root)
    (wheel,) = (root / "dist").glob("stllava_med-*.whl")
    _run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel)], cwd=root)
    return wheel, root / "site"


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STLLAVA_ROOT", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def test_wheel_ships_code_and_every_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"stllava_med/conf/{p.relative_to(REPO_ROOT / 'conf').as_posix()}"
               for p in (REPO_ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    modules = {f"stllava_med/{p.relative_to(REPO_ROOT / 'src' / 'stllava_med').as_posix()}"
               for p in (REPO_ROOT / "src" / "stllava_med").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "stllava_med/families/templates/gemma3.jinja" in names


def test_installed_package_runs_from_elsewhere(installed, tmp_path, tiny_backbone_path):
    _, site = installed
    env = _env(site)
    probe = _run([sys.executable, "-c", "import stllava_med; from stllava_med.utils.config import conf_dir, "
                  "project_root; print(stllava_med.__file__); print(conf_dir()); print(project_root())"],
                 cwd=tmp_path, env=env)
    module_file, conf, root = probe.stdout.split("\n")[:3]
    assert Path(module_file).is_relative_to(site), module_file
    assert Path(conf) == site / "stllava_med" / "conf"
    assert Path(root) == tmp_path.resolve()

    helped = _run([sys.executable, "-m", "stllava_med.evaluate", "--help"], cwd=tmp_path, env=env)
    assert "backbone: " in helped.stdout and "vqa_rad_sample" in helped.stdout

    # Paths of an installed package: under the working directory, whatever the install location.
    job = _run([sys.executable, "-m", "stllava_med.evaluate", "--cfg", "job", "--resolve"], cwd=tmp_path, env=env)
    paths = yaml.safe_load(job.stdout)["paths"]
    assert paths["log_dir"] == str(tmp_path.resolve() / "logs")
    assert paths["data_dir"] == str(tmp_path.resolve() / "data")

    # A real run: the bundled sample and the cached tiny backbone through paths.data_dir, the run directory and
    # Hydra's bookkeeping under the working directory (no out_dir given).
    assert tiny_backbone_path == REPO_ROOT / "data" / "backbones" / "tiny"
    _run([sys.executable, "-m", "stllava_med.evaluate", "backbone=tiny", f"paths.data_dir={REPO_ROOT / 'data'}",
          "data.sets.vqa_rad_sample.limit=2", "eval.max_new_tokens=4", "eval.progress=false", "print_table=false",
          "device=cpu", "num_threads=1"], cwd=tmp_path, env=env)
    (metrics_file,) = (tmp_path / "logs" / "runs" / "evaluate").glob("tiny-*/vqa_rad_sample/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["n_open"] + metrics["n_closed"] == 2
    assert list((tmp_path / "logs" / "hydra" / "evaluate").iterdir())


def test_installed_package_runs_the_whole_method(installed, tmp_path, tiny_backbone_path):
    """The demo's shape from the wheel alone: ``pipeline experiment=smoke`` (SFT → generate → judge → DPO →
    evaluate, every stage composed from the wheel's configs) run from a directory outside the repository."""
    _, site = installed
    root = tmp_path / "pipe"
    proc = _run([sys.executable, "-m", "stllava_med.pipeline", "experiment=smoke", f"paths.data_dir={REPO_ROOT / 'data'}",
                 f"out_dir={root}"], cwd=tmp_path, env=_env(site))
    summary = json.loads((root / "pipeline_summary.json").read_text())
    assert set(summary["stages"]) == {"sft", "evaluate/stage1", "round1/generate", "round1/judge", "round1/dpo",
                                      "evaluate/dpo_round1"}
    assert (root / "table.md").read_text().count("| vqa_rad_sample |") == 2
    for label in ("stage1", "dpo_round1"):
        metrics = summary["evaluations"][label]["vqa_rad_sample"]
        assert metrics["n_open"] + metrics["n_closed"] == 24  # smoke evaluates 24 questions
    assert "STLLaVA-Med pipeline" in proc.stdout
