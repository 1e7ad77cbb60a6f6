"""Stage 1 end to end on the tiny backbone and the bundled VQA-RAD sample, through the entry point:
the loss falls, the run directory holds what the docs promise, the export is what evaluation / generation /
DPO load, and the fine-tuned model has learned to ask: held-out questions, spoken in the questioner role, become
far more likely, down to the closing '?' and the end of the turn (likelihoods, not greedy strings, which flip
between CPUs on a toy model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from stllava_med.backbone import load_backbone
from stllava_med.chat import IGNORE_INDEX, ChatFormat
from stllava_med.data.vqa import load_vqa_rad
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
    """Margins sized on this runner (seed 0, and seeds 1-5 as a stand-in for another CPU's trajectory, a far
    larger perturbation since they also change the data order): logged step loss, first 3 vs last 10, falls by
    0.54 (0.34-0.75 over seeds); epoch mean, first vs second-to-last, by 0.56 (0.42-0.62); validation loss,
    first vs last epoch, by 0.26 (0.13-0.34); held-out loss of the exported model vs the untrained one
    7.67 -> 6.86 (gap 0.80-0.92); question accuracy, first vs last epoch, 0.09 -> 0.34 (gain 0.17-0.26)."""
    from stllava_med.data.instruct import vqa_to_conversations

    _, summary, out_dir = trained
    steps = _logged(out_dir, "train/loss_step")
    assert len(steps) >= 30 and steps[-1][0] >= 190
    first = sum(v for _, v in steps[:3]) / 3
    last = sum(v for _, v in steps[-10:]) / 10
    # single logged batches are noisy (+-0.2): a margin well under the smallest fall seen
    assert last < first - 0.2, (first, last)
    epochs = _logged(out_dir, "train/loss")  # per-epoch means over the same conversations
    assert len(epochs) >= 4 and epochs[-2][1] < epochs[0][1] - 0.2, epochs
    val = _logged(out_dir, "val/loss")
    assert len(val) >= 4 and val[-1][1] < val[0][1], val
    # on the held-out conversations, the fine-tuned model beats the untrained one clearly
    held_out = set((out_dir / "val_ids.txt").read_text().split())
    records, _ = load_vqa_rad(sample_dir, "train")
    conversations = [c for c in vqa_to_conversations(records, dataset="vqa_rad_sample_train") if c.uid in held_out]
    assert len(conversations) == len(held_out) > 0
    before = _held_out_loss(str(tiny_backbone_path), conversations)
    after = _held_out_loss(summary["export"]["merged"], conversations)
    print(f"held-out loss: untrained {before:.3f}, fine-tuned {after:.3f}")
    assert after < before - 0.3, (before, after)
    # the model learns both to answer and to ask
    accuracy = _logged(out_dir, "train/question_acc")
    assert accuracy[-1][1] > accuracy[0][1] + 0.05, accuracy


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


def _questioner_likelihoods(model_path: str, conversations) -> dict[str, float]:
    """Teacher-forced likelihoods of held-out questions spoken in the questioner role.

    With ``sq_ratio=1`` every human turn after the first is rendered as a questioner turn, so the real questions
    of the conversations are targets with ``target_role`` 2 (the image and the first question stay the user's).
    Returns the mean NLL per question token (the question text and its end-of-turn), and, over the questions
    that end in '?', the mean log-probability of that closing '?' and of the end-of-turn that follows it."""
    from stllava_med.data.sft_datamodule import SFTDataset, collate_sft
    from stllava_med.sft.losses import QUESTION_ROLE, sft_token_stats

    backbone = load_backbone({"name_or_path": model_path, "name": "x"})
    tokenizer = backbone.processor.tokenizer
    dataset = SFTDataset(conversations, backbone.processor, ChatFormat(), sq_ratio=1.0, seed=0, max_length=None)
    batch = collate_sft([dataset[(i, 0)] for i in range(len(dataset))], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = backbone.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        pixel_values=batch["pixel_values"]).logits
    questions = batch["labels"].masked_fill(batch["target_role"] != QUESTION_ROLE, IGNORE_INDEX)
    stats = sft_token_stats(logits, questions, batch["target_role"])
    # log p(target at t+1 | prefix up to t) for every position, then the closing '?' and the end-of-turn after it
    targets = questions[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    qmark, eos = tokenizer.convert_tokens_to_ids("?"), tokenizer.eos_token_id
    closing = (targets[:, :-1] == qmark) & (targets[:, 1:] == eos)
    return {"question_nll": float(stats.loss), "question_tokens": int(stats.n_targets),
            "question_acc": float(stats.question_correct) / max(1, int(stats.question_total)),
            "closing_questions": int(closing.sum()), "logp_qmark": float(logp[:, :-1][closing].mean()),
            "logp_end_after_qmark": float(logp[:, 1:][closing].mean())}


def test_fine_tuned_model_asks_questions(trained, tiny_backbone_path, sample_dir):
    """The fine-tuned model has learned to ask, judged by likelihoods of real questions it never trained on
    (the sample's test questions, on the same images), not by greedy strings: a random-initialised toy model
    after 300 steps has a flat next-token distribution (the closing '?' gets p ~ 0.002 even where it is the
    greedy choice), so its greedy output flips with the float kernels and the trajectory: the old check (>= 12
    of 16 generated questions ending in '?') got 6 here and on another EPYC runner, and 16, 14, 2, 0, 0 with
    seeds 1-5, while the likelihoods below barely move.

    Measured on this 2-core runner with the shipped recipe (seed 0) and, as a stand-in for another CPU's
    trajectory, with seeds 1-5 (which change the data order and the LoRA init, a far larger perturbation):
    question NLL 7.67 untrained -> 6.72..6.91 trained (gap 0.76-0.95 nats); log p(closing '?') -7.67 ->
    -5.61..-6.55 (gap 1.1-2.1); log p(end-of-turn after '?') -7.77 -> -4.84 (gap 2.9 in every run). The margins
    asserted below are at most half of the smallest gap seen; each is zero if training changed nothing."""
    from stllava_med.data.instruct import vqa_to_conversations

    _, summary, _ = trained
    records, _ = load_vqa_rad(sample_dir, "test")
    conversations = vqa_to_conversations(records, dataset="vqa_rad_sample_test")
    expected_closing = sum(m.text.endswith("?") for c in conversations for m in c.messages[2::2])
    before = _questioner_likelihoods(str(tiny_backbone_path), conversations)
    after = _questioner_likelihoods(summary["export"]["merged"], conversations)
    print(f"questioner-role likelihoods on held-out questions: untrained {before}, fine-tuned {after}")
    # the measurement covers what it claims: every follow-up question is a questioner target
    assert before["closing_questions"] == after["closing_questions"] == expected_closing >= 50, (before, after)
    assert before["question_tokens"] == after["question_tokens"] > 500
    # the real questions became far more likely in the questioner role (observed gap >= 0.76 nats per token)
    assert after["question_nll"] < before["question_nll"] - 0.3, (before, after)
    # and it closes them: the '?' (observed gain >= 1.1 nats, i.e. >= 3x the probability) ...
    assert after["logp_qmark"] > before["logp_qmark"] + 0.5, (before, after)
    # ... then ends the questioner turn (observed gain 2.9 nats, ~18x the probability)
    assert after["logp_end_after_qmark"] > before["logp_end_after_qmark"] + 1.5, (before, after)


def test_export_loads_in_evaluation_and_as_a_dpo_base(trained, tmp_path):
    from stllava_med.evaluate import run_evaluate

    _, summary, _ = trained
    cfg = compose("evaluate", [f"backbone.name_or_path={summary['export']['merged']}", "data.sets.vqa_rad_sample.limit=6",
                               "eval.progress=false", "print_table=false", f"out_dir={tmp_path / 'eval'}"])
    results = run_evaluate(cfg)
    assert results["vqa_rad_sample"]["n_scored"] == 6
    # DPO puts a fresh LoRA on the stage-1 model (reference = adapter off = the stage-1 weights)
    dpo_base = load_backbone({"name_or_path": summary["export"]["merged"], "name": "policy0",
                              "lora": {"enabled": True, "r": 4, "alpha": 8}})
    assert any("lora_A" in n for n, _ in dpo_base.model.named_parameters())
