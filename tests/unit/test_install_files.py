"""The three ways to install pin one stack: pyproject.toml (pip, wheel), requirements/lock.txt (make install)
and environment.yaml (conda) agree on every version; the code declares what it imports; the entry points
find their configs in a checkout."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import yaml

from conftest import REPO_ROOT

SRC = REPO_ROOT / "src" / "stllava_med"
# conda package name -> pip name, where they differ.
CONDA_TO_PIP = {"pytorch": "torch"}
CONDA_ONLY = {"python", "pip", "cuda-version"}
# Imported under another name than the distribution's.
IMPORT_TO_DIST = {"yaml": "pyyaml", "PIL": "pillow", "hydra": "hydra-core"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        name, sep, version = req.partition("==")
        assert sep and re.fullmatch(r"[0-9][0-9a-z.+]*", version), f"not an exact pin: {req!r}"
        pins[_norm(name)] = version
    return pins


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yaml_pins_equal_pyproject():
    project = _pyproject()
    extras = project["optional-dependencies"]
    wanted = _pins(project["dependencies"] + extras["dev"] + extras["bench"])
    env = yaml.safe_load((REPO_ROOT / "environment.yaml").read_text())
    assert env["channels"][0] == "conda-forge" and "pytorch" not in env["channels"]
    got: dict[str, str] = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            got.update(_pins(dep["pip"]))
            continue
        name, _, version = dep.partition("=")
        if name in CONDA_ONLY:
            continue
        got[_norm(CONDA_TO_PIP.get(name, name))] = version
    assert got == wanted


def test_lock_pins_every_dependency_with_hashes():
    project = _pyproject()
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    text = (REPO_ROOT / "requirements" / "lock.txt").read_text()
    entries = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+)",
                         text, re.M)
    locked = {_norm(name): version for name, version, _ in entries}
    assert len(entries) == len(re.findall(r"^[A-Za-z0-9].*==", text, re.M)), "an entry without hashes"
    for name, version in wanted.items():
        # torch: the CPU build of the same release (2.13.0+cpu satisfies torch==2.13.0).
        assert locked.get(name, "").split("+")[0] == version, f"{name}: lock {locked.get(name)} != {version}"
    assert locked["torch"].endswith("+cpu")


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_a_declared_dependency():
    declared = set(_pins(_pyproject()["dependencies"]))
    imported = set().union(*(_top_level_imports(p) for p in SRC.rglob("*.py")))
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "stllava_med"}
    missing = {name for name in third_party if _norm(IMPORT_TO_DIST.get(name, name)) not in declared}
    assert not missing, f"imported but not in pyproject's dependencies: {sorted(missing)}"


def test_entry_points_find_their_configs_installed_or_not():
    """A relative ``config_path`` ("../../conf") only works from a checkout; the entry points ask conf_dir()."""
    from stllava_med.utils.config import conf_dir

    assert Path(conf_dir()) == REPO_ROOT / "conf"
    entries = 0
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "hydra.main":
                entries += 1
                config_path = next(k.value for k in node.keywords if k.arg == "config_path")
                assert not isinstance(config_path, ast.Constant), f"{path.name}: config_path is a literal"
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "stage_main":
                entries += 1  # utils.config.stage_main: hydra.main(config_path=conf_dir(), ...) after the precheck
    assert entries >= 7
