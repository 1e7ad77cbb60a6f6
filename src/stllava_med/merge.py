"""Merge a LoRA adapter into its full-precision base and save a standalone HF model + processor.

    python -m stllava_med.merge base=llava-hf/llava-1.5-7b-hf adapter=<run dir>/adapter out=<dir> [dtype=bfloat16]

QLoRA runs cannot merge into their 4-bit base; they save the adapter, and this command merges it into the
bf16 weights on a machine that has them. The result loads with AutoModelForImageTextToText / AutoProcessor
(and vLLM).
"""

from __future__ import annotations

import sys
from pathlib import Path


def merge_adapter(base: str, adapter: str, out: str | Path, *, dtype: str = "bfloat16") -> Path:
    from peft import PeftModel

    from stllava_med.backbone import export_merged, load_model, load_processor

    model = load_model(base, dtype=dtype, attn_implementation=None)
    model = PeftModel.from_pretrained(model, adapter)
    processor = load_processor(adapter if (Path(adapter) / "processor_config.json").is_file() else base)
    return export_merged(model, processor, out)


USAGE = "usage: python -m stllava_med.merge base=<model> adapter=<dir> out=<dir> [dtype=bfloat16]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\n\n{(__doc__ or '').strip()}")
        return 0
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    missing = [k for k in ("base", "adapter", "out") if k not in args]
    if missing:
        print(f"merge: missing {missing}; {USAGE}  (--help for more)", file=sys.stderr)
        return 2
    path = merge_adapter(args["base"], args["adapter"], args["out"], dtype=args.get("dtype", "bfloat16"))
    print(f"merged model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
