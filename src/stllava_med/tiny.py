"""The tiny backbone: a genuine LLaVA (CLIP vision tower, MLP projector, Llama text model) with a byte-level BPE
tokenizer trained offline on the bundled VQA-RAD question/answer text. It is built deterministically from a
:class:`TinySpec` on first use and cached as a normal HF directory (recipe recorded, rebuilt when it changes),
so every stage runs offline on a laptop CPU; :func:`stllava_med.backbone.load_backbone` builds it when a
``backbone`` config names its cache path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from stllava_med.utils.io import file_lock, sha256_file, write_dir_atomically

log = logging.getLogger(__name__)

# Roles of the tiny template. ``vuser`` is the questioner (the official code's third role, "VUSER").
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|vuser|>"]

# A LLaVA-style template: role headers are single special tokens, every turn ends with </s> (the end-of-turn
# target), the image placeholder precedes the text of the turn that carries it. Any role name renders, so the
# questioner role needs no special casing.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '</s>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

# Text the tokenizer must cover besides the QA corpus: prompts this project itself writes.
TINY_EXTRA_TEXT = [
    "Describe the image in detail.",
    "Ask a question about this medical image.",
    "What is shown in this image? Is there an abnormality? Where is the lesion located?",
    "yes no left right upper lower axial coronal sagittal CT MRI X-ray ultrasound",
    "0 1 2 3 4 5 6 7 8 9 10 . , ? ! : ; ( ) - / %",
]


@dataclass
class TinySpec:
    """Shape of the tiny LLaVA. Defaults are the project's embedded backbone; benchmarks pass larger ones."""

    seed: int = 0
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_size: int = 2048
    max_positions: int = 1024
    corpus: list[str] = field(default_factory=list)  # JSON files with question/answer records

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _corpus_lines(files: list[str]) -> list[str]:
    lines: list[str] = list(TINY_EXTRA_TEXT)
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"tiny backbone: tokenizer corpus file {path} does not exist")
        with open(path, encoding="utf-8") as fh:
            records = json.load(fh)
        for record in records:
            for key in ("question", "answer", "question_rephrase"):
                value = record.get(key)
                if value not in (None, "NULL"):
                    lines.append(str(value))
    return lines


def _train_tiny_tokenizer(spec: TinySpec) -> Any:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(spec.corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=spec.max_positions,
    )


def build_tiny_backbone(path: str | os.PathLike, spec: TinySpec) -> Path:
    """Build the tiny LLaVA deterministically from ``spec`` and save it as an HF directory at ``path``."""
    # Imported here: without torchvision, importing CLIPImageProcessor logs a fallback warning (to its PIL
    # class), which only a build should print, not every import of stllava_med.backbone.
    from transformers import CLIPImageProcessor

    path = Path(path)
    tokenizer = _train_tiny_tokenizer(spec)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=TINY_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "tiny_spec.json").write_text(json.dumps(_spec_record(spec), indent=2) + "\n")
    return path


def _spec_record(spec: TinySpec) -> dict[str, Any]:
    """The build recipe, with the tokenizer corpus identified by content (not path), for cache validation."""
    record: dict[str, Any] = {k: v for k, v in spec.__dict__.items() if k != "corpus"}
    record["corpus_sha256"] = [sha256_file(c) for c in spec.corpus]
    return record


def _cache_is_current(path: Path, spec: TinySpec) -> bool:
    recipe = path / "tiny_spec.json"
    if not (path / "config.json").is_file() or not recipe.is_file():
        return False
    try:
        return json.loads(recipe.read_text()) == _spec_record(spec)
    except (json.JSONDecodeError, OSError):
        return False


def ensure_tiny_backbone(path: str | os.PathLike, spec: TinySpec) -> Path:
    """Return ``path``, building the tiny backbone there first if it is absent or stale.

    The cache records its recipe (shape, seed, SHA-256 of the tokenizer corpus); a different recipe rebuilds.
    Safe under concurrent sweep jobs: a file lock serialises builders and the directory appears atomically
    (built in a temporary sibling, then renamed)."""
    path = Path(path)
    if _cache_is_current(path, spec):
        return path

    with file_lock(path.parent / f".{path.name}.lock"):
        if _cache_is_current(path, spec):
            return path
        if path.exists():
            log.warning("the tiny backbone at %s was built from another recipe or corpus; rebuilding", path)
        log.info("building the tiny backbone at %s (seed %d)", path, spec.seed)
        # built beside it, fsynced, renamed over it (a half-written directory from an older crash is replaced)
        write_dir_atomically(path, lambda tmp: build_tiny_backbone(tmp, spec), what=f"the tiny backbone {path}")
    return path


def tiny_spec_from_config(cfg: Mapping[str, Any]) -> TinySpec:
    known = {f for f in TinySpec.__dataclass_fields__}
    values = {k: v for k, v in dict(cfg).items() if k in known}
    if "corpus" in values:
        values["corpus"] = [str(c) for c in values["corpus"]]
    return TinySpec(**values)
