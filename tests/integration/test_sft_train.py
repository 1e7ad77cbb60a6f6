"""Stage 1 end to end on the tiny backbone and the bundled VQA-RAD sample, through the entry point:
the loss falls, the run directory holds what the docs promise, the export is what evaluation / generation /
DPO load, and the fine-tuned model asks questions when prompted in the questioner role."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from stllava_med.backbone import load_backbone
from stllava_med.chat import ChatFormat, Turn, prompt_text
from stllava_med.data.vqa import load_image, load_vqa_rad
from stllava_med.eval.vqa import generate_batch
from stllava_med.train_sft import run_train_sft


def compose(config_name: str, overrides: list[str]):
    """Compose a project config as the command line would (module-scoped fixtures cannot use compose_config)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import stllava_med.utils.config  # noqa: F401  (registers resolvers)

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]



# The documented tiny recipe (conf/experiment/sft_tiny.yaml: 300 steps, batch 2, lr 5e-3), as shipped.
TRAIN_OVERRIDES = ["experiment=sft_tiny", "logger=csv", "trainer.enable_progress_bar=false"]


class CountBatches(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.batches += 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_path):
    out_dir = tmp_path_factory.mktemp("sft") / "run"
    cfg = compose("sft", [*TRAIN_OVERRIDES, f"out_dir={out_dir}"])
    summary = run_train_sft(cfg)
    return cfg, summary, out_dir


def _logged(out_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(out_dir / "logs" / "csv" / "version_0" / "metrics.csv") as fh:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(fh) if row.get(key)]


def _held_out_loss(model_path: str, conversations) -> float:
    """Mean target-token loss over conversations (one fixed self-questioning draw), no training."""
    from stllava_med.data.sft_datamodule import SFTDataset, collate_sft
    from stllava_med.sft.losses import sft_token_stats

    backbone = load_backbone({"name_or_path": model_path, "name": "x"})
    dataset = SFTDataset(conversations, backbone.processor, ChatFormat(), sq_ratio=0.5, seed=0, max_length=None)
    batch = collate_sft([dataset[(i, 0)] for i in range(len(dataset))], backbone.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = backbone.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        pixel_values=batch["pixel_values"]).logits
    return float(sft_token_stats(logits, batch["labels"], batch["target_role"]).loss)


def test_loss_decreases(trained, tiny_backbone_path, sample_dir):
    from stllava_med.data.instruct import vqa_to_conversations

    _, summary, out_dir = trained
    steps = _logged(out_dir, "train/loss_step")
    assert len(steps) >= 30 and steps[-1][0] >= 190
    first = sum(v for _, v in steps[:3]) / 3
    last = sum(v for _, v in steps[-10:]) / 10
    assert last < first - 0.3, (first, last)
    epochs = _logged(out_dir, "train/loss")  # per-epoch means
    assert len(epochs) >= 4 and epochs[-2][1] < epochs[0][1], epochs
    val = _logged(out_dir, "val/loss")
    assert len(val) >= 4 and val[-1][1] < val[0][1], val
    # on the held-out conversations, the fine-tuned model beats the untrained one clearly
    held_out = set((out_dir / "val_ids.txt").read_text().split())
    records, _ = load_vqa_rad(sample_dir, "train")
    conversations = [c for c in vqa_to_conversations(records, dataset="vqa_rad_sample_train") if c.uid in held_out]
    assert len(conversations) == len(held_out) > 0
    before = _held_out_loss(str(tiny_backbone_path), conversations)
    after = _held_out_loss(summary["merged_dir"], conversations)
    assert after < before - 0.3, (before, after)
    # the model learns both to answer and to ask
    accuracy = _logged(out_dir, "train/question_acc")
    assert accuracy[-1][1] > accuracy[0][1]


def test_run_directory(trained):
    cfg, summary, out_dir = trained
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert summary["status"] == "complete" and summary["global_step"] == cfg.trainer.max_steps == 300
    metrics = summary["metrics"]
    for key in ("train/loss", "train/answer_acc", "train/question_acc", "train/tokens_per_s", "val/loss",
                "val/answer_acc", "val/question_acc", "val/tokens_per_s"):
        assert key in metrics, key
    assert metrics["train/tokens_per_s"] > 0 and 0 <= metrics["train/question_acc"] <= 1
    selected = (out_dir / "selected_ids.txt").read_text().split()
    held_out = (out_dir / "val_ids.txt").read_text().split()
    assert len(selected) == summary["train_conversations"] and len(held_out) == summary["val_conversations"] > 0
    assert not set(selected) & set(held_out)
    assert all(uid.startswith("vqa_rad_sample_train/") for uid in selected)
    assert (out_dir / "adapter" / "adapter_config.json").is_file()
    assert (out_dir / "merged" / "config.json").is_file() and (out_dir / "checkpoints" / "last.ckpt").is_file()
    # the same command again returns the finished run without training
    counter = CountBatches()
    again = run_train_sft(cfg, callbacks=[counter])
    assert counter.batches == 0 and again == saved


def _question_rate(path: str, sample_dir: Path, n: int = 16) -> tuple[int, list[str]]:
    """How many of ``n`` test images get a question ending in '?' when the model continues a VQA exchange in
    the questioner role (the generation stage's prompt)."""
    backbone = load_backbone({"name_or_path": path, "name": "x"})
    records, _ = load_vqa_rad(sample_dir, "test")
    first_per_image = list({r.image: r for r in reversed(records)}.values())[:n]
    fmt = ChatFormat()
    prompts = [prompt_text(backbone.processor, [Turn("user", r.question), Turn("assistant", r.answer)], "questioner", fmt)
               for r in first_per_image]
    images = [load_image(r.image) for r in first_per_image]
    questions = generate_batch(backbone, prompts, images, max_new_tokens=24)
    return sum(q.endswith("?") for q in questions), questions


def test_fine_tuned_model_asks_questions(trained, tiny_backbone_path, sample_dir):
    _, summary, _ = trained
    untrained, untrained_text = _question_rate(str(tiny_backbone_path), sample_dir)
    asked, questions = _question_rate(summary["merged_dir"], sample_dir)
    assert asked > untrained, (untrained_text, questions)
    assert asked >= 12, questions


def test_export_loads_in_evaluation_and_as_a_dpo_base(trained, tmp_path):
    from stllava_med.evaluate import run_evaluate

    _, summary, _ = trained
    cfg = compose("evaluate", [f"backbone.name_or_path={summary['merged_dir']}", "data.vqa_rad_sample.limit=6",
                               "eval.progress=false", "print_table=false", f"out_dir={tmp_path / 'eval'}"])
    results = run_evaluate(cfg)
    assert results["vqa_rad_sample"]["n_scored"] == 6
    # DPO puts a fresh LoRA on the stage-1 model (reference = adapter off = the stage-1 weights)
    dpo_base = load_backbone({"name_or_path": summary["merged_dir"], "name": "policy0",
                              "lora": {"enabled": True, "r": 4, "alpha": 8}})
    assert any("lora_A" in n for n, _ in dpo_base.model.named_parameters())
