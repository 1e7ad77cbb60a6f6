"""Every stage through its Hydra entry point on every family's tiny real model: SFT (LoRA and full), generation
(self-questioning in the questioner role, and dataset questions), judging with the offline ``reference`` expert,
DPO in each reference mode (with and without prefix sharing where the family has the fast path) and evaluation.

Runs use the stage configs' default batch sizes on the bundled VQA-RAD sample, whose images differ in size (so
every batch mixes tile counts / grids), and only a few steps or images: they check that each stage runs for the
family and leaves what the next stage loads — not what the numbers are."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpo_support import sample_pairs, write_shard

pytestmark = [pytest.mark.families, pytest.mark.usefixtures("one_thread")]

FAST_PATH = {"llava15", "llava_mistral", "llava_next", "qwen2_5_vl", "sq_llava"}
SHARED_PREFIX_SAMPLING = {"llava15", "llava_mistral", "llava_next", "qwen2_5_vl", "sq_llava"}
# What each family's template writes right before a questioner turn's content (the stage-1 role, "vuser").
QUESTIONER_HEADER = {
    "llava15": "VUSER:",
    "sq_llava": "VUSER:",
    "llava_mistral": "[INST]",
    "llava_next": "[INST]",
    "qwen2_5_vl": "<|im_start|>vuser\n",
    "idefics3": "Vuser:",
    "gemma3": "<start_of_turn>vuser\n",
}
QUIET = ["num_threads=1"]
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(config_name: str, overrides: list[str]):
    """A project config composed as the command line would (``tests/conftest.py``'s ``compose``, which this
    directory's conftest shadows by name)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import stllava_med.utils.config  # noqa: F401  (registers resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def backbone_overrides(family: str, family_path: Path) -> list[str]:
    """The tiny backbone config pointed at the family's model; module choices left to the family."""
    return [f"backbone.name_or_path={family_path}", f"backbone.name={family}", "backbone.lora.target_modules=null",
            "backbone.lora.vision_target_modules=null", "backbone.lora.projector_modules=null", *QUIET]


def distinct_sizes(paths) -> int:
    sizes = set()
    for path in paths:
        with Image.open(path) as image:
            sizes.add(image.size)
    return len(sizes)


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def family_name(path) -> str:
    from transformers import AutoConfig

    from stllava_med.families import family_of

    return family_of(AutoConfig.from_pretrained(path)).name


# ---- SFT ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_sft_trains_and_exports_a_model_that_reloads(family, family_path, finetune, tmp_path):
    from stllava_med.backbone import load_backbone, load_model
    from stllava_med.data.vqa import load_vqa_rad
    from stllava_med.families import family_of
    from stllava_med.train_sft import run_train_sft

    cfg = compose("sft", [*backbone_overrides(family, family_path), f"out_dir={tmp_path / 'sft'}",
                          f"sft.finetune={finetune}", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                          "logger=none", "data.val_fraction=0"])
    assert cfg.data.batch_size == 8  # the stage default
    records, _ = load_vqa_rad(Path(cfg.data.sets.vqa_rad_sample_train.root), "train")
    assert distinct_sizes(sorted({r.image for r in records})[:8]) > 1
    summary = run_train_sft(cfg)
    assert summary["status"] == "complete" and summary["global_step"] == 3
    assert finite(summary["metrics"]["train/loss"]), summary["metrics"]

    merged = Path(summary["export"]["merged"])
    reloaded = load_backbone({"name_or_path": str(merged), "name": "merged"})
    family_obj = family_of(reloaded.model)
    assert family_name(merged) == family_name(family_path) == family_obj.name
    # compared under the runtime module names (checkpoints may store other names: Qwen's ``model.layers``)
    before = dict(load_model(str(family_path)).named_parameters())
    after = dict(reloaded.model.named_parameters())
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed no weight"
    assert not any(family_obj.is_vision_parameter(k) for k in changed)  # the tower is frozen in both modes
    if finetune == "full":  # every weight but the tower trains, not only low-rank updates of the projections
        assert any("norm" in k for k in changed)
    else:  # LoRA: only the adapted projections (merged in) and the projector, trained in full, move
        outside = [k for k in changed if not (re.fullmatch(family_obj.lora_targets, k.rsplit(".", 1)[0])
                                              or family_obj.is_projector_parameter(k))]
        assert not outside, outside[:5]


# ---- generation and judging --------------------------------------------------------------------------------

GENERATE_FAST = ["generate.describe_max_new_tokens=6", "generate.question.max_new_tokens=8",
                 "generate.answer.max_new_tokens=4", "generate.progress=false", "print_summary=false"]


class Spy:
    """Records each sample_sequences call of the generator (prompts, role, shared prefix)."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls: list[dict] = []

    def __call__(self, backbone, prompts, images, **kwargs):
        self.calls.append({"prompts": list(prompts), "questioner": kwargs.get("questioner", False),
                           "shared_prefix": kwargs.get("shared_prefix"), "images": len(images)})
        return self.real(backbone, prompts, images, **kwargs)


def test_generate_self_questioning_in_the_questioner_role(family, family_path, tmp_path, monkeypatch):
    import stllava_med.selftrain.generate as candidate_generation
    from stllava_med.generate import run_generate
    from stllava_med.selftrain.records import load_candidates

    spy = Spy(candidate_generation.sample_sequences)
    monkeypatch.setattr(candidate_generation, "sample_sequences", spy)
    out = tmp_path / "gen"
    cfg = compose("generate", [*backbone_overrides(family, family_path), *GENERATE_FAST, f"out_dir={out}",
                               "generate.question_source=self", "generate.question_prompt=questioner",
                               "generate.max_images=2", "generate.questions_per_image=2",
                               "generate.answers_per_question=2"])
    summary = run_generate(cfg)
    assert summary["images_done"] == 2 and summary["complete"]
    candidates = load_candidates(out / "candidates")
    assert distinct_sizes({c.image for c in candidates}) > 1
    assert summary["candidates"] == len(candidates) >= 2
    asked = [c for c in spy.calls if c["questioner"]]
    assert asked and all(c["shared_prefix"] is (family in SHARED_PREFIX_SAMPLING) for c in spy.calls)
    header = QUESTIONER_HEADER[family]
    question_prompts = [p for c in asked for p in c["prompts"]]
    assert all(p.rstrip(" ").endswith(header.rstrip(" ")) for p in question_prompts), question_prompts[0][-80:]
    for candidate in candidates:
        assert candidate.question_source == "self" and candidate.description is not None
        assert any(candidate.description in p for p in question_prompts)  # asked after describing
        assert len(candidate.answers) == 2 and candidate.question.strip()


def test_generate_dataset_questions_then_judge_with_the_reference_expert(family, family_path, tmp_path):
    from stllava_med.backbone import load_processor
    from stllava_med.chat import ChatFormat
    from stllava_med.data.pairs.collate import PairCollator, PairItem
    from stllava_med.data.preference import iter_pairs, resolve_shards
    from stllava_med.generate import run_generate
    from stllava_med.judge import run_judge
    from stllava_med.selftrain.records import load_candidates

    gen = tmp_path / "gen"
    cfg = compose("generate", [*backbone_overrides(family, family_path), *GENERATE_FAST, f"out_dir={gen}",
                               "generate.question_source=dataset", "generate.max_images=4",
                               "generate.questions_per_image=2", "generate.answers_per_question=2",
                               "generate.include_reference_answer=true"])
    assert (cfg.generate.image_batch_size, cfg.generate.answer_batch_size) == (4, 8)  # one batch of each
    summary = run_generate(cfg)
    assert summary["images_done"] == 4
    candidates = load_candidates(gen / "candidates")
    assert len(candidates) == 8 and distinct_sizes({c.image for c in candidates}) > 1
    assert all(c.question_source == "dataset" and c.reference_answer for c in candidates)

    judged = tmp_path / "judge"
    result = run_judge(compose("judge", ["expert=reference", f"candidates={gen}", f"out_dir={judged}",
                                         "judge.progress=false", "print_summary=false"]))
    assert (result["judged"], result["failed"]) == (len(candidates), 0)
    assert result["pairs"] >= 1
    pairs = [pair for pair, _, _ in iter_pairs(resolve_shards(str(judged / "preference")))]
    assert len(pairs) == result["pairs"]
    # the pairs are what this family's DPO stage collates
    shard = resolve_shards(str(judged / "preference"))[0]
    batch = PairCollator(load_processor(str(family_path)), ChatFormat())([PairItem(p, shard) for p in pairs[:4]])
    assert batch["chosen_input_ids"].shape[0] == min(4, len(pairs)) and batch["pixel_values"] is not None


# ---- DPO ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_shard(tmp_path_factory) -> Path:
    rows = sample_pairs(8, stride=29)  # eight pairs on images of five sizes, answers of 2-15 characters
    assert distinct_sizes(r["images"][0] for r in rows) > 1
    return write_shard(tmp_path_factory.mktemp("dpo_pairs") / "pairs.jsonl", rows)


def run_dpo(family, family_path, shard, out_dir, *extra):
    from stllava_med.train_dpo import run_train_dpo

    cfg = compose("dpo", [*backbone_overrides(family, family_path), f"data.path={shard}", f"out_dir={out_dir}",
                          "data.num_workers=0", "data.progress=false", "data.val_fraction=0.2",
                          f"data.scan_cache_dir={out_dir.parent}/scan",
                          f"dpo.reference_cache_dir={out_dir.parent}/reference",
                          "trainer.max_steps=2", "trainer.enable_progress_bar=false", "logger=none",
                          "optim.lr=1e-3", *extra])
    assert cfg.data.batch_size == 4  # the stage default
    return run_train_dpo(cfg)


@pytest.mark.parametrize("mode", ["adapter_off", "copy", "precomputed"])
def test_dpo_in_each_reference_mode(family, family_path, dpo_shard, mode, tmp_path):
    from stllava_med.backbone import load_backbone

    settings = [True, False] if family in FAST_PATH else [True]  # without a fast path the setting is moot
    summaries = {}
    for prefix_sharing in settings:
        out = tmp_path / f"dpo-{prefix_sharing}"
        export = "export.merged=true" if (mode == "adapter_off" and prefix_sharing) else "export.merged=false"
        summary = run_dpo(family, family_path, dpo_shard, out, f"dpo.reference={mode}",
                          f"dpo.prefix_sharing={str(prefix_sharing).lower()}", export)
        pairs = summary["pairs"]
        assert summary["global_step"] == 2 and pairs["train"] + pairs["val"] == 8 and pairs["skipped"] == {}
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert finite(summary["train"].get(key)), (key, summary["train"])
        assert summary["train"]["logps/chosen"] < 0
        if mode == "precomputed":
            assert summary["reference_cache"]["computed_now"] in (0, 8)  # the second setting reuses the cache
        assert (out / "adapter" / "adapter_config.json").is_file()
        if summary["export"].get("merged"):
            merged = load_backbone({"name_or_path": summary["export"]["merged"], "name": "merged"})
            assert family_name(summary["export"]["merged"]) == family_name(family_path)
            del merged
        summaries[prefix_sharing] = summary
    if mode == "precomputed":
        assert summaries[True]["reference_cache"]["computed_now"] == 8
    if len(summaries) == 2:  # prefix sharing is exact: the same run, step for step
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert summaries[True]["train"][key] == pytest.approx(summaries[False]["train"][key], rel=1e-3, abs=1e-4), key


# ---- evaluation --------------------------------------------------------------------------------------------


def test_evaluate_on_sample_questions(family, family_path, tmp_path):
    from stllava_med.evaluate import run_evaluate

    out = tmp_path / "eval"
    cfg = compose("evaluate", [*backbone_overrides(family, family_path), f"out_dir={out}",
                               "data.sets.vqa_rad_sample.limit=8", "eval.max_new_tokens=4", "eval.progress=false",
                               "print_table=false"])
    assert cfg.eval.batch_size == 8
    results = run_evaluate(cfg)
    predictions = [json.loads(line) for line in (out / "vqa_rad_sample" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    assert "vqa_rad_sample" in results and (out / "table.md").is_file()
