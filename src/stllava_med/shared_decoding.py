"""K sampled answers per prompt from one prompt encoding, decoded together, finished rows dropped.

:func:`stllava_med.generation.sample_sequences` encodes each prompt and its image once, repeats the KV cache K
times and continues with ``generate``. This module replaces that ``generate`` continuation with a lean decoding
loop (:func:`decode_shared`, passed to ``generate`` as its ``custom_generate`` method, so the generation config,
logits processors and stopping criteria are ``generate``'s own):

* every step runs only the rows still decoding: a row that ended (EOS, stop string) leaves the KV cache, the
  attention mask and the positions at the next compaction, so the long answers of a batch no longer drag the
  finished ones through every remaining step;
* the sampled tokens are ``generate``'s: each step draws ``torch.multinomial`` over a full ``rows x vocab``
  table (finished rows hold a one-hot at the pad token), so the random stream advances exactly as in
  ``generate``'s own sampling loop, and a row's sample depends only on its own probabilities and its place in
  the stream. The returned tensor has ``generate``'s layout (pad after a row's end).

Same seed, same samples as ``generate`` continuing from the same cache (the reference path, tested in
``tests/integration/test_shared_decoding.py``), as long as a row's logits do not depend on which other rows share
its forward pass (true of the CPU and CUDA kernels we test on; a batch-size-dependent kernel could change the last
bits of a logit, and so, rarely, a sample).

Only what this loop reproduces runs here (:func:`fast_path_supported`): row-wise logits processors (temperature,
top-k, top-p, min-p, min length; not the repetition penalty, whose state generate() sets per row) and stopping criteria (max length, EOS, stop strings),
families whose positions follow the attention mask (no 3-D rope), no stop strings (``generate`` passes a custom
decoding method no tokenizer for them: Mistral's questioner turns). Anything else takes ``generate``'s own loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

# Each of these looks at one row at a time (its scores, its own tokens): running them on the rows still
# decoding gives those rows what running them on the whole batch gives.
ROW_WISE_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper,
                       MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
ROW_WISE_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, StopStringCriteria)


log = logging.getLogger(__name__)

# the last call: which loop it took ("shared", or "generate (<reason>)") and, for "shared", the new tokens of
# each row up to its end (for tests and benchmarks)
LAST_CALL: dict[str, Any] = {}


class BufferedLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose keys and values live in a preallocated buffer that
    grows by chunks: a step writes its new position in place instead of concatenating (``DynamicLayer`` copies
    the whole cache every step, the largest cost of a CPU decoding step at a few hundred cached positions). The
    attention reads a view of the filled part: the same values as the concatenated tensor."""

    CHUNK = 128

    @classmethod
    def from_layer(cls, layer: DynamicLayer, capacity: int) -> BufferedLayer:
        new = cls()
        new.device, new.is_initialized = layer.device, True
        length = layer.keys.shape[-2]
        new._keys = layer.keys.new_empty((*layer.keys.shape[:2], max(capacity, length), layer.keys.shape[-1]))
        new._values = layer.values.new_empty((*layer.values.shape[:2], max(capacity, length), layer.values.shape[-1]))
        new._keys[..., :length, :] = layer.keys
        new._values[..., :length, :] = layer.values
        new.length = length
        new._views()
        return new

    def _views(self) -> None:
        self.keys = self._keys[..., : self.length, :]
        self.values = self._values[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            grow = max(end - self._keys.shape[-2], self.CHUNK, self._keys.shape[-2] // 4)
            self._keys = torch.cat([self._keys, self._keys.new_empty((*self._keys.shape[:2], grow,
                                                                       self._keys.shape[-1]))], dim=-2)
            self._values = torch.cat([self._values, self._values.new_empty((*self._values.shape[:2], grow,
                                                                             self._values.shape[-1]))], dim=-2)
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys = self._keys[indices]
        self._values = self._values[indices]
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()
        else:
            super().crop(tokens_to_remove)


def fast_path_supported(logits_processor: LogitsProcessorList, stopping_criteria: StoppingCriteriaList,
                        generation_config: Any) -> str | None:
    """None when :func:`decode_shared` reproduces ``generate``'s sampling for these settings, else the reason."""
    if not generation_config.do_sample:
        return "greedy decoding"
    if generation_config.num_beams != 1:
        return "beam search"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate"
    for processor in logits_processor:
        if type(processor) not in ROW_WISE_PROCESSORS:
            return f"logits processor {type(processor).__name__}"
    for criterion in stopping_criteria:
        if type(criterion) not in ROW_WISE_CRITERIA:
            return f"stopping criterion {type(criterion).__name__}"
    return None


def decode_shared(model: Any, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList,
                  stopping_criteria: StoppingCriteriaList, generation_config: Any, synced_gpus: bool = False,
                  streamer: Any = None, **model_kwargs: Any) -> torch.LongTensor:
    """``generate``'s ``custom_generate`` decoding method: multinomial sampling that drops finished rows.

    Called by ``generate`` with the prompt ids (every row's full prompt), a cache holding all but the last prompt
    token, the 2-D attention mask (None when ``generate`` dropped an all-ones mask) and the positions it derived
    from it. Returns ``generate``'s output: prompt ids followed by the new tokens, pad after a row's end."""
    cache = model_kwargs.get("cache")
    pad_token = generation_config._pad_token_tensor
    reason = fast_path_supported(logits_processor, stopping_criteria, generation_config) or (
        "synced_gpus" if synced_gpus else "a streamer" if streamer is not None else "no prefilled cache"
        if cache is None else "no pad token" if pad_token is None else "no position ids"
        if model_kwargs.get("position_ids") is None else None)
    if reason:
        # nothing has run yet: generate()'s own sampling loop, with what generate() prepared
        log.debug("shared decoding: %s, generate()'s sampling loop instead", reason)
        LAST_CALL.clear()
        LAST_CALL["decoder"] = f"generate ({reason})"
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    LAST_CALL.clear()
    LAST_CALL["decoder"] = "shared"
    device = input_ids.device
    pad_token = pad_token.to(device)
    rows = input_ids.shape[0]
    attention_mask = model_kwargs.get("attention_mask")
    position_ids = model_kwargs["position_ids"]
    extra = {key: model_kwargs[key] for key in ("use_cache", "logits_to_keep") if key in model_kwargs}

    # the cache's plain layers become buffered ones (others stay as they are), with room for 256 new tokens
    capacity = min(generation_config.max_length, input_ids.shape[1] + 2 * BufferedLayer.CHUNK)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[index] = BufferedLayer.from_layer(layer, capacity)
    present = torch.arange(rows, device=device)   # rows in the cache, in cache order
    unfinished = torch.ones(rows, dtype=torch.long, device=device)
    positions = position_ids[:, -1:]              # the next token's position, per present row
    tokens = input_ids[:, -1:]                    # the next token to feed, per present row
    finished_present = 0
    produced = torch.zeros(rows, dtype=torch.long, device=device)  # new tokens per row, its last (EOS) included
    unfinished_before = unfinished.clone()
    while True:
        outputs = model(input_ids=tokens.contiguous(), attention_mask=attention_mask, position_ids=positions,
                        cache=cache, return_dict=True, **extra)
        cache = outputs.cache
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
        del outputs
        scores = logits_processor(input_ids[present], logits)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        if present.shape[0] < rows:
            # generate() samples every row each step: the same draw over a full table keeps the stream in step
            table = torch.zeros((rows, probs.shape[-1]), dtype=probs.dtype, device=device)
            table[:, int(pad_token)] = 1.0
            table[present] = probs
            probs = table
        next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        next_tokens = next_tokens * unfinished + pad_token * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        produced += unfinished_before
        unfinished_before = unfinished.clone()
        still = unfinished[present]
        remaining = int(still.sum())
        if remaining == 0:
            break
        finished_present = present.shape[0] - remaining
        keep = None
        # compaction copies the present rows' cache once: worth it when an eighth of them have finished
        if finished_present and finished_present * 8 >= present.shape[0]:
            keep = still.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            present = present[keep]
            positions = positions[keep]
            if attention_mask is not None:
                attention_mask = attention_mask[keep]
        positions = positions + 1
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        tokens = input_ids[present, -1:]
    LAST_CALL["new_tokens"] = produced.tolist()
    return input_ids
