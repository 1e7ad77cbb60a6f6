"""Config plumbing shared by the Hydra entry points: resolvers, deterministic run directories, seeding.

A run directory is a function of the stage and of the config keys that affect its result, so rerunning the
same command lands in the same directory and resumes; keys that only change *how* a run is watched
(loggers, progress bars, worker counts, the Hydra section itself) are left out of the fingerprint.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import sys
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stllava_med.schema import RENAMED, STAGE_SCHEMAS
from stllava_med.utils.io import atomic_write_text, stable_hash

log = logging.getLogger(__name__)

# Keys that never change a stage's result. Stage configs add their own under ``run_dir_ignore``.
DEFAULT_IGNORE = (
    "out_dir",
    "hydra",
    "logger",
    "run_dir_ignore",
    "num_workers",
    "data.num_workers",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "progress",
    "print_table",
    "print_summary",
    "objective",             # what a sweeper optimises (the entry point's return value), not the run
    "objective_direction",
    "run_dir_mismatch",      # what to do with a run directory made by another config (utils/run_identity.py)
    "max_image_pixels",      # raised after an image was refused as too large: the same run resumes
)

# Environment variables whose *values* must never reach a saved config or a log line.
SECRET_KEY_PATTERN = re.compile(r"(api_key|token|secret|password)$", re.IGNORECASE)


def project_root() -> Path:
    """The repository root when running from a checkout (editable install), else the working directory.

    Config paths such as ``data/backbones/tiny`` are anchored here so that a command launched from a
    sub-directory, or by a SLURM job whose working directory differs, still finds the same cache."""
    env = os.environ.get("STLLAVA_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "conf").is_dir():
            return parent
    return Path.cwd().resolve()


def conf_dir() -> str:
    """The Hydra config directory (absolute): the checkout's top-level ``conf/`` when running from source
    (``src/`` layout: editable install or ``PYTHONPATH=src``), else the copy an installed wheel ships as
    ``stllava_med/conf`` (setup.py maps the package ``stllava_med.conf`` onto ``conf/``)."""
    import stllava_med

    package = Path(stllava_med.__file__).resolve().parent
    checkout = package.parent.parent / "conf"
    if package.parent.name == "src" and checkout.is_dir():
        return str(checkout)
    return str(package / "conf")


def config_group_options(*groups: str) -> str:
    """One line per config group, ``  group: option, option, ...``, read from the config directory (the
    ``--help`` templates in ``conf/hydra/help/`` list a stage's groups through the ``config_groups``
    resolver, so a new backbone or dataset config shows up without editing them)."""
    root = Path(conf_dir())
    lines = []
    for group in groups:
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        if group == "hydra/launcher":
            options = ["basic", *options]
        elif group == "hydra/sweeper":
            options = ["basic", "optuna (pip install -e '.[sweep]')"]
        lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def register_resolvers() -> None:
    """Idempotently register the resolvers our YAML files use."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("config_groups"):
        OmegaConf.register_new_resolver("config_groups", config_group_options)
    from stllava_med.utils.launch import device_count, gpu_count

    if not OmegaConf.has_resolver("device_count"):  # conf/hydra/launcher/submitit_slurm.yaml: tasks per node
        OmegaConf.register_new_resolver("device_count", device_count)
    if not OmegaConf.has_resolver("gpu_count"):  # ... and GPUs per node
        OmegaConf.register_new_resolver("gpu_count", gpu_count)


register_resolvers()


class UnknownConfigKey(ValueError):
    """A config key that nothing reads: a typo, or a key of another stage. Raised at start-up."""


def check_keys(section: Mapping[str, Any] | None, allowed: Iterable[str], where: str) -> None:
    """Refuse keys of ``section`` that are not ``allowed``, naming each with the nearest valid key.

    Hydra already refuses ``section.typo=1`` (struct mode), but ``+section.typo=1`` adds the key, and a
    settings reader that kept only the fields it knows would then ignore it silently."""
    allowed = sorted(set(allowed))
    unknown = [str(k) for k in (section or {}) if str(k) not in allowed]
    if not unknown:
        return
    problems = [_unknown(f"{where}.{key}" if where else key, key, allowed, where) for key in unknown]
    raise UnknownConfigKey(f"unknown config key(s): {', '.join(problems)}; valid keys of {where or 'the config'}: "
                           f"{', '.join(allowed)}")


def _unknown(full_key: str, key: str, allowed: Iterable[str], where: str) -> str:
    """``full_key`` with a hint: its new name if it was renamed, else the nearest valid key."""
    suffix = full_key.split(".stages.", 1)[-1] if full_key.startswith("stages.") else full_key
    for old, new in RENAMED.items():
        if full_key == old or full_key.endswith(f".{old}") or suffix == old or full_key.startswith(f"{old}."):
            return f"{full_key} (renamed: {new})"
    near = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return full_key + (f" (did you mean {f'{where}.' if where else ''}{near[0]}?)" if near else "")


def _schema_fields(schema: Any) -> dict[str, Any] | None:
    """A dataclass's fields and their types (None for an untyped node: a config group, a dict)."""
    if not dataclasses.is_dataclass(schema):
        return None
    hints = typing.get_type_hints(schema)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(schema)}


def parsed_overrides(args: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """``(arg, Hydra's parsed override)`` for each command-line argument that is an override (``key=value``);
    flags (``-m``, ``--cfg``) and what Hydra cannot parse (it reports that itself) are passed over."""
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            yield arg, parser.parse_override(arg)
        except Exception:  # malformed, or the value of a flag
            continue


def check_against_schema(keys: Iterable[str], schema: type, *, root: str = "") -> None:
    """Refuse dotted ``keys`` that the dataclass ``schema`` has no field for, with the nearest valid key.

    Keys under an untyped node (``backbone.*``, ``trainer.*``, ``data.sets.*``) are left to their readers."""
    problems = []
    for dotted in keys:
        node: Any = schema
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            fields = _schema_fields(node)
            if fields is None:
                break
            if part not in fields:
                where = ".".join(parts[:depth])
                problems.append((_unknown(dotted, part, fields, where), where, sorted(fields)))
                break
            node = fields[part]
    if problems:
        text, where, valid = problems[0]
        more = f" (and {', '.join(p[0] for p in problems[1:])})" if len(problems) > 1 else ""
        raise UnknownConfigKey(f"unknown config key {text}{more}; valid keys of {where or root or 'the config'}: "
                               f"{', '.join(valid)}")


def precheck_overrides(config_name: str, args: Iterable[str]) -> None:
    """Check command-line overrides against the stage's schema before Hydra composes, so that a typo'd key
    (``dpo.prefix_sharng=false`` or ``+dpo.prefix_sharng=false``) fails at start-up naming the nearest valid
    key (Hydra's own error names only the key). Group choices (``backbone=``, ``data=``) and ``hydra.*``
    pass through; Hydra checks them."""
    schema = STAGE_SCHEMAS.get(config_name)
    if schema is None:
        return
    fields = _schema_fields(schema) or {}
    keys = []
    for _, override in parsed_overrides(args):
        key = override.get_key_element().lstrip("+~")
        if key.startswith("hydra.") or key == "hydra" or "/" in key or "@" in key or override.is_delete():
            continue
        if "." not in key and key not in fields and _is_group(key):
            continue  # a group choice: backbone=, data=, trainer=, experiment=
        keys.append(key)
    check_against_schema(keys, schema, root=config_name)


def _is_group(key: str) -> bool:
    return (Path(conf_dir()) / key).is_dir()


# Exit statuses of a single run that ends on one of our errors (printed as one ``Error: ...`` line, no traceback;
# HYDRA_FULL_ERROR=1 shows the traceback; in a multirun the job fails as any other and the sweep goes on).
EXIT_USAGE = 2      # the command line or the run directory's recorded config says no (also unknown keys, secrets)
EXIT_BUSY = 75      # another process holds the run directory now (EX_TEMPFAIL: try again later)
EXIT_INPUT = 1      # bad input, located (file, record, field), or a file that cannot be written (disk full)


def user_error_status(err: BaseException) -> int | None:
    """The exit status for an error that is fully explained by its message, or None (a bug: keep the traceback)."""
    import errno

    from stllava_med.selftrain.store import StoreWriteError
    from stllava_med.utils.run_identity import RunDirBusy, RunDirMismatch

    if isinstance(err, RunDirMismatch | UnknownConfigKey):
        return EXIT_USAGE
    if isinstance(err, RunDirBusy):
        return EXIT_BUSY
    if isinstance(err, StoreWriteError) or (isinstance(err, OSError)
                                             and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
        return EXIT_INPUT
    return None


def _one_line_errors(fn: Any) -> Any:
    @functools.wraps(fn)
    def job(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            status = user_error_status(err)
            multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            if status is None or multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            logging.getLogger(fn.__module__).error("%s", err)  # the job's log file keeps it too
            print(f"Error: {err}", file=sys.stderr)
            sys.exit(status)

    return job


def stage_main(config_name: str) -> Any:
    """``@hydra.main`` for a stage, preceded by :func:`precheck_overrides` on the command line; errors that
    their message explains (:func:`user_error_status`) end a single run as one line and a documented status."""
    def decorate(fn: Any) -> Any:
        hydra_main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)(
            _one_line_errors(fn))

        @functools.wraps(fn)
        def main(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                argv = sys.argv[1:]
                chosen = config_name
                for i, arg in enumerate(argv):  # --config-name / -cn picks another primary config
                    if arg in ("--config-name", "-cn") and i + 1 < len(argv):
                        chosen = argv[i + 1]
                    elif arg.startswith("--config-name="):
                        chosen = arg.split("=", 1)[1]
                from stllava_med.utils.runtime import quiet_known_noise  # both import this module
                from stllava_med.utils.secrets import SecretInConfig, check_argv

                quiet_known_noise()  # before Hydra composes (it warns about the launcher configs)
                try:  # before Hydra writes anything (its job directory, .hydra/overrides.yaml)
                    check_argv(argv)
                    precheck_overrides(chosen, argv)
                except (UnknownConfigKey, SecretInConfig) as err:
                    print(f"Error: {err}", file=sys.stderr)
                    sys.exit(2)
                if any(a in ("-m", "--multirun") for a in argv) and "--cfg" not in argv and "-c" not in argv:
                    from stllava_med.utils.launch import LauncherMismatch, check_launcher

                    try:  # before Hydra submits anything: the SLURM launcher must match the trainer
                        check_launcher(chosen, argv, config_dir=conf_dir())
                    except LauncherMismatch as err:
                        print(f"Error: {err}", file=sys.stderr)
                        sys.exit(2)
            return hydra_main(*args, **kwargs)

        return main

    return decorate


def settings_from(cls: type, section: Mapping[str, Any] | None, where: str, *, extra: Iterable[str] = (),
                  **overrides: Any) -> Any:
    """Build the settings dataclass ``cls`` from a config section: every key must be a field of ``cls`` or one
    of ``extra`` (keys of the same section that the caller reads itself); ``overrides`` win."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(section or {})
    check_keys(values, fields | set(extra), where)
    return cls(**{k: v for k, v in values.items() if k in fields}, **overrides)


def _drop_key(container: dict, dotted: str) -> None:
    parts = dotted.split(".")
    node: Any = container
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def fingerprinted_config(container: Mapping[str, Any], ignore: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """A resolved config (a plain dict) minus the Hydra section, :data:`DEFAULT_IGNORE`, ``ignore`` and its own
    ``run_dir_ignore`` keys: what :func:`config_fingerprint` hashes (and utils.run_identity compares)."""
    import copy

    container = copy.deepcopy(dict(container))
    extra = list(container.get("run_dir_ignore") or [])
    container.pop("hydra", None)
    for key in (*DEFAULT_IGNORE, *ignore, *extra):
        _drop_key(container, key)
    return container


def config_fingerprint(cfg: DictConfig | dict, ignore: tuple[str, ...] | list[str] = ()) -> str:
    """A short hash of the resolved config minus the ignored keys (dotted paths)."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    else:
        container = dict(cfg)
    assert isinstance(container, dict)
    return stable_hash(fingerprinted_config(container, ignore), n=10)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")[:80] or "run"


def resolve_out_dir(cfg: DictConfig, stage: str) -> Path:
    """``cfg.out_dir`` if given, else ``logs/runs/<stage>/<run_name>-<fingerprint>`` under the project root."""
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir)).expanduser().resolve()
    name = _slug(str(cfg.get("run_name") or stage))
    return project_root() / "logs" / "runs" / stage / f"{name}-{config_fingerprint(cfg)}"


def redact(obj: Any) -> Any:
    """Replace the values of secret-looking keys, recursively; used before anything is saved."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY_PATTERN.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def save_config(cfg: DictConfig, out_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config (secrets redacted, Hydra section dropped) into the run directory, and beside it
    ``<name>_overrides.yaml`` (``config_overrides.yaml``): the command-line overrides that made it, when the
    run was launched by Hydra (``python -m stllava_med.<stage> ...``)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    overrides = command_line_overrides()
    if overrides is not None:
        atomic_write_text(out_dir / f"{Path(name).stem}_overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(
            {"overrides": overrides, "argv": [redact_override(a) for a in sys.argv[1:]]})))
    return atomic_write_text(out_dir / name, OmegaConf.to_yaml(OmegaConf.create(redact(container))))


def redact_override(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{key}{sep}<redacted>" if sep and value and SECRET_KEY_PATTERN.search(key.lstrip("+~")) else override


def command_line_overrides() -> list[str] | None:
    """This Hydra job's overrides (a sweep job's own values), secrets redacted; None outside ``@hydra.main``."""
    try:
        task = HydraConfig.get().overrides.task
    except ValueError:
        return None
    return [redact_override(str(o)) for o in task]


def flat_config(cfg: DictConfig | Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """The resolved config as ``{"dpo.beta": 0.1, ...}``: secrets redacted and the Hydra section dropped, as
    :func:`save_config` writes it; what the entry points log as a run's hyperparameters."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    else:
        container = dict(cfg)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}{sep}")
        else:
            flat[prefix[: -len(sep)]] = node

    walk(redact(container), "")
    return flat


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": value}`` (non-empty dicts are descended into; lists and empty dicts are values)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def logger_names(logger_cfg: Mapping[str, Any] | None) -> list[str]:
    """The enabled entries of a ``logger`` group selection (``logger=[csv,tensorboard]`` -> csv, tensorboard)."""
    return [str(name) for name, entry in dict(logger_cfg or {}).items()
            if isinstance(entry, Mapping | DictConfig) and "_target_" in entry]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _swept_keys() -> set[str]:
    """Keys this Hydra multirun sweeps: sweep overrides on the command line (``dpo.beta=0.1,0.5``,
    ``interval(0.05,0.5)``) and the sweeper's own ``params``. Empty outside a multirun, and where the job runs
    in another process than the one that parsed the command line (submitit), which falls back to the job's
    overrides."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return set()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return set()
    keys = {str(k) for k in (hydra_cfg.sweeper.get("params") or {})}
    for _, override in parsed_overrides(sys.argv[1:]):
        if override.is_sweep_override():
            keys.add(override.get_key_element().lstrip("+~"))
    return keys


def run_label(cfg: DictConfig | Mapping[str, Any], max_len: int = 128) -> str:
    """A run's display name for experiment trackers: ``run_name`` plus the keys the sweep set in this job
    (``dpo-tiny dpo.beta=0.27``); outside a sweep, the command line's overrides of result-affecting keys."""
    name = str(cfg.get("run_name") or "run")
    try:
        task = [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # not under @hydra.main
        return name[:max_len]
    swept = _swept_keys()
    ignore = (*DEFAULT_IGNORE, *[str(k) for k in (cfg.get("run_dir_ignore") or [])])
    if swept:
        shown = [o for o in task if _override_key(o) in swept]
    else:
        shown = [o for o in task if not any(_override_key(o) == k or _override_key(o).startswith(f"{k}.")
                                            for k in ignore)]
    return (f"{name} {' '.join(shown)}" if shown else name)[:max_len]


def run_group(cfg: DictConfig | Mapping[str, Any]) -> str:
    """The experiment-tracker group of a run: the multirun's sweep directory name (every job of one sweep
    together), else ``run_name``."""
    try:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(str(hydra_cfg.sweep.dir)).name
    except ValueError:
        pass
    return str(cfg.get("run_name") or "run")


def hydra_output_dir() -> Path | None:
    """The Hydra job's own output directory (per multirun job), or None outside Hydra."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not running under @hydra.main
        return None


def setup_torch_threads(num_threads: int | None) -> None:
    """Cap intra-op threads (CPU runs): oversubscription makes tiny-model runs several times slower."""
    if num_threads:
        import torch  # this module is imported at start-up, and by the judge, which runs without torch

        torch.set_num_threads(int(num_threads))
