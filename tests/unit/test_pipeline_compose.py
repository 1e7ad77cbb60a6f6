"""How the pipeline composes each stage: conf/<stage>.yaml with stages.<stage>.overrides, then the keys set at
stages.<stage>; the backbone's weights are the pipeline's, what a stage sets under backbone.* is kept."""

from __future__ import annotations

from omegaconf import OmegaConf

from conftest import compose
from stllava_med.pipeline import stage_config, stage_settings


def _policy(cfg, path="/runs/sft/merged"):
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    return {**backbone, "name_or_path": path, "name": "tiny-sft"}


def test_a_stage_experiment_keeps_its_backbone_settings_but_not_the_weights():
    cfg = compose("pipeline", ['stages.evaluate.overrides=["experiment=stllava_med_paper_eval"]',
                               'stages.dpo.overrides=["backbone.lora.r=4","backbone.name_or_path=/elsewhere"]'])
    evaluate = stage_config(cfg, "evaluate", backbone=_policy(cfg))
    assert evaluate.backbone.name_or_path == "/runs/sft/merged"
    assert evaluate.eval.max_new_tokens == 1024  # the experiment's own keys
    paper = compose("evaluate", ["experiment=stllava_med_paper_eval"])
    assert evaluate.backbone.chat.system_prompt == paper.backbone.chat.system_prompt is not None
    dpo = stage_config(cfg, "dpo", backbone=_policy(cfg))
    assert dpo.backbone.lora.r == 4 and dpo.backbone.name_or_path == "/runs/sft/merged"
    sft = stage_config(cfg, "sft", backbone=_policy(cfg))  # a stage without overrides: the pipeline's backbone
    assert sft.backbone.lora.r == cfg.backbone.lora.r and sft.backbone.chat.system_prompt == cfg.backbone.chat.system_prompt


def test_only_keys_that_differ_from_the_schema_or_that_the_command_line_names_are_passed():
    cfg = compose("pipeline", ["experiment=smoke", "stages.dpo.dpo.beta=0.3"])
    assert stage_settings(cfg, "dpo")["dpo.beta"] == 0.3
    assert "dpo.loss_type" not in stage_settings(cfg, "dpo")  # left at the schema's default: the stage's own value
    assert stage_settings(cfg, "judge") == {}
    dpo = stage_config(cfg, "dpo")
    assert dpo.dpo.beta == 0.3 and dpo.trainer.max_steps == 6 and dpo.checkpoint.every_n_steps == 2


def test_every_pipeline_experiment_composes_every_stage():
    for experiment in ("demo", "smoke", "stllava_med_paper_pipeline"):
        cfg = compose("pipeline", [f"experiment={experiment}"])
        for stage in ("sft", "generate", "judge", "dpo", "evaluate"):
            OmegaConf.to_container(stage_config(cfg, stage, backbone=_policy(cfg)), resolve=True)
