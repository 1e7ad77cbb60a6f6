"""The DPO stage and the ecosystem, on the tiny backbone: TRL JSONL / Parquet and the official JSON given as
``data.path`` train like our shards, and ``convert_pairs --to trl`` output trains in TRL's own ``DPOTrainer``
(which logs the metric names ours now share)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import compose
from dpo_support import SAMPLE_PAIRS, one_torch_thread, pair_files  # noqa: F401  (autouse fixture)
from stllava_med.convert_pairs import main as convert_main
from stllava_med.data.preference import resolve_shards
from stllava_med.dpo.module import METRIC_NAMES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def processor(tiny_backbone_path):
    from stllava_med.backbone import load_processor

    return load_processor(str(tiny_backbone_path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return pair_files(tmp_path_factory.mktemp("pairs"), 12, stride=37)


def test_foreign_files_give_the_pairs_our_shards_give(processor, files, tmp_path):
    """Same pair ids and content digests (texts and image bytes) from every format; the conversion is in the
    data summary; a format named in data.format is honoured."""
    from stllava_med.chat import ChatFormat
    from stllava_med.data.pairs.datamodule import PreferenceDataModule
    from stllava_med.data.pairs.settings import PreferenceDataSettings

    def digests(path, **extra):
        settings = PreferenceDataSettings(path=path if isinstance(path, list) else str(path), val_fraction=0.0, progress=False, batch_size=4,
                                          convert_cache_dir=str(tmp_path / "converted"), **extra)
        dm = PreferenceDataModule(settings, processor, ChatFormat(), out_dir=tmp_path / "run")
        dm.setup("fit")
        return dm.digests, dm.summary

    native, summary = digests(files["native"])
    assert len(native) == 12 and summary["converted"] == []
    for name in ("trl", "parquet", "official"):
        got, summary = digests(files[name])
        assert got == native, name
        (converted,) = summary["converted"]
        assert converted["format"] == ("official" if name == "official" else "trl")
        assert (converted["read"], converted["kept"], converted["skipped"]) == (12, 12, {})
    assert digests(files["trl"], format="trl")[0] == native
    # a list mixing formats, as data.path may be
    got, summary = digests([str(files["trl"]), str(files["official"])], on_bad_pair="skip")
    assert got == native and summary["scan"]["skipped"] == {"duplicate_id": 12}


@pytest.mark.parametrize("kind", ["trl", "parquet"])
def test_train_dpo_runs_on_a_trl_file(kind, files, tmp_path, tiny_backbone_path):
    from stllava_med.train_dpo import run_train_dpo

    out = tmp_path / "run"
    cfg = compose("dpo", [f"data.path={files[kind]}", f"out_dir={out}", "data.batch_size=4", "data.num_workers=0",
                          "data.val_fraction=0", "data.progress=false", f"data.scan_cache_dir={tmp_path}/scan",
                          f"data.convert_cache_dir={tmp_path}/converted", "trainer.enable_progress_bar=false",
                          "trainer.max_steps=2", "trainer.max_epochs=1", "export.merged=false", "num_threads=1",
                          f"dpo.reference_cache_dir={tmp_path}/reference"])
    summary = run_train_dpo(cfg)
    assert summary["global_step"] == 2 and summary["pairs"] == {"train": 12, "val": 0, "skipped": {}}
    assert all(math.isfinite(summary["train"][name]) for name in METRIC_NAMES)
    data_summary = json.loads((out / "data_summary.json").read_text())
    assert [c["format"] for c in data_summary["converted"]] == ["trl"]
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_convert_pairs_to_trl_trains_in_trls_dpo_trainer(tmp_path, tiny_backbone_path):
    """``convert_pairs --to trl`` output, loaded with ``datasets``, goes into TRL's ``DPOTrainer`` as it is: a few
    steps on the tiny LLaVA with a LoRA adapter. TRL renders the same conversation through the processor's
    chat template as we do, and logs the reward and log-prob metrics under the names ours use."""
    datasets = pytest.importorskip("datasets", reason="`datasets` is not installed (pip install -e '.[bench]')")
    trl = pytest.importorskip("trl", reason="`trl` is not installed (pip install -e '.[bench]')")
    import torch
    from peft import LoraConfig

    from stllava_med.backbone import load_backbone
    from stllava_med.chat import ChatFormat
    from stllava_med.data.pairs.encoding import encode_pair
    from stllava_med.data.preference import iter_pairs
    from stllava_med.data.vqa import load_image

    out = tmp_path / "trl"
    assert convert_main(["native", str(SAMPLE_PAIRS), "--to", "trl", "--out", str(out)]) == 0
    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("json", data_files=[str(s) for s in resolve_shards(out)], split="train",
                                    cache_dir=str(tmp_path / "hf")).select(range(8))

    backbone = load_backbone({"name_or_path": str(tiny_backbone_path), "name": "tiny"}, with_lora=False)
    # TRL's collator builds the training sequence of the first pair exactly as our encoder does
    collator = trl.trainer.dpo_trainer.DataCollatorForVisionPreference(backbone.processor)
    collated = collator([dict(dataset[0])])
    pair, _, _ = next(iter_pairs([SAMPLE_PAIRS]))
    ours = encode_pair(backbone.processor, ChatFormat(), pair, load_image(dataset[0]["images"][0]))
    trl_chosen = collated["input_ids"][0][collated["attention_mask"][0].bool()]
    assert trl_chosen.tolist() == ours.chosen.input_ids.tolist()
    assert int(collated["completion_mask"][0].sum()) == int((ours.chosen.labels != -100).sum())

    config = trl.DPOConfig(output_dir=str(tmp_path / "trl_run"), per_device_train_batch_size=2, max_steps=3,
                           learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                           max_length=None, beta=0.1, gradient_checkpointing=False, disable_tqdm=True, seed=0,
                           dataloader_num_workers=0)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    torch.manual_seed(0)
    trainer = trl.DPOTrainer(model=backbone.model, args=config, train_dataset=dataset,
                             processing_class=backbone.processor, peft_config=peft_config)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(math.isfinite(entry["loss"]) for entry in logged)
    shared = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"}
    assert shared <= set(logged[-1]) and shared <= set(METRIC_NAMES)
