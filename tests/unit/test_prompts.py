"""System prompts per stage: the presets are the official texts character for character, the paper experiments
select them stage by stage, and through the official conversation template (the one a converted checkpoint
carries) every stage's prompt renders exactly as the official code's ``Conversation.get_prompt()``."""

from __future__ import annotations

import copy

import pytest

from conftest import LLAVA15_TEMPLATE, compose
from stllava_med.chat import ChatFormat, Turn, encode, prompt_text, render_with_spans, vqa_turns
from stllava_med.prompts import SYSTEM_PRESETS, system_text, with_system
from stllava_med.schema import GeneratePrompts, StagePrompts

# llava/conversation.py of heliossun/STLLaVA-Med (and SQ-LLaVA): conv_vicuna_v1, conv_vicuna_v1_sq, conv_llava_v1
V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the user's questions.")
V1_SQ = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the user's questions.Also, the artificial intelligence assistant is a "
         "curious virtual user. The virtual user asks complex questions that are relevant to the content in the "
         "image, for example, asking about background knowledge of the objects in the image, asking to discuss "
         "about events happening in the image, etc. Again, do not ask about uncertain details.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.")
DESCRIBE = "Can you describe the image in detail?"  # llava/eval/visual_sq.py


def test_presets_are_the_official_texts():
    assert SYSTEM_PRESETS == {"v1_sq": V1_SQ, "llava_v1": LLAVA_V1, "v1": V1, "none": None}
    assert "questions.Also," in V1_SQ  # no space: the official literals concatenate without one
    assert GeneratePrompts().describe == DESCRIBE


def test_preset_names_resolve_and_typos_are_refused():
    assert system_text("v1_sq") == V1_SQ and system_text(None) is None and system_text("none") is None
    assert system_text("You are a radiologist.") == "You are a radiologist."
    assert ChatFormat(system_prompt="llava_v1").system_prompt == LLAVA_V1
    assert ChatFormat.from_config({"system_prompt": "none"}).system_prompt is None
    with pytest.raises(ValueError, match=r"prompts.system='v1-sq' is no system-prompt preset.*did you mean 'v1_sq'"):
        StagePrompts.from_config({"system": "v1-sq"})
    with pytest.raises(ValueError, match=r"backbone.chat.system_prompt='llava_v2'.*did you mean 'llava_v1'"):
        ChatFormat(system_prompt="llava_v2")
    with pytest.raises(ValueError, match="prompts.answer_systm.*answer_system"):
        GeneratePrompts.from_config({"answer_systm": "llava_v1"})
    fmt = ChatFormat(system_prompt="Be brief, please.")
    assert with_system(fmt, None) is fmt and with_system(fmt, "v1").system_prompt == V1
    assert with_system(fmt, "none").system_prompt is None


def test_paper_experiments_select_the_official_prompts_stage_by_stage():
    from stllava_med.pipeline import stage_config

    assert compose("sft", ["experiment=stllava_med_paper_stage1"]).prompts.system == "v1_sq"
    assert compose("dpo", ["experiment=stllava_med_paper"]).prompts.system == "v1"
    gen = compose("generate", ["experiment=stllava_med_paper_generate"])
    assert (gen.prompts.question_system, gen.prompts.answer_system, gen.prompts.describe) == \
        ("v1_sq", "llava_v1", DESCRIBE)
    assert (gen.generate.describe_max_new_tokens, gen.generate.answer.max_new_tokens,
            gen.generate.question.max_new_tokens) == (1024, 1024, 300)
    # the defaults stay neutral: no system text unless the backbone's
    assert compose("sft").prompts.system is None and compose("evaluate").prompts.system is None
    pipeline = compose("pipeline", ["experiment=stllava_med_paper_pipeline"])
    systems = {stage: stage_config(pipeline, stage).prompts for stage in ("sft", "generate", "dpo", "evaluate")}
    assert systems["sft"].system == "v1_sq" and systems["dpo"].system == "v1"
    assert (systems["generate"].question_system, systems["generate"].answer_system) == ("v1_sq", "llava_v1")
    assert systems["evaluate"].system == "llava_v1"  # survives the pipeline's backbone replacing the stage's


# ---- rendering ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(tiny_backbone_path):
    """The tiny LLaVA's processor with the official SeparatorStyle.TWO template, as convert_checkpoint writes it
    into a converted SQ-LLaVA / STLLaVA-Med directory."""
    from stllava_med.backbone import load_processor
    from stllava_med.convert_checkpoint import vicuna_template

    processor = load_processor(str(tiny_backbone_path))
    processor.chat_template = vicuna_template("none")
    return processor


def test_stage1_v1_sq_renders_the_official_conversation(official):
    turns = [Turn("user", "Q1"), Turn("assistant", "A1"), Turn("questioner", "Q2"), Turn("assistant", "A2")]
    text, spans = render_with_spans(official, turns, ChatFormat(system_prompt="v1_sq"))
    # conv_vicuna_v1_sq.get_prompt() with SQ-LLaVA's VUSER turn ("Q2" + sep2): sep " " after the system and
    # user-side turns, sep2 "</s>" after model-side ones
    assert text == f"{V1_SQ} USER: <image>\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s>"
    assert [text[s.start:s.end] for s in spans] == [" A1</s>", " Q2</s>", " A2</s>"]
    assert all(V1_SQ not in text[s.start:s.end] for s in spans)


def test_question_generation_prompts_are_visual_sq_py(official, tiny_backbone):
    from stllava_med.schema import GenerateSettings
    from stllava_med.selftrain.generate import CandidateGenerator, GenerationSettings

    tiny_backbone.processor.chat_template = official.chat_template
    paper = compose("generate", ["experiment=stllava_med_paper_generate"])
    prompts = GeneratePrompts.from_config(dict(paper.prompts))
    settings = GenerationSettings(**{k: getattr(GenerateSettings(), k) for k in GenerateSettings.__dataclass_fields__})
    generator = CandidateGenerator(tiny_backbone, ChatFormat(), settings, prompts)
    # round 1: conv.append_message(USER, "<image>\nCan you ..."), (ASSISTANT, None) -> "... ASSISTANT:"
    assert generator.describe_prompt() == f"{V1_SQ} USER: <image>\n{DESCRIBE} ASSISTANT:"
    # round 2: (USER, fqs), (ASSISTANT, first_answer), (VUSER, None)
    assert generator.question_prompt("A chest film.") == \
        f"{V1_SQ} USER: <image>\n{DESCRIBE} ASSISTANT: A chest film.</s>VUSER:"
    # answers: model_collectA.py under llava_v1: (USER, "<image>\n" + q), (ASSISTANT, None)
    assert generator.answer_prompt("Is there a fracture?") == \
        f"{LLAVA_V1} USER: <image>\nIs there a fracture? ASSISTANT:"


def test_dpo_and_evaluation_prompts(official, image):
    dpo = ChatFormat(system_prompt="v1")
    text, _ = render_with_spans(official, vqa_turns("Is there a fracture?", "no"), dpo)
    assert text == f"{V1} USER: <image>\nIs there a fracture? ASSISTANT: no</s>"
    enc = encode(official, vqa_turns("Is there a fracture?", "no"), dpo, image)
    assert official.tokenizer.decode(enc.input_ids[enc.labels != -100]).strip() == "no</s>"
    evaluation = with_system(ChatFormat(), "llava_v1")
    assert prompt_text(official, vqa_turns("Where is the lesion?"), "assistant", evaluation) == \
        f"{LLAVA_V1} USER: <image>\nWhere is the lesion? ASSISTANT:"


def test_llava_hf_published_template_differs_only_in_spaces(official):
    """llava-hf's LLaVA-1.5 template (a published, unconverted llava-1.5-7b-hf) renders the same turns with a
    space after each model turn's </s> and at the end: documented in docs/deviations.md."""
    processor = copy.deepcopy(official)
    processor.chat_template = LLAVA15_TEMPLATE
    turns = [Turn("user", "Q1"), Turn("assistant", "A1"), Turn("questioner", "Q2"), Turn("assistant", "A2")]
    text, _ = render_with_spans(processor, turns, ChatFormat(system_prompt="v1_sq"))
    assert text == f"{V1_SQ} USER: <image>\nQ1 ASSISTANT: A1</s> VUSER: Q2</s> ASSISTANT: A2</s> "


@pytest.fixture(scope="module")
def image(sample_dir):
    from PIL import Image

    return Image.open(next((sample_dir / "images").iterdir())).convert("RGB")
