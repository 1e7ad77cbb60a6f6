"""Runs a list of operations inside one process tree, so that they all see the same private tmpfs
(:mod:`tmpfs`: the mount ends with the namespace): ``python kill_driver.py <plan.json> <report.json>``.

Operations (the plan is a JSON list):

- ``{"op": "run", "argv": [...], "env": {...}, "kill_on": "<dir>", "kill_at": n}``: run a command; with
  ``kill_on``, SIGKILL it while the ``n``-th temp file (``.<name>.tmp``, default the first) seen appearing in that
  directory (polled) exists, as a node dies mid-write. From ``n = 2`` on, the temp file seen first has been
  renamed into place (a whole checkpoint) before the kill. The report gets its exit status, the tails of its output, whether it was killed, what was seen, and the temp files
  left in ``kill_on`` once it died.
- ``{"op": "remount", "at": "<dir>", "size": "64m"}``: give the tmpfs at ``dir`` another size.
- ``{"op": "copy", "src": "<dir>", "dst": "<dir>"}``: copy a tree out of the tmpfs, for the test to inspect.

The report is written after every operation (a test that times out still finds what happened)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def temp_files(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp"))
    except FileNotFoundError:
        return []


def run(op: dict) -> dict:
    env = {**os.environ, **op.get("env", {})}
    out_path, err_path = Path(op["log"] + ".out"), Path(op["log"] + ".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        child = subprocess.Popen(op["argv"], env=env, stdout=out, stderr=err)
        killed, seen, appeared, previous = False, [], 0, set()
        folder = Path(op["kill_on"]) if op.get("kill_on") else None
        while child.poll() is None:
            if folder is not None and not killed:
                now = temp_files(folder)
                appeared += len(set(now) - previous)
                previous = set(now)
                if now and appeared >= op.get("kill_at", 1):
                    os.kill(child.pid, signal.SIGKILL)
                    killed, seen = True, now
                    continue
                time.sleep(0.0002)
            else:
                time.sleep(0.01)
        rc = child.wait()
    return {"op": "run", "rc": rc, "killed": killed, "seen": seen,
            "left": temp_files(folder) if folder is not None else [],
            "stdout": out_path.read_text()[-200000:], "stderr": err_path.read_text()[-200000:]}


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    report_path = Path(sys.argv[2])
    report = []
    for op in plan:
        if op["op"] == "run":
            report.append(run(op))
        elif op["op"] == "remount":
            done = subprocess.run(["mount", "-o", f"remount,size={op['size']}", op["at"]], capture_output=True,
                                  text=True)
            report.append({"op": "remount", "rc": done.returncode, "stderr": done.stderr})
        elif op["op"] == "copy":
            shutil.copytree(op["src"], op["dst"], dirs_exist_ok=True, symlinks=True)
            report.append({"op": "copy"})
        else:
            raise ValueError(f"unknown operation {op['op']!r}")
        report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
