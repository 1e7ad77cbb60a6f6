"""Run every benchmark in this folder, one after another, printing their figures (make bench).

Each script measures this project against a peer in the same run and prints a table; see README
"Benchmarks" for the figures recorded on the project's machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ("DPO step vs TRL DPOTrainer (train_dpo's defaults: 2 workers, vision cache)",
     ["bench_dpo_vs_trl.py", "--pairs", "128", "--repeats", "3", "--count-flops"]),
    ("DPO sweep (beta x fraction) vs TRL, shared caches",
     ["bench_sweep.py", "--pairs", "128", "--repeats", "2", "--count-flops"]),
    ("judge throughput vs the ideal", ["bench_judge.py"]),
    ("K answers: shared prefix vs num_return_sequences vs K calls", ["bench_generate.py"]),
    ("DPO vs TRL at the paper's shape (576 image tokens, 100-400-token answers) beside the bench shape",
     ["bench_dpo_vs_trl.py", "--shape", "bench", "paper_tiny", "--pairs", "32", "--repeats", "2",
      "--ours", "adapter_off:on:vision,adapter_off:off", "--count-flops"]),
    ("K answers of 64-256 tokens: fast shared-prefix decoding vs generate's loop, num_return_sequences, K calls",
     ["bench_sampling.py"]),
]


def main() -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    failed = []
    for title, args in SCRIPTS:
        print(f"\n=== {title}: python benchmarks/{' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], env=env).returncode:
            failed.append(args[0])
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
