"""The judge runner: asks an expert about every candidate, concurrently, within rate limits and a budget,
surviving faults, and commits each judgement to the store before moving on.

* **Concurrency**: ``concurrency`` workers (capped by the expert's own ``max_concurrency``) share one queue.
* **Rate limits**: a token bucket for requests/min and one for tokens/min (estimated before a request,
  corrected with the reported usage after it). A 429's ``Retry-After`` pauses every worker, not only the one
  that hit it — the limit is the account's, not the connection's.
* **Retries**: 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter
  (``Retry-After`` honoured when sent), at most ``max_retries`` times; then the judgement is stored as a
  *retryable* failure, which a later run asks again. A malformed or out-of-range reply is retried
  ``max_invalid_retries`` times, then stored as a final failure with the reason. ``max_consecutive_failures``
  judgements in a row that exhaust their retries stop the run (the expert is down; do not burn the queue).
* **Budget**: ``max_requests`` and ``max_cost_usd`` (token usage × configured prices) count everything the
  store has ever spent, so a resumed run does not get a fresh allowance. Before each request the runner checks
  the budget with the request's estimated cost reserved; when it would be exceeded, no new request starts,
  requests in flight finish and are stored, and the run ends with ``stopped`` naming the reason.
* **Visible retries**: retries are logged at WARNING as they happen, rate-limited — the first of a burst (after
  an answer), then every :data:`RETRY_LOG_EVERY` retries or :data:`RETRY_LOG_EVERY_S` seconds, with how many
  were not shown. An expert that has not answered once since the run started (server down, wrong port) stops
  the run as soon as the first judgement exhausts its retries, instead of after ``max_consecutive_failures``.
* **Several processes on one store**: a judgement key is claimed in the store before it is asked, so two judges on
  one store never ask the same judgement (the second waits for the first's answer; a claim of a process that died
  is taken over), and each request is reserved in the store before it is sent, so the budgets count every
  process's requests and cost, in flight included.
* **Resume**: judgements already in the store are never asked again (keys hash the expert model, prompt
  version, image bytes, question and answers); identical candidates share one request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from stllava_med.selftrain.experts.base import (
    Expert,
    ExpertResult,
    FatalError,
    InvalidResponse,
    ItemError,
    TransientError,
)
from stllava_med.selftrain.records import Candidate, Judgement, judgement_key
from stllava_med.selftrain.store import JudgementStore, StoreWriteError, owner_id
from stllava_med.utils.config import check_keys
from stllava_med.utils.io import sha256_file

log = logging.getLogger(__name__)

RETRY_FAILED = ("none", "transient", "all")
# Retry log lines: the first retry of a burst, then one every RETRY_LOG_EVERY retries or RETRY_LOG_EVERY_S seconds.
RETRY_LOG_EVERY = 20
RETRY_LOG_EVERY_S = 30.0


@dataclass
class JudgeSettings:
    """How the runner talks to an expert. Read from the ``expert`` config group (see ``conf/expert/``)."""

    concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    burst_s: float = 1.0
    max_retries: int = 6
    max_invalid_retries: int = 2
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_consecutive_failures: int = 50
    max_requests: int | None = None
    max_cost_usd: float | None = None
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    retry_failed: str = "transient"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"expert.concurrency must be at least 1, got {self.concurrency}")
        if self.max_retries < 0 or self.max_invalid_retries < 0:
            raise ValueError("expert.max_retries and expert.max_invalid_retries must be >= 0")
        if self.retry_failed not in RETRY_FAILED:
            raise ValueError(f"judge.retry_failed must be one of {RETRY_FAILED}, not {self.retry_failed!r}")
        for name in ("requests_per_minute", "tokens_per_minute", "max_cost_usd"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"expert.{name} must be positive or null, got {value}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **overrides: Any) -> JudgeSettings:
        known = set(cls.__dataclass_fields__)
        values = dict(cfg or {})
        check_keys(values, known | set(EXPERT_KEYS), "expert")
        values = {k: v for k, v in values.items() if k in known}
        values.update({k: v for k, v in overrides.items() if k in known})
        return cls(**values)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input_per_mtok + completion_tokens * self.price_output_per_mtok) / 1e6


# Keys of an ``expert`` config that build the expert itself (judge.build_expert) rather than the runner.
EXPERT_KEYS = ("name", "kind", "model", "base_url", "api_key_env", "temperature", "max_tokens", "timeout_s",
               "response_format", "image_detail", "max_image_side", "image_tokens_estimate", "closed_match",
               "backbone", "device", "retry_temperature")


class RateLimiter:
    """Token buckets for requests/min and tokens/min, plus a shared pause (``Retry-After``).

    Each bucket refills continuously and holds at most ``burst_s`` seconds of its rate (at least one request).
    A request may drive the token bucket negative (one large request must still pass); later requests wait
    until the debt is repaid. Waiters are served in arrival order."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None, *,
                 burst_s: float = 1.0, clock: Any = time.monotonic) -> None:
        self.request_rate = requests_per_minute / 60.0 if requests_per_minute else None
        self.token_rate = tokens_per_minute / 60.0 if tokens_per_minute else None
        self.request_capacity = max(1.0, (self.request_rate or 0) * burst_s)
        self.token_capacity = max(1.0, (self.token_rate or 0) * burst_s)
        self._requests = self.request_capacity
        self._tokens = self.token_capacity
        self._clock = clock
        self._updated = clock()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        if self.request_rate:
            self._requests = min(self.request_capacity, self._requests + elapsed * self.request_rate)
        if self.token_rate:
            self._tokens = min(self.token_capacity, self._tokens + elapsed * self.token_rate)

    def pause_for(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def correct(self, token_delta: int) -> None:
        """Charge (or refund) the difference between a request's estimated and reported tokens."""
        if self.token_rate:
            self._refill()
            self._tokens = min(self.token_capacity, self._tokens - token_delta)

    def wait_time(self) -> float:
        self._refill()
        wait = max(0.0, self._paused_until - self._clock())
        if self.request_rate and self._requests < 1.0:
            wait = max(wait, (1.0 - self._requests) / self.request_rate)
        if self.token_rate and self._tokens < 0.0:
            wait = max(wait, -self._tokens / self.token_rate)
        return wait

    async def acquire(self, tokens: int = 0) -> None:
        async with self._lock:
            while (wait := self.wait_time()) > 0:
                await asyncio.sleep(wait)
            if self.request_rate:
                self._requests -= 1.0
            if self.token_rate:
                self._tokens -= tokens


@dataclass
class RunStats:
    """What one invocation of the runner did."""

    candidates: int = 0
    unique_keys: int = 0
    already_judged: int = 0
    todo: int = 0
    judged: int = 0
    failed: int = 0
    requests: int = 0
    transient_errors: int = 0
    invalid_replies: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    stopped: str | None = None
    judged_elsewhere: int = 0  # keys another process on the same store answered while this one ran
    failure_reasons: Counter = field(default_factory=Counter)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates, "unique_keys": self.unique_keys, "already_judged": self.already_judged,
            "todo": self.todo, "judged": self.judged, "failed": self.failed, "requests": self.requests,
            "transient_errors": self.transient_errors, "invalid_replies": self.invalid_replies,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6), "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.requests_per_s, 3), "stopped": self.stopped,
            "judged_elsewhere": self.judged_elsewhere,
            "failure_reasons": dict(self.failure_reasons.most_common(20)),
        }


class _RetryLog:
    """WARNING lines for retries, rate-limited: the first of a burst (no retry logged since the expert last
    answered), then every :data:`RETRY_LOG_EVERY` retries or :data:`RETRY_LOG_EVERY_S` seconds, each saying how
    many retries went unlogged since the line before; an answer after a logged burst is logged at INFO."""

    def __init__(self, every: int = RETRY_LOG_EVERY, every_s: float = RETRY_LOG_EVERY_S,
                 clock: Any = time.monotonic) -> None:
        self.every, self.every_s, self.clock = every, every_s, clock
        self.in_burst = False
        self.burst_retries = 0
        self.burst_started = 0.0
        self.unlogged = 0
        self.last_logged = 0.0

    def retry(self, message: str) -> bool:
        now = self.clock()
        if not self.in_burst:
            self.in_burst, self.burst_retries, self.burst_started, self.unlogged = True, 0, now, 0
            due = True
        else:
            due = self.unlogged + 1 >= self.every or now - self.last_logged >= self.every_s
        self.burst_retries += 1
        if not due:
            self.unlogged += 1
            return False
        suffix = f" ({self.unlogged} more since the last line)" if self.unlogged else ""
        log.warning("%s%s", message, suffix)
        self.unlogged, self.last_logged = 0, now
        return True

    def answered(self) -> None:
        if self.in_burst:
            log.info("expert answering again after %d retries in %.0f s", self.burst_retries,
                     self.clock() - self.burst_started)
        self.in_burst = False


def _reason_class(reason: str) -> str:
    """A short class of a failure reason for counting (the full reason stays in the store)."""
    return reason.split(":", 1)[0][:60]


class ImageHasher:
    """sha256 of image files, computed once per path."""

    def __init__(self) -> None:
        self._cache: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self._cache:
            try:
                self._cache[path] = sha256_file(path)
            except OSError:
                self._cache[path] = None
        return self._cache[path]


def plan_keys(candidates: Sequence[Candidate], expert: Expert, *, hasher: ImageHasher | None = None,
              ) -> tuple[dict[str, str], dict[str, str]]:
    """candidate id → judgement key, and candidate id → reason for candidates that cannot be asked.

    For an expert that sees the image, the key uses the sha256 of the file as it is now, and a file that is
    gone or changed since generation is a problem, not a silent mismatch."""
    hasher = hasher or ImageHasher()
    keys: dict[str, str] = {}
    problems: dict[str, str] = {}
    for candidate in candidates:
        sha = candidate.image_sha256
        if expert.needs_image:
            actual = hasher(candidate.image)
            if actual is None:
                problems[candidate.id] = f"image not found: {candidate.image}"
            elif actual != candidate.image_sha256:
                problems[candidate.id] = f"image changed since generation: {candidate.image}"
        keys[candidate.id] = judgement_key(expert.identity, expert.prompt_version, sha, candidate.question,
                                           candidate.answers)
    return keys, problems


class JudgeRunner:
    def __init__(self, expert: Expert, store: JudgementStore, settings: JudgeSettings, *,
                 limiter: RateLimiter | None = None) -> None:
        self.expert = expert
        self.store = store
        self.settings = settings
        self.limiter = limiter or RateLimiter(settings.requests_per_minute, settings.tokens_per_minute,
                                              burst_s=settings.burst_s)
        self.rng = random.Random(settings.seed)
        self.stats = RunStats()
        self._reserved_cost = 0.0  # this process's requests in flight (the store holds every process's)
        self._others_in_flight = 0
        self.store_error: StoreWriteError | None = None  # the first failed write to the store (the run stops)
        self.owner = owner_id()    # claims and reservations in the store are this runner's
        self._since = time.time()
        self._request_finished = asyncio.Condition()
        self._consecutive_failures = 0
        self._answered = 0  # replies (valid or not) this run: 0 means the expert has not answered since the start
        self._retry_log = _RetryLog()
        self._bar: Any = None
        self._last_postfix = 0.0
        self._started = 0.0

    # -- budget --------------------------------------------------------------------------------------------------

    def _budget_stop(self, estimated_cost: float, *, reserve: bool = False,
                     key: str = "") -> tuple[tuple[str, str] | None, int | None]:
        """((which budget, why), None) when the next request would exceed a budget, else (None, the reservation id
        when ``reserve``). The budget is the store's, shared by every process judging into it: requests recorded
        plus requests in flight (reserved), cost spent plus the estimated cost of those in flight."""
        settings = self.settings
        limits = {"max_requests": settings.max_requests, "max_cost_usd": settings.max_cost_usd}
        if not reserve and limits["max_requests"] is None and limits["max_cost_usd"] is None:
            return None, None
        reservation, kind, totals = self.store.reserve(self.owner, estimated_cost, dry=not reserve, key=key, **limits)
        if kind == "requests":
            sent = totals["sent"] + totals["in_flight"]
            return ("requests", f"budget: max_requests={settings.max_requests} reached ({sent} requests sent, "
                                "all processes on this store)"), None
        if kind == "cost":
            self._others_in_flight = totals["in_flight"] - totals["mine_in_flight"]
            return ("cost", f"budget: max_cost_usd={settings.max_cost_usd:g} would be exceeded (spent "
                            f"${totals['spent']:.4f}, in flight ${totals['in_flight_cost']:.4f}, next "
                            f"≈${estimated_cost:.4f}; all processes on this store)"), None
        return None, reservation

    async def _within_budget(self, estimated_cost: float, *, reserve: bool = False,
                             key: str = "") -> int | bool | None:
        """Wait while requests in flight (here or in another process) hold cost reservations that may turn out
        smaller than estimated; stop the run (and return None / False) once the next request cannot fit even with
        nothing in flight. ``reserve``: the reservation id of the request about to be sent."""
        while True:
            if self.stats.stopped:
                return None if reserve else False
            exceeded, reservation = self._budget_stop(estimated_cost, reserve=reserve, key=key)
            if exceeded is None:
                return reservation if reserve else True
            kind, reason = exceeded
            if kind == "requests" or (self._reserved_cost <= 0 and not self._others_in_flight):
                self.stop(reason)
                return None if reserve else False
            if self._reserved_cost <= 0:  # only other processes' requests are in flight: look again shortly
                await asyncio.sleep(0.2)
                continue
            async with self._request_finished:
                await self._request_finished.wait()

    def _count_done_elsewhere(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def stop(self, reason: str) -> None:
        if self.stats.stopped is None:
            self.stats.stopped = reason
            log.warning("judge: stopping — %s (requests in flight finish and are stored)", reason)

    # -- one judgement ---------------------------------------------------------------------------------------------

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after * self.rng.uniform(1.0, 1.1)  # a little later than asked, never earlier
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (retry - 1))
        return ceiling * self.rng.uniform(0.5, 1.0)

    def _account(self, prompt_tokens: int, completion_tokens: int) -> float:
        cost = self.settings.cost(prompt_tokens, completion_tokens)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.cost_usd += cost
        return cost

    def _finish(self, judgement: Judgement, request: dict[str, Any] | None) -> None:
        self.store.put(judgement, request=request)
        if judgement.ok:
            self.stats.judged += 1
        else:
            self.stats.failed += 1
            self.stats.failure_reasons[_reason_class(judgement.failure or "")] += 1
        if self._bar is not None:
            self._bar.update(1)
            self._refresh_postfix()

    def _refresh_postfix(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self._bar is None or (not force and now - self._last_postfix < 0.5):
            return
        self._last_postfix = now
        elapsed = max(now - self._started, 1e-9)
        self._bar.set_postfix(req_s=f"{self.stats.requests / elapsed:.1f}",
                              tok=self.stats.prompt_tokens + self.stats.completion_tokens,
                              cost=f"${self.stats.cost_usd:.4f}", failed=self.stats.failed, refresh=False)

    async def judge_one(self, candidate: Candidate, key: str) -> None:
        settings = self.settings
        attempt = transient = invalid = 0
        prompt_total = completion_total = 0
        cost_total = 0.0
        started = time.perf_counter()
        estimated_prompt, estimated_completion = self.expert.estimate_tokens(candidate)
        estimated_tokens = estimated_prompt + estimated_completion
        estimated_cost = settings.cost(estimated_prompt, estimated_completion)

        def judgement(status: str, **values: Any) -> Judgement:
            return Judgement(key=key, candidate_id=candidate.id, expert=self.expert.identity,
                             prompt_version=self.expert.prompt_version, status=status, attempts=attempt + 1,
                             prompt_tokens=prompt_total, completion_tokens=completion_total,
                             cost_usd=round(cost_total, 8), seconds=round(time.perf_counter() - started, 4),
                             created_at=time.time(), **values)

        while True:
            if not await self._within_budget(estimated_cost):
                return
            await self.limiter.acquire(estimated_tokens)
            # recheck after the (possibly long) wait: other workers (and processes) may have spent the budget
            # meanwhile; the request is reserved in the store until it is recorded
            reservation = await self._within_budget(estimated_cost, reserve=True, key=key)
            if reservation is None:
                return
            self.stats.requests += 1
            self._reserved_cost += estimated_cost
            request_started = time.perf_counter()
            error: Exception | None = None
            result: ExpertResult | None = None
            try:
                result = await self.expert.judge(candidate, key=key, attempt=attempt)
            except (TransientError, InvalidResponse, ItemError, FatalError) as err:
                error = err
            finally:
                self._reserved_cost -= estimated_cost
            seconds = round(time.perf_counter() - request_started, 4)
            # Charge what the reply used (valid or not) before anyone re-checks the budget.
            used = result if result is not None else error
            prompt_tokens = int(getattr(used, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(used, "completion_tokens", 0) or 0)
            cost = self._account(prompt_tokens, completion_tokens)
            prompt_total += prompt_tokens
            completion_total += completion_tokens
            cost_total += cost
            if prompt_tokens or completion_tokens:
                self.limiter.correct(prompt_tokens + completion_tokens - estimated_tokens)
            async with self._request_finished:
                self._request_finished.notify_all()
            request: dict[str, Any] = {"attempt": attempt, "seconds": seconds, "prompt_tokens": prompt_tokens,
                                       "completion_tokens": completion_tokens, "cost_usd": cost,
                                       "reservation": reservation}
            if result is not None or getattr(error, "status", None) is not None or isinstance(error, InvalidResponse):
                self._answered += 1  # the server replied (an HTTP error is a reply too)
            if result is not None or isinstance(error, InvalidResponse | ItemError):
                self._retry_log.answered()
            if result is not None:
                self._consecutive_failures = 0
                self._finish(judgement("ok", scores=list(result.scores), rationales=list(result.rationales),
                                       order=list(result.order), raw=result.raw), {**request, "outcome": "ok"})
                return
            assert error is not None
            reason_text = getattr(error, "reason", str(error))
            request["detail"] = reason_text[:500]
            if isinstance(error, InvalidResponse):
                self.stats.invalid_replies += 1
                invalid += 1
                if invalid > settings.max_invalid_retries:
                    self._finish(judgement("failed", failure=f"invalid reply after {invalid} attempts: {reason_text}",
                                           retryable=False), {**request, "outcome": "invalid"})
                    return
                self.store.log_request(key, outcome="invalid", **request)
                self._retry_log.retry(f"expert reply invalid, asking again ({invalid}/{settings.max_invalid_retries}) "
                                      f"for {candidate.id}: {reason_text}")
                attempt += 1
                continue
            if isinstance(error, TransientError):
                self.stats.transient_errors += 1
                transient += 1
                if error.retry_after is not None:
                    self.limiter.pause_for(error.retry_after)
                if transient > settings.max_retries:
                    self._finish(judgement("failed", retryable=True,
                                           failure=f"gave up after {transient} attempts: {reason_text}"),
                                 {**request, "outcome": "transient"})
                    self._consecutive_failures += 1
                    self._retry_log.retry(f"expert gave up on {candidate.id} after {transient} attempts: {reason_text} "
                                          f"(stored as retryable; {self._consecutive_failures} in a row, the run "
                                          f"stops at {settings.max_consecutive_failures})")
                    if self._answered == 0:
                        self.stop(f"expert unavailable: no answer since the run started ({self.stats.requests} "
                                  f"requests, {transient} attempts for {candidate.id}; last: {reason_text})")
                    elif self._consecutive_failures >= settings.max_consecutive_failures:
                        self.stop(f"expert unavailable: {self._consecutive_failures} judgements in a row failed "
                                  f"after {settings.max_retries} retries (last: {reason_text})")
                    return
                self.store.log_request(key, outcome="transient", **request)
                delay = self._backoff(transient, error.retry_after)
                self._retry_log.retry(f"expert retry {transient}/{settings.max_retries} for {candidate.id}: "
                                      f"{reason_text}; next in {delay:.1f} s")
                await asyncio.sleep(delay)
                attempt += 1
                continue
            if isinstance(error, ItemError):
                self._finish(judgement("failed", failure=reason_text, retryable=False),
                             {**request, "outcome": "item_error"})
                return
            self.store.log_request(key, outcome="fatal", **request)
            self.stop(f"fatal: {reason_text}")
            return

    # -- the run ---------------------------------------------------------------------------------------------------

    def select(self, candidates: Sequence[Candidate], keys: Mapping[str, str]) -> list[tuple[Candidate, str]]:
        """The (candidate, key) pairs still to ask, one per key: stored ok judgements and final failures are
        skipped; retryable failures are asked again unless ``retry_failed=none``; ``all`` re-asks every failure."""
        stored = self.store.statuses()
        todo: dict[str, Candidate] = {}
        already = 0
        for candidate in candidates:
            key = keys[candidate.id]
            if key in todo:
                continue
            status = stored.get(key)
            if status is not None:
                ok, retryable = status[0] == "ok", status[1]
                redo = not ok and (self.settings.retry_failed == "all"
                                   or (self.settings.retry_failed == "transient" and retryable))
                if not redo:
                    already += 1
                    continue
            todo[key] = candidate
        self.stats.candidates = len(candidates)
        self.stats.unique_keys = len(set(keys.values()))
        self.stats.already_judged = already
        self.stats.todo = len(todo)
        return [(c, k) for k, c in todo.items()]

    def record_problems(self, candidates: Iterable[Candidate], keys: Mapping[str, str],
                        problems: Mapping[str, str]) -> None:
        """Store candidates that cannot be asked (image gone or changed) as final failures, without a request."""
        stored = self.store.statuses()
        for candidate in candidates:
            reason = problems.get(candidate.id)
            key = keys[candidate.id]
            if reason is None or (key in stored and stored[key][0] == "ok"):
                continue
            self.store.put(Judgement(key=key, candidate_id=candidate.id, expert=self.expert.identity,
                                     prompt_version=self.expert.prompt_version, status="failed", failure=reason,
                                     attempts=0, created_at=time.time()))

    async def run(self, items: Sequence[tuple[Candidate, str]]) -> RunStats:
        concurrency = self.settings.concurrency
        if self.expert.max_concurrency:
            concurrency = min(concurrency, self.expert.max_concurrency)
        queue: asyncio.Queue[tuple[Candidate, str]] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        self._started = time.perf_counter()
        self._bar = tqdm(total=len(items), desc=f"judge {self.expert.identity}", unit="q",
                         disable=not self.settings.progress, dynamic_ncols=True)

        deferred: list[tuple[Candidate, str]] = []

        async def worker() -> None:
            while not self.stats.stopped:
                try:
                    candidate, key = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    state = self.store.claim(key, self.owner, since=self._since)  # one process asks each judgement
                    if state == "claimed":
                        await self.judge_one(candidate, key)
                except StoreWriteError as err:  # a full disk: stop; the requests in flight still count
                    self.store_error = self.store_error or err
                    self.stop(f"store: {err}")
                    return
                if state == "done":
                    self.stats.judged_elsewhere += 1
                    self._count_done_elsewhere()
                elif state == "taken":
                    deferred.append((candidate, key))

        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, max(1, len(items))))))
            # keys another judge holds: wait for its answers; a holder that died leaves its keys to this one
            while deferred and not self.stats.stopped:
                await asyncio.sleep(0.2)
                busy = self.store.claimed_by_others([k for _, k in deferred], self.owner)
                for item in [d for d in deferred if d[1] not in busy]:
                    deferred.remove(item)
                    queue.put_nowait(item)
                if not queue.empty():
                    await asyncio.gather(*(worker() for _ in range(min(concurrency, queue.qsize()))))
        finally:
            try:
                self.store.release_owner(self.owner)
            except StoreWriteError as err:  # its reservations stay: the next run on the store counts them as lost
                log.warning("judge: %s", err)
            self.stats.seconds = time.perf_counter() - self._started
            self._refresh_postfix(force=True)
            self._bar.close()
            self._bar = None
            await self.expert.aclose()
        return self.stats


def judge_candidates(candidates: Sequence[Candidate], expert: Expert, store_path: str | Path,
                     settings: JudgeSettings, *, synchronous: str = "NORMAL") -> tuple[RunStats, dict[str, str]]:
    """Judge every candidate not yet in the store at ``store_path``; returns the run's statistics and the
    candidate id → judgement key map (for building pairs)."""
    keys, problems = plan_keys(candidates, expert)
    with JudgementStore(store_path, synchronous=synchronous) as store:
        store.set_meta("expert", expert.identity)
        store.set_meta("prompt_version", expert.prompt_version)
        runner = JudgeRunner(expert, store, settings)
        runner.record_problems(candidates, keys, problems)
        items = runner.select(candidates, keys)
        log.info("judge: %d candidates, %d distinct, %d already judged, %d to ask%s", runner.stats.candidates,
                 runner.stats.unique_keys, runner.stats.already_judged, runner.stats.todo,
                 f" ({len(problems)} cannot be asked)" if problems else "")
        stats = asyncio.run(runner.run(items))
        if runner.store_error is not None:
            raise runner.store_error
    return stats, keys
