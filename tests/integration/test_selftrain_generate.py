"""Generation on the tiny backbone (self-questioning and dataset questions, resume, determinism), the offline
demo's judge (the reference expert) end to end, and the hf_local expert on the tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stllava_med.selftrain.records import Candidate, load_candidates

pytestmark = pytest.mark.integration

# Short generations: the tiny backbone's text is noise; the tests are about structure, counts and resumption.
FAST = ["generate.describe_max_new_tokens=6", "generate.question.max_new_tokens=8",
        "generate.answer.max_new_tokens=6", "generate.progress=false", "print_summary=false", "num_threads=2"]


def read_shards(run_dir: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted((run_dir / "candidates").glob("*.jsonl"))
            for line in shard.read_text().splitlines() if line.strip()]


def test_self_questioning_gives_n_questions_times_k_answers_resumes_and_reproduces(tmp_path, compose_config,
                                                                                   tiny_backbone_path):
    from stllava_med.generate import run_generate

    run = tmp_path / "run"
    common = [*FAST, "generate.question_source=self", "generate.questions_per_image=2",
              "generate.answers_per_question=3", "generate.image_batch_size=1"]
    first = run_generate(compose_config("generate", [*common, "generate.max_images=2", f"out_dir={run}"]))
    assert (first["images_done"], first["complete"]) == (2, True)
    rows = read_shards(run)
    by_image: dict[str, list[Candidate]] = {}
    for row in rows:
        candidate = Candidate.from_json(row)
        by_image.setdefault(candidate.image_sha256, []).append(candidate)
    assert len(by_image) == 2
    for candidates in by_image.values():
        assert len(candidates) == 2  # N questions per image, all distinct
        assert len({c.question.lower() for c in candidates}) == 2
        for candidate in candidates:
            assert len(candidate.answers) == 3 and len({a.lower() for a in candidate.answers}) == 3  # K distinct
            assert candidate.question_source == "self" and candidate.description is not None
            assert candidate.reference_answer is None
    assert first["candidates"] == 4 and first["answers"] == 12
    assert first["this_run"]["answers_sampled"] >= 12 and first["this_run"]["images_per_s"] > 0

    # debris of a kill: candidates of an image whose progress line never came, and a torn progress line
    with open(run / "candidates" / "candidates-00000.jsonl", "a") as fh:
        fh.write(json.dumps(rows[0] | {"id": "orphan", "image_sha256": "e" * 64}) + "\n")
    with open(run / "progress.jsonl", "a") as fh:
        fh.write('{"image_id": "trunc')
    resumed = run_generate(compose_config("generate", [*common, "generate.max_images=3", f"out_dir={run}"]))
    assert resumed["this_run"]["images"] == 1 and resumed["this_run"]["discarded_partial_candidates"] == 1
    assert resumed["images_done"] == 3 and resumed["candidates"] == 6
    after = read_shards(run)
    assert after[:4] == rows[:4] and all(r["id"] != "orphan" for r in after)

    # the same command in a fresh directory, uninterrupted, samples exactly the same candidates
    fresh = tmp_path / "fresh"
    run_generate(compose_config("generate", [*common, "generate.max_images=3", f"out_dir={fresh}"]))
    assert read_shards(fresh) == after


def test_question_prompts_use_the_questioner_role_or_an_instruction(tiny_backbone):
    from stllava_med.chat import ChatFormat
    from stllava_med.selftrain.generate import CandidateGenerator, GenerationSettings

    fmt = ChatFormat()
    questioner = CandidateGenerator(tiny_backbone, fmt, GenerationSettings())
    prompt = questioner.question_prompt("A chest X-ray.")
    assert prompt.endswith("<|vuser|>") and "A chest X-ray.</s>" in prompt
    instruction = CandidateGenerator(tiny_backbone, fmt, GenerationSettings(question_prompt="instruction"))
    prompt = instruction.question_prompt("A chest X-ray.")
    assert prompt.endswith("<|user|>Ask one question about this medical image.</s><|assistant|>")
    assert questioner.answer_prompt("Is it normal?") == "<|user|><image>\nIs it normal?</s><|assistant|>"
    with pytest.raises(ValueError, match="needs generate.describe=true"):
        GenerationSettings(describe=False)
    with pytest.raises(ValueError, match="include_reference_answer needs generate.question_source=dataset"):
        GenerationSettings(include_reference_answer=True)
    with pytest.raises(ValueError, match="answers_per_question must be >= 2"):
        GenerationSettings(answers_per_question=1)


def test_dataset_questions_then_the_reference_expert_end_to_end(tmp_path, compose_config, tiny_backbone_path):
    from stllava_med.data.vqa import dataset_specs, load_vqa
    from stllava_med.generate import run_generate
    from stllava_med.judge import run_judge
    from stllava_med.selftrain.experts.reference import reference_score
    from stllava_med.selftrain.store import JudgementStore

    gen_dir = tmp_path / "gen"
    cfg = compose_config("generate", [*FAST, "data=vqa_rad_sample_train", "generate.question_source=dataset",
                                      "generate.questions_per_image=3", "generate.answers_per_question=2",
                                      "generate.max_images=2", "generate.include_reference_answer=true",
                                      f"out_dir={gen_dir}"])
    summary = run_generate(cfg)
    assert summary["images_done"] == 2 and summary["input"]["source"] == "data"
    records = {r.id: r for r in load_vqa(dataset_specs(cfg.data.sets)["vqa_rad_sample_train"])[0]}
    candidates = load_candidates(gen_dir / "candidates")
    assert 2 <= len(candidates) <= 6
    for candidate in candidates:
        record = records[candidate.meta["record_id"]]
        assert (candidate.question, candidate.reference_answer, candidate.answer_type) == \
            (record.question, record.answer, record.answer_type)
        assert candidate.question_source == "dataset" and len(candidate.answers) in (2, 3)
        # include_reference_answer: the ground truth is among the answers (added unless the policy said it)
        reference_index = candidate.meta["reference_answer_index"]
        assert candidate.answers[reference_index].lower() == record.answer.lower()

    judge_dir = tmp_path / "judge"
    judge_cfg = compose_config("judge", ["expert=reference", f"candidates={gen_dir}", f"out_dir={judge_dir}",
                                         "pairs.min_margin=0.5", "judge.progress=false", "print_summary=false"])
    result = run_judge(judge_cfg)
    assert (result["judged"], result["failed"], result["unjudged"]) == (len(candidates), 0, 0)
    assert result["expert"] == "reference:strict"
    assert result["judged"] == result["ties_dropped"] + result["low_margin_dropped"] + result["pairs"]
    assert result["pairs"] >= 1
    pairs = [json.loads(line) for shard in result["preference_shards"] for line in Path(shard).read_text().splitlines()]
    assert len(pairs) == result["pairs"]
    for pair in pairs:
        scores = json.loads(pair["meta"])["scores"]  # meta is a JSON string in the shard (one type per column)
        assert pair["chosen_score"] == max(scores) > pair["rejected_score"] == min(scores)
    with JudgementStore(judge_dir / "judgements.sqlite", readonly=True) as store:
        judgements = {j.candidate_id: j for j in store.judgements()}
    for candidate in candidates:
        expected = [reference_score(a, candidate.reference_answer, candidate.answer_type)[0] for a in candidate.answers]
        assert judgements[candidate.id].scores == expected
    again = run_judge(judge_cfg)  # resumes: nothing is asked again
    assert again["this_run"]["requests"] == 0 and again["this_run"]["already_judged"] == len(candidates)


def test_hf_local_expert_on_the_tiny_backbone_records_unparsable_replies_as_failures(tmp_path, tiny_backbone, sample_dir):
    from stllava_med.chat import ChatFormat
    from stllava_med.selftrain.experts.hf_local import HFLocalExpert
    from stllava_med.selftrain.judge import JudgeSettings, judge_candidates
    from stllava_med.selftrain.records import candidate_id
    from stllava_med.selftrain.store import JudgementStore
    from stllava_med.utils.io import sha256_file

    image = next((sample_dir / "images").glob("*.jpg"))
    sha = sha256_file(image)
    candidates = [Candidate(id=candidate_id(sha, q), image=str(image), image_sha256=sha, question=q,
                            answers=["yes", "no"]) for q in ("Is this a CT?", "Is there a fracture?")]
    expert = HFLocalExpert(tiny_backbone, ChatFormat(), max_new_tokens=8)
    stats, _ = judge_candidates(candidates, expert, tmp_path / "j.sqlite",
                                JudgeSettings(concurrency=4, max_invalid_retries=1, progress=False))
    assert (stats.judged, stats.failed, stats.requests, stats.invalid_replies) == (0, 2, 4, 4)
    with JudgementStore(tmp_path / "j.sqlite", readonly=True) as store:
        failures = [j for j in store.judgements()]
        assert store.usage().prompt_tokens > 0  # local token counts are recorded too
    assert all(f.failure.startswith("invalid reply after 2 attempts: ") for f in failures)
    assert all(f.expert.startswith("hf_local:") for f in failures)


def test_shared_prefix_sampling_equals_num_return_sequences(tiny_backbone, sample_dir):
    """One prefill + a repeated KV cache samples exactly what generate(num_return_sequences=K) samples, with
    left padding of prompts of different lengths."""
    import torch

    from stllava_med.chat import ChatFormat, prompt_text, vqa_turns
    from stllava_med.data.vqa import load_image
    from stllava_med.generation import generate_batch, sample_sequences, supports_shared_prefix

    assert supports_shared_prefix(tiny_backbone.model)
    images = [load_image(p) for p in sorted((sample_dir / "images").glob("*.jpg"))[:3]]
    questions = ["Is this normal?", "Where is the largest lesion located in this image?", "What organ?"]
    prompts = [prompt_text(tiny_backbone.processor, vqa_turns(q), "assistant", ChatFormat()) for q in questions]
    sampling = {"temperature": 1.2, "top_k": 100, "top_p": 0.95}
    torch.manual_seed(7)
    shared = sample_sequences(tiny_backbone, prompts, images, k=3, max_new_tokens=10, **sampling)
    torch.manual_seed(7)
    plain = generate_batch(tiny_backbone, prompts, images, max_new_tokens=10, do_sample=True, num_return_sequences=3,
                           **sampling)
    assert len(shared) == 9 and shared == plain
    assert len(set(shared[:3])) > 1  # genuinely sampled, not three copies
