"""Chat rendering, exact targets, prompt/training-prefix identity, batched generation and stop tokens, on one
tiny real model per family (tests/families/builders).

The reference for every family is its PUBLISHED chat template (the constant in its builder module), rendered
by the processor's own ``apply_chat_template``: where the family installs a template of ours (LLaVA on
Mistral, LLaVA-NeXT-Mistral, Gemma 3), user/assistant conversations must render to the same string and the
same token ids as the published one; our template only adds the questioner turn."""

from __future__ import annotations

import importlib

import pytest
import torch

from families.conftest import mixed_images
from stllava_med.chat import ChatFormat, Turn, encode, prompt_text, render_with_spans
from stllava_med.families import processor_family
from stllava_med.generation import generation_inputs

pytestmark = [pytest.mark.families, pytest.mark.usefixtures("one_thread")]

# builder module -> name of its published-template constant
_PUBLISHED = {
    "llava15": "LLAVA15_TEMPLATE",
    "sq_llava": "SQ_LLAVA_TEMPLATE",
    "llava_mistral": "MISTRAL_LLAVA_TEMPLATE",
    "llava_next": "MISTRAL_LLAVA_TEMPLATE",
    "qwen2_5_vl": "CHAT_TEMPLATE",
    "idefics3": "CHAT_TEMPLATE",
    "gemma3": "CHAT_TEMPLATE",
}
# what ends a model turn in each family (the published checkpoints' end-of-turn / EOS token)
END_OF_TURN = {
    "llava15": "</s>",
    "sq_llava": "</s>",
    "llava_mistral": "</s>",
    "llava_next": "</s>",
    "qwen2_5_vl": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "gemma3": "<end_of_turn>",
}
SYSTEM = "You are a helpful assistant."
EXCHANGES = [
    ("Is there a fracture?", "no"),
    ("Where is the lesion located?", "left upper lobe"),
    ("What is shown in this image?", "CT of the chest"),
]
CONVERSATION = [
    Turn("user", "Is there a fracture?"),
    Turn("assistant", "no"),
    Turn("questioner", "Where is the lesion located?"),
    Turn("assistant", "left upper lobe"),
]


def published_template(family: str) -> str:
    return getattr(importlib.import_module(f"families.builders.{family}"), _PUBLISHED[family])


def _published_messages(exchanges, *, system: str | None, image) -> list[dict]:
    """The conversation as literal template messages (not through stllava_med.chat), the image (a PIL image,
    so ``apply_chat_template(tokenize=True)`` can process it) with the first user turn."""
    messages: list[dict] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for i, (question, answer) in enumerate(exchanges):
        content: list[dict] = [{"type": "image", "image": image}] if i == 0 and image is not None else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _ids(batch) -> list[int]:
    return batch["input_ids"][0].tolist()


def _target_turns(target_role: torch.Tensor) -> list[tuple[int, int, int]]:
    """(role, first index, end index) of each maximal run of one non-zero target role, in order."""
    runs: list[tuple[int, int, int]] = []
    roles = target_role.tolist()
    for i, role in enumerate(roles):
        if role == 0:
            continue
        if runs and runs[-1][0] == role and runs[-1][2] == i:
            runs[-1] = (role, runs[-1][1], i + 1)
        else:
            runs.append((role, i, i + 1))
    return runs


def _special_ids(processor, model) -> set[int]:
    tokenizer = processor.tokenizer
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    for owner in (processor, model.config):
        for name in ("image_token_id", "image_token_index", "boi_token_index", "eoi_token_index"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                ids.add(value)
    return ids


# ---- 1. rendered prompts ---------------------------------------------------------------------------------


def test_vqa_prompt_matches_published_template(family, family_backbone):
    processor = family_backbone.processor
    published = published_template(family)
    generation_prompt = "add_generation_prompt" in published
    image = mixed_images()[0]
    for question, _ in EXCHANGES:
        prompt = prompt_text(processor, [Turn("user", question)], "assistant", ChatFormat())
        messages = _published_messages([(question, None)], system=None, image=image)
        expected = processor.apply_chat_template(messages, chat_template=published, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        assert prompt == expected
        if not generation_prompt:  # Mistral's [INST] template: the prompt is the user turn itself
            assert prompt.endswith(" [/INST]")
        # and the same ids (image expanded, BOS once) as the processor's own chat-template tokenisation
        ours = generation_inputs(processor, [prompt], [image])
        theirs = processor.apply_chat_template(messages, chat_template=published, tokenize=True, return_dict=True,
                                               return_tensors="pt", add_generation_prompt=generation_prompt)
        assert _ids(ours) == _ids(theirs)


def test_user_assistant_turns_match_published_template(family, family_backbone):
    processor = family_backbone.processor
    model = family_backbone.model
    published = published_template(family)
    ours = processor_family(processor).template_name(model.config)
    if ours is None:
        # no template of ours: the processor keeps the published one, verbatim
        assert processor.chat_template == published
        return
    assert processor.chat_template != published  # ours is installed
    image = mixed_images()[1]
    for system in (None, SYSTEM):
        fmt = ChatFormat(system_prompt=system)
        for n in (1, 2, 3):
            exchanges = EXCHANGES[:n]
            turns = [t for q, a in exchanges for t in (Turn("user", q), Turn("assistant", a))]
            for with_image in (True, False):
                messages = _published_messages(exchanges, system=system, image=image if with_image else None)
                expected_text = processor.apply_chat_template(messages, chat_template=published, tokenize=False)
                # our template itself, and through the training renderer
                assert processor.apply_chat_template(messages, tokenize=False) == expected_text
                text, _ = render_with_spans(processor, turns, fmt, image=with_image)
                assert text == expected_text, (system, n, with_image)
                # the prompt for the last answer: the published rendering of the history (+ generation prompt)
                generation_prompt = "add_generation_prompt" in published
                expected_prompt = processor.apply_chat_template(messages[:-1], chat_template=published,
                                                                tokenize=False, add_generation_prompt=generation_prompt)
                assert prompt_text(processor, turns[:-1], "assistant", fmt, image=with_image) == expected_prompt
                expected = processor.apply_chat_template(messages, chat_template=published, tokenize=True,
                                                         return_dict=True, return_tensors="pt")
                encoded = encode(processor, turns, fmt, image if with_image else None)
                assert encoded.input_ids.tolist() == _ids(expected), (system, n, with_image)
                if with_image:
                    assert torch.equal(encoded.pixel_values, expected["pixel_values"])


# ---- 2. exact targets ------------------------------------------------------------------------------------


def test_exact_targets_and_image_tokens(family, family_backbone):
    from stllava_med.data.sft_datamodule import collate_sft

    processor, model = family_backbone.processor, family_backbone.model
    tokenizer = processor.tokenizer
    fam = processor_family(processor)
    fmt = ChatFormat()
    eot = fam.end_of_turn_text(processor)
    assert eot == END_OF_TURN[family]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    question_end = fam.questioner_stop or eot

    text, spans = render_with_spans(processor, CONVERSATION, fmt)
    targets = [t for t in CONVERSATION if t.role in ("assistant", "questioner")]
    assert [s.role for s in spans] == [t.role for t in targets]
    for span, turn in zip(spans, targets):
        piece = text[span.start:span.end]
        end = question_end if turn.role == "questioner" else eot
        # the template's space before the content (LLaVA's "ASSISTANT: no"), the content, and its end marker
        # (Mistral's questioner: the template's own " [/INST]")
        lead = " " if piece.startswith(" ") else ""
        assert piece.startswith(lead + turn.text), (piece, turn)
        assert piece[len(lead + turn.text):] in (end, " " + end), (piece, turn)
    expected = {role: "".join(text[s.start:s.end] for s, t in zip(spans, targets) if t.role == name)
                for role, name in ((1, "assistant"), (2, "questioner"))}

    image_token = model.config.image_token_id
    forbidden = _special_ids(processor, model) - {eot_id}
    assert image_token in forbidden
    for image in mixed_images():
        enc = encode(processor, CONVERSATION, fmt, image)
        for role in (1, 2):
            ids = enc.input_ids[enc.target_role == role]
            assert tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) \
                == expected[role], (image.size, role)
        labelled = enc.labels != -100
        assert torch.equal(labelled, enc.target_role != 0)
        assert torch.equal(enc.labels[labelled], enc.input_ids[labelled])
        assert not set(enc.input_ids[labelled].tolist()) & forbidden, image.size
        # three target turns in conversation order, each ending with its end marker
        runs = _target_turns(enc.target_role)
        assert [r[0] for r in runs] == [1, 2, 1]
        for role, lo, hi in runs:
            if role == 1 or fam.questioner_stop is None:
                assert int(enc.input_ids[hi - 1]) == eot_id
            else:  # Mistral's questioner ends in text: its closing [/INST]
                assert tokenizer.decode(enc.input_ids[lo:hi]).endswith(fam.questioner_stop)

        # as many image tokens as the model has image features, and the forward accepts them
        n_image_tokens = int((enc.input_ids == image_token).sum())
        vision_kwargs = {k: v for k, v in enc.extra.items() if k not in ("token_type_ids", "mm_token_type_ids")}
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=enc.pixel_values, **vision_kwargs)
        pooled = features.pooler_output
        rows = sum(f.numel() for f in pooled) if isinstance(pooled, list | tuple) else pooled.numel()
        assert n_image_tokens * model.config.get_text_config().hidden_size == rows, image.size
        if family != "idefics3":
            # Idefics3's count is the whole expansion (tile markers, <row_i_col_j>, newlines), not <image> tokens
            counted = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width)])
            assert counted.num_image_tokens == [n_image_tokens], image.size
        item = {"uid": "x", "input_ids": enc.input_ids, "labels": enc.labels, "target_role": enc.target_role,
                "pixel_values": enc.pixel_values, "extra": enc.extra, "family": fam.name,
                "questioner_turns": 1, "dropped_pairs": 0}
        batch = collate_sft([item], tokenizer.pad_token_id)
        inputs = {k: v for k, v in batch.items() if k not in ("target_role", "uids", "questioner_turns",
                                                               "dropped_pairs")}
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        assert out.logits.shape[:2] == enc.input_ids[None].shape
        assert torch.isfinite(out.loss)


# ---- 3. the generation prompt is the training prefix ------------------------------------------------------


def test_prompt_is_training_prefix(family, family_backbone):
    processor = family_backbone.processor
    fmt = ChatFormat()
    for image in (mixed_images()[0], mixed_images()[3]):
        enc = encode(processor, CONVERSATION, fmt, image)
        runs = _target_turns(enc.target_role)
        turn_index = [i for i, t in enumerate(CONVERSATION) if t.role != "user"]
        assert len(runs) == len(turn_index) == 3
        for (role, first, _), index in zip(runs, turn_index):
            turn = CONVERSATION[index]
            assert role == (1 if turn.role == "assistant" else 2)
            prompt = prompt_text(processor, CONVERSATION[:index], turn.role, fmt)
            prompt_ids = _ids(generation_inputs(processor, [prompt], [image]))
            # no tokenizer merge across the boundary in any family: ids compare exactly
            assert prompt_ids == enc.input_ids[:first].tolist(), (turn.role, index, image.size)
            text, spans = render_with_spans(processor, CONVERSATION[: index + 1], fmt)
            assert text.startswith(prompt) and spans[-1].start == len(prompt)


# ---- 4. batched greedy generation == one by one -----------------------------------------------------------


def test_batched_generation_equals_single(family, family_backbone):
    from stllava_med.generation import generate_batch

    processor, model = family_backbone.processor, family_backbone.model
    fam = processor_family(processor)
    # transformers initialises Gemma 3's mm_input_projection_weight to zeros (images would carry nothing):
    # give an all-zero projector weight random values, so the images' features reach the text model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if fam.is_projector_parameter(name) and param.ndim >= 2 and not param.any():
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    images = [mixed_images()[i] for i in (0, 1, 3)]  # different token counts / tiles / grids per image
    prompts = [prompt_text(processor, [Turn("user", q)], "assistant", ChatFormat()) for q, _ in EXCHANGES]
    batched = generate_batch(family_backbone, prompts, images, max_new_tokens=8)
    single = [generate_batch(family_backbone, [p], [im], max_new_tokens=8)[0] for p, im in zip(prompts, images)]
    assert batched == single
    assert any(batched)  # greedy decoding of a random model writes something


# ---- 5. stop tokens --------------------------------------------------------------------------------------


def test_stop_tokens_include_end_of_turn(family, family_backbone):
    processor, model = family_backbone.processor, family_backbone.model
    tokenizer = processor.tokenizer
    stops = processor_family(processor).stop_token_ids(processor, model)
    eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert eot_id is not None and eot_id != tokenizer.unk_token_id
    assert tokenizer.convert_ids_to_tokens(eot_id) == END_OF_TURN[family]
    assert eot_id in stops
    assert len(stops) == len(set(stops))
    if family == "gemma3":  # the generation config's <eos> stays a stop token too
        assert tokenizer.eos_token_id in stops
