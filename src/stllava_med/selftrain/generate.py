"""Candidate generation: the policy describes each image, asks its own questions about it, and samples K answers
to each question (STLLaVA-Med stage 2a, first half).

Per image (``question_source=self``):

1. **describe** — greedy, ``prompts.describe`` as the user turn (the official "Can you describe the image in
   detail?"), under ``prompts.question_system``;
2. **ask** — continuing the conversation in the *questioner* role (the rendering stage 1 trains on), N
   questions are sampled from that one prefix with ``num_return_sequences``; for a backbone without stage-1
   training, ``question_prompt=instruction`` asks through a user instruction (``prompts.question``) instead;
3. **answer** — each question is put to the policy as the single-turn VQA prompt (the prompt evaluation uses and
   DPO trains on) under ``prompts.answer_system``, and K answers are sampled with one ``num_return_sequences=K``
   call.

With ``question_source=dataset`` the questions (and their ground-truth answers, for the ``reference`` expert)
come from a labelled VQA set and only step 3 runs. ``include_reference_answer`` (off by default, not the
paper's method) adds the ground-truth answer to the sampled ones, so that a policy too weak to ever answer
correctly — the tiny backbone of the offline demo, say — still yields preference pairs.

Work is batched across images (``image_batch_size``) and questions (``answer_batch_size`` prompts × K sequences
per call); each prompt and its image are encoded once and the K samples decode from a shared KV cache
(:func:`stllava_med.generation.sample_sequences`). Identical questions of an image and identical answers of a
question are dropped and resampled, at most ``max_*_rounds`` more times. Sampling is seeded per batch of the
full image list, so a rerun — or a resumed run — produces the same candidates. Candidates are appended to JSONL
shards as each batch finishes, and an image counts as done only once its line is in ``progress.jsonl``; a rerun
skips done images and discards the partial output of an image a kill interrupted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stllava_med.chat import Turn, prompt_text, vqa_turns
from stllava_med.data.images import IMAGE_ASPECT_RATIOS, image_preparer
from stllava_med.data.vqa import ImageError, load_image
from stllava_med.families import processor_family
from stllava_med.generation import generate_batch, sample_sequences, supports_shared_prefix
from stllava_med.prompts import with_system
from stllava_med.schema import GeneratePrompts, GenerateSettings, Sampling
from stllava_med.selftrain.records import Candidate, candidate_id
from stllava_med.utils.config import check_keys
from stllava_med.utils.io import JsonlWriter, read_jsonl, sha256_file, stable_hash, write_jsonl
from stllava_med.utils.sharding import owns_batch

log = logging.getLogger(__name__)

QUESTION_SOURCES = ("self", "dataset")
QUESTION_PROMPTS = ("questioner", "instruction")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SHARD_PREFIX = "candidates"
PROGRESS_FILE = "progress.jsonl"


@dataclass
class GenerationSettings(GenerateSettings):
    """What generation runs with: ``generate.*`` (:class:`stllava_med.schema.GenerateSettings`, where the
    defaults live: the paper's) and the run's seed."""

    seed: int = 0

    def __post_init__(self) -> None:
        if self.question_source not in QUESTION_SOURCES:
            raise ValueError(f"generate.question_source must be one of {QUESTION_SOURCES}, not {self.question_source!r}")
        if self.question_prompt not in QUESTION_PROMPTS:
            raise ValueError(f"generate.question_prompt must be one of {QUESTION_PROMPTS}, not {self.question_prompt!r}")
        if self.answers_per_question < 2:
            raise ValueError(f"generate.answers_per_question must be >= 2 (a pair needs two answers), "
                             f"got {self.answers_per_question}")
        if self.question_source == "self" and self.questions_per_image < 1:
            raise ValueError(f"generate.questions_per_image must be >= 1, got {self.questions_per_image}")
        if self.question_source == "self" and self.question_prompt == "questioner" and not self.describe:
            raise ValueError("generate.question_prompt=questioner continues the conversation after the image "
                             "description: it needs generate.describe=true (or use question_prompt=instruction)")
        if self.include_reference_answer and self.question_source != "dataset":
            raise ValueError("generate.include_reference_answer needs generate.question_source=dataset "
                             "(self-asked questions have no ground truth)")
        if str(self.shared_prefix).lower() not in ("auto", "true", "false"):
            raise ValueError(f"generate.shared_prefix must be auto, true or false, not {self.shared_prefix!r}")
        if self.on_bad_image not in ("error", "skip"):
            raise ValueError(f"generate.on_bad_image must be 'error' or 'skip', not {self.on_bad_image!r}")
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"generate.image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, "
                             f"not {self.image_aspect_ratio!r}")
        for name in ("image_batch_size", "answer_batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"generate.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **overrides: Any) -> GenerationSettings:
        cfg = dict(cfg or {})
        check_keys(cfg, set(GenerateSettings.__dataclass_fields__), "generate")
        values = {k: v for k, v in cfg.items() if k not in ("question", "answer")}
        for role in ("question", "answer"):
            default = getattr(GenerateSettings(), role)
            check_keys(cfg.get(role), Sampling.__dataclass_fields__, f"generate.{role}")
            values[role] = Sampling(**{**asdict(default), **dict(cfg.get(role) or {})})
        values.update(overrides)
        if values.get("questions_per_image") is not None and int(values["questions_per_image"]) < 0:
            values["questions_per_image"] = 0  # -1: every question of the image (dataset mode)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GivenQuestion:
    """A labelled question (``question_source=dataset``)."""

    question: str
    answer: str
    answer_type: str
    record_id: str


@dataclass
class ImageTask:
    """One image to generate for; ``image_id`` is the sha256 of its bytes."""

    path: str
    image_id: str
    questions: list[GivenQuestion] = field(default_factory=list)


def _dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())


def list_images(source: str | Path | Sequence[str | Path]) -> list[str]:
    """Image paths from a folder (recursive, sorted), a text file with one path per line, or a list."""
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise FileNotFoundError(f"generate.images: no image files ({sorted(IMAGE_EXTENSIONS)}) under {path}")
            return files
        if path.is_file() and path.suffix.lower() in (".txt", ".lst"):
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            return [str((path.parent / line) if not Path(line).is_absolute() else line) for line in lines if line]
        if path.is_file():
            return [str(path)]
        raise FileNotFoundError(f"generate.images: {path} is neither a folder, a list file nor an image")
    return [str(Path(p).expanduser()) for p in source]


def tasks_from_paths(paths: Iterable[str], *, on_bad_image: str = "error") -> tuple[list[ImageTask], list[str]]:
    """One task per distinct image (by content); missing files raise, or are skipped and reported."""
    tasks: dict[str, ImageTask] = {}
    skipped: list[str] = []
    for path in paths:
        try:
            sha = sha256_file(path)
        except OSError as err:
            if on_bad_image != "skip":
                raise FileNotFoundError(f"generate.images: cannot read {path}: {err}") from err
            skipped.append(f"{path}: {err.strerror or err}")
            continue
        tasks.setdefault(sha, ImageTask(path=str(path), image_id=sha))
    return list(tasks.values()), skipped


def tasks_from_records(records: Iterable[Any], *, questions_per_image: int | None = None) -> list[ImageTask]:
    """Group labelled VQA records by image (in order of first appearance), dropping repeated questions and
    keeping at most ``questions_per_image`` per image (0 / None: all)."""
    tasks: dict[str, ImageTask] = {}
    seen: dict[str, set[str]] = {}
    hashes: dict[str, str] = {}
    for record in records:
        if record.image not in hashes:
            hashes[record.image] = sha256_file(record.image)
        sha = hashes[record.image]
        task = tasks.setdefault(sha, ImageTask(path=record.image, image_id=sha))
        key = _dedupe_key(record.question)
        if key in seen.setdefault(sha, set()):
            continue
        if questions_per_image and len(task.questions) >= questions_per_image:
            continue
        seen[sha].add(key)
        task.questions.append(GivenQuestion(record.question, record.answer, record.answer_type, record.id))
    return list(tasks.values())


class ShardWriter:
    """Appends records to ``<dir>/<prefix>-00000.jsonl``, starting a new shard every ``shard_size`` lines and
    continuing the last shard of an earlier run."""

    def __init__(self, directory: Path, *, prefix: str = SHARD_PREFIX, shard_size: int = 10000) -> None:
        self.directory = directory
        self.prefix = prefix
        self.shard_size = shard_size
        directory.mkdir(parents=True, exist_ok=True)
        shards = sorted(directory.glob(f"{prefix}-*.jsonl"))
        self.index = int(shards[-1].stem.rsplit("-", 1)[1]) if shards else 0
        self.count = sum(1 for _ in read_jsonl(shards[-1])) if shards else 0
        self._writer: JsonlWriter | None = None

    @property
    def path(self) -> Path:
        return self.directory / f"{self.prefix}-{self.index:05d}.jsonl"

    def write(self, record: dict[str, Any]) -> None:
        if self.count >= self.shard_size:
            self.close()
            self.index += 1
            self.count = 0
        if self._writer is None:
            self._writer = JsonlWriter(self.path)
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_progress(out_dir: Path) -> dict[str, dict[str, Any]]:
    path = out_dir / PROGRESS_FILE
    if not path.is_file():
        return {}
    return {str(row["image_id"]): row for row in read_jsonl(path, allow_truncated_tail=True)}


def discard_unfinished(out_dir: Path, done: Mapping[str, Any]) -> int:
    """Remove candidates of images not marked done (a kill between an image's candidates and its progress
    line) and a torn last progress line; returns how many candidates were discarded."""
    progress = out_dir / PROGRESS_FILE
    if progress.is_file():
        write_jsonl(progress, done.values())
    discarded = 0
    for shard in sorted((out_dir / "candidates").glob(f"{SHARD_PREFIX}-*.jsonl")):
        rows = list(read_jsonl(shard, allow_truncated_tail=True))
        kept = [r for r in rows if str(r.get("image_sha256")) in done]
        with open(shard, "rb") as fh:
            torn = not fh.read().endswith(b"\n") and shard.stat().st_size > 0
        if len(kept) != len(rows) or torn:
            discarded += len(rows) - len(kept)
            write_jsonl(shard, kept)
    return discarded


def batch_seed(seed: int, batch_index: int) -> int:
    return int(stable_hash({"seed": seed, "batch": batch_index}, n=8), 16) % (2**31 - 1)


class CandidateGenerator:
    """Runs the three generation steps for batches of images with one backbone."""

    def __init__(self, backbone: Any, fmt: Any, settings: GenerationSettings,
                 prompts: GeneratePrompts | None = None) -> None:
        self.backbone = backbone
        self.fmt = fmt
        self.settings = settings
        self.prompts = prompts or GeneratePrompts()
        # describe + ask under one system text, answers under another (official: v1_sq / llava_v1); null: fmt's
        self.question_fmt = with_system(fmt, self.prompts.question_system, "prompts.question_system")
        self.answer_fmt = with_system(fmt, self.prompts.answer_system, "prompts.answer_system")
        self.counts: Counter = Counter()
        choice = str(settings.shared_prefix).lower()
        supported = supports_shared_prefix(backbone.model)
        self.shared_prefix = supported and choice in ("auto", "true")
        if choice != "false" and not supported:
            # logged once per run: a family without the exact cached continuation samples the plain way
            log.info("shared-prefix sampling is not available for the %s family; K answers are sampled with "
                     "generate(num_return_sequences=K) (the image and prompt are encoded K times)",
                     processor_family(backbone.processor).name)

    # -- prompts ----------------------------------------------------------------------------------------------

    def describe_prompt(self) -> str:
        return prompt_text(self.backbone.processor, [Turn("user", self.prompts.describe)], "assistant",
                           self.question_fmt)

    def question_prompt(self, description: str | None) -> str:
        turns: list[Turn] = []
        if description is not None:
            turns = [Turn("user", self.prompts.describe), Turn("assistant", description)]
        if self.settings.question_prompt == "questioner":
            return prompt_text(self.backbone.processor, turns, "questioner", self.question_fmt)
        return prompt_text(self.backbone.processor, [*turns, Turn("user", self.prompts.question)],
                           "assistant", self.question_fmt)

    def answer_prompt(self, question: str) -> str:
        return prompt_text(self.backbone.processor, vqa_turns(question), "assistant", self.answer_fmt)

    # -- sampling with deduplication -------------------------------------------------------------------------

    def _sample_distinct(self, prompts: Sequence[str], images: Sequence[Any], want: int, sampling: Sampling,
                         rounds: int, kind: str) -> list[list[str]]:
        """Up to ``want`` distinct non-empty samples per prompt: one ``num_return_sequences=want`` call, then
        up to ``rounds`` more for prompts still short (duplicates and empty samples are dropped, counted)."""
        results: list[list[str]] = [[] for _ in prompts]
        seen: list[set[str]] = [set() for _ in prompts]
        for _ in range(1 + rounds):
            pending = [i for i in range(len(prompts)) if len(results[i]) < want]
            if not pending:
                break
            texts = sample_sequences(self.backbone, [prompts[i] for i in pending], [images[i] for i in pending],
                                     k=want, max_new_tokens=sampling.max_new_tokens,
                                     shared_prefix=self.shared_prefix,
                                     questioner=kind == "questions" and self.settings.question_prompt == "questioner",
                                     **sampling.kwargs())
            self.counts[f"{kind}_sampled"] += len(texts)
            for slot, i in enumerate(pending):
                for text in texts[slot * want:(slot + 1) * want]:
                    text = text.strip()
                    key = _dedupe_key(text)
                    if not key:
                        self.counts[f"{kind}_empty_dropped"] += 1
                    elif key in seen[i]:
                        self.counts[f"{kind}_duplicates_dropped"] += 1
                    elif len(results[i]) < want:
                        seen[i].add(key)
                        results[i].append(text)
        return results

    # -- one batch ----------------------------------------------------------------------------------------------

    def run_batch(self, tasks: Sequence[ImageTask], images: Sequence[Any]) -> list[tuple[list[Candidate], dict[str, Any]]]:
        """Candidates (and a progress record) per task of a batch whose images are loaded."""
        settings = self.settings
        descriptions: list[str | None] = [None] * len(tasks)
        questions: list[list[GivenQuestion]] = []
        if settings.question_source == "self":
            if settings.describe:
                descriptions = list(generate_batch(self.backbone, [self.describe_prompt()] * len(tasks), list(images),
                                                   max_new_tokens=settings.describe_max_new_tokens))
            asked = self._sample_distinct([self.question_prompt(d) for d in descriptions], images,
                                          settings.questions_per_image, settings.question,
                                          settings.max_question_rounds, "questions")
            for per_image in asked:
                if len(per_image) < settings.questions_per_image:
                    self.counts["images_with_fewer_questions"] += 1
                questions.append([GivenQuestion(q, "", "", "") for q in per_image])
        else:
            questions = [list(t.questions) for t in tasks]
        flat = [(i, q) for i, per_image in enumerate(questions) for q in per_image]
        answers: list[list[str]] = []
        size = settings.answer_batch_size
        for start in range(0, len(flat), size):
            chunk = flat[start:start + size]
            answers.extend(self._sample_distinct([self.answer_prompt(q.question) for _, q in chunk],
                                                 [images[i] for i, _ in chunk], settings.answers_per_question,
                                                 settings.answer, settings.max_answer_rounds, "answers"))
        out: list[tuple[list[Candidate], dict[str, Any]]] = [([], {}) for _ in tasks]
        policy = getattr(self.backbone, "name_or_path", None) or getattr(self.backbone, "name", None)
        for (i, given), sampled in zip(flat, answers):
            task = tasks[i]
            dataset = settings.question_source == "dataset"
            meta: dict[str, Any] = {"record_id": given.record_id} if dataset else {}
            if settings.include_reference_answer:
                # the ground truth joins the sampled answers (unless the policy already said it): a bootstrap
                # for policies too weak to ever be right, at the price of off-policy chosen answers
                keys = [_dedupe_key(a) for a in sampled]
                if _dedupe_key(given.answer) in keys:
                    meta["reference_answer_index"] = keys.index(_dedupe_key(given.answer))
                else:
                    meta["reference_answer_index"] = len(sampled)
                    sampled = [*sampled, given.answer]
                    self.counts["reference_answers_added"] += 1
            if len(sampled) < 2:
                self.counts["questions_dropped_fewer_than_2_answers"] += 1
                continue
            if len(sampled) < settings.answers_per_question:
                self.counts["questions_with_fewer_answers"] += 1
            out[i][0].append(Candidate(
                id=candidate_id(task.image_id, given.question), image=task.path, image_sha256=task.image_id,
                question=given.question, answers=sampled, question_source=settings.question_source,
                description=descriptions[i], reference_answer=given.answer if dataset else None,
                answer_type=given.answer_type if dataset else None, policy=str(policy) if policy else None,
                meta=meta,
            ))
        for i, task in enumerate(tasks):
            out[i] = (out[i][0], {"image_id": task.image_id, "image": task.path, "questions": len(questions[i]),
                                  "candidates": len(out[i][0]),
                                  "answers": sum(len(c.answers) for c in out[i][0])})
        return out


def shard_tasks(tasks: Sequence[ImageTask], batch_size: int, shard: tuple[int, int]) -> list[ImageTask]:
    """The tasks of the image batches that ``shard = (index, n)`` runs: batch b of the full list when b % n == index."""
    return [t for b, start in enumerate(range(0, len(tasks), batch_size)) if owns_batch(b, shard)
            for t in tasks[start:start + batch_size]]


def generate_candidates(backbone: Any, fmt: Any, tasks: Sequence[ImageTask], settings: GenerationSettings,
                        out_dir: str | Path, prompts: GeneratePrompts | None = None,
                        shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Generate candidates for ``tasks`` (resuming what ``out_dir`` already holds); returns the run summary.

    ``shard = (index, n)``: only the image batches ``b`` (of the full list, seeded as one process seeds them)
    with ``b % n == index``; the summary counts those images."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.max_images is not None:
        tasks = list(tasks)[: settings.max_images]
    mine = shard_tasks(tasks, settings.image_batch_size, shard)
    done = read_progress(out_dir)
    discarded = discard_unfinished(out_dir, done)
    if discarded:
        log.warning("generate: discarded %d candidates of images a previous run did not finish", discarded)
    todo_total = sum(1 for t in mine if t.image_id not in done)
    if done:
        log.info("generate: resuming, %d/%d images already done", len(mine) - todo_total, len(mine))
    generator = CandidateGenerator(backbone, fmt, settings, prompts)
    prepare_image = image_preparer(backbone.processor, settings.image_aspect_ratio)
    shards = ShardWriter(out_dir / "candidates", shard_size=settings.shard_size)
    progress = JsonlWriter(out_dir / PROGRESS_FILE)
    started = time.perf_counter()
    processed = 0
    this_run = Counter()
    bar = tqdm(total=len(mine), initial=len(mine) - todo_total, desc="generate", unit="img",
               disable=not settings.progress, dynamic_ncols=True)
    try:
        for batch_index, start in enumerate(range(0, len(tasks), settings.image_batch_size)):
            if not owns_batch(batch_index, shard):
                continue
            batch = [t for t in tasks[start:start + settings.image_batch_size] if t.image_id not in done]
            if not batch:
                continue
            loaded, images = [], []
            for task in batch:
                try:
                    images.append(prepare_image(load_image(task.path, record_id=task.image_id[:12])))
                    loaded.append(task)
                except ImageError as err:
                    if settings.on_bad_image != "skip":
                        raise
                    row = {"image_id": task.image_id, "image": task.path, "questions": 0, "candidates": 0,
                           "answers": 0, "skipped": str(err)}
                    progress.write(row)
                    done[task.image_id] = row
                    this_run["images_skipped"] += 1
            batch_started = time.perf_counter()
            if loaded:
                torch.manual_seed(batch_seed(settings.seed, batch_index))
                results = generator.run_batch(loaded, images)
                seconds = round((time.perf_counter() - batch_started) / len(loaded), 4)
                for candidates, row in results:
                    for candidate in candidates:
                        shards.write(candidate.to_json())
                    row["seconds"] = seconds
                    progress.write(row)  # after its candidates: the marker that the image is complete
                    done[row["image_id"]] = row
                    this_run["images"] += 1
                    this_run["candidates"] += row["candidates"]
                    this_run["answers"] += row["answers"]
            processed += len(batch)
            bar.update(len(batch))
            elapsed = time.perf_counter() - started
            bar.set_postfix(img_s=f"{processed / max(elapsed, 1e-9):.3f}", cand=this_run["candidates"], refresh=False)
    finally:
        bar.close()
        shards.close()
        progress.close()
    elapsed = time.perf_counter() - started
    this_run_json = {"images": this_run["images"], "images_skipped": this_run["images_skipped"],
                     "candidates": this_run["candidates"], "answers": this_run["answers"],
                     "seconds": round(elapsed, 3),
                     "images_per_s": round(this_run["images"] / elapsed, 4) if this_run["images"] and elapsed > 0 else None,
                     "discarded_partial_candidates": discarded, **dict(generator.counts)}
    return progress_summary(mine, done, this_run_json, out_dir / "candidates")


def progress_summary(tasks: Sequence[ImageTask], done: Mapping[str, dict[str, Any]], this_run: dict[str, Any] | None,
                     candidates_dir: Path) -> dict[str, Any]:
    """The summary of a generation run (or shard, or merge) over ``tasks`` from their progress rows."""
    rows = [done[t.image_id] for t in tasks if t.image_id in done]
    summary = {
        "images": len(tasks),
        "images_done": len(rows),
        "images_skipped": sum(1 for r in rows if r.get("skipped")),
        "questions": sum(int(r.get("questions", 0)) for r in rows),
        "candidates": sum(int(r.get("candidates", 0)) for r in rows),
        "answers": sum(int(r.get("answers", 0)) for r in rows),
        "complete": len(rows) == len(tasks),
        "this_run": this_run,
        "skipped_examples": [r["skipped"] for r in rows if r.get("skipped")][:10],
        "candidates_dir": str(candidates_dir),
    }
    return summary


def merge_shards(run_dir: Path, tasks: Sequence[ImageTask], shard_dirs: Sequence[Path], *,
                 shard_size: int) -> dict[str, Any]:
    """Merge finished shards into ``run_dir``'s single-process layout: ``candidates/candidates-NNNNN.jsonl`` (the
    shards' lines, unchanged, in task order, ``shard_size`` per file: what one process writes) and
    ``progress.jsonl`` (task order). ``tasks`` is the full list (after ``max_images``). Returns the summary."""
    done: dict[str, dict[str, Any]] = {}
    lines: dict[str, list[str]] = {}
    for directory in shard_dirs:
        progress = read_progress(directory)
        done.update(progress)
        for shard in sorted((directory / "candidates").glob(f"{SHARD_PREFIX}-*.jsonl")):
            for line in shard.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    image = str(json.loads(line)["image_sha256"])
                    if image in progress:
                        lines.setdefault(image, []).append(line)
    missing = [t.image_id for t in tasks if t.image_id not in done]
    if missing:
        raise RuntimeError(f"generate: cannot merge, {len(missing)} images are in no shard's progress "
                           f"(first: {missing[0]})")
    ordered = [line for t in tasks for line in lines.get(t.image_id, [])]
    target = run_dir / "candidates"
    staging = run_dir / ".candidates.merging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for number, start in enumerate(range(0, len(ordered), shard_size)):
        text = "".join(f"{line}\n" for line in ordered[start:start + shard_size])
        (staging / f"{SHARD_PREFIX}-{number:05d}.jsonl").write_text(text, encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    write_jsonl(run_dir / PROGRESS_FILE, [done[t.image_id] for t in tasks])
    return progress_summary(tasks, done, None, target)
