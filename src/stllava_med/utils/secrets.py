"""Secrets never reach a file: refused on the command line and in config files before Hydra writes anything.

A key whose last part matches :data:`stllava_med.utils.config.SECRET_KEY_PATTERN` (``api_key``, ``token``,
``secret``, ``password``, any case: ``expert.api_key``, ``+hf_token``, ``hydra.job.env_set.OPENAI_API_KEY``) with
a literal value is refused:

* on the command line by :func:`check_argv`, which :func:`stllava_med.utils.config.stage_main` runs before Hydra
  composes (so neither Hydra's job directory, its ``.hydra/overrides.yaml`` / ``hydra.yaml``, nor a multirun's
  ``multirun.yaml`` is created);
* in the composed config (a YAML file of an experiment or config group) by :class:`SecretsCheck`, a Hydra callback
  (``conf/hydra/default.yaml``) whose ``on_run_start`` / ``on_multirun_start`` run before Hydra saves the config.

An interpolation (``expert.api_key='${oc.env:OPENAI_API_KEY}'``) is not a secret: Hydra's files keep the
expression, and our own ``config.yaml`` redacts the resolved value. The key's own home is the environment
variable that ``expert.api_key_env`` names. As a last guard, :meth:`SecretsCheck.on_job_start` rewrites the job's
``.hydra/*.yaml`` with secret-looking values redacted.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from stllava_med.utils.config import SECRET_KEY_PATTERN


class SecretInConfig(ValueError):
    """A secret given as a literal value in a config or on the command line."""


def is_secret_key(dotted: str) -> bool:
    return bool(SECRET_KEY_PATTERN.search(str(dotted).lstrip("+~").rsplit(".", 1)[-1]))


def _literal(value: Any) -> bool:
    """A value that would be written as it is: non-empty and not an interpolation (``${oc.env:...}``)."""
    if value is None or value == "" or value == []:
        return False
    text = str(value).strip()
    return not (text.startswith("${") and text.endswith("}"))


def _how_to_fix(key: str) -> str:
    return (f"{key} must not be given in a config or on the command line: Hydra saves both "
            "(<job dir>/.hydra/config.yaml, overrides.yaml). Put it in an environment variable (the expert's key: "
            "the variable expert.api_key_env names, default OPENAI_API_KEY), or refer to one: "
            f"{key.lstrip('+~')}='${{oc.env:NAME}}'")


def check_argv(args: Iterable[str]) -> None:
    """Refuse a command-line override that sets a secret-looking key to a literal value (the value is not shown)."""
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, raw = arg.partition("=")
        if not is_secret_key(key):
            continue
        try:
            override = parser.parse_override(arg)
            value = override.value()
        except Exception:  # malformed: refuse on the raw text, never echo it
            value = raw
        if _literal(value if not isinstance(value, list) else ",".join(map(str, value))):
            raise SecretInConfig(f"command line: {_how_to_fix(key.lstrip('+~'))}")


def find_secrets(cfg: DictConfig | ListConfig | Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` (unresolved) that hold a literal secret-looking value."""
    found: list[str] = []
    if isinstance(cfg, DictConfig):
        items = [(str(k), cfg._get_node(k)) for k in cfg]
    elif isinstance(cfg, ListConfig):
        items = [(str(i), cfg._get_node(i)) for i in range(len(cfg))]
    else:
        return found
    for key, node in items:
        dotted = f"{prefix}{key}"
        if isinstance(node, DictConfig | ListConfig):  # unresolved: an interpolation stays an expression
            found.extend(find_secrets(node, f"{dotted}."))
        elif isinstance(cfg, DictConfig) and is_secret_key(key) and _literal(node._value() if node is not None else None):
            found.append(dotted)
    return found


def check_config(cfg: DictConfig, where: str = "config") -> None:
    found = find_secrets(cfg)
    if found:
        more = f" (and {', '.join(found[1:])})" if len(found) > 1 else ""
        raise SecretInConfig(f"{where}: {_how_to_fix(found[0])}{more}")


def _redact_node(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: ("<redacted>" if is_secret_key(str(k)) and _literal(v) and not isinstance(v, dict | list)
                    else _redact_node(v)) for k, v in node.items()}
    if isinstance(node, list):
        from stllava_med.utils.config import redact_override

        return [redact_override(v) if isinstance(v, str) else _redact_node(v) for v in node]
    return node


def redact_hydra_files(job_dir: Path) -> list[Path]:
    """Rewrite ``<job_dir>/.hydra/{config,hydra,overrides}.yaml`` with secret-looking values redacted; returns the
    files that changed."""
    changed = []
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        path = job_dir / name
        if not path.is_file():
            continue
        original = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        redacted = _redact_node(original)
        if redacted != original:
            from stllava_med.utils.io import atomic_write_text

            atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(redacted)))
            changed.append(path)
    return changed


def _refuse(config: DictConfig, where: str) -> None:
    """Exit 2 with the error: Hydra turns a callback's exception into a warning and goes on (and writes the config);
    a SystemExit stops it."""
    try:
        check_config(config, where)
    except SecretInConfig as err:
        print(f"Error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class SecretsCheck(Callback):
    """Hydra callback: refuse literal secrets in the composed config before Hydra writes it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse(config, f"{kwargs.get('config_name') or 'the'} config (set in a YAML file)")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse(config, f"{kwargs.get('config_name') or 'the'} config (set in a YAML file)")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            output_dir = Path(str(config.hydra.runtime.output_dir))
            subdir = config.hydra.output_subdir
        except Exception:
            return
        if subdir is not None:
            redact_hydra_files(output_dir / str(subdir))
