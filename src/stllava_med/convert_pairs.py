"""Write preference pairs as our JSONL shards, or as TRL's dataset, from foreign formats or from VQA ground truth.

    # TRL's vision preference format (JSON / JSONL / Parquet; embedded image bytes are written to <out>/images)
    python -m stllava_med.convert_pairs trl data.parquet --out data/pairs/rlaif
    # the official STLLaVA-Med DPO JSON (images relative to --image-root); "stllava" is the same format
    python -m stllava_med.convert_pairs official dpo_10k.json --image-root /data/pmc/images --out data/pairs/official
    # real pairs from VQA-RAD ground truth (tests, demo): chosen = the answer, rejected = another answer
    python -m stllava_med.convert_pairs vqa-rad data/vqa_rad_sample --split train --out data/vqa_rad_sample/preference
    # our shards (a file, a folder or a glob) as TRL's vision DPO dataset, for trl.DPOTrainer
    python -m stllava_med.convert_pairs native data/vqa_rad_sample/preference --to trl --out data/pairs/sample_trl

``--to native`` (the default) writes our shards; ``--to trl`` writes JSONL in TRL's conversational vision
preference format (``{"id", "images", "prompt": [user turn with {"type": "image"} + the question],
"chosen": [assistant turn], "rejected": [assistant turn]}``), which ``datasets.load_dataset("json",
data_files=...)`` loads and ``trl.DPOTrainer`` trains on as it is.

Image paths in the written files are absolute, except with ``--relative-images`` (native only: relative to the
output directory, so the folder can be moved with its images). Bad pairs stop the conversion with an error
naming the file, record and field, unless ``--on-bad-pair skip`` (then they are counted in
``conversion_report.json``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from stllava_med.data.pairs.sources import PAIR_SUFFIXES
from stllava_med.data.preference import (
    BAD_PAIR_POLICIES,
    PreferencePair,
    SkipReport,
    convert_records,
    pair_to_trl,
    relative_images,
    resolve_shards,
    vqa_ground_truth_pairs,
    write_shards,
)
from stllava_med.data.vqa import load_vqa_rad
from stllava_med.utils.io import atomic_write_json

log = logging.getLogger("stllava_med.convert_pairs")


OUTPUT_FORMATS = ("native", "trl")


def build_vqa_rad_pairs(root: Path, split: str, out: Path, *, seed: int = 0, relative: bool = True,
                        shard_size: int = 10000, prefix: str | None = None,
                        to: str = "native") -> tuple[list[Path], dict]:
    """Ground-truth pairs from VQA-RAD in the MEVF split files (the bundled sample's format)."""
    records, load_report = load_vqa_rad(root, split)
    pairs = vqa_ground_truth_pairs(records, seed=seed, source=f"{root.name}/{split}/ground_truth",
                                   id_prefix=f"vqa_rad-{split}")
    if to == "trl":
        pairs = [PreferencePair(**{**asdict(p), "images": [str(Path(i).resolve()) for i in p.images]}) for p in pairs]
        shards = write_shards(pairs, out, shard_size=shard_size, prefix=prefix or split, to_row=pair_to_trl)
    else:
        stream = relative_images(pairs, out) if relative else iter(pairs)
        shards = write_shards(stream, out, shard_size=shard_size, prefix=prefix or split)
    report = {"format": "vqa-rad", "to": to, "source": str(root), "split": split, "read": load_report.read,
              "kept": len(pairs), "skipped": {"no_differing_answer": load_report.kept - len(pairs)},
              "shards": [s.name for s in shards]}
    return shards, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stllava_med.convert_pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["trl", "official", "stllava", "native", "vqa-rad"], help="input format")
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="input files, folders or globs (vqa-rad: the dataset folder)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the JSONL shards")
    parser.add_argument("--to", choices=OUTPUT_FORMATS, default="native",
                        help="output format: our shards (native) or TRL's vision preference dataset (trl)")
    parser.add_argument("--image-root", type=Path, default=None, help="folder that relative image paths refer to")
    parser.add_argument("--on-bad-pair", choices=BAD_PAIR_POLICIES, default="error")
    parser.add_argument("--shard-size", type=int, default=10000, help="pairs per shard")
    parser.add_argument("--prefix", default=None, help="shard file prefix (default: pairs, or the split)")
    parser.add_argument("--relative-images", action="store_true",
                        help="store image paths relative to --out (native output only)")
    parser.add_argument("--split", default="train", help="vqa-rad: train or test")
    parser.add_argument("--seed", type=int, default=0, help="vqa-rad: seed of the rejected-answer choice")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.to == "trl" and args.relative_images:
        parser.error("--relative-images is for native shards: TRL resolves image paths against nothing, so "
                     "--to trl writes them absolute")

    if args.format == "vqa-rad":
        if len(args.inputs) != 1:
            parser.error("vqa-rad takes one dataset folder")
        shards, report = build_vqa_rad_pairs(args.inputs[0], args.split, args.out, seed=args.seed,
                                             relative=True, shard_size=args.shard_size, prefix=args.prefix,
                                             to=args.to)
    else:
        report_obj = SkipReport()
        images_dir = args.out / "images"
        try:
            files = resolve_shards([str(p) for p in args.inputs], suffixes=PAIR_SUFFIXES)
        except FileNotFoundError as err:
            parser.error(str(err).replace("data.path: ", ""))

        def pairs():
            for path in files:
                yield from convert_records(path, args.format, image_root=args.image_root, images_dir=images_dir,
                                           on_bad_pair=args.on_bad_pair, report=report_obj)

        progress = tqdm(pairs(), desc="convert", unit="pair", mininterval=2.0)
        if args.to == "trl":
            shards = write_shards(progress, args.out, shard_size=args.shard_size, prefix=args.prefix or "pairs",
                                  to_row=pair_to_trl)
        else:
            stream = relative_images(progress, args.out) if args.relative_images else progress
            shards = write_shards(stream, args.out, shard_size=args.shard_size, prefix=args.prefix or "pairs")
        report = {"format": args.format, "to": args.to, "inputs": [str(p) for p in files], **report_obj.to_json(),
                  "shards": [s.name for s in shards]}
    atomic_write_json(args.out / "conversion_report.json", report)
    print(f"wrote {report['kept']} pairs in {len(shards)} shard(s) to {args.out}"
          + (f" ({args.to} format)" if args.to != "native" else "")
          + (f"; skipped {report['skipped']}" if report.get("skipped") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
