"""One schema per stage: every config key, its type and its default, in one place.

Each stage's config (``conf/<stage>.yaml``) starts from its schema below, registered in Hydra's ConfigStore as
``<stage>_schema``; the YAML files only choose groups (backbone, data, trainer, logger) and set what differs,
as experiments do. Hydra checks types when it composes (``dpo.beta=abc`` fails before anything runs) and
refuses keys that do not exist (``dpo.prefix_sharng=false``); :func:`stllava_med.utils.config.precheck_overrides`
names the nearest valid key on the command line, and the settings readers refuse keys added with ``+``.

The sections are the settings objects the code runs with (``DPOSettings``, ``PreferenceDataSettings``...):
building one in Python gives the same defaults as the command line. Stage-specific defaults (SFT's learning
rate is not DPO's) are set where the stage schema builds its section. One vocabulary for every stage:

    data.*        what is read, the split and the loader (``val_fraction``, ``batch_size``, ``val_batch_size``);
                  SFT, generate and evaluate put their selected datasets at ``data.sets.<name>``
    optim.*       learning rates, weight decay, schedule
    checkpoint.*  how often ``last.ckpt`` is written
    export.*      what is written at the end (the adapter always; ``merged``: the full model + processor)
    prompts.*     the system text(s) and instructions the stage renders with (presets: stllava_med.prompts)

This module imports nothing heavy: the entry points register it before Hydra composes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


def _check(cls: type, values: Mapping[str, Any], where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from stllava_med.utils.config import check_keys  # utils.config imports this module

    values = dict(values or {})
    check_keys(values, {*cls.__dataclass_fields__, *extra}, where)
    return {k: v for k, v in values.items() if k in cls.__dataclass_fields__}

# --------------------------------------------------------------------------------------------------------------
# The backbone (conf/backbone/<name>.yaml: each option sets its values; the defaults are here)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BackboneSettings:
    """``backbone.*``: which weights and how they load. ``chat`` is read by :class:`stllava_med.chat.ChatFormat`,
    ``lora`` by :class:`stllava_med.backbone.LoraSettings` (each refuses keys it lacks), ``tiny`` by
    :mod:`stllava_med.tiny` (the embedded toy backbone's shape)."""

    name: str = "backbone"
    name_or_path: str = "???"             # an HF directory or hub id (loaded offline)
    dtype: str = "float32"                # float32 | bfloat16 | float16 | auto
    attn_implementation: str | None = None  # sdpa | eager | flash_attention_2; null: transformers' choice
    quantization: str | None = None       # null | 4bit | 8bit (bitsandbytes; QLoRA)
    bnb_compute_dtype: str = "bfloat16"
    device_map: Any = None
    trust_remote_code: bool = False
    adapter_path: str | None = None       # a trained LoRA adapter loaded on top (evaluation / generation)
    chat: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    tiny: Any = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> BackboneSettings:
        values = _check(cls, cfg or {}, "backbone")
        if not values.get("name_or_path") or values["name_or_path"] == "???":
            raise ValueError("backbone.name_or_path is required (an HF directory, e.g. a stage's merged/ export)")
        for key in ("chat", "lora"):
            values[key] = dict(values.get(key) or {})
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------
# Sections shared by the training stages
# --------------------------------------------------------------------------------------------------------------


@dataclass
class OptimSettings:
    """``optim.*``: AdamW with a cosine schedule and linear warmup (the paper: cosine, 3% warmup, no decay)."""

    lr: float = 2e-4                      # LoRA (and every other trainable weight but the projector)
    projector_lr: float | None = 2e-5     # the projector's own rate; null: lr
    weight_decay: float = 0.0             # biases and norms never decay
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0             # the cosine's floor, as a fraction of lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    projector_modules: list[str] | None = None   # null: the model family's projector

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, where: str = "optim") -> OptimSettings:
        values = _check(cls, cfg or {}, where)
        if values.get("betas") is not None:
            values["betas"] = [float(b) for b in values["betas"]]
        if values.get("projector_modules") is not None:
            values["projector_modules"] = [str(m) for m in values["projector_modules"]]
        settings = cls(**values)
        if settings.lr < 0:
            raise ValueError(f"{where}.lr must be >= 0, got {settings.lr}")
        if not 0.0 <= settings.warmup_ratio < 1.0:
            raise ValueError(f"{where}.warmup_ratio must be in [0, 1), got {settings.warmup_ratio}")
        return settings


@dataclass
class CheckpointSettings:
    """``checkpoint.*``: ``<run dir>/checkpoints/last.ckpt`` (trainable tensors, optimizer, loop position)."""

    every_n_steps: int | None = 200       # also written at every epoch end; null: epoch ends only


@dataclass
class ExportSettings:
    """``export.*``: the adapter (``<run dir>/adapter``) is always saved."""

    merged: bool = True                   # also <run dir>/merged: the full HF model + processor, loadable by path


IMAGE_ASPECT_RATIOS = ("keep", "pad")


def _check_aspect(value: str, where: str) -> None:
    if value not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"{where} must be one of {IMAGE_ASPECT_RATIOS}, not {value!r}")


def _check_system(value: str | None, where: str) -> None:
    from stllava_med.prompts import system_text  # light: refuses a preset name that does not exist

    system_text(value, where)


@dataclass
class StagePrompts:
    """``prompts.*`` of train_sft, train_dpo and evaluate: the system text the stage renders every conversation
    with. The paper's: ``v1_sq`` for stage 1, ``v1`` for DPO, ``llava_v1`` for evaluation (:mod:`stllava_med.prompts`
    has the texts)."""

    system: str | None = None             # preset (v1_sq | llava_v1 | v1 | none) or a text; null: backbone.chat.system_prompt

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, where: str = "prompts") -> StagePrompts:
        settings = cls(**_check(cls, cfg or {}, where))
        _check_system(settings.system, f"{where}.system")
        return settings


@dataclass
class GeneratePrompts:
    """``prompts.*`` of generate: one system text for the describe and question rounds, one for answer sampling
    (the official code: ``v1_sq`` and ``llava_v1``), and the user instructions."""

    question_system: str | None = None    # describe + ask (preset or text); null: backbone.chat.system_prompt
    answer_system: str | None = None      # answer sampling (preset or text); null: backbone.chat.system_prompt
    describe: str = "Can you describe the image in detail?"   # round 1's user turn (official visual_sq.py)
    question: str = "Ask one question about this medical image."  # question_prompt=instruction only (ours)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, where: str = "prompts") -> GeneratePrompts:
        settings = cls(**_check(cls, cfg or {}, where))
        _check_system(settings.question_system, f"{where}.question_system")
        _check_system(settings.answer_system, f"{where}.answer_system")
        if not settings.describe.strip() or not settings.question.strip():
            raise ValueError(f"{where}.describe and {where}.question must not be empty")
        return settings


# --------------------------------------------------------------------------------------------------------------
# Stage 1: SFT
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SFTData:
    """``data.*`` of ``train_sft``: the selected datasets (``data=<name>`` puts ``conf/data/<name>.yaml`` at
    ``data.sets.<name>``), how conversations are built and split, and the loader."""

    sets: dict[str, Any] = field(default_factory=dict)
    fraction: float = 1.0                 # nested deterministic subset of the training conversations
    fraction_seed: int = 0                # keep fixed across a sweep so that 9% ⊂ 25% ⊂ 50%
    val_fraction: float = 0.05            # conversations held out for val/ metrics (0 disables validation)
    vqa_grouping: str = "image"           # VQA sets: image (one image's questions = one conversation) | single
    max_qa_per_conversation: int | None = 10
    batch_size: int = 8
    val_batch_size: int | None = None     # null: batch_size
    num_workers: int = 0
    max_length: int | None = 2048         # tokens, image tokens included; longer conversations lose trailing pairs
    on_too_long: str = "drop_turns"       # drop_turns (counted) | error
    # error: a missing image fails at load (per set: data.sets.<name>.on_missing_image), an unreadable one at its
    # batch, naming the record | skip: every image is decoded before training; missing and unreadable ones (and
    # those over max_image_pixels) are skipped with their conversations, counted in data_report.json
    on_bad_image: str = "error"
    cache_images: bool = False            # keep decoded images in memory (small datasets)
    # keep: the processor's own resize / crop | pad: first to a square in the processor's mean colour
    # (LLaVA's expand2square, the official training's image_aspect_ratio=pad)
    image_aspect_ratio: str = "keep"
    shuffle: bool = True
    pin_memory: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **runtime: Any) -> Any:
        values = _check(cls, cfg or {}, "data")
        settings = cls(**values, **runtime)
        if settings.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {settings.batch_size}")
        if not 0.0 <= settings.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {settings.val_fraction}")
        if settings.on_too_long not in ("drop_turns", "error"):
            raise ValueError(f"data.on_too_long must be drop_turns or error, not {settings.on_too_long!r}")
        if settings.on_bad_image not in ("error", "skip"):
            raise ValueError(f"data.on_bad_image must be error or skip, not {settings.on_bad_image!r}")
        if settings.vqa_grouping not in ("image", "single"):
            raise ValueError(f"data.vqa_grouping must be image or single, not {settings.vqa_grouping!r}")
        _check_aspect(settings.image_aspect_ratio, "data.image_aspect_ratio")
        return settings


@dataclass
class SFTSettings:
    """``sft.*``: what stage 1 trains."""

    finetune: str = "lora"                # lora (the paper) | full (every weight but the vision tower; random bases)
    sq_ratio: float = 0.5                 # probability that a human turn after the first becomes a questioner turn
    gradient_checkpointing: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SFTSettings:
        settings = cls(**_check(cls, cfg or {}, "sft"))
        if settings.finetune not in ("lora", "full"):
            raise ValueError(f"sft.finetune must be 'lora' or 'full', not {settings.finetune!r}")
        if not 0.0 <= settings.sq_ratio <= 1.0:
            raise ValueError(f"sft.sq_ratio must be in [0, 1], got {settings.sq_ratio}")
        return settings


# --------------------------------------------------------------------------------------------------------------
# Stage 2b: DPO
# --------------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
PAIR_FORMATS = ("auto", "native", "trl", "official")


@dataclass
class PreferenceDataSettings:
    """``data.*`` of ``train_dpo``: the preference pairs, the split and the loader."""

    path: Any = ""                        # pair files: a file, a directory, a glob, or a list of them
    format: str = "auto"                  # auto (per file) | native (our shards) | trl | official (STLLaVA-Med JSON)
    val_path: Any = None                  # held-out pairs; null: a seeded val_fraction of path
    val_fraction: float = 0.05
    fraction: float = 1.0                 # nested deterministic subset of the training pairs
    fraction_seed: int = 0
    seed: int = 0                         # shuffle order (the stage schema sets ${seed})
    batch_size: int = 4                   # pairs per device per step
    val_batch_size: int | None = None     # null: batch_size
    max_length: int | None = 2048         # longer pairs are dropped (counted); nothing is ever truncated
    num_workers: int = 0                  # dataloader workers
    shuffle_buffer: int = 1000
    image_root: str | None = None         # relative image paths: against this, else the shard's directory
    image_aspect_ratio: str = "keep"      # keep | pad (to a square in the processor's mean colour; the paper's DPO)
    on_bad_pair: str = "error"            # error | skip (counted in data_summary.json)
    scan_cache_dir: str | None = None     # the length scan's cache; null: none
    convert_cache_dir: str | None = None  # foreign files converted here, keyed by content; null: <run dir>
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **overrides: Any) -> PreferenceDataSettings:
        values = _check(cls, cfg or {}, "data")
        for key in ("path", "val_path"):
            if isinstance(values.get(key), list | tuple):
                values[key] = [str(p) for p in values[key]]
        values.update(overrides)
        settings = cls(**values)
        if not settings.path:
            raise ValueError("data.path is required: preference pairs (a file, a directory or a glob of our JSONL "
                             "shards, or TRL / official files)")
        if settings.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {settings.batch_size}")
        if not 0.0 <= settings.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {settings.val_fraction}")
        if settings.format not in PAIR_FORMATS:
            raise ValueError(f"data.format must be one of {PAIR_FORMATS}, not {settings.format!r}")
        if settings.on_bad_pair not in ("error", "skip"):
            raise ValueError(f"data.on_bad_pair must be error or skip, not {settings.on_bad_pair!r}")
        _check_aspect(settings.image_aspect_ratio, "data.image_aspect_ratio")
        return settings


@dataclass
class DPOSettings:
    """``dpo.*``: the loss and the reference."""

    beta: float = 0.1
    loss_type: str = "sigmoid"            # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0          # sigmoid: conservative DPO; robust: the assumed label-flip rate
    nll_weight: float = 0.0               # > 0 adds the chosen answer's per-token NLL
    prefix_sharing: bool = True           # image + prompt once, both answers from its KV cache
    reference: str = "adapter_off"        # adapter_off | copy | precomputed
    reference_path: str | None = None     # copy / precomputed from a copy: default backbone.name_or_path
    precompute_source: str = "adapter_off"  # what the precomputed pass runs: adapter_off | copy
    precompute_batch_size: int | None = None
    reference_cache_dir: str | None = None  # precomputed log-probs (the stage schema sets the shared cache)
    gradient_checkpointing: bool = False  # turns prefix sharing off
    # TRL's DPOConfig.disable_dropout (its default too): every dropout of the policy at p=0 while it trains, so the
    # policy / reference log-ratio is not sampling noise. false: the backbone's own dropout (LoRA's lora.dropout).
    disable_dropout: bool = True
    # The frozen vision tower's output cached on disk per (image content, tower weights, image processing), filled
    # once before training and shared by the jobs of a sweep and later epochs; cached batches skip image decoding
    # and processing (stllava_med.dpo.vision_cache). LLaVA families with a frozen tower only. null: off.
    vision_cache_dir: str | None = None   # (the stage schema sets the shared cache)
    vision_cache_dtype: str = "auto"      # auto (the tower's dtype: exact) | float16 | bfloat16 | float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> DPOSettings:
        settings = cls(**_check(cls, cfg or {}, "dpo"))
        if settings.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"dpo.loss_type must be one of {DPO_LOSS_TYPES}, not {settings.loss_type!r}")
        if settings.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {settings.beta}")
        if settings.nll_weight < 0:
            raise ValueError(f"dpo.nll_weight must be >= 0, got {settings.nll_weight}")
        if settings.reference not in ("adapter_off", "copy", "precomputed"):
            raise ValueError(f"dpo.reference must be adapter_off, copy or precomputed, not {settings.reference!r}")
        if settings.vision_cache_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ValueError("dpo.vision_cache_dtype must be auto, float16, bfloat16 or float32, not "
                             f"{settings.vision_cache_dtype!r}")
        return settings


# --------------------------------------------------------------------------------------------------------------
# Stage 2a: generation, judging, pairs; evaluation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DataSets:
    """``data.*`` of the stages that read datasets as they are (generate in dataset mode, evaluate)."""

    sets: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExpectedCounts:
    """``data.sets.<name>.expect_counts``: the questions a benchmark file must hold (the paper's test splits, in
    conf/data/llava_med_*.yaml), checked on the loaded records before ``limit``. An entry without the key, or
    ``expect_counts: null``, checks nothing (custom subsets)."""

    total: int                            # questions in the file (open + closed)
    open: int                             # answer_type OPEN
    closed: int                           # answer_type CLOSED

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, where: str) -> ExpectedCounts | None:
        if cfg is None:
            return None
        values = _check(cls, cfg, where)
        missing = [k for k in cls.__dataclass_fields__ if values.get(k) is None]
        if missing:
            raise ValueError(f"{where} needs {missing} (or null to check nothing)")
        settings = cls(**{k: int(v) for k, v in values.items()})
        if settings.open + settings.closed != settings.total:
            raise ValueError(f"{where}: open {settings.open} + closed {settings.closed} != total {settings.total}")
        return settings


@dataclass
class Sampling:
    temperature: float = 1.2
    top_k: int | None = 100
    top_p: float | None = 0.95
    max_new_tokens: int = 300

    def kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


@dataclass
class GenerateSettings:
    """``generate.*``: defaults are the paper's sampling."""

    question_source: str = "self"         # self: the policy asks | dataset: questions + ground truth from data=
    question_prompt: str = "questioner"   # questioner: the stage-1 role (vuser) | instruction
    images: Any = None                    # self mode: a folder, a .txt list or a list of image paths
    questions_per_image: int = 5          # self: questions per image; dataset: at most N per image (-1: all)
    answers_per_question: int = 2         # K >= 2 sampled answers per question
    max_images: int | None = None         # the first M images (raising it later extends the same run)
    image_batch_size: int = 4             # images per describe / question call
    answer_batch_size: int = 8            # questions per answer call (each x K sequences)
    describe: bool = True                 # greedy description first (the questioner continues after it)
    describe_max_new_tokens: int = 300    # the official code: 1024 (experiment=stllava_med_paper_generate)
    question: Sampling = field(default_factory=lambda: Sampling(temperature=1.2, top_k=300, top_p=0.95))
    # answer.max_new_tokens: 300 here, 1024 in the official code (experiment=stllava_med_paper_generate)
    answer: Sampling = field(default_factory=lambda: Sampling(temperature=1.2, top_k=100, top_p=0.95))
    max_question_rounds: int = 2          # extra rounds to replace duplicate / empty questions
    max_answer_rounds: int = 2            # ... and answers (< 2 distinct answers: the question is dropped, counted)
    include_reference_answer: bool = False  # dataset mode: add the ground truth to the sampled answers
    shared_prefix: str = "auto"           # auto | true | false: one prompt encoding, K samples from its KV cache
    shard_size: int = 10000               # candidates per JSONL shard
    on_bad_image: str = "error"           # error | skip (counted in summary.json)
    image_aspect_ratio: str = "keep"      # keep (the official generation) | pad (square, the processor's mean colour)
    progress: bool = True
    # Shards (utils/sharding.py): image batch b runs in shard b % num_shards, with the seed one process gives it;
    # each shard writes <run>/shards/shard-<i>-of-<n>/, the last to finish merges. null: RANK / WORLD_SIZE
    # (torchrun), else SLURM_PROCID / SLURM_NTASKS (srun), else 0 / 1. Not part of the run directory's hash.
    num_shards: int | None = 1
    shard_index: int | None = 0
    merge_only: bool = False              # merge the finished shards of the run directory; no model is loaded


@dataclass
class JudgeRunSettings:
    """``judge.*``: the run around the expert (the expert itself is the ``expert`` group)."""

    retry_failed: str = "transient"       # on resume, re-ask judgements that exhausted their retries: transient|none|all
    store_synchronous: str = "NORMAL"     # SQLite: NORMAL survives a killed process; FULL also an OS crash
    progress: bool = True
    limit: int | None = None              # judge only the first N candidates (smoke runs)
    # candidates= a generation run that has not finished (no summary.json with complete: true, or progress past
    # it): refused with its counts unless true (judges what is there; the pairs then come from part of the images)
    allow_partial: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> JudgeRunSettings:
        settings = cls(**_check(cls, cfg or {}, "judge"))
        if settings.retry_failed not in ("none", "transient", "all"):
            raise ValueError(f"judge.retry_failed must be none, transient or all, not {settings.retry_failed!r}")
        return settings


@dataclass
class PairSettings:
    """``pairs.*``: best and worst judged answer of a question become a pair."""

    min_margin: float = 1.0               # chosen - rejected score below this (1-10 scale): dropped, counted
    max_per_image: int | None = None      # at most N pairs per image (largest margins first)
    max_pairs: int | None = None          # at most N pairs in all, after max_per_image (largest margins first; id breaks ties)
    shard_size: int = 5000
    source: str = "selftrain"             # written into every pair's `source` field

    def __post_init__(self) -> None:
        if self.min_margin < 0:
            raise ValueError(f"pairs.min_margin must be >= 0, got {self.min_margin}")
        if self.max_per_image is not None and self.max_per_image < 1:
            raise ValueError(f"pairs.max_per_image must be >= 1 or null, got {self.max_per_image}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"pairs.max_pairs must be >= 1 or null, got {self.max_pairs}")
        if self.shard_size < 1:
            raise ValueError(f"pairs.shard_size must be >= 1, got {self.shard_size}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> PairSettings:
        return cls(**_check(cls, cfg or {}, "pairs"))


@dataclass
class EvalSettings:
    """``eval.*``: zero-shot VQA with the LLaVA-Med metrics (greedy decoding)."""

    batch_size: int = 8
    max_new_tokens: int = 32              # VQA answers are short
    on_bad_image: str = "error"           # error | skip (counted in metrics.json)
    image_aspect_ratio: str = "keep"      # keep (the official evaluation) | pad (square, the processor's mean colour)
    progress: bool = True
    # Shards, as generate.*: batch b of each dataset (padding stays that of one process) runs in shard
    # b % num_shards; null: from RANK / WORLD_SIZE or SLURM_PROCID / SLURM_NTASKS. Not part of the run's hash.
    num_shards: int | None = 1
    shard_index: int | None = 0
    merge_only: bool = False              # merge the finished shards' predictions and score them; no model

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> EvalSettings:
        settings = cls(**_check(cls, cfg or {}, "eval"))
        if settings.on_bad_image not in ("error", "skip"):
            raise ValueError(f"eval.on_bad_image must be error or skip, not {settings.on_bad_image!r}")
        if settings.batch_size < 1 or settings.max_new_tokens < 1:
            raise ValueError("eval.batch_size and eval.max_new_tokens must be >= 1")
        _check_aspect(settings.image_aspect_ratio, "eval.image_aspect_ratio")
        return settings


# --------------------------------------------------------------------------------------------------------------
# Stage configs (the root of conf/<stage>.yaml)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    """Keys every stage has. Config groups (paths, backbone, trainer, logger, expert) are typed by their own
    readers (``backbone.*`` by :mod:`stllava_med.backbone`, ``trainer.*`` by Lightning's ``Trainer``)."""

    run_name: str = "run"
    out_dir: str | None = None            # default: logs/runs/<stage>/<run_name>-<config hash>; rerunning resumes
    seed: int = 0
    num_threads: int | None = None        # torch intra-op threads (CPU)
    print_summary: bool = True            # the key | value table at the end
    paths: Any = None
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    run_dir_ignore: list[str] = field(default_factory=list)  # keys left out of the run directory's hash
    # A run directory whose run_identity.json (or config.yaml) records another config (keys outside
    # run_dir_ignore differ): error (names each differing key, old -> new) | new (run in <out_dir>/run-<hash>)
    run_dir_mismatch: str = "error"
    # An image with more pixels is a bad image (PIL's decompression-bomb guard): an error naming the record, or a
    # counted skip where the stage skips bad images. null: no limit. 89478485 is PIL's default (~9459 x 9459).
    max_image_pixels: int | None = 89_478_485


@dataclass
class _Objective:
    # What the command returns to a Hydra sweeper (hydra/sweeper=optuna): a metric of metrics.json. Optuna's
    # direction is the sweeper's own setting: pass hydra.sweeper.direction=<objective_direction> (a mismatch
    # is warned about). null: return nothing.
    objective: str | None = None
    objective_direction: str = "minimize"


@dataclass
class SFTStage(_Objective, _Stage):
    run_name: str = "sft-${backbone.name}"
    objective: str | None = "val/loss"
    slurm_auto_requeue: bool = False      # true only for plain sbatch (submitit requeues by itself)
    trainer: Any = None
    logger: Any = None
    data: SFTData = field(default_factory=SFTData)
    sft: SFTSettings = field(default_factory=SFTSettings)
    prompts: StagePrompts = field(default_factory=StagePrompts)
    optim: OptimSettings = field(default_factory=OptimSettings)
    checkpoint: CheckpointSettings = field(default_factory=lambda: CheckpointSettings(every_n_steps=200))
    export: ExportSettings = field(default_factory=ExportSettings)
    run_dir_ignore: list[str] = field(default_factory=lambda: [
        "checkpoint", "export", "data.cache_images", "data.val_batch_size", "slurm_auto_requeue", "num_threads"])


@dataclass
class DPOStage(_Objective, _Stage):
    run_name: str = "dpo-${backbone.name}"
    objective: str | None = "val/rewards/accuracies"
    objective_direction: str = "maximize"
    slurm_auto_requeue: bool = False
    trainer: Any = None
    logger: Any = None
    data: PreferenceDataSettings = field(default_factory=lambda: PreferenceDataSettings(
        path="${paths.data_dir}/vqa_rad_sample/preference", seed="${seed}", num_workers=2,  # type: ignore[arg-type]
        scan_cache_dir="${paths.data_dir}/cache/preference_scan",
        convert_cache_dir="${paths.data_dir}/cache/preference_converted"))
    dpo: DPOSettings = field(default_factory=lambda: DPOSettings(
        reference_cache_dir="${paths.data_dir}/cache/reference_logps",
        vision_cache_dir="${paths.data_dir}/cache/vision_features"))
    prompts: StagePrompts = field(default_factory=StagePrompts)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=5e-6, projector_lr=2e-5))
    checkpoint: CheckpointSettings = field(default_factory=lambda: CheckpointSettings(every_n_steps=50))
    export: ExportSettings = field(default_factory=ExportSettings)
    run_dir_ignore: list[str] = field(default_factory=lambda: [
        "checkpoint", "export", "data.scan_cache_dir", "data.convert_cache_dir", "data.progress",
        "dpo.reference_cache_dir", "dpo.precompute_batch_size", "dpo.vision_cache_dir", "slurm_auto_requeue",
        "num_threads"])


@dataclass
class GenerateStage(_Stage):
    run_name: str = "${backbone.name}-${.generate.question_source}"  # relative: also inside the pipeline
    device: str = "auto"                  # auto | cpu | cuda | cuda:1
    data: DataSets = field(default_factory=DataSets)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    prompts: GeneratePrompts = field(default_factory=GeneratePrompts)
    run_dir_ignore: list[str] = field(default_factory=lambda: [
        "device", "num_threads", "generate.progress", "generate.max_images", "generate.shard_size",
        "generate.on_bad_image", "generate.num_shards", "generate.shard_index", "generate.merge_only"])


@dataclass
class JudgeStage(_Stage):
    run_name: str = "${expert.name}"
    candidates: Any = None                # a candidates JSONL, a directory of shards (a generation run) or a glob
    expert: Any = None
    judge: JudgeRunSettings = field(default_factory=JudgeRunSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    # backbone: read by expert=hf_local through expert.backbone, which stays in the fingerprint
    run_dir_ignore: list[str] = field(default_factory=lambda: ["backbone", "judge.progress", "judge.allow_partial"])


@dataclass
class EvaluateStage(_Objective, _Stage):
    run_name: str = "${backbone.name}"
    device: str = "auto"
    print_table: bool = True              # the metrics table and the key | value summary at the end
    # a metric of the first dataset (closed_accuracy, open_recall, ...) or <dataset>/<metric>
    objective: str | None = "closed_accuracy"
    objective_direction: str = "maximize"
    data: DataSets = field(default_factory=DataSets)
    eval: EvalSettings = field(default_factory=EvalSettings)
    prompts: StagePrompts = field(default_factory=StagePrompts)
    run_dir_ignore: list[str] = field(default_factory=lambda: ["eval.progress", "device", "num_threads",
                                                               "eval.num_shards", "eval.shard_index", "eval.merge_only"])


# --------------------------------------------------------------------------------------------------------------
# The pipeline: each stage's own schema at stages.<name>
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _InPipeline:
    backbone: Any = None                  # the pipeline passes its own (stage 1's export, round r's policy)
    enabled: bool = True
    # Hydra overrides for the stage's own config (conf/<stage>.yaml) when the pipeline composes it: group choices
    # and stage experiments, e.g. [experiment=stllava_med_paper, trainer=gpu, data=vqa_rad_train]
    overrides: list[str] = field(default_factory=list)


@dataclass
class SFTInPipeline(_InPipeline, SFTStage):
    pass


@dataclass
class GenerateInPipeline(_InPipeline, GenerateStage):
    pass


@dataclass
class JudgeInPipeline(_InPipeline, JudgeStage):
    pass


@dataclass
class DPOInPipeline(_InPipeline, DPOStage):
    pass


@dataclass
class EvaluateInPipeline(_InPipeline, EvaluateStage):
    pass


@dataclass
class PipelineStages:
    sft: SFTInPipeline = field(default_factory=SFTInPipeline)
    generate: GenerateInPipeline = field(default_factory=GenerateInPipeline)
    judge: JudgeInPipeline = field(default_factory=JudgeInPipeline)
    dpo: DPOInPipeline = field(default_factory=DPOInPipeline)
    evaluate: EvaluateInPipeline = field(default_factory=EvaluateInPipeline)


@dataclass
class PipelineSettings:
    rounds: int = 1                       # iterative self-training: round r+1 generates with round r's DPO policy
    evaluate_stage1: bool = True          # evaluate the stage-1 model beside the DPO model(s)


@dataclass
class PipelineStage(_Objective, _Stage):
    run_name: str = "pipeline-${backbone.name}"
    # a metric of the last evaluated model on the first dataset (closed_accuracy, ...),
    # <model>/<dataset>/<metric> (stage1/vqa_rad_sample/open_f1) or dpo/<round>/<train|val>/<metric>
    objective: str | None = "closed_accuracy"
    objective_direction: str = "maximize"
    expert: Any = None
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    stages: PipelineStages = field(default_factory=PipelineStages)


STAGE_SCHEMAS: dict[str, type] = {"sft": SFTStage, "dpo": DPOStage, "generate": GenerateStage,
                                  "judge": JudgeStage, "evaluate": EvaluateStage, "pipeline": PipelineStage}
# The primary config of each pipeline stage (conf/<name>.yaml) and its schema.
PIPELINE_STAGES: dict[str, type] = {"sft": SFTStage, "generate": GenerateStage, "judge": JudgeStage,
                                    "dpo": DPOStage, "evaluate": EvaluateStage}

# Keys that were renamed when the stages got one vocabulary: named in the error for the old key.
RENAMED: dict[str, str] = {
    "data.val_ratio": "data.val_fraction",
    "data.eval_batch_size": "data.val_batch_size",
    "sft.lr": "optim.lr",
    "sft.projector_lr": "optim.projector_lr",
    "sft.weight_decay": "optim.weight_decay",
    "sft.warmup_ratio": "optim.warmup_ratio",
    "sft.min_lr_ratio": "optim.min_lr_ratio",
    "sft.export": "export.merged",
    "sft.checkpoint_every_n_steps": "checkpoint.every_n_steps",
    "checkpoint_every_n_steps": "checkpoint.every_n_steps",
    "stage_overrides": "stages.<stage>.overrides",
    "pipeline.stages": "stages.<stage>.enabled",
}


def register() -> None:
    """Store every stage schema as ``<stage>_schema`` (idempotent: the ConfigStore replaces same-named nodes)."""
    store = ConfigStore.instance()
    for name, schema in STAGE_SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)


register()
