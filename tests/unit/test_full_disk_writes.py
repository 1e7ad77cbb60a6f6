"""The write primitives every cache and index goes through, on a tmpfs that is full: an append is whole or
absent (the file keeps its last whole record), a whole-file write leaves no temp file, and both raise DiskFull
naming the file. (The stages on a full disk: tests/integration/test_checkpoint_filesystems.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tmpfs import run_on_tmpfs

_SCRIPT = r"""
import json, os, sys
from stllava_med.utils.io import DiskFull, append_whole_to, atomic_write_bytes
folder = sys.argv[1]
index = os.path.join(folder, "index.jsonl")
append_whole_to(index, b'{"a": 1}\n')
with open(os.path.join(folder, "filler"), "wb", buffering=0) as fh:  # fill the file system
    try:
        while True:
            fh.write(b"\0" * 4096)
    except OSError:
        pass
out = {}
try:
    append_whole_to(index, b'{"b": "' + b"x" * 200_000 + b'"}\n')
except DiskFull as err:
    out["append"] = str(err)
out["index"] = open(index, "rb").read().decode()
try:
    atomic_write_bytes(os.path.join(folder, "features-1.npy"), b"y" * 200_000)
except DiskFull as err:
    out["whole"] = str(err)
out["files"] = sorted(os.listdir(folder))
print(json.dumps(out))
"""


def test_appends_and_whole_file_writes_on_a_full_disk(tmp_path):
    folder = tmp_path / "cache"
    done = run_on_tmpfs([sys.executable, "-c", _SCRIPT, str(folder)], folder, "256k", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["append"] == f"disk full: no space left on device writing {folder / 'index.jsonl'}"
    assert out["index"] == '{"a": 1}\n'  # cut back to its last whole line
    assert out["whole"] == f"disk full: no space left on device writing {folder / 'features-1.npy'}"
    assert out["files"] == ["filler", "index.jsonl"]  # no temp file, no partial shard
    assert not list(Path(tmp_path).glob("*.tmp"))
