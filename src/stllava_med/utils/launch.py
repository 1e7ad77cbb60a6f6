"""Launcher <-> trainer consistency for ``hydra/launcher=submitit_slurm``.

The SLURM launcher's ``nodes``, ``tasks_per_node`` and ``gpus_per_node`` follow ``trainer.num_nodes`` and
``trainer.devices`` by interpolation (``conf/hydra/launcher/submitit_slurm.yaml``, through the
``device_count`` / ``gpu_count`` resolvers below), so ``trainer=ddp trainer.devices=4 trainer.num_nodes=2``
asks SLURM for 2 nodes x 4 tasks x 4 GPUs. Values set explicitly on the launcher must agree with the trainer:
:func:`check_launcher` (run by ``stage_main`` before Hydra starts a multirun) refuses a contradiction before
anything is submitted. It runs there, not as a Hydra callback, because Hydra 1.3's ``Callbacks._notify``
turns a callback's exception into a warning and carries on launching.

The pipeline has no top-level trainer: its launcher defaults to 1 node x 1 task x 1 GPU, and every enabled
training stage (SFT, DPO) must run with the launcher's nodes and tasks (``stages.<stage>.overrides=[trainer=ddp,
trainer.devices=4]`` with ``hydra.launcher.tasks_per_node=4 hydra.launcher.gpus_per_node=4``): each stage's
composed trainer is checked the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Keys whose sweep would give the jobs of one multirun different resource needs: the launcher requests one
# allocation for all of them (its parameters come from the base config), so such sweeps are refused.
TRAINER_SWEEP_KEYS = ("trainer", "trainer.devices", "trainer.num_nodes", "trainer.accelerator")
DISTRIBUTED_PIPELINE_STAGES = ("sft", "dpo")


class LauncherMismatch(ValueError):
    """The launcher's SLURM resources contradict the trainer's devices / nodes."""


def device_count(devices: Any) -> int:
    """Processes per node for ``trainer.devices``: an int, a digit string or a list of device ids. ``auto``
    and ``-1`` depend on the machine, so they cannot size a SLURM request."""
    if isinstance(devices, bool):
        raise LauncherMismatch(f"trainer.devices={devices!r} is not a device count")
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) > 0:
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) > 0:
        return len(devices)
    try:  # an omegaconf ListConfig
        from omegaconf import ListConfig

        if isinstance(devices, ListConfig) and len(devices) > 0:
            return len(devices)
    except ImportError:  # pragma: no cover
        pass
    raise LauncherMismatch(
        f"trainer.devices={devices!r} cannot size a SLURM job: set trainer.devices to the number of GPUs per "
        "node (hydra.launcher.tasks_per_node and gpus_per_node follow it)")


def gpu_count(accelerator: Any, devices: Any) -> int:
    """GPUs per node for a trainer: none for ``accelerator=cpu``, else one per device."""
    if str(accelerator).lower() == "cpu":
        return 0
    return device_count(devices)


def launcher_problems(launcher: Mapping[str, Any], trainer: Mapping[str, Any], where: str = "trainer") -> list[str]:
    """What in ``launcher`` (the resolved ``hydra.launcher``) contradicts ``trainer`` (``where``)."""
    problems = []
    nodes = int(trainer.get("num_nodes") or 1)
    tasks = device_count(trainer.get("devices", 1))
    if int(launcher.get("nodes") or 1) != nodes:
        problems.append(f"hydra.launcher.nodes={launcher.get('nodes')} but {where}.num_nodes={nodes}")
    if launcher.get("tasks_per_node") is not None and int(launcher["tasks_per_node"]) != tasks:
        problems.append(f"hydra.launcher.tasks_per_node={launcher['tasks_per_node']} but {where}.devices="
                        f"{trainer.get('devices')} (Lightning needs one task per device)")
    if not (launcher.get("gpus_per_task") or launcher.get("gres")):  # GPUs requested another way: not ours to judge
        gpus = gpu_count(trainer.get("accelerator", "auto"), trainer.get("devices", 1))
        have = int(launcher.get("gpus_per_node") or 0)
        if have != gpus:
            problems.append(f"hydra.launcher.gpus_per_node={launcher.get('gpus_per_node')} but {where} uses {gpus} "
                            f"GPU(s) per node (accelerator={trainer.get('accelerator')}, devices={trainer.get('devices')})")
    return problems


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _overrides(args: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the command line's plain overrides, the keys it sweeps)."""
    from stllava_med.utils.config import parsed_overrides  # utils.config imports this module

    plain, swept = [], []
    for arg, override in parsed_overrides(args):
        if override.is_sweep_override():
            swept.append(override.get_key_element().lstrip("+~"))
        else:
            plain.append(arg)
    return plain, swept


def check_launcher(config_name: str, args: Sequence[str], *, config_dir: str) -> None:
    """Refuse a multirun whose SLURM launcher contradicts the trainer(s) it launches (before any submission).

    Composes ``config_name`` with the command line's non-sweep overrides (the base config the launcher's
    parameters come from); nothing happens unless the chosen launcher is submitit's SLURM launcher."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    plain, swept = _overrides(args)
    if GlobalHydra.instance().is_initialized():  # pragma: no cover - only when called inside Hydra
        return
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=plain, return_hydra_config=True)
        except Exception:  # noqa: BLE001 - a bad override or group: Hydra reports it when it composes
            return
        target = str(OmegaConf.select(cfg, "hydra.launcher._target_") or "")
        if not target.endswith("SlurmLauncher"):
            return
        trainer_sweeps = [k for k in swept if k in TRAINER_SWEEP_KEYS
                          or any(k.startswith(f"stages.{s}.trainer") for s in DISTRIBUTED_PIPELINE_STAGES)]
        if trainer_sweeps:
            raise LauncherMismatch(
                f"hydra/launcher=submitit_slurm: cannot sweep {', '.join(trainer_sweeps)}: the launcher requests one "
                "allocation (nodes, tasks, GPUs) for every job of a multirun; run one multirun per device count")
        launcher = {k: OmegaConf.select(cfg, f"hydra.launcher.{k}")
                    for k in ("nodes", "tasks_per_node", "gpus_per_node", "gpus_per_task", "gres")}
        trainers: dict[str, Mapping[str, Any]] = {}
        if "stages" in cfg and "trainer" not in cfg:  # the pipeline: check its training stages
            from stllava_med.pipeline import stage_config

            for stage in DISTRIBUTED_PIPELINE_STAGES:
                if bool(cfg.stages[stage].enabled):
                    trainers[f"stages.{stage}.trainer"] = _plain(stage_config(cfg, stage).trainer) or {}
        elif cfg.get("trainer") is not None:
            trainers["trainer"] = _plain(cfg.trainer)
        problems = [p for where, trainer in trainers.items() for p in launcher_problems(launcher, trainer, where)]
    if problems and "trainer" not in trainers:
        raise LauncherMismatch(
            "the SLURM launcher contradicts the pipeline's training stages: " + "; ".join(problems) + ". The "
            "pipeline has no top-level trainer to follow: set hydra.launcher.nodes / tasks_per_node / gpus_per_node "
            "to the trainer of every enabled training stage (stages.sft, stages.dpo) (docs/clusters.md)")
    if problems:
        raise LauncherMismatch(
            "the SLURM launcher contradicts the trainer: " + "; ".join(problems) + ". hydra.launcher.nodes / "
            "tasks_per_node / gpus_per_node follow trainer.num_nodes / trainer.devices unless set: drop the "
            "explicit launcher values, or set the trainer to match (docs/clusters.md)")
