"""Stage-1 loss and token statistics: pure tensor functions (no Lightning, no I/O).

Causal LM cross-entropy over the target tokens only (labels != IGNORE_INDEX), averaged per target token, plus
next-token accuracy split by who speaks: answers (role 1) and questioner turns (role 2), so a run shows
whether the model is learning to ask as well as to answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stllava_med.chat import IGNORE_INDEX

ANSWER_ROLE = 1
QUESTION_ROLE = 2


@dataclass
class TokenStats:
    loss: torch.Tensor            # mean cross-entropy over target tokens (differentiable)
    n_targets: torch.Tensor       # target tokens in the batch
    answer_correct: torch.Tensor  # greedy next-token hits on answer targets
    answer_total: torch.Tensor
    question_correct: torch.Tensor
    question_total: torch.Tensor


def sft_token_stats(logits: torch.Tensor, labels: torch.Tensor, target_role: torch.Tensor) -> TokenStats:
    """``logits`` (B, L, V) predict position t+1 from position t; ``labels`` and ``target_role`` are (B, L)
    aligned with the inputs (the shift happens here). The loss is computed in float32."""
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    shifted_roles = target_role[:, 1:]
    targets = shifted_labels != IGNORE_INDEX
    n_targets = targets.sum()
    summed = F.cross_entropy(shifted_logits.float().reshape(-1, shifted_logits.shape[-1]),
                             shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    # a batch without targets (cannot come from SFTDataset, which always keeps one answer) contributes zero
    loss = summed / n_targets.clamp(min=1)
    with torch.no_grad():
        hits = (shifted_logits.argmax(dim=-1) == shifted_labels) & targets
        answers = targets & (shifted_roles == ANSWER_ROLE)
        questions = targets & (shifted_roles == QUESTION_ROLE)
        stats = TokenStats(loss=loss, n_targets=n_targets,
                           answer_correct=(hits & answers).sum(), answer_total=answers.sum(),
                           question_correct=(hits & questions).sum(), question_total=questions.sum())
    return stats
