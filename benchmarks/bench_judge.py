"""Judge throughput against a local OpenAI-compatible server with a fixed latency per call.

    python benchmarks/bench_judge.py [--latency 0.1] [--seconds 4]

The server (tests/openai_server.py) runs in its own process and answers every request after ``--latency``
seconds. The whole client path is real: the official ``openai`` client, the judge runner (limiter, retries,
budget bookkeeping) and a SQLite store committing every judgement. For each scenario the ideal throughput is
``min(concurrency / latency, rate limit)``; the target is at least 80% of it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from stllava_med.selftrain.experts.openai_expert import OpenAIExpert  # noqa: E402
from stllava_med.selftrain.judge import JudgeSettings, judge_candidates  # noqa: E402
from stllava_med.selftrain.records import Candidate, candidate_id  # noqa: E402
from stllava_med.utils.io import sha256_file  # noqa: E402


def candidates(n: int, tag: str) -> list[Candidate]:
    images = sorted((REPO / "data" / "vqa_rad_sample" / "images").glob("*.jpg"))[:8]
    hashes = {p: sha256_file(p) for p in images}
    out = []
    for i in range(n):
        image = images[i % len(images)]
        question = f"[{tag}] question {i}: is there an abnormality in this image?"
        out.append(Candidate(id=candidate_id(hashes[image], question), image=str(image), image_sha256=hashes[image],
                             question=question, answers=[f"answer A to {i}", f"answer B to {i}"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--seconds", type=float, default=4.0, help="target duration of each scenario")
    args = parser.parse_args()
    scenarios = [  # (concurrency, requests/min limit or None)
        (4, None),
        (8, None),
        (16, None),
        (32, 3000),
    ]
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "openai_server.py"), "--latency",
                               str(args.latency), "--seconds", "900"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"test server did not start: {line!r}")
        base_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for index, (concurrency, rpm) in enumerate(scenarios):
                ideal = min(concurrency / args.latency, rpm / 60 if rpm else float("inf"))
                n = max(20, int(ideal * args.seconds))
                expert = OpenAIExpert(model="bench", api_key="sk-bench-placeholder", base_url=base_url, timeout_s=30)
                # burst_s=0.2: the limiter's initial burst is 0.2 s of the rate, so a short run measures the
                # sustained rate rather than the burst
                settings = JudgeSettings(concurrency=concurrency, requests_per_minute=rpm, burst_s=0.2,
                                         progress=False, price_input_per_mtok=2.5, price_output_per_mtok=10)
                stats, _ = judge_candidates(candidates(n, f"s{index}"), expert, Path(tmp) / f"s{index}.sqlite",
                                            settings)
                assert stats.judged == n and stats.failed == 0, stats.to_json()
                rows.append((concurrency, rpm, ideal, n, stats.seconds, stats.requests_per_s))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    print(f"\nJudge throughput, server latency {args.latency * 1000:.0f} ms per call "
          f"(openai client + runner + SQLite store, one process; server in another)\n")
    print("| concurrency | rate limit (req/min) | ideal req/s | requests | seconds | measured req/s | % of ideal |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    for concurrency, rpm, ideal, n, seconds, rate in rows:
        share = 100 * rate / ideal
        ok &= share >= 80
        print(f"| {concurrency} | {rpm or '-'} | {ideal:.1f} | {n} | {seconds:.2f} | {rate:.1f} | {share:.0f}% |")
    print(f"\ntarget >= 80% of min(concurrency / latency, rate limit): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
