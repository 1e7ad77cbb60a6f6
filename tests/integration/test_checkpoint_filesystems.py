"""Checkpoints on the file-system layouts of a cluster, and on a disk that fills up.

Lightning's own local save goes through an fsspec transaction: a temp file in ``$TMPDIR``, moved onto the
destination at commit — a *copy* when ``$TMPDIR`` (a node-local ``/tmp`` or ``/dev/shm``) and ``out_dir`` (NFS,
Lustre) are different file systems, which a kill can tear, and which fails outright when ``$TMPDIR`` is smaller
than a checkpoint. Our checkpoint IO writes beside the destination, fsyncs and renames.

- A DPO run with a checkpoint every step is SIGKILLed as soon as a temp checkpoint file appears, again and
  again, with ``$TMPDIR`` on a tmpfs smaller than one checkpoint (and ``out_dir`` on disk), and with ``out_dir`` on
  a tmpfs: every rerun resumes from a complete checkpoint, the run finishes, no temp file is left in the run
  directory or in ``$TMPDIR``, and the exported adapter is bit-identical to an uninterrupted run's.
- DPO and SFT with ``out_dir`` on a tmpfs that fills at the third step's checkpoint: the run exits non-zero with
  one line naming the checkpoint and saying the disk is full, leaves no temp file and its last checkpoint
  complete; given space, the same command resumes from it and ends where an uninterrupted run does.

Each tmpfs is private to a process tree (``tests/tmpfs.py``; skipped with the reason where none can be mounted);
``tests/kill_driver.py`` runs the stage processes inside it and copies the run directory out for inspection."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_support import sample_pairs, write_shard
from stllava_med.training.checkpoints import checkpoint_problem
from tmpfs import on_tmpfs, require_tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a dozen tiny training processes

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
SAMPLE_DIR = REPO_ROOT / "data" / "vqa_rad_sample"
STEPS = 8  # 16 pairs / 2 per batch, one epoch: a checkpoint after each step
KILLS = 3


def dpo_overrides(tmp_path: Path, out_dir: Path) -> list[str]:
    shard = tmp_path / "pairs.jsonl"
    if not shard.is_file():
        write_shard(shard, sample_pairs(16, stride=29))
    return [f"data.path={shard}", f"out_dir={out_dir}", "data.batch_size=2", "data.num_workers=0",
            "data.val_fraction=0", "data.progress=false", f"data.scan_cache_dir={tmp_path}/scan",
            f"dpo.reference_cache_dir={tmp_path}/reference", "trainer.enable_progress_bar=false",
            "trainer.max_steps=-1", "trainer.max_epochs=1", "checkpoint.every_n_steps=1", "optim.lr=2e-3",
            "optim.projector_lr=2e-3", "export.merged=false", "logger=none", "num_threads=1", "print_summary=false"]


def sft_overrides(tmp_path: Path, out_dir: Path) -> list[str]:
    return ["logger=none", "trainer.enable_progress_bar=false", "data=vqa_rad_sample_train", "data.fraction=0.25",
            "data.val_fraction=0", "data.batch_size=4", "trainer.max_steps=6", "trainer.max_epochs=-1",
            "checkpoint.every_n_steps=1", "export.merged=false", "optim.lr=5e-3", "num_threads=1",
            "print_summary=false", f"out_dir={out_dir}"]


OVERRIDES = {"dpo": dpo_overrides, "sft": sft_overrides}


def stage_argv(stage: str, overrides: list[str], hydra_dir: Path) -> list[str]:
    return [sys.executable, "-m", f"stllava_med.train_{stage}", *overrides, f"hydra.run.dir={hydra_dir}"]


def drive(tmp_path: Path, plan: list[dict], mount_at: Path, size: str, name: str) -> list[dict]:
    """Run ``plan`` (kill_driver.py) with a ``size`` tmpfs at ``mount_at``; the report."""
    plan_path, report_path = tmp_path / f"{name}-plan.json", tmp_path / f"{name}-report.json"
    plan_path.write_text(json.dumps(plan))
    done = subprocess.run(on_tmpfs([sys.executable, str(TESTS_DIR / "kill_driver.py"), str(plan_path),
                                    str(report_path)], mount_at, size),
                          capture_output=True, text=True, timeout=900, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report_path.read_text())


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def straight_run(tmp_path: Path, stage: str) -> Path:
    """An uninterrupted run on disk: the reference."""
    out_dir = tmp_path / f"{stage}-straight"
    done = subprocess.run(stage_argv(stage, OVERRIDES[stage](tmp_path, out_dir), tmp_path / "hydra" / "straight"),
                          capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir


def assert_same_adapter(expected_dir: Path, actual_dir: Path) -> None:
    expected = load_file(expected_dir / "adapter" / "adapter_model.safetensors")
    actual = load_file(actual_dir / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys() and expected
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def temp_debris(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp"))


def checkpoint_steps(folder: Path) -> dict[str, int]:
    """Every checkpoint file in ``folder``: its global step, after checking it is complete."""
    steps = {}
    for path in sorted(folder.glob("*.ckpt")):
        problem, step = checkpoint_problem(path)
        assert problem is None, (path, problem)
        steps[path.name] = step
    return steps


@pytest.mark.parametrize("layout", ["tmpdir_on_tmpfs", "out_dir_on_tmpfs"])
def test_sigkill_during_checkpoint_writes_never_leaves_a_torn_checkpoint(tmp_path, layout, tiny_backbone_path):
    require_tmpfs()
    straight = straight_run(tmp_path, "dpo")
    size = (straight / "checkpoints" / "last.ckpt").stat().st_size
    mount_at = tmp_path / "tmpfs"
    if layout == "tmpdir_on_tmpfs":
        # smaller than one checkpoint: Lightning's save through $TMPDIR could not even write it there
        tmpfs_size, out_dir, env = f"{size // 2 // 1024}k", tmp_path / "run", {"TMPDIR": str(mount_at)}
    else:
        tmpfs_size, out_dir, env = f"{8 * size // 1024 + 1024}k", mount_at / "run", {}
    argv = stage_argv("dpo", dpo_overrides(tmp_path, out_dir), tmp_path / "hydra" / "killed")
    # process i is killed while the (i + 2)-th temp checkpoint file it writes exists: after a whole checkpoint
    # (progress), mid-write of the next (a step file or last.ckpt)
    plan = [{"op": "run", "argv": argv, "env": env, "kill_on": str(out_dir / "checkpoints"), "kill_at": i + 2,
             "log": str(tmp_path / f"kill-{i}")} for i in range(KILLS)]
    plan += [{"op": "run", "argv": argv, "env": env, "log": str(tmp_path / "final")},
             {"op": "copy", "src": str(out_dir), "dst": str(tmp_path / "saved")},
             {"op": "copy", "src": str(mount_at), "dst": str(tmp_path / "tmpfs-after")}]
    report = drive(tmp_path, plan, mount_at, tmpfs_size, layout)
    runs = [r for r in report if r["op"] == "run"]

    for i, killed in enumerate(runs[:KILLS]):
        # each process was killed while a temp checkpoint file existed (before its run could end)
        assert killed["killed"] and killed["rc"] == -signal.SIGKILL, killed["stderr"][-2000:]
        assert killed["seen"] and all(n.startswith(".") and n.endswith(".tmp") for n in killed["seen"])
        assert "PytorchStreamReader" not in killed["stderr"] and "Traceback" not in killed["stderr"], i
        if i:  # every rerun went on from a complete checkpoint of the one before
            assert "resuming from" in killed["stderr"] + killed["stdout"], killed["stderr"][-2000:]
    final = runs[-1]
    assert final["rc"] == 0, final["stderr"][-3000:]
    assert "resuming from" in final["stderr"] + final["stdout"]

    saved = tmp_path / "saved"
    assert temp_debris(saved) == []
    assert json.loads((saved / "metrics.json").read_text())["global_step"] == STEPS
    steps = checkpoint_steps(saved / "checkpoints")
    assert steps["last.ckpt"] == STEPS and steps[f"step{STEPS:07d}.ckpt"] == STEPS
    assert_same_adapter(straight, saved)
    if layout == "tmpdir_on_tmpfs":  # nothing went through $TMPDIR
        assert sorted(p.name for p in (tmp_path / "tmpfs-after").rglob("*") if p.is_file()) == []


@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_a_full_disk_stops_training_naming_the_checkpoint_and_keeps_the_last_good_one(tmp_path, stage,
                                                                                      tiny_backbone_path):
    require_tmpfs()
    straight = straight_run(tmp_path, stage)
    ckpt = (straight / "checkpoints" / "last.ckpt").stat().st_size
    mount_at = tmp_path / "tmpfs"
    out_dir = mount_at / "run"
    # steady state after step 2: last, last.prev and the newest step file; step 3's step file (a fourth) does
    # not fit (the run directory's small files take a page each)
    pages = math.ceil(ckpt / 4096)
    tmpfs_size = f"{4 * (3 * pages + pages // 2 + 40)}k"
    argv = stage_argv(stage, OVERRIDES[stage](tmp_path, out_dir), tmp_path / "hydra" / "full")
    plan = [{"op": "run", "argv": argv, "log": str(tmp_path / "full")},
            {"op": "copy", "src": str(out_dir), "dst": str(tmp_path / "after-full")},
            {"op": "remount", "at": str(mount_at), "size": "64m"},
            {"op": "run", "argv": argv, "log": str(tmp_path / "resumed")},
            {"op": "copy", "src": str(out_dir), "dst": str(tmp_path / "saved")}]
    report = drive(tmp_path, plan, mount_at, tmpfs_size, stage)
    full, remount, resumed = report[0], report[2], report[3]

    assert full["rc"] == 1, full["stderr"][-3000:]
    lines = [line for line in full["stderr"].splitlines() if line.strip()]
    step_file = out_dir / "checkpoints" / "step0000003.ckpt"
    message = f"disk full: no space left on device writing checkpoint {step_file}"
    assert lines[-1].startswith(f"Error: {message}"), full["stderr"][-3000:]
    assert "rerun the same command" in lines[-1]
    after = tmp_path / "after-full"
    assert temp_debris(after) == []  # the torn temp file was removed
    assert checkpoint_steps(after / "checkpoints") == {"last.ckpt": 2, "last.prev.ckpt": 1, "step0000002.ckpt": 2}
    assert not (after / "metrics.json").exists()

    assert remount["rc"] == 0, remount["stderr"]
    assert resumed["rc"] == 0, resumed["stderr"][-3000:]
    assert f"resuming from {out_dir / 'checkpoints' / 'last.ckpt'}" in resumed["stderr"] + resumed["stdout"]
    saved = tmp_path / "saved"
    assert temp_debris(saved) == []
    metrics = json.loads((saved / "metrics.json").read_text())
    assert metrics["global_step"] == json.loads((straight / "metrics.json").read_text())["global_step"]
    assert_same_adapter(straight, saved)


GENERATE = ["data=vqa_rad_sample_train", "generate.question_source=dataset", "generate.answers_per_question=2",
            "generate.max_images=16", "generate.image_batch_size=1", "generate.answer.max_new_tokens=6",
            "generate.progress=false", "print_summary=false", "num_threads=1"]


def test_a_full_disk_stops_generation_naming_its_output_and_keeps_what_it_wrote(tmp_path, tiny_backbone_path):
    require_tmpfs()

    def argv(out_dir: Path, name: str) -> list[str]:
        return [sys.executable, "-m", "stllava_med.generate", *GENERATE, f"out_dir={out_dir}",
                f"hydra.run.dir={tmp_path / 'hydra' / name}"]

    straight = tmp_path / "straight"
    done = subprocess.run(argv(straight, "straight"), capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    shard = straight / "candidates" / "candidates-00000.jsonl"
    outputs = {shard, straight / "progress.jsonl", straight / "summary.json"}
    small = sum(1 for p in straight.rglob("*") if p.is_file() and p.stat().st_size and p not in outputs)
    # room for the run's small files, the progress file and about half of the candidates
    pages = small + 2 + math.ceil(shard.stat().st_size / 4096) // 2
    mount_at = tmp_path / "tmpfs"
    out_dir = mount_at / "run"
    plan = [{"op": "run", "argv": argv(out_dir, "full"), "log": str(tmp_path / "full")},
            {"op": "copy", "src": str(out_dir), "dst": str(tmp_path / "after-full")},
            {"op": "remount", "at": str(mount_at), "size": "16m"},
            {"op": "run", "argv": argv(out_dir, "resumed"), "log": str(tmp_path / "resumed")},
            {"op": "copy", "src": str(out_dir), "dst": str(tmp_path / "saved")}]
    report = drive(tmp_path, plan, mount_at, f"{4 * pages}k", "generate")
    full, resumed = report[0], report[3]

    assert full["rc"] == 1, full["stderr"][-3000:]
    lines = [line for line in full["stderr"].splitlines() if line.strip()]
    named = [str(out_dir / "candidates" / "candidates-00000.jsonl"), str(out_dir / "progress.jsonl")]
    assert any(lines[-1] == f"Error: disk full: no space left on device writing {path}" for path in named), \
        full["stderr"][-3000:]
    after = tmp_path / "after-full"
    # what was written stays whole: every line parses, and the images marked done have all their candidates
    progress = (after / "progress.jsonl").read_text()
    candidates = (after / "candidates" / "candidates-00000.jsonl").read_text()
    assert progress.endswith("\n") and candidates.endswith("\n")
    done_images = [json.loads(line)["image_id"] for line in progress.splitlines()]
    expected = shard.read_text().splitlines()
    assert 0 < len(done_images) < 16
    kept = candidates.splitlines()
    assert kept == expected[:len(kept)]  # a prefix of the uninterrupted run's candidates, no torn line
    assert {json.loads(line)["image_sha256"] for line in kept} >= set(done_images)
    assert temp_debris(after) == []

    assert resumed["rc"] == 0, resumed["stderr"][-3000:]
    saved = tmp_path / "saved"
    assert (saved / "candidates" / "candidates-00000.jsonl").read_text().splitlines() == expected
    assert json.loads((saved / "summary.json").read_text())["images_done"] == 16


def _pages(folder: Path, *, skip: str = "") -> int:
    """4 KiB pages the files under ``folder`` take on a tmpfs (minus those under ``skip``)."""
    return sum(math.ceil(p.stat().st_size / 4096) or 1 for p in folder.rglob("*")
               if p.is_file() and not (skip and skip in p.relative_to(folder).parts))


def test_a_full_disk_during_the_merged_export_names_it_and_the_rerun_exports(tmp_path, tiny_backbone_path):
    require_tmpfs()
    overrides = [o for o in dpo_overrides(tmp_path, tmp_path / "unused") if not o.startswith("export.merged=")]
    straight_dir = tmp_path / "dpo-straight"
    straight = subprocess.run(stage_argv("dpo", [*overrides, f"out_dir={straight_dir}", "export.merged=true"],
                                         tmp_path / "hydra" / "straight"),
                              capture_output=True, text=True, timeout=600, env=_env())
    assert straight.returncode == 0, straight.stderr[-3000:]
    merged_pages = _pages(straight_dir / "merged")
    ckpt_pages = math.ceil((straight_dir / "checkpoints" / "last.ckpt").stat().st_size / 4096)
    # room for what the run directory holds besides the merged weights (three checkpoints: last, last.prev, the
    # newest step file; the adapter, small files), one more checkpoint being written, and half the merged
    # weights: training fits, the disk fills during the merged export
    room = _pages(straight_dir, skip="merged") + ckpt_pages + 32
    assert merged_pages > 4 * 32, "the merged export must be larger than the slack for this test to mean anything"
    mount_at = tmp_path / "tmpfs"
    out_dir = mount_at / "run"
    argv = stage_argv("dpo", [*overrides, f"out_dir={out_dir}", "export.merged=true"], tmp_path / "hydra" / "full")
    plan = [{"op": "run", "argv": argv, "log": str(tmp_path / "full")},
            {"op": "copy", "src": str(out_dir), "dst": str(tmp_path / "after-full")},
            {"op": "remount", "at": str(mount_at), "size": "64m"},
            {"op": "run", "argv": argv, "log": str(tmp_path / "resumed")},
            {"op": "copy", "src": str(out_dir), "dst": str(tmp_path / "saved")}]
    report = drive(tmp_path, plan, mount_at, f"{4 * (room + merged_pages // 2)}k", "export")
    full, resumed = report[0], report[3]

    assert full["rc"] == 1, full["stderr"][-3000:]
    lines = [line for line in full["stderr"].splitlines() if line.strip()]
    assert lines[-1] == f"Error: disk full: no space left on device writing the merged model {out_dir / 'merged'}", \
        full["stderr"][-3000:]
    after = tmp_path / "after-full"
    assert temp_debris(after) == [] and not (after / "merged").exists()  # no half-written export
    assert not (after / "metrics.json").exists()  # the run is not complete
    assert checkpoint_steps(after / "checkpoints")["last.ckpt"] == STEPS  # training's end is kept

    assert resumed["rc"] == 0, resumed["stderr"][-3000:]
    saved = tmp_path / "saved"
    assert temp_debris(saved) == []
    assert json.loads((saved / "metrics.json").read_text())["global_step"] == STEPS
    expected = load_file(straight_dir / "merged" / "model.safetensors")
    actual = load_file(saved / "merged" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
