"""Sharded generation and evaluation (utils/sharding.py): two shards as two parallel processes write the same
candidates (byte for byte) and the same predictions and metrics as one process; a shard killed mid-batch
resumes alone and the merge follows; shards that do not belong together are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, compose

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src"),
       "OMP_NUM_THREADS": "1"}
for _key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID"):
    ENV.pop(_key, None)

FAST = ["generate.describe_max_new_tokens=6", "generate.question.max_new_tokens=8",
        "generate.answer.max_new_tokens=6", "generate.progress=false", "print_summary=false", "num_threads=1"]
DATASET = [*FAST, "generate.question_source=dataset", "generate.questions_per_image=2", "generate.max_images=6",
           "generate.image_batch_size=2", "generate.shard_size=3"]  # 3 batches: shard 0 runs 0 and 2, shard 1 runs 1
SELF = [*FAST, "generate.question_source=self", "generate.questions_per_image=2", "generate.max_images=4",
        "generate.image_batch_size=1", "generate.shard_size=4"]
EVAL = ["data.sets.vqa_rad_sample.limit=40", "eval.batch_size=8", "eval.max_new_tokens=8", "eval.progress=false",
        "print_table=false", "num_threads=1"]  # 5 batches of 8

# The real entry point, SIGKILLed right after its n-th candidate line is written (mid-batch: the image's
# progress line never comes), as when a node dies.
_KILLED = """
import json, os, signal, sys
from stllava_med.selftrain import generate as g
written, limit, original = [0], int(os.environ["KILL_AFTER_CANDIDATES"]), g.ShardWriter.write
def write(self, record):
    original(self, record)
    written[0] += 1
    if written[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
g.ShardWriter.write = write
sys.argv = ["generate", *json.loads(sys.argv[1])]
from stllava_med.generate import main
main()
"""


def start(stage: str, overrides: list[str], kill_after: int | None = None) -> subprocess.Popen:
    if kill_after is None:
        command = [sys.executable, "-m", f"stllava_med.{stage}", *overrides]
        env = ENV
    else:
        command = [sys.executable, "-c", _KILLED, json.dumps(overrides)]
        env = {**ENV, "KILL_AFTER_CANDIDATES": str(kill_after)}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{err[-4000:]}"
    return out + err


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.jsonl"))}


def progress_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "progress.jsonl").read_text().splitlines()]


def shards(stage: str, base: list[str], out: Path, n: int = 2) -> list[str]:
    section = "generate" if stage == "generate" else "eval"
    return [*base, f"out_dir={out}", f"{section}.num_shards={n}"]


@pytest.fixture(scope="module")
def dataset_runs(tmp_path_factory, tiny_backbone_path):
    """Dataset-mode generation: one process and two parallel shards, all three at once."""
    root = tmp_path_factory.mktemp("gen_dataset")
    single, sharded = root / "single", root / "sharded"
    procs = [start("generate", [*DATASET, f"out_dir={single}"]),
             *(start("generate", [*shards("generate", DATASET, sharded), f"generate.shard_index={i}"]) for i in (0, 1))]
    for proc in procs:
        finish(proc)
    return single, sharded


def test_shard_keys_leave_the_run_directory_alone_and_default_from_the_launcher(monkeypatch):
    from stllava_med.utils.config import config_fingerprint
    from stllava_med.utils.sharding import resolve_shard

    for stage, section in (("generate", "generate"), ("evaluate", "eval")):
        plain = config_fingerprint(compose(stage, []))
        assert config_fingerprint(compose(stage, [f"{section}.num_shards=8", f"{section}.shard_index=3"])) == plain
        assert config_fingerprint(compose(stage, [f"{section}.merge_only=true"])) == plain
        assert config_fingerprint(compose(stage, [f"{section}.num_shards=null", f"{section}.shard_index=null"])) == plain
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_shard(None, None, "generate") == (0, 1)
    assert resolve_shard(2, 4, "generate") == (2, 4)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "6")
    assert resolve_shard(None, None, "eval") == (5, 6)
    monkeypatch.setenv("RANK", "1")  # torchrun's variables win over SLURM's
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_shard(None, None, "eval") == (1, 3)
    with pytest.raises(ValueError, match=r"generate.shard_index must be in \[0, 2\)"):
        resolve_shard(2, 2, "generate")


def test_dataset_mode_two_parallel_shards_write_what_one_process_writes(dataset_runs):
    from stllava_med.generate import run_generate
    from stllava_med.selftrain.records import load_candidates

    single, sharded = dataset_runs
    expected = files(single / "candidates")
    assert len(expected) >= 2  # shard_size=3 splits the output: the merge must split it the same way
    assert files(sharded / "candidates") == expected
    assert progress_rows(sharded) == progress_rows(single)
    for i in (0, 1):  # each shard wrote only its own batches, under its own folder
        own = json.loads((sharded / "shards" / f"shard-0000{i}-of-00002" / "summary.json").read_text())
        assert own["images"] == (4 if i == 0 else 2) and own["complete"]
    merged, one = (json.loads((run / "summary.json").read_text()) for run in (sharded, single))
    assert merged["merged"] is True and sorted(merged["shards"]) == ["0", "1"]
    for key in ("images", "images_done", "questions", "candidates", "answers", "complete"):
        assert merged[key] == one[key]
    assert [c.id for c in load_candidates(sharded)] == [c.id for c in load_candidates(single)]

    # an explicit merge, without a model, rebuilds the same files
    shutil.rmtree(sharded / "candidates")
    (sharded / "progress.jsonl").unlink()
    again = run_generate(compose("generate", [*DATASET, f"out_dir={sharded}", "generate.merge_only=true"]), sharded)
    assert again["merged"] is True and files(sharded / "candidates") == expected


def test_shards_that_do_not_belong_together_are_refused(dataset_runs, tmp_path):
    from stllava_med.generate import run_generate
    from stllava_med.pipeline import run_pipeline
    from stllava_med.utils.sharding import ShardingError

    single, sharded = dataset_runs
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}

    def run(overrides: list[str], out: Path) -> None:
        run_generate(compose("generate", [*DATASET, f"out_dir={out}", *overrides]), out)

    with pytest.raises(ShardingError, match=r"started with generate.num_shards=2.*num_shards=3"):
        run(["generate.num_shards=3", "generate.shard_index=0"], copy)
    with pytest.raises(ShardingError, match=r"started with generate.num_shards=2.*num_shards=1"):
        run([], copy)  # one process in a sharded directory
    with pytest.raises(ShardingError, match="another config"):
        run(["generate.num_shards=2", "generate.shard_index=1", "generate.answers_per_question=3"], copy)
    with pytest.raises(ShardingError, match="single-process run"):
        run(["generate.num_shards=2", "generate.shard_index=0"], single)
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # nothing was touched
    assert not (single / "shards").exists()
    with pytest.raises(ValueError, match="the pipeline runs generate in one process"):
        run_pipeline(compose("pipeline", ["experiment=smoke", "stages.generate.generate.num_shards=2",
                                          f"out_dir={tmp_path / 'pipe'}"]))


def test_self_mode_a_killed_shard_resumes_alone_and_the_merge_follows(tmp_path, tiny_backbone_path):
    from stllava_med.generate import run_generate
    from stllava_med.selftrain.records import load_candidates

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    one = start("generate", [*SELF, f"out_dir={single}"])
    first = start("generate", [*shards("generate", SELF, sharded), "generate.shard_index=0"])
    # shard 1 runs batches 1 and 3: killed after the first candidate line of batch 3's image
    killed = start("generate", [*shards("generate", SELF, sharded), "generate.shard_index=1"], kill_after=3)
    finish(killed, expect=-signal.SIGKILL)
    finish(first)
    finish(one)
    assert not (sharded / "candidates").exists() and not (sharded / "summary.json").exists()  # nothing merged
    shard0, shard1 = (sharded / "shards" / f"shard-0000{i}-of-00002" for i in (0, 1))
    assert (shard0 / "shard_done.json").is_file() and not (shard1 / "shard_done.json").is_file()
    assert len((shard1 / "progress.jsonl").read_text().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="not merged yet"):  # the judge does not read half a run
        load_candidates(sharded)
    with pytest.raises(RuntimeError, match=r"shards \[1\] of 2 have not finished"):
        run_generate(compose("generate", [*SELF, f"out_dir={sharded}", "generate.merge_only=true"]), sharded)
    untouched = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in shard0.rglob("*") if p.is_file()}

    finish(start("generate", [*shards("generate", SELF, sharded), "generate.shard_index=1"]))  # shard 1 alone
    resumed = json.loads((shard1 / "summary.json").read_text())
    assert resumed["this_run"]["images"] == 1 and resumed["this_run"]["discarded_partial_candidates"] >= 1
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in shard0.rglob("*") if p.is_file()} == untouched
    assert json.loads((sharded / "summary.json").read_text())["merged"] is True
    assert files(sharded / "candidates") == files(single / "candidates")
    assert progress_rows(sharded) == progress_rows(single)
    rows = [json.loads(line) for f in sorted((single / "candidates").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len({r["image_sha256"] for r in rows}) == 4 and all(r["question_source"] == "self" for r in rows)


def test_evaluation_two_parallel_shards_give_one_process_predictions_and_metrics(tmp_path, tiny_backbone_path):
    from stllava_med.eval.vqa import METRIC_KEYS
    from stllava_med.evaluate import run_evaluate
    from stllava_med.utils.sharding import ShardingError

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    procs = [start("evaluate", [*EVAL, f"out_dir={single}"]),
             *(start("evaluate", [*shards("evaluate", EVAL, sharded), f"eval.shard_index={i}"]) for i in (0, 1))]
    for proc in procs:
        finish(proc)

    def predictions(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "vqa_rad_sample" / "predictions.jsonl").read_text().splitlines()]

    assert len(predictions(single)) == 40 and predictions(sharded) == predictions(single)
    for i, n in ((0, 24), (1, 16)):  # batches 0, 2, 4 and 1, 3
        own = sharded / "shards" / f"shard-0000{i}-of-00002" / "vqa_rad_sample" / "predictions.jsonl"
        assert len(own.read_text().splitlines()) == n
    keys = (*METRIC_KEYS, "n_open", "n_closed", "n_questions", "n_scored")
    one = json.loads((single / "metrics.json").read_text())["vqa_rad_sample"]
    merged = json.loads((sharded / "metrics.json").read_text())["vqa_rad_sample"]
    assert {k: merged[k] for k in keys} == {k: one[k] for k in keys}
    assert merged["num_shards"] == 2 and merged["generated"] == 40
    assert (sharded / "table.md").read_text() == (single / "table.md").read_text()

    again = run_evaluate(compose("evaluate", [*EVAL, f"out_dir={sharded}", "eval.merge_only=true"]), sharded)
    assert {k: again["vqa_rad_sample"][k] for k in keys} == {k: one[k] for k in keys}
    with pytest.raises(ShardingError, match=r"started with eval.num_shards=2.*num_shards=4"):
        run_evaluate(compose("evaluate", [*shards("evaluate", EVAL, sharded, n=4), "eval.shard_index=0"]), sharded)
    with pytest.raises(ShardingError, match="single-process run"):
        run_evaluate(compose("evaluate", [*shards("evaluate", EVAL, single), "eval.shard_index=1"]), single)
