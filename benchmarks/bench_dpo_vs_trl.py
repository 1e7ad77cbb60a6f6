"""DPO throughput and memory: this project's DPO step against TRL's ``DPOTrainer``, same model, pairs,
batch size, precision, LoRA and learning rate, one epoch each, end to end (reference cost included).

    python benchmarks/bench_dpo_vs_trl.py                 # CPU, ~2-3 minutes
    python benchmarks/bench_dpo_vs_trl.py --pairs 128 --threads 4
    python benchmarks/bench_dpo_vs_trl.py --shape bench paper_tiny --pairs 32 --repeats 2   # the paper's shape too
    python benchmarks/bench_dpo_vs_trl.py --device cuda --shape llava7b --pairs 64 --batch-size 4   # GPU

Shape (``--shape bench``, default): a LLaVA built from configs with real proportions — 224 px images, patch
14 → 256 image tokens per image, vision hidden 128, text hidden 256 — and the bundled VQA-RAD sample's real
images and text. Each pair's prompt asks for the findings; the chosen answer lists the image's findings as
question/answer sentences from VQA-RAD, the rejected one the same sentences with wrong answers (from the
ground-truth pair builder), 10–100 tokens. ``--shape paper_tiny`` has the paper's input shape with small hidden
sizes (CPU): 336 px images, patch 14 → 576 image tokens, LLaVA-1.5's projector (2-layer MLP, GELU), the official
DPO template's system text (``v1``: conv_vicuna_v1, as ``dpo_finetune.sh --version v1``) and answers of 100–400
tokens, as long as self-generated ones (an image's findings followed by the next images'). Several shapes in one
run (``--shape bench paper_tiny``) alternate within each round and end with a table of the ratios by shape.
``--shape llava7b`` builds a 7B-shaped LLaVA-1.5 (random weights,
CLIP ViT-L/14-336 + LLaMA-7B dimensions, 576 image tokens, bf16) for a GPU; that path has not been run yet (no GPU
was available when the benchmark was written).

Each contender runs in a fresh subprocess; time counts everything after the model is loaded (for us: the
pair scan, the reference pre-computation and training; for TRL: dataset building, trainer set-up and
training; with the vision cache, its fill). Peak memory is the process's peak RSS above its RSS right after
the model load, plus the peak unique memory (USS) of its dataloader workers (sampled every 20 ms), and on a GPU the
peak allocated CUDA memory — measured the same way for both. Both get the same dataloader workers (``--workers``,
by default ``train_dpo``'s ``data.num_workers``), and TRL's dataset lists the pairs in the order our worker-sharded
loader trains them, so the per-step losses compare (``--pairs`` a multiple of workers x batch size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SAMPLE = REPO / "data" / "vqa_rad_sample"
PROMPT = "Describe the findings in this image."


# --------------------------------------------------------------------------------------------------------------
# Shared set-up: backbone and pairs
# --------------------------------------------------------------------------------------------------------------


def bench_backbone(shape: str) -> Path:
    from stllava_med.tiny import TinySpec, ensure_tiny_backbone

    corpus = [str(SAMPLE / "trainset.json"), str(SAMPLE / "testset.json")]
    if shape == "bench":
        spec = TinySpec(seed=0, image_size=224, patch_size=14, vision_hidden=128, vision_layers=2, vision_heads=2,
                        text_hidden=256, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=512,
                        corpus=corpus)
        return ensure_tiny_backbone(REPO / "data" / "backbones" / "bench-224", spec)
    if shape == "paper_tiny":
        # the paper's input shape with small hidden sizes: CLIP-336 / patch 14 (576 image tokens), LLaVA-1.5's
        # projector (2-layer MLP, GELU: the tiny builder's), positions for 576 + prompt + 400-token answers
        spec = TinySpec(seed=0, image_size=336, patch_size=14, vision_hidden=128, vision_layers=2, vision_heads=2,
                        text_hidden=256, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=512,
                        max_positions=2048, corpus=corpus)
        return ensure_tiny_backbone(REPO / "data" / "backbones" / "bench-paper-336", spec)
    if shape == "llava7b":
        return build_llava7b(REPO / "data" / "backbones" / "llava7b-random")
    raise ValueError(shape)


# answer lengths (tokens) and system text per shape: paper_tiny has the official DPO template's system text
# (conv_vicuna_v1, the "v1" preset: dpo_finetune.sh --version v1) and answers as long as self-generated ones
ANSWER_TOKENS = {"bench": (10, 100), "llava7b": (10, 100), "paper_tiny": (100, 400)}
SYSTEM = {"bench": None, "llava7b": None, "paper_tiny": "v1"}


def chat_format(shape: str) -> Any:
    from stllava_med.chat import ChatFormat

    return ChatFormat(system_prompt=SYSTEM[shape])


def build_llava7b(path: Path) -> Path:
    """LLaVA-1.5-7B dimensions with random weights (bf16), the tiny tokenizer and a 336 px CLIP processor."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from stllava_med.backbone import load_processor

    tiny = bench_backbone("bench")
    processor = load_processor(str(tiny))
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 7B: seconds on a GPU
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)  # ~14 GB, built in bf16
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.patch_size = 14
    processor.save_pretrained(path)
    return path


def build_pairs(n_pairs: int, out: Path, tokenizer: Any, answer_tokens: tuple[int, int] = (10, 100)) -> Path:
    """Findings-style pairs from the VQA-RAD sample (real images and text); answers of 10-100 tokens, or of
    ``answer_tokens`` when the lower bound is above 10 (long answers: see :func:`long_answers`)."""
    import hashlib

    from stllava_med.data.preference import PreferencePair, vqa_ground_truth_pairs, write_shards
    from stllava_med.data.vqa import load_vqa_rad

    records, _ = load_vqa_rad(SAMPLE, "train")
    wrong = {p.id: p.rejected for p in vqa_ground_truth_pairs(records, id_prefix="r")}
    by_image: dict[str, list[Any]] = {}
    for record in records:
        if f"r-{record.id}" in wrong:
            by_image.setdefault(record.image, []).append(record)
    images = sorted(by_image)

    def tokens(text: str) -> int:
        return len(tokenizer(text + tokenizer.eos_token, add_special_tokens=False).input_ids)

    if answer_tokens[0] > 10:
        return long_answers(n_pairs, out, records, wrong, by_image, images, tokens, answer_tokens)
    pairs = []
    for index in range(n_pairs):
        image = images[index % len(images)]
        facts = by_image[image]
        digest = int(hashlib.sha256(f"{index}".encode()).hexdigest(), 16)
        start, wanted = digest % len(facts), 1 + (digest >> 8) % 6  # 1-6 findings
        chosen_facts: list[Any] = []
        for j in range(len(facts)):
            candidate = [*chosen_facts, facts[(start + j) % len(facts)]]
            chosen = " ".join(f"{r.question} {str(r.answer).strip()}." for r in candidate)
            rejected = " ".join(f"{r.question} {wrong[f'r-{r.id}']}." for r in candidate)
            if max(tokens(chosen), tokens(rejected)) > 100:
                break
            chosen_facts = candidate
            if len(chosen_facts) >= wanted and min(tokens(chosen), tokens(rejected)) >= 10:
                break
        chosen = " ".join(f"{r.question} {str(r.answer).strip()}." for r in chosen_facts)
        rejected = " ".join(f"{r.question} {wrong[f'r-{r.id}']}." for r in chosen_facts)
        pairs.append(PreferencePair(id=f"bench-{index}", images=[image], prompt=PROMPT, chosen=chosen,
                                    rejected=rejected, source="bench/vqa_rad_sample"))
    write_shards(pairs, out, prefix="bench")
    return out


def long_answers(n_pairs: int, out: Path, records: list[Any], wrong: dict[str, str], by_image: dict[str, list[Any]],
                 images: list[str], tokens: Any, bounds: tuple[int, int]) -> Path:
    """Pairs whose answers are ``bounds`` tokens long (a length drawn per pair), as self-generated answers are: the
    image's findings, then those of the next images (one image has ~10 findings, ~120 tokens), as question /
    answer sentences; the rejected answer the same sentences with wrong answers."""
    import hashlib

    from stllava_med.data.preference import PreferencePair, write_shards

    pairs = []
    for index in range(n_pairs):
        image = images[index % len(images)]
        digest = int(hashlib.sha256(f"long-{index}".encode()).hexdigest(), 16)
        target = bounds[0] + digest % (bounds[1] - bounds[0] + 1)
        facts = [r for j in range(len(images)) for r in by_image[images[(index + j) % len(images)]]]
        chosen_facts: list[Any] = []
        for fact in facts:
            candidate = [*chosen_facts, fact]
            chosen = " ".join(f"{r.question} {str(r.answer).strip()}." for r in candidate)
            rejected = " ".join(f"{r.question} {wrong[f'r-{r.id}']}." for r in candidate)
            if max(tokens(chosen), tokens(rejected)) > bounds[1]:
                break
            chosen_facts = candidate
            if min(tokens(chosen), tokens(rejected)) >= target:
                break
        chosen = " ".join(f"{r.question} {str(r.answer).strip()}." for r in chosen_facts)
        rejected = " ".join(f"{r.question} {wrong[f'r-{r.id}']}." for r in chosen_facts)
        pairs.append(PreferencePair(id=f"bench-{index}", images=[image], prompt=PROMPT, chosen=chosen,
                                    rejected=rejected, source="bench/vqa_rad_sample"))
    write_shards(pairs, out, prefix="bench")
    return out


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory of this process above its level at entry (the kernel's high-water mark, reset on
    entry through /proc/self/clear_refs), plus the peak of its dataloader workers (sampled every 20 ms) — their
    unique memory (USS: the pages only they hold). A forked worker shares the parent's pages until it writes
    them; its RSS would count the model and the libraries a second time, its USS counts what it adds."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.worker_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_workers, daemon=True)

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def _sample_workers(self) -> None:
        while not self._stop.is_set():
            total = 0
            for child in self.process.children(recursive=True):
                with contextlib.suppress(Exception):  # a worker that just exited
                    total += child.memory_full_info().uss
            self.worker_peak = max(self.worker_peak, total)
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        self.baseline = self._status("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = self._status("VmHWM") + self.worker_peak

    @property
    def peak_increase_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


@contextlib.contextmanager
def flop_counting(args: argparse.Namespace) -> Any:
    """With ``--count-flops``: count the training run's FLOPs (benchmarks/flops.py; its time is then not a
    measurement), else nothing."""
    if not getattr(args, "count_flops", False):
        yield None
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from flops import count_flops

    with count_flops() as counter:
        yield counter


def lora_fingerprint(model: Any) -> str:
    """Hash of the LoRA A matrices (B starts at zero), to check both contenders start from the same adapter."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if "lora_A" in name:
            digest.update(name.split("lora_A")[0].split("model.", 1)[-1].encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def lora_settings(shape: str) -> dict[str, Any]:
    r = 128 if shape == "llava7b" else 16
    return {"enabled": True, "r": r, "alpha": 2 * r, "dropout": 0.0, "train_projector": True,
            "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            "projector_modules": ["multi_modal_projector"]}


def model_dtype(args: argparse.Namespace) -> str:
    """The contenders' weight dtype: bf16 for the 7B shape (GPU), else ``--dtype`` (float32; float64 for an
    exactness run)."""
    return "bfloat16" if args.shape == "llava7b" else getattr(args, "dtype", "float32")


def lightning_precision(dtype: str) -> str:
    return {"bfloat16": "bf16-true", "float64": "64-true"}.get(dtype, "32-true")


def run_ours(args: argparse.Namespace, model_dir: Path, pairs_dir: Path, work: Path) -> dict[str, Any]:
    import torch
    from lightning.pytorch import Trainer

    from stllava_med.backbone import LoraSettings, apply_lora, load_backbone
    from stllava_med.data.pairs.datamodule import PreferenceDataModule
    from stllava_med.data.pairs.scan import processor_fingerprint
    from stllava_med.data.pairs.settings import PreferenceDataSettings
    from stllava_med.dpo.module import DPOModule, DPOSettings
    from stllava_med.dpo.reference import (
        AdapterOffReference,
        PrecomputedReference,
        ReferenceCache,
        reference_fingerprint,
    )

    dtype = model_dtype(args)
    backbone = load_backbone({"name_or_path": str(model_dir), "dtype": dtype, "attn_implementation": "sdpa"},
                             with_lora=False)
    # the same seed right before the adapter is made, as TRL does: both start from identical LoRA weights
    from transformers import set_seed

    set_seed(args.seed)
    backbone.model = apply_lora(backbone.model, LoraSettings.from_config(lora_settings(args.shape)))
    lora_init = lora_fingerprint(backbone.model)
    if args.device == "cuda":
        backbone.model.to("cuda")
    with PeakMemory() as memory:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        settings = PreferenceDataSettings(path=str(pairs_dir), val_fraction=0.0, batch_size=args.batch_size,
                                          max_length=4096, num_workers=args.workers, progress=False,
                                          scan_cache_dir=str(work / "scan"), seed=args.seed,
                                          shuffle_buffer=1)  # file order, as TRL's sequential sampler below
        datamodule = PreferenceDataModule(settings, backbone.processor, chat_format(args.shape))
        datamodule.setup("fit")
        policy_reference = AdapterOffReference(backbone.model, prefix_sharing=args.prefix_sharing)
        if args.reference == "precomputed":
            cache = ReferenceCache(work / "reference", data_fingerprint=datamodule.data_fingerprint,
                                   reference=reference_fingerprint(str(model_dir), settings={"dtype": dtype}),
                                   processor=processor_fingerprint(backbone.processor, chat_format(args.shape)),
                                   max_length=settings.max_length)
            reference: Any = PrecomputedReference(
                cache, policy_reference, datamodule.digests,
                lambda ids, rank, world: datamodule.reference_batches(ids, rank=rank, world_size=world),
                batch_size=args.batch_size, progress=False)
        else:
            reference = policy_reference
        vision = None
        if getattr(args, "vision", False):  # the stage's default (dpo.vision_cache_dir): a fresh cache, filled inside the timed run
            from stllava_med.dpo.vision_cache import build_cached_vision

            vision = build_cached_vision(work / "vision", backbone.model, datamodule, batch_size=args.batch_size,
                                         progress=False)
        module = DPOModule(backbone.model, reference, DPOSettings(beta=0.1, prefix_sharing=args.prefix_sharing),
                           {"lr": args.lr, "projector_lr": args.lr, "warmup_ratio": 0.0}, vision_cache=vision)
        losses: list[float] = []
        step_ends: list[float] = []  # when each optimizer step's loss was recorded (device_check: per-step times)

        class Record(__import__("lightning").pytorch.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
                losses.append(float(outputs["loss"]))  # float(): waits for the step on a GPU
                step_ends.append(time.perf_counter())

        trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
                          precision=lightning_precision(dtype), logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[Record()])
        with flop_counting(args) as flops:
            trainer.fit(module, datamodule=datamodule)
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"flops": flops.get_total_flops() if flops is not None else None, "name": f"ours ({args.reference}, prefix sharing {'on' if args.prefix_sharing else 'off'}"
                    f"{', vision cache' if vision is not None else ''})",
            "seconds": elapsed, "pairs": len(datamodule.train_entries), "steps": len(losses),
            "first_loss": losses[0], "mean_loss": sum(losses) / len(losses), "losses": losses, "lora_init": lora_init,
            "step_seconds": [b - a for a, b in zip(step_ends, step_ends[1:])],
            "peak_rss_mb": memory.peak_increase_mb,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None}


def trained_order(n_pairs: int, workers: int, batch_size: int) -> list[int]:
    """The file positions of ``n_pairs`` pairs in the order our loader trains them (``shuffle_buffer=1``, one
    rank): worker ``w`` of ``W`` streams the pairs ``k % W == w`` in file order, in batches, and the DataLoader
    takes one batch from each worker in turn. With 0 or 1 workers: file order. When ``n_pairs`` is not a
    multiple of ``W x batch_size`` our slots are padded (zero-weight repeats): the steps then differ from TRL's."""
    width = max(1, workers)
    slots = [list(range(slot, n_pairs, width)) for slot in range(width)]
    batches = [[items[i:i + batch_size] for i in range(0, len(items), batch_size)] for items in slots]
    order: list[int] = []
    for index in range(max(len(b) for b in batches) if n_pairs else 0):
        for slot_batches in batches:
            if index < len(slot_batches):
                order.extend(slot_batches[index])
    return order


def run_trl(args: argparse.Namespace, model_dir: Path, pairs_dir: Path, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset, List
    from datasets import Image as HFImage
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from stllava_med.backbone import LoraSettings, load_backbone
    from stllava_med.chat import prompt_text, vqa_turns
    from stllava_med.data.preference import iter_pairs, resolve_image, resolve_shards

    dtype = model_dtype(args)
    backbone = load_backbone({"name_or_path": str(model_dir), "dtype": dtype, "attn_implementation": "sdpa"},
                             with_lora=False)
    if args.device == "cuda":
        backbone.model.to("cuda")
    processor = backbone.processor
    eos = processor.tokenizer.eos_token
    lora = LoraSettings.from_config(lora_settings(args.shape))
    with PeakMemory() as memory:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        columns: dict[str, list[Any]] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
        in_file = [(pair, shard) for pair, shard, _ in iter_pairs(resolve_shards(pairs_dir))]
        # the order our loader trains them in (its worker-sharded layout), so that the per-step losses compare
        for pair, shard in (in_file[k] for k in trained_order(len(in_file), args.workers, args.batch_size)):
            # The same rendered prompt and target tokens as ours: TRL tokenises prompt and completion apart.
            columns["images"].append([str(resolve_image(pair.images[0], shard))])
            columns["prompt"].append(prompt_text(processor, vqa_turns(pair.prompt), "assistant",
                                                 chat_format(args.shape)))
            columns["chosen"].append(pair.chosen + eos)
            columns["rejected"].append(pair.rejected + eos)
        # images as paths, decoded on access, like a hub dataset (no up-front decoding in TRL's favour or against)
        dataset = Dataset.from_dict(columns).cast_column("images", List(HFImage()))
        losses: list[float] = []
        step_ends: list[float] = []

        class Record(TrainerCallback):
            def on_log(self, a, state, control, logs=None, **kwargs):  # noqa: ANN001
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))
                    step_ends.append(time.perf_counter())

        config = DPOConfig(
            output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=args.device != "cuda", bf16=args.shape == "llava7b",
            max_length=None, beta=getattr(args, "beta", 0.1), loss_type=["sigmoid"], gradient_checkpointing=False,
            dataloader_num_workers=args.workers, disable_tqdm=True, seed=args.seed, remove_unused_columns=False,
            train_sampling_strategy="sequential", max_grad_norm=1.0,
        )
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.target_regex(),
                                 modules_to_save=list(lora.projector_modules))
        trainer = DPOTrainer(model=backbone.model, args=config, train_dataset=dataset, processing_class=processor,
                             peft_config=peft_config, callbacks=[Record()])
        lora_init = lora_fingerprint(trainer.model)
        with flop_counting(args) as flops:
            trainer.train()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"flops": flops.get_total_flops() if flops is not None else None, "name": "TRL DPOTrainer (PEFT: reference = adapter off, every step)", "seconds": elapsed,
            "pairs": len(dataset), "steps": len(losses), "first_loss": losses[0],
            "mean_loss": sum(losses) / len(losses), "losses": losses, "lora_init": lora_init,
            "step_seconds": [b - a for a, b in zip(step_ends, step_ends[1:])],
            "peak_rss_mb": memory.peak_increase_mb,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None}


def stage_workers() -> int:
    """``data.num_workers`` of ``python -m stllava_med.train_dpo`` (the stage schema's default)."""
    from stllava_med.schema import DPOStage

    return int(DPOStage().data.num_workers)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    model_dir, pairs_dir = Path(args.model_dir), Path(args.pairs_dir)
    runner = run_trl if args.contender == "trl" else run_ours
    result = runner(args, model_dir, pairs_dir, work)
    print("RESULT " + json.dumps(result), flush=True)


def shape_summary(model_dir: Path, pairs_dir: Path) -> str:
    """Image tokens per image and answer lengths in tokens, as the model sees them."""
    import statistics

    from stllava_med.backbone import load_processor
    from stllava_med.data.preference import iter_pairs, resolve_shards

    processor = load_processor(str(model_dir))
    image_tokens = processor._get_num_multimodal_tokens(image_sizes=[[512, 512]]).num_image_tokens[0]
    lengths = []
    for pair, _, _ in iter_pairs(resolve_shards(pairs_dir)):
        for answer in (pair.chosen, pair.rejected):
            lengths.append(len(processor.tokenizer(answer + processor.tokenizer.eos_token, add_special_tokens=False).input_ids))
    return (f"{image_tokens} image tokens per image; answers {min(lengths)}-{max(lengths)} tokens "
            f"(median {statistics.median(lengths):.0f})")


def launch(args: argparse.Namespace, contender: str, reference: str, sharing: str, vision: str, run_work: Path,
           shape: str, model_dir: Path, pairs_dir: Path, count: bool = False) -> dict[str, Any]:
    """One contender's run in a fresh process (``count``: with the FLOP counter on)."""
    command = [sys.executable, __file__, "--contender", contender, "--reference", reference,
               "--prefix-sharing", sharing, "--vision", vision, "--work", str(run_work),
               "--model-dir", str(model_dir), "--pairs-dir", str(pairs_dir),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--workers", str(args.workers), "--lr", str(args.lr), "--seed", str(args.seed),
               "--shape", shape, "--device", args.device, "--dtype", args.dtype] + (["--count-flops"] if count else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{contender} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    result["pairs_per_s"] = result["pairs"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per contender (1: steadiest on a shared machine)")
    parser.add_argument("--workers", type=int, default=stage_workers(),
                        help="dataloader workers, the same for both (default: train_dpo's data.num_workers, "
                             "%(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (TRL and ours alternate); medians reported")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=["bench", "paper_tiny", "llava7b"], nargs="+", default=["bench"],
                        help="one or more shapes, measured in the same rounds; a summary of the ratios follows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="weights and arithmetic of both (bench / paper_tiny shapes); float64 is an exactness "
                             "run: the step-loss gaps without float32 rounding (its times are not the float32 ones)")
    parser.add_argument("--ours", default="adapter_off:on:vision,adapter_off:on,precomputed:on:vision,adapter_off:off",
                        help="our variants, reference:prefix-sharing[:vision], comma separated; ':vision' adds the "
                             "vision feature cache (train_dpo's default dpo.vision_cache_dir), fresh in each run")
    parser.add_argument("--count-flops", action="store_true",
                        help="after the timed rounds, run each contender once more counting its matrix-product and "
                             "attention FLOPs (benchmarks/flops.py) and print the FLOP ratio beside the time ratio")
    parser.add_argument("--contender", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--reference", default="precomputed", help=argparse.SUPPRESS)
    parser.add_argument("--prefix-sharing", type=lambda v: v == "on", default=True, help=argparse.SUPPRESS)
    parser.add_argument("--vision", type=lambda v: v == "vision", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        args.shape = args.shape[0]
        child(args)
        return

    import statistics

    shapes = list(dict.fromkeys(args.shape))
    runs = [("trl", "-", "-", "-")] + [("ours", *(v.split(":") + ["-"])[:3]) for v in args.ours.split(",") if v]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {(sh, i): [] for sh in shapes for i in range(len(runs))}
    summaries: dict[str, str] = {}
    flops: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        from stllava_med.backbone import load_processor

        model_dirs, pairs_dirs = {}, {}
        for shape in shapes:
            model_dirs[shape] = bench_backbone(shape)
            pairs_dirs[shape] = build_pairs(args.pairs, work / f"pairs-{shape}",
                                            load_processor(str(model_dirs[shape])).tokenizer, ANSWER_TOKENS[shape])
            summaries[shape] = shape_summary(model_dirs[shape], pairs_dirs[shape])
        for round_index in range(args.repeats):
            for shape in shapes:
                for index, (contender, reference, sharing, vision) in enumerate(runs):
                    run_work = work / f"r{round_index}-{shape}-{index}"
                    run_work.mkdir()
                    result = launch(args, contender, reference, sharing, vision, run_work, shape,
                                    model_dirs[shape], pairs_dirs[shape])
                    results[shape, index].append(result)
                    print(f"  round {round_index + 1}, {shape}: {result['name']}: {result['pairs_per_s']:.2f} "
                          f"pairs/s, peak +{result['peak_rss_mb']:.0f} MB", flush=True)
        if args.count_flops:  # one more run of each, counting (its time is not a measurement)
            for shape in shapes:
                for index, (contender, reference, sharing, vision) in enumerate(runs):
                    run_work = work / f"flops-{shape}-{index}"
                    run_work.mkdir()
                    flops[shape, index] = launch(args, contender, reference, sharing, vision, run_work, shape,
                                                 model_dirs[shape], pairs_dirs[shape], count=True)["flops"]

    import torch

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores), {args.threads} threads"
    ratios: dict[str, list[float]] = {}
    for shape in shapes:
        trl = results[shape, 0]
        print(f"\nDPO, one epoch of {trl[0]['pairs']} pairs, batch {args.batch_size}, {shape} shape "
              f"({summaries[shape]}), {'bfloat16' if shape == 'llava7b' else args.dtype}, {device}, {args.workers} dataloader workers, {args.repeats} round(s), medians:")
        same_init = len({r["lora_init"] for i in range(len(runs)) for r in results[shape, i]}) == 1
        print(f"identical LoRA initialisation for all runs: {'yes' if same_init else 'NO'}")
        if trl[0]["pairs"] % (max(1, args.workers) * args.batch_size):
            print(f"note: {trl[0]['pairs']} pairs are not a multiple of {max(1, args.workers)} workers x batch "
                  f"{args.batch_size}: our slots are padded, so the per-step losses do not pair up with TRL's")
        header = ("| run | pairs/s | vs TRL | seconds | steps | mean loss | max step-loss gap to TRL | to our first run "
                  "| peak memory above start (MB) |"
                  + (" peak CUDA (MB) |" if args.device == "cuda" else ""))
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for index in range(len(runs)):
            rounds = results[shape, index]
            ratio = statistics.median(r["pairs_per_s"] / t["pairs_per_s"] for r, t in zip(rounds, trl))
            ratios.setdefault(shape, []).append(ratio)
            med = {k: statistics.median(r[k] for r in rounds) for k in ("pairs_per_s", "seconds", "peak_rss_mb")}
            first = rounds[0]
            gap = max(abs(a - b) for a, b in zip(first["losses"], trl[0]["losses"]))
            # between two of our configurations: the same optimiser and loss code, another order of summation
            ours_gap = ("—" if index == 0 else
                        f"{max(abs(a - b) for a, b in zip(first['losses'], results[shape, 1][0]['losses'])):.1e}")
            row = (f"| {first['name']} | {med['pairs_per_s']:.2f} | {ratio:.2f}x | {med['seconds']:.1f} | "
                   f"{first['steps']} | {first['mean_loss']:.4f} | {gap:.1e} | {ours_gap} | {med['peak_rss_mb']:.0f} |")
            if args.device == "cuda":
                row += f" {statistics.median(r['peak_cuda_mb'] for r in rounds):.0f} |"
            print(row)
    if flops:
        print("\nArithmetic (one more run of each with the FLOP counter: matrix products and attention, forward and "
              "backward, dense; benchmarks/flops.py). TRL's FLOPs / ours is the speed-up the same arithmetic speed "
              "would give; the time ratio above against it:\n")
        print("| shape | run | GFLOP per pair | TRL's FLOPs / ours | time ratio (median) | time ratio / FLOP ratio |")
        print("|---|---|---:|---:|---:|---:|")
        for shape in shapes:
            pairs = results[shape, 0][0]["pairs"]
            for index in range(len(runs)):
                name = results[shape, index][0]["name"]
                flop_ratio = flops[shape, 0] / flops[shape, index]
                print(f"| {shape} | {name} | {flops[shape, index] / pairs / 1e9:.2f} | {flop_ratio:.2f}x | "
                      f"{ratios[shape][index]:.2f}x | {ratios[shape][index] / flop_ratio:.2f} |")
    if len(shapes) > 1:
        print("\nRatio to TRL's pairs/s by shape (same rounds, medians of per-round ratios):\n")
        names = [results[shapes[0], i][0]["name"] for i in range(1, len(runs))]
        print("| shape | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for shape in shapes:
            print(f"| {shape} ({summaries[shape]}) | " + " | ".join(f"{r:.2f}x" for r in ratios[shape][1:]) + " |")


if __name__ == "__main__":
    main()
