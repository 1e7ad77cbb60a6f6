"""K sampled answers per question, three ways:

* ``shared prefix`` — what the generation stage does: each prompt and image encoded once, K samples decoded
  from a repeated KV cache (:func:`stllava_med.generation.sample_sequences`);
* ``num_return_sequences`` — one ``generate(num_return_sequences=K)`` call (HF repeats the inputs, so the
  vision tower and prefill run K times, but decoding is batched);
* ``K separate calls`` — K ``generate`` calls per batch.

    python benchmarks/bench_generate.py [--images 8] [--questions 2] [--k 2 4] [--tokens 16] [--device cpu]

Same backbone, prompts, images, sampling settings and answer length in every mode (``min_new_tokens`` =
``max_new_tokens``, so no mode gains from earlier stops). The backbone is a tiny LLaVA with CLIP-224 inputs
(256 image tokens per image) built from a seed into ``data/backbones/bench-224``; ``--spec default`` uses the
project's 64-image-token tiny backbone. Each timing is the best of ``--repeats``. Prints images/s per mode.
"""

from __future__ import annotations

import argparse
import os
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
from stllava_med.tiny import TinySpec, ensure_tiny_backbone  # noqa: E402

MODES = ("shared prefix", "num_return_sequences", "K separate calls")


def build(spec_name: str) -> Path:
    corpus = [str(REPO / "data" / "vqa_rad_sample" / f) for f in ("trainset.json", "testset.json")]
    if spec_name == "default":
        return ensure_tiny_backbone(REPO / "data" / "backbones" / "tiny", TinySpec(corpus=corpus))
    spec = TinySpec(image_size=224, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4,
                    text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=512,
                    corpus=corpus)
    return ensure_tiny_backbone(REPO / "data" / "backbones" / "bench-224", spec)


def run(mode: str, backbone, prompts, images, k: int, tokens: int, batch: int, seed: int) -> float:
    torch.manual_seed(seed)
    sampling = {"temperature": 1.2, "top_k": 100, "top_p": 0.95, "min_new_tokens": tokens}
    started = time.perf_counter()
    produced = 0
    for start in range(0, len(prompts), batch):
        chunk, chunk_images = prompts[start:start + batch], images[start:start + batch]
        if mode == "shared prefix":
            produced += len(sample_sequences(backbone, chunk, chunk_images, k=k, max_new_tokens=tokens,
                                             shared_prefix=True, **sampling))
        elif mode == "num_return_sequences":
            produced += len(generate_batch(backbone, chunk, chunk_images, max_new_tokens=tokens, do_sample=True,
                                           num_return_sequences=k, **sampling))
        else:
            for _ in range(k):
                produced += len(generate_batch(backbone, chunk, chunk_images, max_new_tokens=tokens, do_sample=True,
                                               **sampling))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert produced == len(prompts) * k
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--questions", type=int, default=2, help="questions per image")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=16, help="answer length (new tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-warmup", type=int, default=6, help="at most this many untimed rounds")
    parser.add_argument("--batch", type=int, default=8, help="questions per generate call")
    parser.add_argument("--spec", choices=["bench224", "default"], default="bench224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = build(args.spec)
    backbone = load_backbone({"name_or_path": str(path), "name": path.name})
    backbone.model.to(args.device)
    fmt = ChatFormat()
    records, _ = load_vqa_rad(REPO / "data" / "vqa_rad_sample", "train")
    per_image: dict[str, list] = {}
    for record in records:
        questions = per_image.setdefault(record.image, [])
        if len(questions) < args.questions:
            questions.append(record)
    chosen = [r for image in list(per_image)[: args.images] for r in per_image[image]]
    prompts = [prompt_text(backbone.processor, vqa_turns(r.question), "assistant", fmt) for r in chosen]
    images = [load_image(r.image) for r in chosen]
    image_tokens = (backbone.model.config.vision_config.image_size // backbone.model.config.vision_config.patch_size) ** 2
    # On CPU the first passes over a set of tensor shapes are many times slower (oneDNN kernel selection,
    # allocator growth): untimed warm-up rounds over the exact shapes until a round's time settles, then the
    # timed rounds, modes interleaved, best of --repeats.
    def full_round(seed: int) -> dict[tuple[int, str], float]:
        return {(k, mode): run(mode, backbone, prompts, images, k, args.tokens, args.batch, seed)
                for k in args.k for mode in MODES}

    previous = float("inf")
    for warm in range(args.max_warmup):
        total = sum(full_round(100 + warm).values())
        if total > 0.8 * previous:
            break
        previous = total
    seconds: dict[tuple[int, str], float] = {}
    for round_index in range(args.repeats):
        for key, elapsed in full_round(round_index).items():
            seconds[key] = min(seconds.get(key, float("inf")), elapsed)
    print(f"\nK answers per question: {args.images} images x {args.questions} questions, {args.tokens} new tokens "
          f"per answer, batches of {args.batch} questions, {path.name} ({image_tokens} image tokens), "
          f"device {args.device}, {torch.get_num_threads()} threads, best of {args.repeats} after warm-up\n")
    print("| K | " + " | ".join(f"{m}: images/s" for m in MODES) + " | shared prefix vs separate | vs num_return_sequences |")
    print("|---:|" + "---:|" * (len(MODES) + 2))
    for k in args.k:
        rates = {m: args.images / seconds[k, m] for m in MODES}
        print(f"| {k} | " + " | ".join(f"{rates[m]:.2f}" for m in MODES)
              + f" | {rates[MODES[0]] / rates[MODES[2]]:.2f}x | {rates[MODES[0]] / rates[MODES[1]]:.2f}x |")

if __name__ == "__main__":
    main()
