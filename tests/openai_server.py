"""A real OpenAI-compatible HTTP server for the judge's tests and benchmarks, on 127.0.0.1 only.

It speaks the ``POST /v1/chat/completions`` JSON the official ``openai`` client sends and expects (``choices``,
``message``, ``finish_reason``, ``usage``), grades the answers it finds in the judge's prompt with a
deterministic rule (so tests can check that scores come back to the right answer whatever order they were
shown in), and can inject faults:

===============  ==============================================================================================
``429`` / ``429:S``  HTTP 429 with ``Retry-After: S`` (seconds; default 1)
``500`` / ``503``    HTTP 5xx
``timeout``          sleep ``timeout_sleep_s`` before answering (longer than the client's timeout)
``malformed``        200 with message content that is not JSON
``out_of_range``     200 with a score of 11
``wrong_count``      200 with one score too few
``bad_body``         200 whose body is not JSON at all
``auth``             HTTP 401
``echo_key``         HTTP 500 whose error message repeats the request's Authorization header (careless servers do)
===============  ==============================================================================================

Faults come from a global queue (consumed by arrival order) and/or per-question scripts (consumed by the
requests for that question). Every request is logged (question, presented answers, response format, fault,
whether it was answered). ``hold_after=N`` answers the first N requests and holds every later one until
:meth:`release` (then answered, or dropped unanswered with ``drop=True``): the kill-and-resume test uses it to
kill the judge at a moment it knows exactly which requests were answered.

Run standalone (benchmarks): ``python tests/openai_server.py --latency 0.1`` prints ``PORT <n>`` and serves.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ANSWER = re.compile(r"\[Answer (\d+)\]\n(.*?)\n\[End of Answer \1\]", re.DOTALL)
_QUESTION = re.compile(r"\[Question\]\n(.*?)\n\n\[Answer 1\]", re.DOTALL)


def default_score(question: str, answer: str) -> int:
    """The server's grading rule: an explicit ``[q=N]`` tag in the answer, else a hash of the answer (1–10)."""
    tag = re.search(r"\[q=(\d+)\]", answer)
    if tag:
        return int(tag.group(1))
    return int(hashlib.sha256(answer.encode("utf-8")).hexdigest(), 16) % 10 + 1


@dataclass
class RequestLog:
    index: int
    time: float
    question: str | None
    presented: list[str]
    response_format: str | None
    has_image: bool
    authorized: bool
    fault: str | None
    status: int = 0
    answered: bool = False
    held: bool = False


@dataclass
class ServerState:
    latency_s: float = 0.0
    timeout_sleep_s: float = 2.0
    api_key: str | None = None
    faults: deque = field(default_factory=deque)
    question_faults: dict[str, deque] = field(default_factory=dict)
    score_fn: Callable[[str, str], int] = default_score
    hold_after: int | None = None
    max_requests: int = 10000
    max_hold_s: float = 30.0
    log: list[RequestLog] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release_event: threading.Event = field(default_factory=threading.Event)
    drop_held: bool = False
    answered_count: int = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def setup(self) -> None:
        super().setup()
        # headers and body go out as two writes; with Nagle on, the body waits for the client's delayed ACK
        # (~40 ms per response), which would be measured as expert latency
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> bool:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            return False

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> bool:
        body = json.dumps({"error": {"message": message, "type": "test_server", "code": status}}).encode()
        return self._send(status, body, headers)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        state = self.server.state
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            self._error(400, "body is not JSON")
            return
        text, has_image = "", False
        for message in payload.get("messages", []):
            content = message.get("content")
            if isinstance(content, str):
                text += content + "\n"
                continue
            for part in content or []:
                if part.get("type") == "text":
                    text += part["text"] + "\n"
                elif part.get("type") == "image_url":
                    has_image = str(part.get("image_url", {}).get("url", "")).startswith("data:image/")
        question_match = _QUESTION.search(text)
        question = question_match.group(1) if question_match else None
        presented = [m.group(2) for m in _ANSWER.finditer(text)]
        response_format = (payload.get("response_format") or {}).get("type")
        authorized = state.api_key is None or self.headers.get("Authorization") == f"Bearer {state.api_key}"
        with state.lock:
            fault = None
            if question is not None:
                for fragment, script in state.question_faults.items():
                    if fragment in question and script:
                        fault = script.popleft()
                        break
            if fault is None and state.faults:
                fault = state.faults.popleft()
            entry = RequestLog(len(state.log), time.time(), question, presented, response_format, has_image,
                               authorized, fault)
            state.log.append(entry)
            over_cap = len(state.log) > state.max_requests
            hold = state.hold_after is not None and state.answered_count >= state.hold_after and fault is None
            entry.held = hold
        if over_cap:
            entry.status = 500
            self._error(500, "test server request cap reached")
            return
        if hold:
            state.release_event.wait(timeout=state.max_hold_s)
            if state.drop_held:
                self.close_connection = True
                return
        if state.latency_s:
            time.sleep(state.latency_s)
        if not authorized or fault == "auth":
            entry.status = 401
            self._error(401, "invalid api key")
            return
        if fault and fault.startswith("429"):
            retry_after = fault.split(":", 1)[1] if ":" in fault else "1"
            entry.status = 429
            self._error(429, "rate limited", {"Retry-After": retry_after})
            return
        if fault == "echo_key":
            entry.status = 500
            self._error(500, f"upstream failed for request with {self.headers.get('Authorization')}")
            return
        if fault in ("500", "502", "503"):
            entry.status = int(fault)
            self._error(int(fault), "server error")
            return
        if fault == "timeout":
            time.sleep(state.timeout_sleep_s)
        if fault == "bad_body":
            entry.status = 200
            entry.answered = self._send(200, b"<html>not json</html>")
            return
        if not presented or question is None:
            entry.status = 400
            self._error(400, "no [Question]/[Answer n] blocks in the prompt")
            return
        scores = [{"answer": i + 1, "score": state.score_fn(question, a), "rationale": f"graded answer {i + 1}"}
                  for i, a in enumerate(presented)]
        if fault == "out_of_range":
            scores[0]["score"] = 11
        if fault == "wrong_count":
            scores = scores[:-1]
        content = "this is not json {" if fault == "malformed" else json.dumps({"scores": scores})
        prompt_tokens = len(text) // 4 + (85 if has_image else 0)
        completion_tokens = max(1, len(content) // 4)
        body = json.dumps({
            "id": f"chatcmpl-test-{entry.index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload.get("model", "test"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }).encode()
        entry.status = 200
        entry.answered = self._send(200, body)
        if entry.answered:
            with state.lock:
                state.answered_count += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, state: ServerState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class OpenAITestServer:
    """Context manager: ``with OpenAITestServer(latency_s=0.1) as server: server.base_url``."""

    def __init__(self, *, latency_s: float = 0.0, api_key: str | None = None, faults: Iterable[str] = (),
                 question_faults: dict[str, Iterable[str]] | None = None, timeout_sleep_s: float = 2.0,
                 score_fn: Callable[[str, str], int] = default_score, hold_after: int | None = None,
                 max_requests: int = 10000, max_hold_s: float = 30.0) -> None:
        self.state = ServerState(latency_s=latency_s, timeout_sleep_s=timeout_sleep_s, api_key=api_key,
                                 faults=deque(faults),
                                 question_faults={k: deque(v) for k, v in (question_faults or {}).items()},
                                 score_fn=score_fn, hold_after=hold_after, max_requests=max_requests,
                                 max_hold_s=max_hold_s)
        self._server = _Server(self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log(self) -> list[RequestLog]:
        with self.state.lock:
            return list(self.state.log)

    def requests_per_question(self, *, answered_only: bool = False) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for entry in self.log:
            if entry.question is not None and (entry.answered or not answered_only):
                counts[entry.question] += 1
        return dict(counts)

    def release(self, *, drop: bool = False) -> None:
        self.state.drop_held = drop
        self.state.hold_after = None
        self.state.release_event.set()

    def start(self) -> OpenAITestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release(drop=True)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--seconds", type=float, default=600.0, help="serve this long at most, then exit")
    args = parser.parse_args(argv)
    with OpenAITestServer(latency_s=args.latency, max_requests=10**7) as server:
        print(f"PORT {server.port}", flush=True)
        # serve until stdin closes (the parent exited or is done) or the deadline passes
        stdin_closed = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
        with contextlib.suppress(KeyboardInterrupt):
            stdin_closed.wait(timeout=args.seconds)

if __name__ == "__main__":
    main()
