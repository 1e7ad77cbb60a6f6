"""A config key that nothing reads is an error at start-up, naming the key and the nearest valid one (or its new
name): on the command line of every stage (before Hydra composes), in Hydra's composition (the stage schemas
of stllava_med.schema), in every settings reader (keys added with +), and in the pipeline's stages.<name>."""

from __future__ import annotations

import pytest

from conftest import compose
from stllava_med.backbone import LoraSettings, load_backbone
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.data.sft_datamodule import SFTDataSettings
from stllava_med.dpo.module import DPOSettings
from stllava_med.schema import STAGE_SCHEMAS, OptimSettings, SFTSettings
from stllava_med.selftrain.generate import GenerationSettings
from stllava_med.selftrain.judge import JudgeSettings
from stllava_med.selftrain.pairs import PairSettings
from stllava_med.utils.config import UnknownConfigKey, check_keys, precheck_overrides


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def test_check_keys_names_the_key_and_the_nearest_valid_one():
    with pytest.raises(UnknownConfigKey, match=r"dpo\.prefix_sharng \(did you mean dpo\.prefix_sharing\?\)"):
        check_keys({"prefix_sharng": False, "beta": 0.1}, ["prefix_sharing", "beta"], "dpo")
    with pytest.raises(UnknownConfigKey, match=r"dpo\.zzz; valid keys of dpo: beta"):
        check_keys({"zzz": 1}, ["beta"], "dpo")
    check_keys({"beta": 0.1}, ["beta", "prefix_sharing"], "dpo")  # known keys pass


@pytest.mark.parametrize("reader, section, where", [
    (lambda s: DPOSettings.from_config(s), {"beta": 0.1, "prefix_sharng": False}, "dpo.prefix_sharng"),
    (lambda s: LoraSettings.from_config(s), {"r": 8, "alhpa": 16}, "backbone.lora.alhpa"),
    (lambda s: ChatFormat.from_config(s), {"questioner_rol": "vuser"}, "backbone.chat.questioner_rol"),
    (lambda s: PreferenceDataSettings.from_config({"path": "x.jsonl", **s}), {"batch_sise": 2}, "data.batch_sise"),
    (lambda s: SFTDataSettings.from_config(s), {"batch_size": 2, "val_fractoin": 0.1}, "data.val_fractoin"),
    (lambda s: OptimSettings.from_config(s), {"lr": 1e-4, "projectr_lr": 1e-5}, "optim.projectr_lr"),
    (lambda s: SFTSettings.from_config(s), {"sq_ration": 0.5}, "sft.sq_ration"),
    (lambda s: PairSettings.from_config(s), {"min_margn": 1}, "pairs.min_margn"),
    (lambda s: JudgeSettings.from_config(s), {"concurency": 2}, "expert.concurency"),
    (lambda s: GenerationSettings.from_config(s), {"questions_per_imag": 2}, "generate.questions_per_imag"),
    (lambda s: GenerationSettings.from_config(s), {"question": {"temprature": 1.0}}, "generate.question.temprature"),
])
def test_every_settings_reader_refuses_unknown_keys(reader, section, where):
    with pytest.raises(UnknownConfigKey, match=where.replace(".", r"\.")):
        reader(section)


def test_a_backbone_config_with_an_unknown_key_fails_before_loading(tmp_path):
    with pytest.raises(UnknownConfigKey, match=r"backbone\.quantisation \(did you mean backbone\.quantization\?\)"):
        load_backbone({"name_or_path": str(tmp_path / "missing"), "quantisation": "4bit"})


@pytest.mark.parametrize("stage", ["sft", "dpo", "generate", "judge", "evaluate"])
def test_each_stage_default_config_passes_its_readers(stage):
    """The shipped YAML holds only keys that something reads (the readers accept every default)."""
    cfg = compose(stage)
    LoraSettings.from_config(_plain(cfg.backbone.lora))
    ChatFormat.from_config(_plain(cfg.backbone.chat))
    if stage == "sft":
        SFTDataSettings.from_config(_plain(cfg.data))
        SFTSettings.from_config(_plain(cfg.sft))
        OptimSettings.from_config(_plain(cfg.optim))
    if stage == "dpo":
        OptimSettings.from_config(_plain(cfg.optim))
        DPOSettings.from_config(_plain(cfg.dpo))
        PreferenceDataSettings.from_config(_plain(cfg.data))
    if stage == "generate":
        GenerationSettings.from_config(_plain(cfg.generate))
    if stage == "judge":
        for expert in ("reference", "openai", "hf_local"):
            JudgeSettings.from_config(_plain(compose("judge", [f"expert={expert}"]).expert))
        PairSettings.from_config(_plain(cfg.pairs))


def test_the_pipeline_refuses_a_mistyped_stage_key_before_any_stage_runs(tmp_path):
    from stllava_med.pipeline import run_pipeline

    cfg = compose("pipeline", ["experiment=demo", f"out_dir={tmp_path}", "+stages.dpo.dpo.prefix_sharng=false"])
    with pytest.raises(UnknownConfigKey, match=r"dpo\.prefix_sharng \(did you mean dpo\.prefix_sharing\?\)"):
        run_pipeline(cfg)
    assert not any(tmp_path.iterdir()), "nothing may run (or be written) before the config is checked"


@pytest.mark.parametrize("stage, override, message", [
    ("dpo", "dpo.prefix_sharng=false", r"dpo\.prefix_sharng \(did you mean dpo\.prefix_sharing\?\)"),
    ("dpo", "+dpo.prefix_sharng=false", r"dpo\.prefix_sharng \(did you mean dpo\.prefix_sharing\?\)"),
    ("dpo", "data.val_ratio=0.1", r"data\.val_ratio \(renamed: data\.val_fraction\)"),
    ("dpo", "checkpoint_every_n_steps=5", r"checkpoint_every_n_steps \(renamed: checkpoint\.every_n_steps\)"),
    ("sft", "sft.lr=1e-3", r"sft\.lr \(renamed: optim\.lr\)"),
    ("sft", "sft.export=false", r"sft\.export \(renamed: export\.merged\)"),
    ("sft", "data.eval_batch_size=4", r"data\.eval_batch_size \(renamed: data\.val_batch_size\)"),
    ("sft", "optim.lrr=1e-3", r"optim\.lrr \(did you mean optim\.lr\?\)"),
    ("evaluate", "eval.max_new_token=8", r"eval\.max_new_token \(did you mean eval\.max_new_tokens\?\)"),
    ("generate", "generate.answer.temprature=1", r"generate\.answer\.temprature \(did you mean generate\.answer\.temperature\?\)"),
    ("judge", "pairs.min_margn=2", r"pairs\.min_margn \(did you mean pairs\.min_margin\?\)"),
    ("pipeline", "stages.dpo.dpo.bta=0.5", r"stages\.dpo\.dpo\.bta \(did you mean stages\.dpo\.dpo\.beta\?\)"),
    ("pipeline", "stage_overrides.dpo=[]", r"stage_overrides\.dpo \(renamed: stages\.<stage>\.overrides\)"),
    ("pipeline", "dpo.beta=0.5", r"unknown config key dpo\.beta"),
])
def test_the_command_line_is_checked_against_the_stage_schema(stage, override, message):
    with pytest.raises(UnknownConfigKey, match=message):
        precheck_overrides(stage, [override])


@pytest.mark.parametrize("stage", sorted(STAGE_SCHEMAS))
def test_valid_command_lines_pass_the_precheck(stage):
    """Group choices, keys of untyped groups (backbone, trainer, data.sets) and hydra.* are left to Hydra."""
    trainer = ["+trainer.max_steps=3", "trainer=gpu"] if stage in ("sft", "dpo") else []
    precheck_overrides(stage, ["backbone=tiny", "backbone.lora.r=4", *trainer, "hydra.job.chdir=false", "seed=3",
                               "-m", "--cfg", "job"])
    if stage == "pipeline":
        precheck_overrides(stage, ["stages.dpo.dpo.beta=0.5", "+stages.dpo.trainer.max_steps=3",
                                   "stages.sft.overrides=[trainer=gpu]", "stages.evaluate.enabled=false"])


def test_the_schema_types_keys_when_hydra_composes():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("dpo", ["dpo.beta=abc"])
    with pytest.raises(ConfigCompositionException):
        compose("sft", ["data.batch_size=eight"])
    with pytest.raises(ConfigCompositionException):
        compose("dpo", ["dpo.prefix_sharng=false"])  # Hydra's struct check, without the hint the precheck gives


def test_a_typo_fails_at_start_up_from_the_command_line():
    """The real entry point: exit code 2 and the nearest key on stderr, within seconds (no model is loaded)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "stllava_med.train_dpo", "+dpo.prefix_sharng=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dpo.prefix_sharng (did you mean dpo.prefix_sharing?)" in proc.stderr


def test_defaults_live_in_the_schema_only():
    """The stage YAML files set no key of a section the schema defines (experiments may): the composed default
    config equals the schema's defaults, section by section."""
    from omegaconf import OmegaConf

    for stage, sections in {"sft": ("data", "sft", "optim", "checkpoint", "export"),
                            "dpo": ("data", "dpo", "optim", "checkpoint", "export"),
                            "generate": ("generate",), "judge": ("judge", "pairs"), "evaluate": ("eval",)}.items():
        composed = compose(stage)
        schema = OmegaConf.structured(STAGE_SCHEMAS[stage])
        for section in sections:
            got = OmegaConf.to_container(composed[section], resolve=False)
            want = OmegaConf.to_container(schema[section], resolve=False)
            if section == "data":
                got.pop("sets", None)
                want.pop("sets", None)
            assert got == want, (stage, section)


def test_the_backbone_is_typed_when_hydra_composes_and_its_loader_reads_the_schema():
    from hydra.errors import ConfigCompositionException

    from stllava_med.schema import BackboneSettings

    with pytest.raises(ConfigCompositionException):
        compose("dpo", ["backbone.trust_remote_code=maybe"])
    with pytest.raises(UnknownConfigKey, match=r"backbone\.dtyp \(did you mean backbone\.dtype\?\)"):
        precheck_overrides("dpo", ["+backbone.dtyp=bf16"])
    with pytest.raises(ValueError, match="backbone.name_or_path is required"):
        BackboneSettings.from_config({"name": "x"})
    assert BackboneSettings.from_config({"name_or_path": "/m"}).dtype == BackboneSettings.dtype  # one default
