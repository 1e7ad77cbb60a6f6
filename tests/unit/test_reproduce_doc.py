"""Every ``python -m stllava_med.<stage> ...`` command in docs/reproduce.md composes on this machine, as
``--cfg job`` would compose it: the command-line precheck (unknown keys, named with the nearest one), Hydra's
composition with the hydra node (launcher choices included), resolution, one composition per job of a
``-m`` sweep, and for the pipeline every enabled stage's own config, as the pipeline composes them at start-up.
``convert_checkpoint`` and ``report`` are plain tools: their arguments are parsed by their own ``main``."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, REPO_ROOT

DOC = REPO_ROOT / "docs" / "reproduce.md"
ENTRY_TO_CONFIG = {"train_sft": "sft", "train_dpo": "dpo"}
HYDRA_STAGES = {"train_sft", "train_dpo", "generate", "judge", "evaluate", "score", "pipeline"}


def doc_commands() -> list[str]:
    """The commands of the doc's ```bash blocks, continuation lines joined."""
    text = DOC.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip().startswith("python -m stllava_med."):
                commands.append(line.strip())
    return commands


COMMANDS = doc_commands()


def test_the_doc_covers_every_step():
    text = DOC.read_text(encoding="utf-8")
    # no command hides in another kind of block, where the extraction would miss it
    fenced = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    assert all("python -m stllava_med." not in body for lang, body in fenced if lang != "bash")
    modules = {shlex.split(c)[2].split(".", 1)[1] for c in COMMANDS}
    assert {"convert_checkpoint", "evaluate", "score", "train_sft", "generate", "judge", "train_dpo", "pipeline",
            "report"} <= modules, modules
    assert any("experiment=stllava_med_paper_eval" in c for c in COMMANDS)
    assert any("stages.dpo.dpo.beta=" in c and " -m " in f" {c} " for c in COMMANDS)


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not multirun:
        assert not sweeps, f"comma lists without -m: {sweeps}"
        return [overrides]
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def _compose(config: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import stllava_med.utils.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config, overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_  # the launcher group resolved (submitit_slurm on the SLURM commands)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every value resolves, nothing left at ???
    return cfg


def _check_hydra_stage(module: str, args: list[str]) -> int:
    from stllava_med.utils.config import precheck_overrides

    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    assert not [a for a in overrides if a.startswith("-")], overrides
    config = ENTRY_TO_CONFIG.get(module, module)
    precheck_overrides(config, overrides)
    jobs = _jobs(overrides, multirun)
    for job in jobs:
        cfg = _compose(config, job)
        if module == "evaluate":
            from stllava_med.data.vqa import dataset_specs
            from stllava_med.schema import EvalSettings, ExpectedCounts

            EvalSettings.from_config(OmegaConf.to_container(cfg.eval, resolve=True))
            for name, spec in dataset_specs(OmegaConf.to_container(cfg.data.sets, resolve=True)).items():
                ExpectedCounts.from_config(spec.get("expect_counts"), name)
        if module == "pipeline":
            from stllava_med.pipeline import STAGES, stage_config

            for stage in STAGES:
                if cfg.stages[stage].enabled:
                    stage_cfg = stage_config(cfg, stage)
                    OmegaConf.to_container(stage_cfg, resolve=True, throw_on_missing=False)
    return len(jobs)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i}-{shlex.split(c)[2].split('.', 1)[1]}"
                                                    for i, c in enumerate(COMMANDS)])
def test_command_composes(command, monkeypatch):
    tokens = shlex.split(command)
    assert tokens[:2] == ["python", "-m"]
    module, args = tokens[2].split(".", 1)[1], tokens[3:]
    if module in HYDRA_STAGES:
        jobs = _check_hydra_stage(module, args)
        if "stages.dpo.dpo.beta=0.05,0.1,0.5" in args:
            assert jobs == 12  # 3 betas x 4 fractions
    elif module == "convert_checkpoint":
        convert_checkpoint = pytest.importorskip("stllava_med.convert_checkpoint",
                                                 reason="stllava_med.convert_checkpoint is not in this checkout")

        calls = []

        class Result:
            out_dir, model_type, projector_type, report = Path("/x"), "llava", "mlp2x_gelu", {"files": []}

        def fake_convert(source, out, **kwargs):
            calls.append((source, out, kwargs))
            return Result()

        monkeypatch.setattr(convert_checkpoint, "convert", fake_convert)
        assert convert_checkpoint.main(args) == 0  # argparse exits 2 on an unknown option or a bad choice
        assert len(calls) == 1 and calls[0][0].is_absolute()
    elif module == "report":
        positional = [a for a in args if "=" not in a]
        options = {a.split("=", 1)[0] for a in args if "=" in a}
        assert len(positional) == 1 and options <= {"out"}, args
    else:
        pytest.fail(f"docs/reproduce.md: a command for an unknown entry point stllava_med.{module}")


def test_a_mistyped_key_would_be_caught():
    """The check above is not vacuous: the same path refuses a typo'd key and an unknown option."""
    from stllava_med.utils.config import UnknownConfigKey

    with pytest.raises(UnknownConfigKey, match="eval.max_new_tokens"):
        _check_hydra_stage("evaluate", ["experiment=stllava_med_paper_eval", "eval.max_new_tokns=1024"])
    with pytest.raises(UnknownConfigKey, match="stages.dpo.dpo.beta"):
        _check_hydra_stage("pipeline", ["-m", "stages.dpo.dpo.betta=0.1,0.5"])
    convert_checkpoint = pytest.importorskip("stllava_med.convert_checkpoint",
                                             reason="stllava_med.convert_checkpoint is not in this checkout")
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main(["/ckpt/x", "--out", "/models/x", "--conv-mode", "vicuna"])
    assert exit_info.value.code == 2
