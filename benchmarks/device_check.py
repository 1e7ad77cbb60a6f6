"""GPU check: the project's training and sampling on a LLaVA-1.5-7B-shaped model, figures in one JSON.

    python benchmarks/device_check.py --out logs/device_check.json        # one H100 / H200, < 8 minutes
    python benchmarks/device_check.py --dry-run --out /tmp/check.json     # the tiny backbone on the CPU, seconds

(``benchmarks/device_check.sh`` wraps the first with a time limit and the offline settings.) Nothing is downloaded:
the model is LLaVA-1.5-7B's configuration (CLIP ViT-L/14-336, 576 image tokens, the 2-layer GELU projector,
LLaMA-7B) with random bf16 weights, built on the GPU and saved once under ``--work``; the tokenizer and the pairs
are the bundled tiny tokenizer and VQA-RAD sample. Parts, each recorded as it finishes (a part that fails records
its error, the others still run):

``dpo``       our DPO step against TRL's ``DPOTrainer`` (same pairs, LoRA initialisation, order and schedule; each in
              its own process, through ``bench_dpo_vs_trl.py``'s contenders): tokens/s of the steady steps, peak
              CUDA memory, the largest per-step loss gap, and our step's MFU (formula in the JSON);
``logps``     prefix-sharing log-probabilities equal to the plain (concatenated) path in bf16 within tolerance;
``sampling``  K=2 answers per question: the fast shared-prefix decoder, ``generate``'s loop from the same cache
              and ``generate(num_return_sequences=2)``: new tokens/s, and the fast path's samples equal the
              reference's for the same seed;
``sft``       SFT steps (LoRA, gradient checkpointing): tokens/s, peak memory, gradients on every LoRA layer;
``qlora``     the same model loaded 4-bit (bitsandbytes NF4) with LoRA: steps run, every LoRA layer gets gradients.

``--dry-run`` runs every part on the project's tiny backbone in fp32 on the CPU (TRL's side is skipped, with the
reason, when trl is not installed; QLoRA when bitsandbytes is not): what ``make test`` runs, to keep this script
working where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import bench_dpo_vs_trl as bench  # noqa: E402

# dense bf16 peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12}
PARTS = ("dpo", "logps", "sampling", "sft", "qlora")


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.figures: dict[str, Any] = {
            "mode": "dry-run (tiny backbone, CPU, fp32)" if self.dry else "LLaVA-1.5-7B shape, random bf16 weights",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not self.dry else "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "parts": {}}
        self.started = time.perf_counter()
        self._backbone: Any = None

    # ---- shared pieces ---------------------------------------------------------------------------------------

    def model_dir(self) -> Path:
        if self.dry:
            from stllava_med.tiny import TinySpec, ensure_tiny_backbone

            corpus = [str(bench.SAMPLE / f) for f in ("trainset.json", "testset.json")]
            return ensure_tiny_backbone(REPO / "data" / "backbones" / "tiny", TinySpec(corpus=corpus))
        path = self.work / "llava7b-random"
        if not (path / "config.json").is_file():
            bench.build_llava7b(path)  # built on the GPU, saved (~14 GB); the memory goes back for the contenders
            self.release()
        return path

    def backbone(self) -> Any:
        """The model in its dtype on the device, without LoRA (loaded once for logps and sampling)."""
        if self._backbone is None:
            from stllava_med.backbone import load_backbone

            self._backbone = load_backbone({"name_or_path": str(self.model_dir()), "name": "check",
                                            "dtype": "float32" if self.dry else "bfloat16",
                                            "attn_implementation": "sdpa"}, with_lora=False)
            self._backbone.model.to(self.device)
        return self._backbone

    def release(self) -> None:
        import gc

        import torch

        self._backbone = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def pairs_dir(self, n: int) -> Path:
        from stllava_med.backbone import load_processor

        path = self.work / f"pairs-{n}"
        if not path.is_dir():
            bench.build_pairs(n, path, load_processor(str(self.model_dir())).tokenizer)
        return path

    def sync(self) -> None:
        import torch

        if torch.cuda.is_available() and not self.dry:
            torch.cuda.synchronize()

    def peak_reset(self) -> None:
        import torch

        if torch.cuda.is_available() and not self.dry:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        import torch

        if torch.cuda.is_available() and not self.dry:
            return torch.cuda.max_memory_allocated() / 2**20
        return None

    def record(self, part: str, result: dict[str, Any]) -> None:
        self.figures["parts"][part] = result
        self.figures["seconds"] = round(time.perf_counter() - self.started, 1)
        self.figures["passed"] = all(p.get("ok", False) or p.get("skipped") for p in self.figures["parts"].values())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.figures, indent=2) + "\n")
        print(f"[{self.figures['seconds']:.0f}s] {part}: " + json.dumps(result)[:600], flush=True)

    def dpo_batch(self, backbone: Any, n: int, batch_size: int) -> Any:
        from stllava_med.chat import ChatFormat
        from stllava_med.data.pairs.datamodule import PreferenceDataModule
        from stllava_med.data.pairs.settings import PreferenceDataSettings

        settings = PreferenceDataSettings(path=str(self.pairs_dir(n)), val_fraction=0.0, batch_size=batch_size,
                                          max_length=4096, num_workers=0, progress=False,
                                          scan_cache_dir=str(self.work / "scan"), seed=0, shuffle_buffer=1)
        datamodule = PreferenceDataModule(settings, backbone.processor, ChatFormat())
        datamodule.setup("fit")
        return next(iter(datamodule.train_dataloader()))

    def to_device(self, value: Any) -> Any:
        import torch

        if isinstance(value, torch.Tensor):
            moved = value.to(self.device)
            return moved.to(self.dtype) if moved.is_floating_point() else moved
        if isinstance(value, dict):
            return {k: self.to_device(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.to_device(v) for v in value)
        return value

    # ---- parts -----------------------------------------------------------------------------------------------

    def part_dpo(self) -> dict[str, Any]:
        import importlib.util

        pairs, batch = (8, 2) if self.dry else (self.args.dpo_pairs, 4)
        model_dir, pairs_dir = self.model_dir(), self.pairs_dir(pairs)
        shape = "bench" if self.dry else "llava7b"
        contenders = {"ours": ("ours", "adapter_off", "on")}
        skipped = None
        if importlib.util.find_spec("trl") is None:
            skipped = "trl is not installed (pip install -e '.[bench]'): TRL's side skipped"
        else:
            contenders["trl"] = ("trl", "-", "-")
        results: dict[str, Any] = {}
        for name, (contender, reference, sharing) in contenders.items():
            run_work = self.work / f"dpo-{name}"
            run_work.mkdir(exist_ok=True)
            command = [sys.executable, str(HERE / "bench_dpo_vs_trl.py"), "--contender", contender,
                       "--reference", reference, "--prefix-sharing", sharing, "--work", str(run_work),
                       "--model-dir", str(model_dir), "--pairs-dir", str(pairs_dir), "--batch-size", str(batch),
                       "--threads", str(self.args.threads), "--workers", "0", "--lr", "1e-4", "--seed", "0",
                       "--shape", shape, "--device", self.device]
            proc = subprocess.run(command, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"{name} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
            results[name] = json.loads(lines[-1][len("RESULT "):])
        tokens_per_pair, unique_per_pair = self.pair_tokens(model_dir, pairs_dir)
        out: dict[str, Any] = {"pairs": pairs, "batch_size": batch, "tokens_per_pair": tokens_per_pair,
                               "tokens_note": "tokens/s counts chosen + rejected sequences (image tokens included) "
                                              "over the steady steps (the first step excluded)"}
        for name, result in results.items():
            steady = result["step_seconds"] or [result["seconds"] / max(result["steps"], 1)]
            step = statistics.median(steady)
            out[name] = {"tokens_per_s": round(batch * tokens_per_pair / step, 1), "median_step_s": round(step, 4),
                         "epoch_seconds": round(result["seconds"], 2), "steps": result["steps"],
                         "peak_cuda_mb": result["peak_cuda_mb"], "peak_rss_mb": round(result["peak_rss_mb"], 1),
                         "losses": result["losses"], "lora_init": result["lora_init"]}
        flops = self.dpo_flops(model_dir, unique_per_pair) * batch
        step = out["ours"]["median_step_s"]
        peak = self.peak_flops()
        out["ours"]["mfu"] = round(flops / step / peak, 4) if peak else None
        out["mfu_formula"] = ("per pair: 4 N_lm (P + A_c + A_r) for the policy (forward + input gradients, frozen base) "
                              "+ 2 N_lm (P + A_c + A_r) for the adapter-off reference + 2 N_vision x image tokens "
                              "(the tower once); N = matmul parameters, attention score FLOPs left out; P = image + "
                              "prompt positions, run once per pair with prefix sharing; peak = dense bf16 "
                              f"({peak / 1e12 if peak else None} TFLOP/s)")
        if skipped:
            out["trl"] = {"skipped": skipped}
            out["ok"] = True
        else:
            gap = max(abs(a - b) for a, b in zip(results["ours"]["losses"], results["trl"]["losses"]))
            out["max_step_loss_gap"] = gap
            out["same_lora_init"] = results["ours"]["lora_init"] == results["trl"]["lora_init"]
            out["ours_vs_trl_tokens_per_s"] = round(out["ours"]["tokens_per_s"] / out["trl"]["tokens_per_s"], 3)
            if out["ours"]["peak_cuda_mb"] and out["trl"]["peak_cuda_mb"]:
                out["ours_vs_trl_peak_memory"] = round(out["ours"]["peak_cuda_mb"] / out["trl"]["peak_cuda_mb"], 3)
            # bf16: the two implementations round differently; fp32 (dry run) agrees to ~1e-5
            out["ok"] = out["same_lora_init"] and gap < (1e-3 if self.dry else 5e-2)
        return out

    def pair_tokens(self, model_dir: Path, pairs_dir: Path) -> tuple[float, float]:
        """Mean tokens per pair: (chosen + rejected full sequences, unique positions with a shared prefix)."""
        from stllava_med.backbone import load_processor
        from stllava_med.chat import ChatFormat, prompt_text, vqa_turns
        from stllava_med.data.preference import iter_pairs, resolve_shards

        processor = load_processor(str(model_dir))
        image_tokens = processor._get_num_multimodal_tokens(image_sizes=[[512, 512]]).num_image_tokens[0]
        prompt = prompt_text(processor, vqa_turns(bench.PROMPT), "assistant", ChatFormat())
        prefix = len(processor.tokenizer(prompt, add_special_tokens=False).input_ids) - 1 + image_tokens
        eos = processor.tokenizer.eos_token
        full, unique = [], []
        for pair, _, _ in iter_pairs(resolve_shards(pairs_dir)):
            a_c, a_r = (len(processor.tokenizer(t + eos, add_special_tokens=False).input_ids)
                        for t in (pair.chosen, pair.rejected))
            full.append(2 * prefix + a_c + a_r)
            unique.append(prefix + a_c + a_r)
        return statistics.mean(full), statistics.mean(unique)

    def dpo_flops(self, model_dir: Path, unique_tokens: float) -> float:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir))
        text, vision = config.text_config, config.vision_config
        head_dim = text.hidden_size // text.num_attention_heads
        n_lm = text.num_hidden_layers * (
            text.hidden_size * head_dim * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
            + 3 * text.hidden_size * text.intermediate_size) + text.hidden_size * text.vocab_size
        n_vision = vision.num_hidden_layers * (4 * vision.hidden_size ** 2 + 2 * vision.hidden_size
                                               * vision.intermediate_size)
        image_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        return 6 * n_lm * unique_tokens + 2 * n_vision * image_tokens

    def peak_flops(self) -> float | None:
        if self.args.peak_tflops:
            return self.args.peak_tflops * 1e12
        name = self.figures["device"]
        return next((v for k, v in PEAK_BF16.items() if k in name), None)

    def part_logps(self) -> dict[str, Any]:
        import torch

        from stllava_med.dpo.logps import LogProbs

        backbone = self.backbone()
        batch = self.to_device(self.dpo_batch(backbone, 8, 4))
        with torch.no_grad():
            shared = LogProbs(backbone.model, prefix_sharing=True)(batch)
            plain = LogProbs(backbone.model, prefix_sharing=False)(batch)
        diffs, scales = [], []
        for a, b in ((shared.chosen, plain.chosen), (shared.rejected, plain.rejected)):
            diffs.append((a.float() - b.float()).abs().max().item())
            scales.append(b.float().abs().mean().item())
        rel = max(diffs) / max(scales)
        tolerance = 1e-5 if self.dry else 1e-2  # relative to the mean |sum of answer log-probs|
        return {"max_abs_diff": max(diffs), "mean_abs_logp": max(scales), "relative": rel, "tolerance": tolerance,
                "positions_shared": shared.positions, "positions_plain": plain.positions, "ok": rel <= tolerance}

    def part_sampling(self) -> dict[str, Any]:
        import torch

        from stllava_med.chat import ChatFormat, prompt_text, vqa_turns
        from stllava_med.data.vqa import load_image, load_vqa_rad
        from stllava_med.generation import generate_batch, sample_sequences
        from stllava_med.shared_decoding import LAST_CALL

        backbone = self.backbone()
        tokenizer = backbone.processor.tokenizer
        config = backbone.model.generation_config
        saved_eos = config.eos_token_id
        special = set(tokenizer.all_special_ids)
        # a random-weight model rarely samples EOS: every 64th token id ends an answer too (bench_sampling.py)
        config.eos_token_id = [tokenizer.eos_token_id] + [i for i in range(0, len(tokenizer), 64) if i not in special]
        records, _ = load_vqa_rad(bench.SAMPLE, "train")
        chosen = records[: (4 if self.dry else 8)]
        fmt = ChatFormat(system_prompt="llava_v1")
        prompts = [prompt_text(backbone.processor, vqa_turns(r.question), "assistant", fmt) for r in chosen]
        images = [load_image(r.image) for r in chosen]
        k, low, high = 2, (8 if self.dry else 64), (32 if self.dry else 256)
        sampling = {"temperature": 1.2, "top_k": 100, "top_p": 0.95, "min_new_tokens": low}
        modes = {"fast": lambda: sample_sequences(backbone, prompts, images, k=k, max_new_tokens=high,
                                                  drop_finished=True, **sampling),
                 "generate_loop": lambda: sample_sequences(backbone, prompts, images, k=k, max_new_tokens=high,
                                                           drop_finished=False, **sampling),
                 "num_return_sequences": lambda: generate_batch(backbone, prompts, images, max_new_tokens=high,
                                                                do_sample=True, num_return_sequences=k, **sampling)}
        try:
            modes["fast"]()  # warm-up (kernels, allocator)
            out: dict[str, Any] = {"questions": len(prompts), "k": k, "answer_tokens": [low, high]}
            texts = {}
            for name, fn in modes.items():
                torch.manual_seed(5)
                self.sync()
                start = time.perf_counter()
                texts[name] = fn()
                self.sync()
                out.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 3)
                if name == "fast":
                    new_tokens = sum(LAST_CALL["new_tokens"])
                    out["decoder"] = LAST_CALL["decoder"]
            out["new_tokens"] = new_tokens
            out["new_tokens_per_s"] = {n: round(new_tokens / s, 1) for n, s in out["seconds"].items()}
            out["fast_vs_num_return_sequences"] = round(out["seconds"]["num_return_sequences"] / out["seconds"]["fast"], 3)
            out["fast_equals_reference"] = texts["fast"] == texts["generate_loop"]
            out["reference_equals_num_return_sequences"] = texts["generate_loop"] == texts["num_return_sequences"]
            # answers alike, of all; below 1 on a GPU whose kernels make a row's logits depend on the batch's size
            # (rows leave the fast path's batch; num_return_sequences prefills K times more rows than the reference)
            out["identical_fraction"] = {
                "fast_vs_reference": sum(a == b for a, b in zip(texts["fast"], texts["generate_loop"])) / len(texts["fast"]),
                "reference_vs_num_return_sequences": sum(a == b for a, b in zip(texts["generate_loop"],
                                                                                texts["num_return_sequences"]))
                / len(texts["fast"])}
            out["ok"] = out["fast_equals_reference"] and out["decoder"] == "shared"
        finally:
            config.eos_token_id = saved_eos
        return out

    def lora_steps(self, model: Any, processor: Any, steps: int, batch_size: int) -> dict[str, Any]:
        """LoRA steps on SFT-style batches (image + question + answer, loss on the answer)."""
        import torch

        from stllava_med.chat import ChatFormat, prompt_text, vqa_turns
        from stllava_med.data.vqa import load_image, load_vqa_rad

        records, _ = load_vqa_rad(bench.SAMPLE, "train")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
        reached: set[str] = set()
        times, tokens = [], 0
        device = next(p.device for p in trainable)
        model.train()
        for step in range(steps):
            chunk = records[step * batch_size:(step + 1) * batch_size]
            texts = [prompt_text(processor, vqa_turns(r.question), "assistant", ChatFormat())
                     + " ".join([str(r.answer)] * 8) + processor.tokenizer.eos_token for r in chunk]
            inputs = processor(text=texts, images=[load_image(r.image) for r in chunk], padding=True,
                               return_tensors="pt")
            inputs = {k: (v.to(device, self.dtype) if v.is_floating_point() else v.to(device))
                      for k, v in inputs.items()}
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            labels = labels.masked_fill(labels == model.config.image_token_id, -100)
            self.sync()
            start = time.perf_counter()
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            reached |= {n for n, p in lora_b.items() if p.grad is not None and p.grad.abs().sum() > 0}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.sync()
            times.append(time.perf_counter() - start)
            tokens = int(inputs["attention_mask"].sum())
        steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
        return {"steps": steps, "batch_size": batch_size, "tokens_per_step": tokens,
                "tokens_per_s": round(tokens / steady, 1), "median_step_s": round(steady, 4),
                "lora_layers": len(lora_b), "lora_layers_with_gradients": len(reached), "loss": float(loss.detach()),
                "ok": bool(lora_b) and len(reached) == len(lora_b) and bool(torch.isfinite(loss))}

    def lora_settings(self) -> Any:
        from stllava_med.backbone import LoraSettings

        r = 16 if self.dry else 128
        return LoraSettings.from_config({"enabled": True, "r": r, "alpha": 2 * r, "dropout": 0.0,
                                         "train_projector": True})

    def part_sft(self) -> dict[str, Any]:
        from stllava_med.backbone import apply_lora

        backbone = self.backbone()
        self.peak_reset()
        model = apply_lora(backbone.model, self.lora_settings(), gradient_checkpointing=True)
        out = self.lora_steps(model, backbone.processor, steps=3 if self.dry else 6, batch_size=4 if self.dry else 8)
        out["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False)
                                             or getattr(model.get_base_model(), "is_gradient_checkpointing", False))
        out["peak_cuda_mb"] = self.peak_mb()
        out["ok"] = out["ok"] and out["gradient_checkpointing"]
        self.release()  # the LoRA-wrapped model is not the plain one the other parts use
        return out

    def part_qlora(self) -> dict[str, Any]:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return {"skipped": "bitsandbytes is not installed"}
        from stllava_med.backbone import apply_lora, load_backbone

        self.release()
        self.peak_reset()
        backbone = load_backbone({"name_or_path": str(self.model_dir()), "name": "check-4bit",
                                  "dtype": "float32" if self.dry else "bfloat16", "quantization": "4bit",
                                  "bnb_compute_dtype": "float32" if self.dry else "bfloat16"}, with_lora=False)
        loaded_mb = self.peak_mb()
        import bitsandbytes as bnb

        quantised = sum(isinstance(m, bnb.nn.Linear4bit) for m in backbone.model.modules())
        model = apply_lora(backbone.model, self.lora_settings(), gradient_checkpointing=not self.dry)
        out = self.lora_steps(model, backbone.processor, steps=3 if self.dry else 4, batch_size=2 if self.dry else 4)
        out.update({"linear4bit_modules": quantised, "peak_cuda_mb_after_load": loaded_mb,
                    "peak_cuda_mb": self.peak_mb()})
        out["ok"] = out["ok"] and quantised > 0
        del model, backbone
        self.release()
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the tiny backbone on the CPU, fp32 (seconds)")
    parser.add_argument("--out", default=str(REPO / "logs" / "device_check.json"))
    parser.add_argument("--work", default=None, help="model and pairs (default: data/device_check or a temp dir)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--dpo-pairs", type=int, default=32, help="pairs per DPO contender (batch 4)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (dry run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    args = parser.parse_args()
    import tempfile

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run, or on a GPU machine", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        args.work = args.work or (tmp if args.dry_run else str(REPO / "data" / "device_check"))
        check = Check(args)
        for part in [p for p in PARTS if p in args.parts.split(",")]:
            started = time.perf_counter()
            try:
                result = getattr(check, f"part_{part}")()
            except Exception as error:  # recorded; the other parts still run
                result = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            result["part_seconds"] = round(time.perf_counter() - started, 1)
            check.record(part, result)
    print(f"\n{'PASSED' if check.figures['passed'] else 'FAILED'}: {args.out} ({check.figures['seconds']:.0f}s)")
    return 0 if check.figures["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
