"""What every tiny family builder shares: the tokenizer corpus and an offline BPE trainer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_DIR = REPO_ROOT / "data" / "vqa_rad_sample"

# Text this project writes itself (prompts, system texts), so the tokenizer covers it with short sequences.
EXTRA_TEXT = [
    "Describe the image in detail.",
    "Can you describe the image in detail?",
    "Ask one question about this medical image.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "You are a helpful assistant.",
    "What is shown in this image? Is there an abnormality? Where is the lesion located?",
    "yes no left right upper lower axial coronal sagittal CT MRI X-ray ultrasound",
    "USER ASSISTANT VUSER User Assistant Vuser user assistant vuser model system",
    "0 1 2 3 4 5 6 7 8 9 10 . , ? ! : ; ( ) - / % [ ] < > |",
]


def corpus_lines() -> list[str]:
    lines = list(EXTRA_TEXT)
    for name in ("trainset.json", "testset.json"):
        for record in json.loads((SAMPLE_DIR / name).read_text(encoding="utf-8")):
            for key in ("question", "answer"):
                value = record.get(key)
                if value not in (None, "NULL"):
                    lines.append(str(value))
    return lines


def train_tokenizer(special_tokens: Sequence[str], *, vocab_size: int = 1024, extra_lines: Iterable[str] = (),
                    byte_level: bool = True, **fast_kwargs: Any) -> Any:
    """A ``PreTrainedTokenizerFast`` trained offline on the bundled sample's text with ``special_tokens``
    (each one a single id, in the given order first). ``fast_kwargs`` go to the tokenizer (bos/eos/pad...)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*corpus_lines(), *extra_lines], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **fast_kwargs)


def seeded(seed: int):
    """Context manager: a fixed torch RNG for model init, restoring the caller's RNG afterwards."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            yield
        finally:
            torch.random.set_rng_state(state)

    return _ctx()
