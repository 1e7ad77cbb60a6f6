"""The judgement store: SQLite in WAL mode, one row per judgement keyed by :func:`judgement_key`, plus one row
per request sent to the expert (for budgets and audits).

Every judgement is committed before the runner moves on, so a run killed at any moment (SIGKILL, preemption,
a SLURM time limit) loses no answer it received, and its successor asks only what is missing. WAL lets readers
(a progress monitor, a test, the pair builder) read while the judge writes. ``synchronous=NORMAL`` makes a
commit survive a crash of the process; ``FULL`` also an OS crash or power loss, at one fsync per commit.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stllava_med.selftrain.records import Judgement

SCHEMA_VERSION = 1
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    candidate_id TEXT NOT NULL,
    expert TEXT NOT NULL,
    status TEXT NOT NULL,
    retryable INTEGER NOT NULL,
    record TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS judgements_candidate ON judgements (candidate_id);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    seconds REAL NOT NULL,
    created_at REAL NOT NULL
);
-- Work in progress, shared by every process on the store: a claim hands a judgement key to one judge (the others
-- skip it, then wait for its result); a reservation is one request in flight, counted against the budget with its
-- estimated cost until the request is recorded (in the same transaction). Rows of a process that died are stale.
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, claimed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    cost_usd REAL NOT NULL,
    created_at REAL NOT NULL
);
"""

# A claim or reservation older than this whose owner cannot be checked (another host) is taken to be abandoned.
STALE_AFTER_S = 3600.0


class StoreWriteError(OSError):
    """The store could not be written (disk full, read-only, an I/O error, locked past the timeout): the message
    names the file. What was committed before stays; requests reserved and not recorded count as sent."""


def owner_id() -> str:
    """``host:pid:random``: who holds a claim or reservation (the pid lets a process on the same host see that
    the holder died)."""
    import os
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_alive(owner: str, claimed_at: float, now: float) -> bool:
    import os
    import socket

    host, _, rest = owner.partition(":")
    pid = rest.split(":", 1)[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now - claimed_at < STALE_AFTER_S


@dataclass(frozen=True)
class Usage:
    """What a store has spent, over every run that wrote to it."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class JudgementStore:
    """A SQLite file of judgements. Use from one thread (the judge's event loop); open as many read-only
    readers elsewhere as you like."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", readonly: bool = False) -> None:
        self.path = Path(path)
        synchronous = str(synchronous).upper()
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"store synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"judgement store {self.path} does not exist")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            with self._writing("opening it"):
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={synchronous}")
            with self._writing("creating its tables"):
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = self.meta("schema_version")
        if version is not None and int(version) != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: judgement store schema {version}, this code reads {SCHEMA_VERSION}")

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """One write transaction; SQLite's failures (``database or disk is full``, ``disk I/O error``, ``attempt
        to write a readonly database``, ``database is locked``) become a :class:`StoreWriteError` naming the file."""
        try:
            with self._db:
                yield
        except sqlite3.OperationalError as err:
            text = str(err)
            hint = ""
            if "full" in text.lower():
                hint = (f"; free space on the file system of {self.path.parent} (or move the run directory) and "
                        "rerun the same command: every judgement committed so far is kept, and the requests in "
                        "flight are counted against the budget")
            raise StoreWriteError(f"{self.path}: cannot write the judgement store while {what}: {text}{hint}") from err

    # -- metadata ------------------------------------------------------------------------------------------------

    def meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        with self._writing(f"setting {name}"):
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    # -- judgements ----------------------------------------------------------------------------------------------

    def put(self, judgement: Judgement, *, request: dict | None = None) -> None:
        """Commit a judgement (replacing an earlier failure of the same key), together with the request that
        produced it, in one transaction; the key's claim goes with it."""
        with self._writing(f"storing the judgement of {judgement.candidate_id}"):
            self._db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)",
                (judgement.key, judgement.candidate_id, judgement.expert, judgement.status, int(judgement.retryable),
                 json.dumps(judgement.to_json(), ensure_ascii=False), judgement.created_at or time.time()),
            )
            if request is not None:
                self._insert_request(judgement.key, **request)
            self._db.execute("DELETE FROM claims WHERE key = ?", (judgement.key,))

    # -- work shared between processes -------------------------------------------------------------------------

    def _drop_stale(self, now: float) -> None:
        for rowid, owner, at in self._db.execute("SELECT rowid, owner, claimed_at FROM claims").fetchall():
            if not _owner_alive(str(owner), float(at), now):
                self._db.execute("DELETE FROM claims WHERE rowid = ?", (rowid,))
        dead = {str(owner) for owner, at in self._db.execute("SELECT owner, created_at FROM reservations").fetchall()
                if not _owner_alive(str(owner), float(at), now)}
        for owner in dead:
            self._settle_reservations(owner, "lost", f"in flight when its process ({owner}) ended: it may have been "
                                                     "answered and charged, so it counts at its estimated cost")

    def _settle_reservations(self, owner: str, outcome: str, detail: str) -> None:
        """Turn ``owner``'s reservations into recorded requests (at their estimated cost): a request reserved was
        about to be sent or in flight, and may have been answered and billed without being recorded (a SIGKILL, a
        full disk), so the budgets count it rather than forget it."""
        rows = self._db.execute("SELECT id, key, cost_usd FROM reservations WHERE owner = ?", (owner,)).fetchall()
        for rid, key, cost in rows:
            self._db.execute("DELETE FROM reservations WHERE id = ?", (rid,))
            self._db.execute(
                "INSERT INTO requests (key, attempt, outcome, detail, prompt_tokens, completion_tokens, cost_usd, "
                "seconds, created_at) VALUES (?, -1, ?, ?, 0, 0, ?, 0.0, ?)",
                (str(key), outcome, detail, float(cost), time.time()))

    def claim(self, key: str, owner: str, *, since: float) -> str:
        """Hand ``key`` to ``owner``: ``claimed``; ``taken`` while another live process holds it; ``done`` when a
        judgement of it was stored after ``since`` (another process answered it meanwhile)."""
        now = time.time()
        with self._writing(f"claiming {key}"):
            self._db.execute("BEGIN IMMEDIATE")
            self._drop_stale(now)
            row = self._db.execute("SELECT created_at FROM judgements WHERE key = ?", (key,)).fetchone()
            if row is not None and float(row[0]) >= since:
                return "done"
            holder = self._db.execute("SELECT owner FROM claims WHERE key = ?", (key,)).fetchone()
            if holder is not None and holder[0] != owner:
                return "taken"
            self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, owner, now))
            return "claimed"

    def claimed_by_others(self, keys: Iterable[str], owner: str) -> set[str]:
        """The ``keys`` another live process holds now."""
        with self._writing("dropping stale claims"):
            self._db.execute("BEGIN IMMEDIATE")
            self._drop_stale(time.time())
        wanted = set(keys)
        return {k for k, o in self._db.execute("SELECT key, owner FROM claims") if k in wanted and o != owner}

    def reserve(self, owner: str, cost_usd: float, *, max_requests: int | None, max_cost_usd: float | None,
                dry: bool = False, key: str = "") -> tuple[int | None, str | None, dict[str, float]]:
        """Reserve one request against the budget of every process on the store (requests recorded + reserved,
        cost spent + reserved): ``(reservation id, None, totals)``, or ``(None, "requests" | "cost", totals)`` when
        it would exceed ``max_requests`` / ``max_cost_usd``. ``totals``: sent, spent, in_flight, in_flight_cost,
        mine_in_flight. ``dry``: check only (reservation id None). ``key``: the judgement it is for."""
        with self._writing("reserving a request"):
            self._db.execute("BEGIN IMMEDIATE")
            self._drop_stale(time.time())
            sent, spent = self._db.execute("SELECT COUNT(*), COALESCE(SUM(cost_usd), 0.0) FROM requests").fetchone()
            flying, flying_cost = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(cost_usd), 0.0) FROM reservations").fetchone()
            mine = self._db.execute("SELECT COUNT(*) FROM reservations WHERE owner = ?", (owner,)).fetchone()[0]
            totals = {"sent": int(sent), "spent": float(spent), "in_flight": int(flying),
                      "in_flight_cost": float(flying_cost), "mine_in_flight": int(mine)}
            if max_requests is not None and sent + flying >= max_requests:
                return None, "requests", totals
            if max_cost_usd is not None and spent + flying_cost + cost_usd > max_cost_usd:
                return None, "cost", totals
            if dry:
                return None, None, totals
            cursor = self._db.execute("INSERT INTO reservations (owner, key, cost_usd, created_at) VALUES (?, ?, ?, ?)",
                                      (owner, key, cost_usd, time.time()))
            return int(cursor.lastrowid or 0), None, totals

    def release_owner(self, owner: str) -> None:
        """Drop ``owner``'s claims (its run ended); requests it reserved and never recorded (interrupted in
        flight) are recorded as ``unrecorded``, at their estimated cost."""
        with self._writing("releasing this run's claims"):
            self._db.execute("DELETE FROM claims WHERE owner = ?", (owner,))
            self._settle_reservations(owner, "unrecorded", "reserved by a run that ended before recording it (an "
                                                           "interrupted request): counted at its estimated cost")

    def log_request(self, key: str, *, attempt: int, outcome: str, detail: str | None = None,
                    prompt_tokens: int = 0, completion_tokens: int = 0, cost_usd: float = 0.0,
                    seconds: float = 0.0, reservation: int | None = None) -> None:
        """Record one request that did not (yet) produce a judgement: a retry, a malformed reply."""
        with self._writing(f"recording a request for {key}"):
            self._insert_request(key, attempt=attempt, outcome=outcome, detail=detail, prompt_tokens=prompt_tokens,
                                 completion_tokens=completion_tokens, cost_usd=cost_usd, seconds=seconds,
                                 reservation=reservation)

    def _insert_request(self, key: str, *, attempt: int, outcome: str, detail: str | None = None,
                        prompt_tokens: int = 0, completion_tokens: int = 0, cost_usd: float = 0.0,
                        seconds: float = 0.0, reservation: int | None = None) -> None:
        if reservation is not None:  # the request replaces its reservation in the budget, in one transaction
            self._db.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
        self._db.execute(
            "INSERT INTO requests (key, attempt, outcome, detail, prompt_tokens, completion_tokens, cost_usd, "
            "seconds, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, attempt, outcome, detail, prompt_tokens, completion_tokens, cost_usd, seconds, time.time()),
        )

    def get(self, key: str) -> Judgement | None:
        row = self._db.execute("SELECT record FROM judgements WHERE key = ?", (key,)).fetchone()
        return None if row is None else Judgement.from_json(json.loads(row[0]), where=f"{self.path}: {key}")

    def statuses(self) -> dict[str, tuple[str, bool]]:
        """key → (status, retryable) for every stored judgement."""
        return {k: (s, bool(r)) for k, s, r in self._db.execute("SELECT key, status, retryable FROM judgements")}

    def judgements(self, keys: Iterable[str] | None = None) -> Iterator[Judgement]:
        if keys is None:
            rows = self._db.execute("SELECT key, record FROM judgements ORDER BY created_at, key")
            for key, record in rows:
                yield Judgement.from_json(json.loads(record), where=f"{self.path}: {key}")
            return
        for key in keys:
            judgement = self.get(key)
            if judgement is not None:
                yield judgement

    def count(self, status: str | None = None) -> int:
        if status is None:
            return int(self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM judgements WHERE status = ?", (status,)).fetchone()[0])

    def usage(self) -> Usage:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(cost_usd), 0.0) FROM requests").fetchone()
        return Usage(int(row[0]), int(row[1]), int(row[2]), float(row[3]))

    def request_outcomes(self) -> dict[str, int]:
        return {o: int(n) for o, n in self._db.execute("SELECT outcome, COUNT(*) FROM requests GROUP BY outcome")}

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JudgementStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
