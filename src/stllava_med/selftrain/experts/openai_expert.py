"""An expert behind the OpenAI chat-completions API: GPT-4o (the paper's), or any OpenAI-compatible server
(vLLM, SGLang, Ollama) serving a larger open LVLM, chosen with ``expert.base_url`` and ``expert.model``.

The image travels as a base64 data URL; the reply is constrained by a JSON schema (structured outputs) and
validated anyway, since not every server enforces schemas. The client's own retries are switched off: the
judge runner retries with its own backoff, budget and rate limits, and must see every attempt to count it.

The API key is read from the environment by the caller and lives only inside the client object: it is never
an attribute of this class, a config value, a log line or part of an error message.
"""

from __future__ import annotations

import base64
import email.utils
import io
import logging
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import openai
from openai import AsyncOpenAI

from stllava_med.data.vqa import ImageError, load_image
from stllava_med.selftrain.experts.base import (
    SYSTEM_PROMPT,
    Expert,
    ExpertResult,
    FatalError,
    InvalidResponse,
    ItemError,
    TransientError,
    map_back,
    parse_scores,
    presentation_order,
    render_prompt,
    response_schema,
)
from stllava_med.selftrain.records import Candidate

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json_schema", "json_object", "none")
# Retry-After beyond this is treated as "come back much later": we cap rather than sleep for hours.
MAX_RETRY_AFTER_S = 600.0
_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"))


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if seconds == seconds and seconds >= 0:
            return min(seconds, MAX_RETRY_AFTER_S)
    return None


def image_data_url(path: str | Path, *, max_side: int | None = None) -> str:
    """The image file as a ``data:`` URL. JPEG/PNG/GIF/WebP bytes are sent as they are; anything else
    (TIFF, 16-bit PNG exports...) or a ``max_side`` downscale goes through PIL to PNG."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ItemError(f"cannot read image {path}: {err}") from err
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is not None and not max_side:
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    try:
        image = load_image(path)
    except ImageError as err:
        raise ItemError(str(err)) from err
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    elif mime is not None:  # small enough: the original bytes, untouched
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class OpenAIExpert(Expert):
    """Grades answers through ``/v1/chat/completions`` with an image, a rubric and a JSON schema."""

    def __init__(self, *, model: str, api_key: str, base_url: str | None = None, temperature: float = 0.2,
                 max_tokens: int = 400, timeout_s: float = 60.0, response_format: str = "json_schema",
                 image_detail: str | None = "auto", max_image_side: int | None = None,
                 image_tokens_estimate: int = 765, seed: int = 0, max_concurrency: int | None = None,
                 identity: str | None = None) -> None:
        if response_format not in RESPONSE_FORMATS:
            raise ValueError(f"expert.response_format must be one of {RESPONSE_FORMATS}, not {response_format!r}")
        self.model = model
        self.base_url = base_url
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.response_format = response_format
        self.image_detail = image_detail
        self.max_image_side = max_image_side
        self.image_tokens_estimate = image_tokens_estimate
        self.seed = seed
        self.max_concurrency = max_concurrency
        self.identity = identity or f"openai:{model}"
        # the HTTP client logs every request at INFO: 10K lines per run in the job log, and nothing we lack
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        self._client = AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)
        # A server may echo request headers in an error body; reasons and replies are stored, so scrub the key.
        self._scrub = _scrubber(api_key)
        self._images: OrderedDict[tuple[str, int | None], str] = OrderedDict()
        self._replied = False  # the server has answered at least once (any HTTP status)

    def __repr__(self) -> str:  # no key, no client internals
        return f"OpenAIExpert(model={self.model!r}, base_url={self.base_url!r})"

    def _image_url(self, path: str) -> str:
        # the N questions of an image arrive close together: keep a few encoded images
        cache_key = (path, self.max_image_side)
        if cache_key in self._images:
            self._images.move_to_end(cache_key)
            return self._images[cache_key]
        url = image_data_url(path, max_side=self.max_image_side)
        self._images[cache_key] = url
        while len(self._images) > 16:
            self._images.popitem(last=False)
        return url

    def messages(self, candidate: Candidate, order: list[int]) -> list[dict[str, Any]]:
        presented = [candidate.answers[i] for i in order]
        image: dict[str, Any] = {"url": self._image_url(candidate.image)}
        if self.image_detail:
            image["detail"] = self.image_detail
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image_url", "image_url": image},
                                         {"type": "text", "text": render_prompt(candidate.question, presented)}]},
        ]

    def _response_format(self, n: int) -> dict[str, Any] | None:
        if self.response_format == "json_schema":
            return {"type": "json_schema",
                    "json_schema": {"name": "answer_scores", "strict": True, "schema": response_schema(n)}}
        if self.response_format == "json_object":
            return {"type": "json_object"}
        return None

    def estimate_tokens(self, candidate: Candidate) -> tuple[int, int]:
        # ~4 characters per token for English text, plus the image's tokens
        text = len(SYSTEM_PROMPT) + len(render_prompt(candidate.question, candidate.answers))
        return text // 4 + self.image_tokens_estimate, self.max_tokens

    async def judge(self, candidate: Candidate, *, key: str, attempt: int) -> ExpertResult:
        n = len(candidate.answers)
        order = presentation_order(n, key=key, attempt=attempt, seed=self.seed)
        kwargs: dict[str, Any] = {"model": self.model, "messages": self.messages(candidate, order),
                                  "temperature": self.temperature, "max_tokens": self.max_tokens}
        response_format = self._response_format(n)
        if response_format is not None:
            kwargs["response_format"] = response_format
        try:
            response = await self._client.chat.completions.create(**kwargs)
        except openai.APITimeoutError:
            raise TransientError(f"timeout after {self.timeout_s:g}s") from None
        except openai.APIConnectionError as err:
            reason = self._scrub(_connection_reason(err, self.base_url))
            if _unresolvable(err) and not self._replied:
                # a host name that does not resolve before the server ever answered: a typo, not a blip
                raise FatalError(reason) from None
            raise TransientError(reason) from None
        except openai.APIStatusError as err:
            self._replied = True
            status = err.status_code
            reason = self._scrub(f"HTTP {status}: {_short(err.message)}")
            if status == 429 or status >= 500 or status in (408, 409):
                raise TransientError(reason, retry_after=parse_retry_after(err.response.headers), status=status) from None
            if status in (401, 403, 404):
                raise FatalError(reason, status=status) from None
            raise ItemError(reason, status=status) from None
        except ValueError as err:  # a 200 whose body is not JSON (json.JSONDecodeError is a ValueError)
            raise InvalidResponse(self._scrub(f"response body is not JSON: {_short(str(err))}")) from None
        except openai.APIResponseValidationError as err:
            raise InvalidResponse(self._scrub(f"response body is not a chat completion: {_short(str(err))}")) from None
        self._replied = True
        if isinstance(response, str | bytes) or not getattr(response, "choices", None):
            raise InvalidResponse("response body is not a chat completion (no choices)")
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        choice = response.choices[0]
        message = choice.message
        content = getattr(message, "content", None)
        content = None if content is None else self._scrub(content)
        try:
            if getattr(message, "refusal", None):
                raise InvalidResponse(f"refused: {_short(message.refusal)}")
            if choice.finish_reason == "length":
                raise InvalidResponse(f"reply cut off at max_tokens={self.max_tokens}")
            presented_scores, presented_rationales = parse_scores(content, n)
        except InvalidResponse as err:
            err.prompt_tokens, err.completion_tokens = prompt_tokens, completion_tokens
            raise
        return ExpertResult(
            scores=map_back(presented_scores, order),
            rationales=map_back(presented_rationales, order),
            order=order,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            raw=content,
            extra={"response_model": getattr(response, "model", None)},
        )

    async def aclose(self) -> None:
        await self._client.close()


def _causes(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _unresolvable(err: BaseException) -> bool:
    """The host name does not exist (EAI_NONAME), as opposed to a resolver that failed for now (EAI_AGAIN)."""
    for cause in _causes(err):
        if isinstance(cause, socket.gaierror):
            return cause.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        if "Name or service not known" in str(cause) or "nodename nor servname" in str(cause):
            return True
    return False


def _connection_reason(err: BaseException, base_url: str | None) -> str:
    """``connection error to <url>: <what the socket said>`` (refused, unresolvable host, reset...)."""
    detail = ""
    for cause in _causes(err)[1:]:  # the deepest cause with an errno says most (ConnectionRefusedError, gaierror)
        text = " ".join(str(cause).split())
        if text and (not detail or getattr(cause, "errno", None) is not None):
            detail = f"{type(cause).__name__}: {_short(text, 120)}"
    return f"connection error to {base_url or 'api.openai.com'}: {detail or type(err).__name__}"


def _scrubber(secret: str) -> Any:
    if not secret or len(secret) < 8:  # placeholders such as "EMPTY" are no secret, and too common to replace
        return lambda text: text
    return lambda text: text.replace(secret, "<redacted>")


def _short(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
