"""Experts that grade the policy's answers: ``openai`` (GPT-4o or any OpenAI-compatible server), ``reference``
(ground truth through the evaluation metrics) and ``hf_local`` (a local transformers LVLM). Each module is
imported on demand, so judging through an API does not import torch."""

from stllava_med.selftrain.experts.base import (
    PROMPT_VERSION,
    Expert,
    ExpertError,
    ExpertResult,
    FatalError,
    InvalidResponse,
    ItemError,
    TransientError,
)

__all__ = ["PROMPT_VERSION", "Expert", "ExpertError", "ExpertResult", "FatalError", "InvalidResponse", "ItemError",
           "TransientError"]
