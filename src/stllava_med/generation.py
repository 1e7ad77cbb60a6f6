"""Generation: batched decoding, and K sampled answers per prompt from one shared prefill.

Serves evaluation (:mod:`stllava_med.eval.vqa`: greedy answers), candidate generation
(:mod:`stllava_med.selftrain.generate`: descriptions, self-asked questions, K answers each) and the ``hf_local``
expert. Prompts are rendered text (:func:`stllava_med.chat.prompt_text`); they are left-padded so that every
continuation starts in the same column, and a turn ends the family's way (:func:`stop_settings`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stllava_med.backbone import Backbone
from stllava_med.chat import tokenizer_kwargs
from stllava_med.families import UnsupportedFamilyFeature, family_of, processor_family
from stllava_med.shared_decoding import decode_shared


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


def generation_inputs(processor: Any, prompts: Sequence[str], images: Sequence[Any] | None) -> Any:
    """Processor inputs for a batch of rendered prompts, left-padded so continuations start in one column;
    images passed the way the family's processor wants them; BOS never doubled."""
    family = processor_family(processor)
    tokenizer = processor.tokenizer
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return processor(text=list(prompts), images=family.processor_images(images), padding=True,
                         return_tensors="pt", **tokenizer_kwargs(processor, list(prompts)))
    finally:
        tokenizer.padding_side = previous_side


def stop_settings(backbone: Backbone, *, questioner: bool = False) -> dict[str, Any]:
    """``generate`` keywords that end a turn the family's way: every end-of-turn token (not only the
    tokenizer's EOS, e.g. Gemma's ``<end_of_turn>``), and for a questioner turn that ends in text (Mistral's
    ``[/INST]``) that text as a stop string."""
    family = processor_family(backbone.processor)
    settings: dict[str, Any] = {"eos_token_id": family.stop_token_ids(backbone.processor, backbone.model),
                                "pad_token_id": backbone.processor.tokenizer.pad_token_id}
    if questioner and family.questioner_stop:
        settings["stop_strings"] = [family.questioner_stop]
        settings["tokenizer"] = backbone.processor.tokenizer
    return settings


def decode_new(backbone: Backbone, new_tokens: torch.Tensor, *, questioner: bool = False) -> list[str]:
    texts = backbone.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    stop = processor_family(backbone.processor).questioner_stop if questioner else None
    if stop:
        texts = [t.split(stop, 1)[0] for t in texts]
    return [t.strip() for t in texts]


@torch.inference_mode()
def generate_batch(backbone: Backbone, prompts: Sequence[str], images: Sequence[Any], *, max_new_tokens: int,
                   do_sample: bool = False, num_return_sequences: int = 1, questioner: bool = False,
                   **sampling: Any) -> list[str]:
    """Decode continuations for a batch of rendered prompts (left-padded); returns the new text only,
    ``num_return_sequences`` consecutive entries per prompt. ``questioner``: the prompts end in the
    questioner role (stops at the family's questioner end marker)."""
    inputs = generation_inputs(backbone.processor, prompts, images)
    device = model_device(backbone.model)
    dtype = next((p.dtype for p in backbone.model.parameters() if p.is_floating_point()), torch.float32)
    inputs = {k: (v.to(device, dtype=dtype) if k == "pixel_values" and v.is_floating_point() else v.to(device))
              for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    was_training = backbone.model.training
    backbone.model.eval()
    try:
        output = backbone.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            **stop_settings(backbone, questioner=questioner),
            **({k: v for k, v in sampling.items() if v is not None} if do_sample else {}),
        )
    finally:
        backbone.model.train(was_training)
    return decode_new(backbone, output[:, inputs["input_ids"].shape[1]:], questioner=questioner)


def supports_shared_prefix(model: Any) -> bool:
    """Whether the model's family continues exactly from a prefilled, repeated KV cache (LLaVA, LLaVA-NeXT,
    Qwen2-VL family: tested against a fresh ``generate``); others take the plain num_return_sequences path."""
    try:
        return family_of(model).shared_prefix_sampling
    except UnsupportedFamilyFeature:
        return False


def sample_sequences(backbone: Any, prompts: Sequence[str], images: Sequence[Any], *, k: int, max_new_tokens: int,
                     shared_prefix: bool = True, questioner: bool = False, drop_finished: bool = True,
                     **sampling: Any) -> list[str]:
    """``k`` sampled continuations per prompt, ``k`` consecutive entries per prompt.

    With ``shared_prefix`` each prompt and its image are encoded once: one forward pass fills the KV cache for
    the batch, the cache is repeated ``k`` times, and decoding continues from it. ``generate``'s own
    ``num_return_sequences`` repeats the *inputs* instead, so the vision tower and the prompt prefill run ``k``
    times — the dominant cost for short answers to prompts with hundreds of image tokens. Both give the same
    text for the same seed (tested).

    ``drop_finished`` (shared prefix only): decode with :func:`stllava_med.shared_decoding.decode_shared`, which
    runs only the rows still decoding (finished answers leave the cache) and samples what ``generate``'s own loop
    samples from the same cache (tested); False: ``generate``'s loop (the reference)."""
    if not shared_prefix or k == 1:
        return generate_batch(backbone, prompts, images, max_new_tokens=max_new_tokens, do_sample=True,
                              num_return_sequences=k, questioner=questioner, **sampling)
    processor, model = backbone.processor, backbone.model
    inputs = generation_inputs(processor, prompts, images)
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device)
    extra = {key: (value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device))
             for key, value in inputs.items()
             if isinstance(value, torch.Tensor) and key not in ("input_ids", "attention_mask")}
    # generate() derives positions from the mask the same way; the prefill must agree with it. 3-D rope
    # families compute theirs (and the offsets generate() continues from) inside the model's forward.
    positions: dict[str, Any] = {}
    rope_index = family_of(model).rope_index
    if not rope_index:
        positions["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, :-1]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # everything but the last prompt token: generate() must have one uncached token to start from
            prefill = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                            use_cache=True, **positions, **_prefix_extras(extra, input_ids.shape[1] - 1))
            cache = prefill.cache
            cache.batch_repeat_interleave(k)
            stop = stop_settings(backbone, questioner=questioner)
            _repeat_rope_deltas(model, k)
            output = model.generate(
                input_ids=input_ids.repeat_interleave(k, dim=0),
                attention_mask=attention_mask.repeat_interleave(k, dim=0),
                cache=cache, max_new_tokens=max_new_tokens, do_sample=True,
                # generate()'s loop for 3-D rope positions (rope_deltas live on the model, per row) and stop
                # strings (generate() hands a custom decoding method no tokenizer for them)
                **({"custom_generate": decode_shared}
                   if drop_finished and not rope_index and "stop_strings" not in stop else {}),
                **stop,
                **{key: value for key, value in sampling.items() if value is not None},
            )
    finally:
        model.train(was_training)
    return decode_new(backbone, output[:, input_ids.shape[1]:], questioner=questioner)


def _repeat_rope_deltas(model: Any, k: int) -> None:
    """3-D rope families (Qwen2-VL / Qwen2.5-VL) keep the prefill's per-prompt rope offsets on the model, and
    ``generate`` continues every row's positions from them: repeat them with the cache (one row per sample)."""
    get_base = getattr(model, "get_base_model", None)
    core = getattr(get_base() if callable(get_base) else model, "model", None)
    deltas = getattr(core, "rope_deltas", None)
    if deltas is not None and getattr(deltas, "dim", lambda: 0)() >= 1:
        core.rope_deltas = deltas.repeat_interleave(k, dim=0)


def _prefix_extras(extra: dict[str, Any], length: int) -> dict[str, Any]:
    """Processor outputs for the prefill of the first ``length`` prompt tokens: per-token ones cut to it."""
    return {key: (value[:, :length] if key.endswith("token_type_ids") else value) for key, value in extra.items()}
