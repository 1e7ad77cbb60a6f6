"""Target masks of stage-1 examples, with the tiny backbone's template and with llava-hf's real LLaVA-1.5
chat template set on the tiny processor: only answers and questioner turns (plus their end of turn) are
targets — never image tokens, the system text or the first human turn — and the questioner prefix is
exactly the one generation uses."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import LLAVA15_TEMPLATE
from stllava_med.backbone import load_processor
from stllava_med.chat import IGNORE_INDEX, ChatFormat, encode, prompt_text
from stllava_med.data.instruct import InstructRecord, Message, vqa_to_conversations
from stllava_med.data.sft_datamodule import ConversationTooLong, SFTDataset, collate_sft
from stllava_med.data.vqa import load_image, load_vqa_rad

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]



SYSTEM = "You are a careful radiology assistant."


@pytest.fixture(params=["tiny", "llava15"])
def processor(request, tiny_backbone_path):
    processor = load_processor(str(tiny_backbone_path))
    if request.param == "llava15":
        processor.chat_template = LLAVA15_TEMPLATE
    return processor


@pytest.fixture(scope="module")
def image(sample_dir):
    return load_image(sample_dir / "images" / "synpic100176.jpg")


def _record(sample_dir) -> InstructRecord:
    texts = ["Is this an axial CT?", "yes", "Is there a mass in the left lobe?", "no",
             "Which organ is abnormal?", "the liver"]
    return InstructRecord(id="r1", image=str(sample_dir / "images" / "synpic100176.jpg"), dataset="t",
                          messages=tuple(Message("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(texts)))


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs where mask is True."""
    runs, start = [], None
    for i, on in enumerate(mask.tolist() + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("system_prompt", [None, SYSTEM])
def test_only_answers_and_questions_are_targets(processor, image, sample_dir, system_prompt):
    fmt = ChatFormat(system_prompt=system_prompt)
    record = _record(sample_dir)
    turns = record.turns([False, True, False])  # user, assistant, QUESTIONER, assistant, user, assistant
    assert [t.role for t in turns] == ["user", "assistant", "questioner", "assistant", "user", "assistant"]
    enc = encode(processor, turns, fmt, image)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    targets = enc.labels != IGNORE_INDEX
    assert torch.equal(targets, enc.target_role != 0)
    assert torch.equal(enc.labels[targets], enc.input_ids[targets])
    image_positions = enc.input_ids == tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int(image_positions.sum()) == 64  # the tiny backbone's 8x8 patches
    assert not (targets & image_positions).any()
    # exactly four target runs: answer, question, answer, answer — each its text plus the end-of-turn token
    runs = _runs(targets)
    expected = [("yes", 1), ("Is there a mass in the left lobe?", 2), ("no", 1), ("the liver", 1)]
    assert len(runs) == len(expected)
    for (start, end), (text, role) in zip(runs, expected):
        decoded = tokenizer.decode(enc.input_ids[start:end], skip_special_tokens=False)
        assert decoded.strip() == text + eos, decoded
        assert set(enc.target_role[start:end].tolist()) == {role}
    # nothing before the first answer is a target: system text, image, first human turn
    prefix = tokenizer.decode(enc.input_ids[: runs[0][0]], skip_special_tokens=False)
    assert "Is this an axial CT?" in prefix
    if system_prompt:
        assert SYSTEM in prefix
    # the later human turn that was NOT drawn as questioner is context, not a target
    between = tokenizer.decode(enc.input_ids[runs[2][1]: runs[3][0]], skip_special_tokens=False)
    assert "Which organ is abnormal?" in between


def test_questioner_prefix_is_the_generation_prompt(processor, image, sample_dir):
    """Training and generation share one rendering: the tokens before the question's first target token are
    exactly the tokens of ``prompt_text(history, "questioner")`` (same for the answer after a question)."""
    fmt = ChatFormat()
    turns = _record(sample_dir).turns([False, True, False])
    enc = encode(processor, turns, fmt, image)
    question_start = _runs(enc.target_role == 2)[0][0]
    answer_after_question_start = _runs(enc.target_role == 1)[1][0]
    for history, role, first_target in ((turns[:2], "questioner", question_start),
                                        (turns[:3], "assistant", answer_after_question_start)):
        prompt = prompt_text(processor, history, role, fmt)
        prompt_ids = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0]
        assert torch.equal(prompt_ids, enc.input_ids[:first_target]), (prompt, first_target)
    if processor.chat_template == LLAVA15_TEMPLATE:
        # the questioner is rendered "VUSER:" as in the official conv_vicuna_v1_sq, after the EOS that ends
        # the previous answer (the llava-hf template has no end-of-turn marker of its own)
        assert prompt_text(processor, turns[:2], "questioner", fmt).endswith(f"ASSISTANT: yes{processor.tokenizer.eos_token} VUSER:")


def test_dataset_applies_sq_ratio_and_never_targets_first_turn(processor, image, sample_dir):
    record = _record(sample_dir)
    for sq_ratio, questions in ((0.0, 0), (1.0, 2)):
        dataset = SFTDataset([record], processor, ChatFormat(), sq_ratio=sq_ratio, seed=0, max_length=None)
        item = dataset[(0, 0)]
        assert item["questioner_turns"] == questions
        assert len(_runs(item["target_role"] == 2)) == questions
        assert len(_runs(item["target_role"] == 1)) == 3
        first_target = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
        assert "Is this an axial CT?" in processor.tokenizer.decode(item["input_ids"][:first_target])


def test_sq_ratio_statistics_on_rendered_sample(tiny_backbone_path, sample_dir):
    """Over the bundled sample and three epochs, the share of later human turns rendered as (target)
    questioner turns matches sft.sq_ratio; counted from the encoded target roles, not from the draws."""
    processor = load_processor(str(tiny_backbone_path))
    records, _ = load_vqa_rad(sample_dir, "train")
    conversations = vqa_to_conversations(records, dataset="s", grouping="image", max_qa_per_conversation=10)
    dataset = SFTDataset(conversations, processor, ChatFormat(), sq_ratio=0.5, seed=0, max_length=None,
                         cache_images=True)
    eligible = asked = 0
    for epoch in range(3):
        batch = collate_sft([dataset[(i, epoch)] for i in range(len(dataset))], processor.tokenizer.pad_token_id)
        asked += sum(len(_runs(row == 2)) for row in batch["target_role"])
        assert int(batch["questioner_turns"]) == sum(len(_runs(row == 2)) for row in batch["target_role"])
        eligible += sum(c.n_pairs - 1 for c in conversations)
    rate = asked / eligible
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / eligible), rate


def test_too_long_conversations_lose_trailing_pairs_or_fail(processor, image, sample_dir):
    record = _record(sample_dir)
    full = encode(processor, record.turns(), ChatFormat(), image).length
    two_pairs = encode(processor, record.truncated(2).turns(), ChatFormat(), image).length
    dataset = SFTDataset([record], processor, ChatFormat(), sq_ratio=0.0, seed=0, max_length=two_pairs)
    item = dataset[(0, 0)]
    assert item["dropped_pairs"] == 1 and item["input_ids"].shape[0] == two_pairs < full
    strict = SFTDataset([record], processor, ChatFormat(), sq_ratio=0.0, seed=0, max_length=two_pairs,
                        on_too_long="error")
    with pytest.raises(ConversationTooLong, match=r"conversation t/r1 .*exceeds max_length.*with 3 question/answer"):
        strict[(0, 0)]
    tiny = SFTDataset([record], processor, ChatFormat(), sq_ratio=0.0, seed=0, max_length=10)
    with pytest.raises(ConversationTooLong, match=r"conversation t/r1 .*with 1 question/answer pair"):
        tiny[(0, 0)]
