"""The ``hf_local`` expert: a local transformers LVLM prompted with the same rubric, for judging without an
API (a larger open model on the same GPU node, or — in tests — the tiny backbone, whose replies do not parse
and are recorded as failures with the reason).

The prompt goes through the backbone's own chat template (:func:`stllava_med.chat.prompt_text`). Generation is
greedy on the first attempt; a retry after an unparsable reply samples, so it can come out differently. One
model serves one request at a time (``max_concurrency = 1``); the call runs in a worker thread so the event
loop (store writes, progress) keeps going.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch

from stllava_med.chat import Turn, prompt_text
from stllava_med.data.vqa import ImageError, load_image
from stllava_med.generation import generate_batch
from stllava_med.selftrain.experts.base import (
    SYSTEM_PROMPT,
    Expert,
    ExpertResult,
    InvalidResponse,
    ItemError,
    map_back,
    parse_scores,
    presentation_order,
    render_prompt,
)
from stllava_med.selftrain.records import Candidate


class HFLocalExpert(Expert):
    max_concurrency = 1

    def __init__(self, backbone: Any, fmt: Any, *, max_new_tokens: int = 400, retry_temperature: float = 0.7,
                 seed: int = 0, identity: str | None = None) -> None:
        self.backbone = backbone
        self.fmt = fmt
        self.max_new_tokens = max_new_tokens
        self.retry_temperature = retry_temperature
        self.seed = seed
        self.identity = identity or f"hf_local:{backbone.name_or_path or backbone.name}"
        self._lock = threading.Lock()

    def _generate(self, prompt: str, image: Any, attempt: int) -> tuple[str, int, int]:
        with self._lock:
            if attempt:
                torch.manual_seed(self.seed + attempt)
            text = generate_batch(self.backbone, [prompt], [image], max_new_tokens=self.max_new_tokens,
                                  do_sample=attempt > 0, temperature=self.retry_temperature)[0]
        tokenizer = self.backbone.processor.tokenizer
        return text, len(tokenizer(prompt)["input_ids"]), len(tokenizer(text)["input_ids"])

    async def judge(self, candidate: Candidate, *, key: str, attempt: int) -> ExpertResult:
        n = len(candidate.answers)
        order = presentation_order(n, key=key, attempt=attempt, seed=self.seed)
        presented = [candidate.answers[i] for i in order]
        try:
            image = load_image(candidate.image, record_id=candidate.id)
        except ImageError as err:
            raise ItemError(str(err)) from err
        text = f"{SYSTEM_PROMPT}\n\n{render_prompt(candidate.question, presented)}"
        prompt = prompt_text(self.backbone.processor, [Turn("user", text)], "assistant", self.fmt)
        try:
            reply, prompt_tokens, completion_tokens = await asyncio.to_thread(self._generate, prompt, image, attempt)
        except (RuntimeError, ValueError, IndexError) as err:  # e.g. the prompt exceeds the model's positions
            raise ItemError(f"local generation failed: {type(err).__name__}: {str(err)[:160]}") from err
        try:
            scores, rationales = parse_scores(reply, n, lenient=True)
        except InvalidResponse as err:
            err.prompt_tokens, err.completion_tokens = prompt_tokens, completion_tokens
            raise
        return ExpertResult(scores=map_back(scores, order), rationales=map_back(rationales, order), order=order,
                            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, raw=reply)
