"""K sampled answers per question with long answers (64-256 tokens), four ways, same run, rounds interleaved:

* ``shared prefix + drop finished`` — the generation stage's path: each prompt and image encoded once, the KV cache
  repeated K times, all rows decoded together by :func:`stllava_med.shared_decoding.decode_shared`, which drops a
  row from the cache once it has ended (:func:`stllava_med.generation.sample_sequences`, ``drop_finished=True``);
* ``shared prefix + generate loop`` — the same shared prefill, then ``generate``'s own sampling loop (every row runs
  until the longest ends; ``drop_finished=False``: the path before, and the reference the fast path is tested
  against);
* ``num_return_sequences`` — one ``generate(num_return_sequences=K)`` call (the image and prompt encoded K times);
* ``K separate calls`` — K ``generate`` calls per batch.

    python benchmarks/bench_sampling.py [--images 8] [--questions 2] [--k 2 4] [--min-tokens 64] [--max-tokens 256]

The model is a tiny LLaVA with the paper's input shape: 336 px images, patch 14 → 576 image tokens, the LLaVA-1.5
projector (2-layer MLP, GELU), the ``llava_v1`` system text the stage samples answers under, small hidden sizes
(CPU), random weights built from a seed into ``data/backbones/bench-sampling-336``. A random-weight model rarely
samples its EOS, so answers end the way self-generated ones do only with help: every ``--stop-every``-th token id
also ends an answer (as an extra EOS id in the generation config, the same for every mode), after at least
``--min-tokens`` and at most ``--max-tokens`` new tokens; the script prints the answer lengths it got.
The first three modes sample the same answers for the same seed (checked every round); ``K separate calls``
samples others of the same distribution. Prints answers/s per mode and ratios against the peers of the same
round (median over rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from stllava_med.backbone import load_backbone  # noqa: E402
from stllava_med.chat import ChatFormat, prompt_text, vqa_turns  # noqa: E402
from stllava_med.data.vqa import load_image, load_vqa_rad  # noqa: E402
from stllava_med.generation import generate_batch, sample_sequences  # noqa: E402
from stllava_med.shared_decoding import LAST_CALL  # noqa: E402
from stllava_med.tiny import TinySpec, ensure_tiny_backbone  # noqa: E402

MODES = ("shared prefix + drop finished", "shared prefix + generate loop", "num_return_sequences", "K separate calls")
SAMPLING = {"temperature": 1.2, "top_k": 100, "top_p": 0.95}  # the stage's answer sampling


def build(spec_name: str) -> Path:
    corpus = [str(REPO / "data" / "vqa_rad_sample" / f) for f in ("trainset.json", "testset.json")]
    if spec_name == "default":
        return ensure_tiny_backbone(REPO / "data" / "backbones" / "tiny", TinySpec(corpus=corpus))
    spec = TinySpec(image_size=336, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4,
                    text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=512,
                    max_positions=1024, corpus=corpus)
    return ensure_tiny_backbone(REPO / "data" / "backbones" / "bench-sampling-336", spec)


def run(mode: str, backbone, prompts, images, k: int, args, seed: int) -> tuple[float, list[str]]:
    torch.manual_seed(seed)
    sampling = {**SAMPLING, "min_new_tokens": args.min_tokens}
    started = time.perf_counter()
    texts: list[str] = []
    lengths: list[int] = []  # new tokens per answer (EOS included), from the fast path's record
    for start in range(0, len(prompts), args.batch):
        chunk, chunk_images = prompts[start:start + args.batch], images[start:start + args.batch]
        if mode.startswith("shared prefix"):
            texts += sample_sequences(backbone, chunk, chunk_images, k=k, max_new_tokens=args.max_tokens,
                                      shared_prefix=True, drop_finished=mode == MODES[0], **sampling)
            lengths += LAST_CALL.get("new_tokens", []) if mode == MODES[0] else []
        elif mode == "num_return_sequences":
            texts += generate_batch(backbone, chunk, chunk_images, max_new_tokens=args.max_tokens, do_sample=True,
                                    num_return_sequences=k, **sampling)
        else:
            for _ in range(k):
                texts += generate_batch(backbone, chunk, chunk_images, max_new_tokens=args.max_tokens,
                                        do_sample=True, **sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert len(texts) == len(prompts) * k
    return time.perf_counter() - started, texts, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--questions", type=int, default=2, help="questions per image")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--stop-every", type=int, default=64, help="every N-th token id also ends an answer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=8, help="questions per call (the stage's answer_batch_size)")
    parser.add_argument("--spec", choices=["paper336", "default"], default="paper336")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="1: steadiest on a shared machine")
    args = parser.parse_args()
    modes = [m for m in MODES if m in args.modes.split(",")]
    torch.set_num_threads(args.threads)
    path = build(args.spec)
    backbone = load_backbone({"name_or_path": str(path), "name": path.name})
    backbone.model.to(args.device)
    tokenizer = backbone.processor.tokenizer
    special = set(tokenizer.all_special_ids)
    stops = [tokenizer.eos_token_id] + [i for i in range(0, len(tokenizer), args.stop_every) if i not in special]
    backbone.model.generation_config.eos_token_id = stops
    fmt = ChatFormat(system_prompt="llava_v1")
    records, _ = load_vqa_rad(REPO / "data" / "vqa_rad_sample", "train")
    per_image: dict[str, list] = {}
    for record in records:
        questions = per_image.setdefault(record.image, [])
        if len(questions) < args.questions:
            questions.append(record)
    chosen = [r for image in list(per_image)[: args.images] for r in per_image[image]]
    prompts = [prompt_text(backbone.processor, vqa_turns(r.question), "assistant", fmt) for r in chosen]
    images = [load_image(r.image) for r in chosen]
    vision = backbone.model.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    prompt_lengths = [len(tokenizer(p).input_ids) for p in prompts]

    seconds: dict[tuple[int, str], list[float]] = {}
    lengths: list[int] = []
    for round_index in range(args.warmup + args.rounds):
        timed = round_index >= args.warmup
        for k in args.k:
            reference = None
            for mode in modes if round_index % 2 == 0 else modes[::-1]:  # alternate the order across rounds
                elapsed, texts, calls_lengths = run(mode, backbone, prompts, images, k, args,
                                                    seed=1000 * round_index + k)
                if mode != "K separate calls":
                    if reference is not None and texts != reference:
                        raise SystemExit(f"round {round_index}, K={k}: {mode} sampled other answers than its peers")
                    reference = texts
                    if k == args.k[0] and mode == modes[0]:
                        lengths += calls_lengths
                if timed:
                    seconds.setdefault((k, mode), []).append(elapsed)
        if timed:
            line = ", ".join(f"K={k} {m}: {seconds[k, m][-1]:.1f}s" for k in args.k for m in modes)
            print(f"  round {round_index - args.warmup + 1}: {line}", flush=True)

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lengths.sort()
    print(f"\nK answers per question: {len(prompts)} questions ({args.images} images x {args.questions}), "
          f"batches of {args.batch} questions, {path.name} ({image_tokens} image tokens, prompt text "
          f"{min(prompt_lengths)}-{max(prompt_lengths)} tokens with the llava_v1 system text), answers "
          f"{lengths[0]}-{lengths[-1]} tokens (median {statistics.median(lengths):.0f}, EOS included), "
          f"{device}, {torch.get_num_threads()} threads, {args.rounds} timed rounds after {args.warmup} warm-up, "
          f"medians of per-round ratios\n")
    print("| K | " + " | ".join(f"{m}: answers/s" for m in modes)
          + "".join(f" | drop finished vs {m}" for m in modes[1:]) + " |")
    print("|---:|" + "---:|" * (2 * len(modes) - 1))
    for k in args.k:
        rate = {m: statistics.median(len(prompts) * k / s for s in seconds[k, m]) for m in modes}
        per_round = [[b / a for a, b in zip(seconds[k, modes[0]], seconds[k, m])] for m in modes[1:]]
        print(f"| {k} | " + " | ".join(f"{rate[m]:.2f}" for m in modes)
              + "".join(f" | {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in per_round) + " |")
    print("\n(ratios: median over rounds, the rounds' range in brackets)")


if __name__ == "__main__":
    main()
