"""Commands run with a small tmpfs mounted at a directory: another file system than the rest of the run (the
cluster layout of a node-local ``/tmp`` beside an NFS ``out_dir``), or a disk that fills up.

The mount is private to the command: ``unshare -rm`` (a user + mount namespace: nothing to unmount, no root
needed where user namespaces are allowed), else, as root, a plain ``mount`` that is unmounted afterwards. Inside,
``remount <dir> <size>`` (``mount -o remount,size=...``) gives the tmpfs more room. The tmpfs ends with the
command: what a test inspects afterwards the command copies out itself (``kill_driver.py``'s ``copy``)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# mount, run the command, unmount (a no-op in a private namespace, which ends with it); 97: the mount failed
_SCRIPT = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97; at="$2"; shift 2; "$@"; rc=$?; '
           'umount -l "$at" 2>/dev/null; exit $rc')


def _prefixes() -> list[list[str]]:
    found = []
    if shutil.which("unshare"):
        found.append(["unshare", "-rm"])
    if os.geteuid() == 0 and shutil.which("mount"):
        found.append([])
    return found


@functools.lru_cache(maxsize=1)
def _working_prefix() -> tuple[tuple[str, ...] | None, str]:
    """The first way of mounting that works here (and an empty reason), or None and why none does."""
    reasons = []
    for prefix in _prefixes():
        with tempfile.TemporaryDirectory() as probe:
            done = subprocess.run([*prefix, "sh", "-c", _SCRIPT, "sh", "64k", probe, "sh", "-c",
                                   f'test "$(stat -f -c %T "{probe}")" = tmpfs'],
                                  capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return tuple(prefix), ""
        reasons.append(f"{' '.join(prefix) or 'mount as root'}: exit {done.returncode} {done.stderr.strip()[:200]}")
    if not reasons:
        reasons.append("no unshare(1) and not root")
    return None, "cannot mount a tmpfs here (" + "; ".join(reasons) + ")"


def require_tmpfs() -> tuple[str, ...]:
    """The command prefix that mounts a private tmpfs here, or skip the test saying why none can."""
    prefix, reason = _working_prefix()
    if prefix is None:
        pytest.skip(reason)
    return prefix


def on_tmpfs(command: list[str], mount_at: Path, size: str) -> list[str]:
    """``command`` run with a ``size`` tmpfs (``2m``, ``640k``) mounted at ``mount_at`` (created if missing)."""
    prefix = require_tmpfs()
    Path(mount_at).mkdir(parents=True, exist_ok=True)
    return [*prefix, "sh", "-c", _SCRIPT, "sh", size, str(mount_at), *command]


def run_on_tmpfs(command: list[str], mount_at: Path, size: str, *, env: dict[str, str] | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` with a ``size`` tmpfs at ``mount_at``; its exit status 97 means the mount failed."""
    done = subprocess.run(on_tmpfs(command, mount_at, size), env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode == 97:
        raise AssertionError(f"mounting a tmpfs at {mount_at} failed: {done.stderr[-2000:]}")
    return done
