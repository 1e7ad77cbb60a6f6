"""Small file helpers shared by every stage: atomic writes, JSONL, hashing, disk-full errors that name the file.

Every file a stage must find whole is written in its own directory (never in ``$TMPDIR``: a temp file there is
*copied* into a run directory on another file system, and a kill mid-copy leaves a torn file), flushed to disk
and renamed over its destination. Appended files (JSONL) are appended line by line; a write that fails (a full
disk) is cut back to the last whole line, so what was written before stays readable and a rerun resumes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write failed because the file system holding ``path`` is full (ENOSPC) or its quota is spent (EDQUOT).
    The message names the file, which a bare ``OSError: [Errno 28]`` from ``write()`` does not."""

    def __init__(self, path: str | os.PathLike, code: int = errno.ENOSPC, what: str = "") -> None:
        reason = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        super().__init__(code, f"disk full: {reason} writing {what or path}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def no_space(err: BaseException) -> int | None:
    """The errno (ENOSPC / EDQUOT) if ``err`` or an exception it was raised from is a full-disk error, else None.
    Libraries wrap it (torch's zip writer, ``shutil``), so the chain is searched."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return int(current.errno)
        if "No space left on device" in str(current):
            return errno.ENOSPC
        current = current.__cause__ or current.__context__
    return None


def raise_if_disk_full(err: BaseException, path: str | os.PathLike, what: str = "") -> None:
    """Raise :class:`DiskFull` naming ``path`` (``what``: how to name it), chained to ``err``, when ``err`` is a
    full-disk error (a DiskFull from a nested write is renamed to the outer ``path``); return otherwise (the caller
    re-raises ``err``)."""
    code = no_space(err)
    if code is not None:
        raise DiskFull(path, code, what) from err


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` so that readers see either the old file or the whole new one, never a torn write: a temp
    file in ``path``'s own directory (one file system: the rename is atomic, never a copy), fsynced, renamed
    over ``path``. On failure the temp file is removed; a full disk raises :class:`DiskFull` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() gives (mkstemp's is 0600: unreadable to the group)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(err, path)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically (:func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], Any], what: str = "") -> Path:
    """Build a directory (an exported adapter, merged weights) with ``write(tmp)`` in a temp sibling of
    ``out_dir`` (``.<name>-*.tmp``: the same file system), fsync every file in it, then rename it to ``out_dir``
    (an existing ``out_dir`` is renamed aside first and removed after). A kill leaves the old directory or the
    new one whole, plus temp debris that :func:`~stllava_med.training.checkpoints.remove_temp_debris` removes.
    On failure the temp directory is removed; a full disk raises :class:`DiskFull` naming ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", suffix=".tmp", dir=out_dir.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # what mkdir gives (mkdtemp's is 0700)
        write(tmp)
        for file in sorted(tmp.rglob("*")):
            if file.is_file() and not file.is_symlink():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
                if file.stat().st_mode & 0o777 == 0o600:  # a library's temp file moved into place (safetensors)
                    os.chmod(file, 0o666 & ~_umask())
        fsync_dir(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", suffix=".tmp", dir=out_dir.parent))
            os.replace(out_dir, old) if out_dir.is_dir() else os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():  # put the previous one back
            with contextlib.suppress(OSError):
                os.replace(old, out_dir)
        raise_if_disk_full(err, out_dir, what)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def append_whole(fd: int, data: bytes, path: str | os.PathLike) -> None:
    """Append ``data`` to the open file ``fd`` (opened with O_APPEND) all or nothing: a write that fails part way
    (a full disk) is cut back to the file's previous end, so the file still ends where its last whole record
    does; a full disk raises :class:`DiskFull` naming ``path``."""
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise_if_disk_full(err, path)
        raise


def append_whole_to(path: str | os.PathLike, data: bytes) -> None:
    """Append whole lines ``data`` to the append-only file ``path`` (an index, a cache), whole or not at all
    (:func:`append_whole`), fsynced. An unterminated last line a killed writer left is cut first, so the new
    lines start on their own. Call it under the file's lock when several processes append."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        _cut_torn_tail(fd, path)
        append_whole(fd, data, path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(fd: int, path: str | os.PathLike) -> None:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    keep = os.pread(fd, size, 0).rfind(b"\n") + 1
    log.warning("%s: dropping a truncated last line (a killed writer)", path)
    os.ftruncate(fd, keep)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class JsonlWriter:
    """Append-only JSONL writer that flushes every record, so a killed process loses at most a partial
    last line (which :func:`read_jsonl` reports precisely)."""

    def __init__(self, path: str | os.PathLike, mode: str = "a") -> None:
        if mode not in ("a", "w"):
            raise ValueError(f"JsonlWriter mode must be 'a' or 'w', not {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if mode == "w" else 0)
        self._fd: int | None = os.open(self.path, flags, 0o666)

    def write(self, record: dict) -> None:
        """One line, written whole or not at all (:func:`append_whole`): on a full disk the file keeps its
        previous lines and :class:`DiskFull` names it."""
        if self._fd is None:
            raise ValueError(f"{self.path}: write to a closed JsonlWriter")
        line = json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"
        append_whole(self._fd, line.encode("utf-8"), self.path)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _utf8_text(path: Path) -> str:
    """A file's text; bytes that are not UTF-8 are an error naming the file, line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}: not UTF-8 text at line {line}, column {column} (byte 0x{data[err.start]:02x}); "
                         "save the file as UTF-8") from None


def read_jsonl(path: str | os.PathLike, *, allow_truncated_tail: bool = False) -> Iterator[dict]:
    """Yield records of a JSONL file; a malformed line (or one that is not UTF-8) is an error naming the file
    and line number.

    ``allow_truncated_tail`` tolerates an unterminated last line (what a killed writer leaves behind) so
    that resumable stages can continue after a crash."""
    path = Path(path)
    parts = path.read_bytes().split(b"\n")  # b"\n" only, as a file's lines (JSON text may hold U+2028 raw)
    lines = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        torn_tail = allow_truncated_tail and lineno == len(lines) and not raw.endswith(b"\n")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if torn_tail:
                return
            raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                             f"{err.start + 1}); save the file as UTF-8") from None
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail:
                return
            raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from err


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write a whole JSONL file atomically."""
    lines = [json.dumps(r, ensure_ascii=False, default=_json_default) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def load_json(path: str | os.PathLike) -> Any:
    """json.load with an error that names the file, line and column."""
    path = Path(path)
    text = _utf8_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    payload = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=_json_default)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:n]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed) for the duration of the block: serialises
    processes that build or append the same thing (sweep jobs sharing a cache or a pipeline stage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
