"""A DPO sweep, end to end: the β × fraction grid (β ∈ {0.1, 0.5} × fraction ∈ {0.25, 1.0}, one epoch each) run
with TRL's ``DPOTrainer`` (each job on its own, as a TRL user runs a sweep) and with this project (the jobs
sharing the precomputed reference cache and the vision feature cache on disk, as the jobs of ``-m`` or a
submitit sweep do), every job in its own process, one after the other, from the same LoRA initialisation, on the
shape of ``bench_dpo_vs_trl.py`` (its builders: 224 px images, 256 image tokens, findings-style answers).

    python benchmarks/bench_sweep.py                  # CPU, a few minutes
    python benchmarks/bench_sweep.py --pairs 128 --repeats 2
    python benchmarks/bench_sweep.py --dry-run        # 8 pairs, every job in this process: plumbing only

Printed: the total time of the sweep (each job counted from after its model load, as in bench_dpo_vs_trl.py:
our scan, cache fills and training; TRL's dataset building, trainer set-up and training) and the wall time of the
processes that ran it (start-up and model loads included), pairs/s and peak memory per job (the kernel's RSS
high-water mark above the RSS after the model load, workers included), and the largest per-step loss gap
between each of our jobs and the TRL job of the same β and fraction (same pairs in the same order, same
schedule). With ``--repeats`` > 1 the TRL sweep and ours alternate, and medians are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dpo_vs_trl as base  # noqa: E402  (sets the offline environment and src/ on the path)

GRID = [(beta, fraction) for beta in (0.1, 0.5) for fraction in (0.25, 1.0)]


def subset_pairs(pairs_dir: Path, fraction: float, out: Path) -> Path:
    """The pairs of data.fraction=``fraction`` (the datamodule's selection, in file order), for a TRL job."""
    from stllava_med.data.fraction import in_fraction
    from stllava_med.data.preference import iter_pairs, resolve_image, resolve_shards, write_shards

    kept = []
    for pair, shard, _ in iter_pairs(resolve_shards(pairs_dir)):
        if in_fraction(pair.id, fraction, 0):
            kept.append(dataclasses.replace(pair, images=[str(resolve_image(i, shard)) for i in pair.images]))
    write_shards(kept, out, prefix="bench")
    return out


def run_our_job(args: argparse.Namespace, model_dir: Path, pairs_dir: Path, work: Path, beta: float,
                fraction: float) -> dict[str, Any]:
    """One job of our sweep, as ``train_dpo`` builds it (scan, vision cache, precomputed reference, fit), with the
    scan, reference and vision caches in ``work`` shared by every job."""
    from lightning.pytorch import Callback, Trainer
    from transformers import set_seed

    from stllava_med.backbone import LoraSettings, apply_lora, load_backbone
    from stllava_med.chat import ChatFormat
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
    from stllava_med.dpo.vision_cache import build_cached_vision

    backbone = load_backbone({"name_or_path": str(model_dir), "dtype": args.dtype, "attn_implementation": "sdpa"},
                             with_lora=False)
    set_seed(args.seed)  # as TRL does right before it makes the adapter: the same LoRA initialisation
    backbone.model = apply_lora(backbone.model, LoraSettings.from_config(base.lora_settings("bench")))
    lora_init = base.lora_fingerprint(backbone.model)
    with base.PeakMemory() as memory:
        start = time.perf_counter()
        settings = PreferenceDataSettings(path=str(pairs_dir), val_fraction=0.0, fraction=fraction,
                                          batch_size=args.batch_size, max_length=4096, num_workers=args.workers,
                                          progress=False, scan_cache_dir=str(work / "scan"), seed=args.seed,
                                          shuffle_buffer=1)  # file order, as TRL's sequential sampler
        datamodule = PreferenceDataModule(settings, backbone.processor, ChatFormat())
        datamodule.setup("fit")
        vision = build_cached_vision(work / "vision", backbone.model, datamodule, batch_size=args.batch_size,
                                     progress=False)
        cache = ReferenceCache(work / "reference", data_fingerprint=datamodule.data_fingerprint,
                               reference=reference_fingerprint(str(model_dir), settings={"dtype": args.dtype}),
                               processor=processor_fingerprint(backbone.processor, ChatFormat()),
                               max_length=settings.max_length)
        reference = PrecomputedReference(
            cache, AdapterOffReference(backbone.model), datamodule.digests,
            lambda ids, rank, world: datamodule.reference_batches(ids, rank=rank, world_size=world),
            batch_size=args.batch_size, progress=False)
        module = DPOModule(backbone.model, reference, DPOSettings(beta=beta),
                           {"lr": args.lr, "projector_lr": args.lr, "warmup_ratio": 0.0}, vision_cache=vision)
        losses: list[float] = []

        class Record(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
                losses.append(float(outputs["loss"]))

        trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, precision=base.lightning_precision(args.dtype),
                          logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[Record()])
        with base.flop_counting(args) as flops:
            trainer.fit(module, datamodule=datamodule)
        elapsed = time.perf_counter() - start
    return {"flops": flops.get_total_flops() if flops is not None else None, "seconds": elapsed, "pairs": len(datamodule.train_entries), "losses": losses, "lora_init": lora_init,
            "peak_rss_mb": memory.peak_increase_mb, "vision_computed": vision.computed if vision else None,
            "reference_computed": reference.computed}


def run_trl_job(args: argparse.Namespace, model_dir: Path, pairs_dir: Path, work: Path, beta: float
                ) -> dict[str, Any]:
    job = argparse.Namespace(**{**vars(args), "beta": beta, "shape": "bench", "device": "cpu"})
    result = base.run_trl(job, model_dir, pairs_dir, work)
    return {k: result[k] for k in ("seconds", "pairs", "losses", "lora_init", "peak_rss_mb", "flops")}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work, model_dir, pairs_dir = Path(args.work), Path(args.model_dir), Path(args.pairs_dir)
    if args.contender == "trl":
        result = run_trl_job(args, model_dir, pairs_dir, work, args.beta)
    else:
        result = run_our_job(args, model_dir, pairs_dir, work, args.beta, args.fraction)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, contender: str, work: Path, model_dir: Path, pairs_dir: Path,
          beta: float, fraction: float, count: bool = False) -> tuple[dict[str, Any], float]:
    command = [sys.executable, __file__, "--contender", contender, "--work", str(work), "--model-dir",
               str(model_dir), "--pairs-dir", str(pairs_dir), "--beta", str(beta), "--fraction", str(fraction),
               "--batch-size",
               str(args.batch_size), "--threads", str(args.threads), "--workers", str(args.workers), "--lr",
               str(args.lr), "--seed", str(args.seed), "--dtype", args.dtype] + (["--count-flops"] if count else [])
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{contender} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):]), wall


def sweep_round(args: argparse.Namespace, work: Path, model_dir: Path, pairs_dir: Path,
                subsets: dict[float, Path], count: bool = False) -> dict[str, Any]:
    """One TRL sweep and one of ours, each job in its own process, one after the other; our jobs share the scan,
    reference and vision caches of one fresh directory, TRL's jobs share nothing. ``count``: with the FLOP
    counter on (the times are then not measurements)."""
    out: dict[str, Any] = {"trl": [], "ours": [], "trl_wall": 0.0, "ours_wall": 0.0}
    ours_work = work / "ours"
    ours_work.mkdir()
    for who in ("trl", "ours"):
        for index, (beta, fraction) in enumerate(GRID):
            job_work = work / f"trl-{index}" if who == "trl" else ours_work
            job_work.mkdir(exist_ok=True)
            job_pairs = subsets[fraction] if who == "trl" else pairs_dir
            start = time.perf_counter()
            if args.dry_run:  # in this process: the jobs read whether to count from args, for this round only
                job_args = argparse.Namespace(**{**vars(args), "count_flops": count})
                job = (run_trl_job(job_args, model_dir, job_pairs, job_work, beta) if who == "trl"
                       else run_our_job(job_args, model_dir, job_pairs, job_work, beta, fraction))
            else:
                job, _ = spawn(args, who, job_work, model_dir, job_pairs, beta, fraction, count)
            out[f"{who}_wall"] += time.perf_counter() - start
            out[who].append(job)
            extra = ("" if who == "trl" else f" (vision features computed {job['vision_computed']}, reference "
                     f"log-probs {job['reference_computed']})")
            print(f"  {who} β={beta} fraction={fraction}: {job['pairs'] / job['seconds']:.2f} pairs/s, peak "
                  f"+{job['peak_rss_mb']:.0f} MB{extra}", flush=True)
    return out


def report(args: argparse.Namespace, rounds: list[dict[str, Any]], shape: str) -> None:
    import torch  # noqa: F401  (the device line below reads the torch build)

    def total(r: dict[str, Any], who: str) -> float:
        return sum(job["seconds"] for job in r[who])

    def med(values: list[float]) -> float:
        return statistics.median(values)

    first = rounds[0]
    same_init = len({job["lora_init"] for r in rounds for who in ("trl", "ours") for job in r[who]}) == 1
    speedup = med([total(r, "trl") / total(r, "ours") for r in rounds])
    wall_speedup = med([r["trl_wall"] / r["ours_wall"] for r in rounds])
    trl_peak = med([max(job["peak_rss_mb"] for job in r["trl"]) for r in rounds])
    our_peak = med([max(job["peak_rss_mb"] for job in r["ours"]) for r in rounds])
    machine = f"CPU ({os.cpu_count()} cores), {args.threads} torch thread(s)"
    print(f"\nDPO sweep, β × fraction = {GRID}, one epoch each, {args.pairs} pairs, batch {args.batch_size}, "
          f"bench shape ({shape}), {args.dtype}, {machine}, {args.workers} dataloader workers, {len(rounds)} round(s), medians"
          f"{' (DRY RUN: plumbing only, not a measurement)' if args.dry_run else ''}:")
    print(f"identical LoRA initialisation for all jobs: {'yes' if same_init else 'NO'}")
    print("| job (β, fraction) | pairs | TRL pairs/s | ours pairs/s | ours vs TRL | TRL peak MB | ours peak MB "
          "| max step-loss gap |")
    print("|---|---|---|---|---|---|---|---|")
    for index, (beta, fraction) in enumerate(GRID):
        trl_jobs = [r["trl"][index] for r in rounds]
        our_jobs = [r["ours"][index] for r in rounds]
        trl_rate = med([j["pairs"] / j["seconds"] for j in trl_jobs])
        our_rate = med([j["pairs"] / j["seconds"] for j in our_jobs])
        ratio = med([(o["pairs"] / o["seconds"]) / (t["pairs"] / t["seconds"]) for o, t in zip(our_jobs, trl_jobs)])
        gap = max(abs(a - b) for a, b in zip(first["ours"][index]["losses"], first["trl"][index]["losses"]))
        steps = (len(first["ours"][index]["losses"]), len(first["trl"][index]["losses"]))
        print(f"| {beta}, {fraction} | {first['trl'][index]['pairs']} | {trl_rate:.2f} | {our_rate:.2f} | "
              f"{ratio:.2f}x | {med([j['peak_rss_mb'] for j in trl_jobs]):.0f} | "
              f"{med([j['peak_rss_mb'] for j in our_jobs]):.0f} | {gap:.1e}"
              f"{'' if steps[0] == steps[1] else f' (steps {steps[0]} vs {steps[1]})'} |")
    print(f"| **sweep** | {sum(j['pairs'] for j in first['trl'])} | total {med([total(r, 'trl') for r in rounds]):.1f} s "
          f"| total {med([total(r, 'ours') for r in rounds]):.1f} s | **{speedup:.2f}x** | {trl_peak:.0f} (max) | "
          f"{our_peak:.0f} (max) | |")
    print(f"\nSWEEP {speedup:.2f}x TRL's total sweep time ({med([total(r, 'trl') for r in rounds]):.1f} s vs "
          f"{med([total(r, 'ours') for r in rounds]):.1f} s; process wall time incl. start-up and model loads: "
          f"{wall_speedup:.2f}x, {med([r['trl_wall'] for r in rounds]):.1f} s vs "
          f"{med([r['ours_wall'] for r in rounds]):.1f} s) at {our_peak / trl_peak:.2f}x its peak memory "
          f"({our_peak:.0f} vs {trl_peak:.0f} MB); {machine}")


def report_flops(rounds: list[dict[str, Any]], counted: dict[str, Any]) -> None:
    """The counted FLOPs per job and for the sweep, beside the measured time ratios."""
    print("\nArithmetic (one more sweep of each with the FLOP counter: matrix products and attention, forward and "
          "backward, dense; benchmarks/flops.py). TRL's FLOPs / ours is the speed-up the same arithmetic speed would "
          "give; the time ratio against it:\n")
    print("| job (β, fraction) | TRL GFLOP | ours GFLOP | TRL's FLOPs / ours | time ratio (median) | time / FLOP ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for index, (beta, fraction) in enumerate(GRID):
        trl, ours = counted["trl"][index]["flops"], counted["ours"][index]["flops"]
        ratio = statistics.median((r["ours"][index]["pairs"] / r["ours"][index]["seconds"])
                                  / (r["trl"][index]["pairs"] / r["trl"][index]["seconds"]) for r in rounds)
        print(f"| {beta}, {fraction} | {trl / 1e9:.0f} | {ours / 1e9:.0f} | {trl / ours:.2f}x | {ratio:.2f}x | "
              f"{ratio / (trl / ours):.2f} |")
    trl = sum(job["flops"] for job in counted["trl"])
    ours = sum(job["flops"] for job in counted["ours"])
    ratio = statistics.median(sum(j["seconds"] for j in r["trl"]) / sum(j["seconds"] for j in r["ours"]) for r in rounds)
    print(f"| **sweep** | {trl / 1e9:.0f} | {ours / 1e9:.0f} | **{trl / ours:.2f}x** | {ratio:.2f}x | "
          f"{ratio / (trl / ours):.2f} |")
    print(f"\nSWEEP FLOPS TRL's sweep counts {trl / ours:.2f}x our FLOPs; our time ratio is {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds (TRL sweep and ours alternate); medians")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="both contenders' weights and arithmetic; float64 is an exactness run: the step-loss "
                             "gaps without float32 rounding (times are not the float32 ones)")
    parser.add_argument("--dry-run", action="store_true", help="8 pairs, in this process: seconds, plumbing only")
    parser.add_argument("--count-flops", action="store_true",
                        help="after the timed rounds, run both sweeps once more counting their matrix-product and "
                             "attention FLOPs (benchmarks/flops.py) and print the FLOP ratio beside the time ratio")
    parser.add_argument("--contender", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        child(args)
        return
    if args.dry_run:
        import torch

        args.pairs, args.repeats = 8, 1
        torch.set_num_threads(args.threads)

    model_dir = base.bench_backbone("bench")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        from stllava_med.backbone import load_processor

        pairs_dir = base.build_pairs(args.pairs, work / "pairs", load_processor(str(model_dir)).tokenizer)
        subsets = {f: subset_pairs(pairs_dir, f, work / f"pairs-{f}") for f in sorted({f for _, f in GRID})}
        shape = base.shape_summary(model_dir, pairs_dir)
        rounds = []
        for index in range(args.repeats):
            round_work = work / f"round-{index}"
            round_work.mkdir()
            print(f"round {index + 1}:", flush=True)
            rounds.append(sweep_round(args, round_work, model_dir, pairs_dir, subsets))
        counted = None
        if args.count_flops:  # one more sweep of each, counting (its time is not a measurement)
            (work / "flops").mkdir()
            print("counting FLOPs (one more sweep of each):", flush=True)
            counted = sweep_round(args, work / "flops", model_dir, pairs_dir, subsets, count=True)
    report(args, rounds, shape)
    if counted is not None:
        report_flops(rounds, counted)


if __name__ == "__main__":
    main()
