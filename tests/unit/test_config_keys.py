"""A config key that nothing reads is an error at start-up, naming the key and the nearest valid one — in
every stage's settings readers and in the pipeline's per-stage overlays (before any stage runs)."""

from __future__ import annotations

import pytest

from conftest import compose
from stllava_med.backbone import LoraSettings, load_backbone
from stllava_med.chat import ChatFormat
from stllava_med.data.pairs.settings import PreferenceDataSettings
from stllava_med.data.sft_datamodule import SFTDataSettings
from stllava_med.dpo.module import DPOSettings
from stllava_med.selftrain.generate import GenerationSettings
from stllava_med.selftrain.judge import JudgeSettings
from stllava_med.selftrain.pairs import PairSettings
from stllava_med.sft.module import SFTOptimSettings
from stllava_med.utils.config import UnknownConfigKey, check_keys


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
    (lambda s: SFTDataSettings.from_mapping(s), {"batch_size": 2, "val_fractoin": 0.1}, "data.val_fractoin"),
    (lambda s: SFTOptimSettings.from_mapping(s), {"lr": 1e-4, "projectr_lr": 1e-5}, "sft.projectr_lr"),
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
        SFTDataSettings.from_mapping(_plain(cfg.data))
        SFTOptimSettings.from_mapping(_plain(cfg.sft))
    if stage == "dpo":
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

    cfg = compose("pipeline", ["experiment=demo", f"out_dir={tmp_path}", "+dpo.prefix_sharng=false"])
    with pytest.raises(UnknownConfigKey, match=r"dpo\.prefix_sharng \(did you mean dpo\.prefix_sharing\?\)"):
        run_pipeline(cfg)
    assert not any(tmp_path.iterdir()), "nothing may run (or be written) before the config is checked"
