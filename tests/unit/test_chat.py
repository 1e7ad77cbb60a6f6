"""Target masks from the chat template: only model turns (+ end of turn) are targets; prompts used at
generation time are exactly the training prefixes; works with the tiny and the LLaVA-1.5 templates."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from conftest import LLAVA15_TEMPLATE
from stllava_med.chat import (
    IGNORE_INDEX,
    ChatFormat,
    SequenceTooLong,
    TemplateError,
    Turn,
    encode,
    prompt_text,
    render_with_spans,
)

TURNS = [
    Turn("user", "Is there a fracture?"),
    Turn("assistant", "no"),
    Turn("questioner", "Where is the lesion?"),
    Turn("assistant", "left lung"),
]


@pytest.fixture(scope="module")
def processor(tiny_backbone_path):
    from stllava_med.backbone import load_processor

    return load_processor(str(tiny_backbone_path))


@pytest.fixture(scope="module")
def llava15_processor(processor):
    proc = copy.deepcopy(processor)
    proc.chat_template = LLAVA15_TEMPLATE
    return proc


@pytest.fixture(scope="module")
def image(sample_dir):
    return Image.open(next((sample_dir / "images").iterdir())).convert("RGB")


def _targets(proc, enc):
    return proc.tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX])


def test_spans_cover_model_turns_and_end_of_turn(processor):
    text, spans = render_with_spans(processor, TURNS, ChatFormat())
    assert [text[s.start:s.end] for s in spans] == ["no</s>", "Where is the lesion?</s>", "left lung</s>"]
    assert [s.role for s in spans] == ["assistant", "questioner", "assistant"]
    assert "<|vuser|>" in text  # the questioner is rendered as the template's third role


def test_labels_only_on_targets_never_image_or_first_turn(processor, image):
    enc = encode(processor, TURNS, ChatFormat(), image)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    n_image = int((enc.input_ids == image_id).sum())
    assert n_image == 64  # 112 px / 14 px patches, CLS dropped
    assert (enc.labels[enc.input_ids == image_id] == IGNORE_INDEX).all()
    assert _targets(processor, enc).replace(" ", "") == "no</s>Whereisthelesion?</s>leftlung</s>".replace(" ", "")
    first_turn_ids = processor.tokenizer("Is there a fracture?", add_special_tokens=False).input_ids
    labelled = enc.labels[enc.labels != IGNORE_INDEX].tolist()
    assert not any(labelled[i:i + len(first_turn_ids)] == first_turn_ids for i in range(len(labelled)))
    # questions and answers are told apart for separate accuracies
    roles = enc.target_role[enc.labels != IGNORE_INDEX].tolist()
    assert roles.count(2) == len(processor.tokenizer("Where is the lesion?</s>", add_special_tokens=False).input_ids)


def test_system_prompt_is_never_a_target(processor, image):
    fmt = ChatFormat(system_prompt="You are a radiology assistant.")
    enc = encode(processor, TURNS[:2], fmt, image)
    assert "radiology" in processor.tokenizer.decode(enc.input_ids)
    assert "radiology" not in _targets(processor, enc)


@pytest.mark.parametrize("role", ["assistant", "questioner"])
@pytest.mark.parametrize("template", ["tiny", "llava15"])
def test_generation_prompt_is_the_training_prefix(processor, llava15_processor, image, role, template):
    processor = processor if template == "tiny" else llava15_processor
    fmt = ChatFormat()
    turns = [*TURNS[:2], Turn(role, "What organ is shown?")]
    enc = encode(processor, turns, fmt, image)
    first_target = int((enc.labels != IGNORE_INDEX).nonzero()[-len(processor.tokenizer(
        "What organ is shown?</s>", add_special_tokens=False).input_ids)])
    prompt = prompt_text(processor, turns[:2], role, fmt)
    prompt_ids = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0]
    assert torch.equal(prompt_ids, enc.input_ids[:first_target])


def test_llava15_template_gets_eos_and_consistent_prompt(llava15_processor, image):
    fmt = ChatFormat()
    text, spans = render_with_spans(llava15_processor, TURNS, fmt)
    assert text.startswith("USER: <image>\nIs there a fracture? ASSISTANT: no</s>")
    assert "VUSER: Where is the lesion?" in text
    # the template has no end-of-turn marker: EOS is appended so the model learns to stop
    assert [text[s.start:s.end] for s in spans] == [" no</s>", " Where is the lesion?</s>", " left lung</s>"]
    enc = encode(llava15_processor, TURNS, fmt, image)
    assert _targets(llava15_processor, enc).count("</s>") == 3
    prompt = prompt_text(llava15_processor, TURNS[:1], "assistant", fmt)
    assert prompt == llava15_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a fracture?"}]}],
        add_generation_prompt=True)
    assert prompt_text(llava15_processor, TURNS[:2], "questioner", fmt).endswith("ASSISTANT: no</s> VUSER:")


def test_too_long_is_refused_not_truncated(processor, image):
    with pytest.raises(SequenceTooLong, match="exceeds max_length=20"):
        encode(processor, TURNS, ChatFormat(), image, max_length=20)


def test_template_that_drops_content_is_refused(processor):
    proc = copy.deepcopy(processor)
    proc.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>...</s>{% endfor %}"
    with pytest.raises(TemplateError):
        render_with_spans(proc, TURNS, ChatFormat())
