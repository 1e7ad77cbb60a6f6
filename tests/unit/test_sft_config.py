"""conf/sft.yaml composes with the keys the issue names, dataset lists beside flat stage keys, and the
paper's stage-1 experiment."""

from __future__ import annotations

from omegaconf import OmegaConf

from stllava_med.data.vqa import dataset_specs
from stllava_med.utils.config import config_fingerprint


def test_defaults(compose_config):
    cfg = compose_config("sft")
    assert cfg.backbone.name == "tiny"
    assert cfg.sft.sq_ratio == 0.5 and cfg.optim.lr == 2e-4 and cfg.optim.projector_lr == 2e-5
    assert cfg.data.fraction == 1.0
    assert list(dataset_specs(cfg.data.sets)) == ["vqa_rad_sample_train"]
    assert "experiment" not in cfg  # no experiment unless asked for


def test_overrides_the_issue_names(compose_config):
    cfg = compose_config("sft", [
        "backbone=tiny", "data=[vqa_rad_sample_train,llava_med_instruct]", "data.fraction=0.25",
        "data.batch_size=4", "sft.sq_ratio=0.3", "trainer.max_steps=7", "trainer.max_epochs=2", "seed=3",
        "out_dir=/tmp/somewhere",
    ])
    specs = dataset_specs(cfg.data.sets)
    assert set(specs) == {"vqa_rad_sample_train", "llava_med_instruct"}
    assert specs["llava_med_instruct"]["format"] == "llava_med_instruct"
    assert cfg.data.fraction == 0.25 and cfg.data.batch_size == 4
    assert cfg.sft.sq_ratio == 0.3 and cfg.trainer.max_steps == 7 and cfg.trainer.max_epochs == 2
    assert cfg.seed == 3 and cfg.out_dir == "/tmp/somewhere"


def test_run_dir_fingerprint_tracks_results_not_bookkeeping(compose_config):
    base = config_fingerprint(compose_config("sft"))
    assert config_fingerprint(compose_config("sft", ["data.num_workers=4", "checkpoint.every_n_steps=7",
                                                     "logger=tensorboard"])) == base
    for override in ("data.fraction=0.5", "sft.sq_ratio=0.3", "seed=1", "trainer.max_steps=9"):
        assert config_fingerprint(compose_config("sft", [override])) != base, override


def test_paper_experiment(compose_config):
    cfg = compose_config("sft", ["experiment=stllava_med_paper_stage1"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["backbone"]["name"] == "llava15_7b"
    assert plain["backbone"]["lora"]["r"] == 128 and plain["backbone"]["lora"]["alpha"] == 256
    assert list(dataset_specs(plain["data"]["sets"])) == ["llava_med_instruct"]
    assert plain["data"]["batch_size"] == 8 and plain["data"]["max_length"] == 2048
    assert plain["trainer"]["max_epochs"] == 3 and plain["trainer"]["accumulate_grad_batches"] == 4
    assert plain["optim"]["lr"] == 2e-4 and plain["optim"]["projector_lr"] == 2e-5
    assert plain["optim"]["warmup_ratio"] == 0.03 and plain["sft"]["sq_ratio"] == 0.5
    assert plain["trainer"]["accelerator"] == "gpu"


def test_tiny_experiment(compose_config):
    cfg = compose_config("sft", ["experiment=sft_tiny"])
    assert cfg.backbone.name == "tiny" and list(dataset_specs(cfg.data.sets)) == ["vqa_rad_sample_train"]
    assert cfg.trainer.max_steps == 300 and cfg.trainer.max_epochs == -1 and cfg.data.batch_size == 2
    assert cfg.sft.sq_ratio == 0.5 and cfg.optim.lr == 5e-3
