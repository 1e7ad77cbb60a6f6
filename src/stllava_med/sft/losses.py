"""Stage-1 loss and token statistics: pure tensor functions (no Lightning, no I/O).

Causal LM cross-entropy over the target tokens only (labels != IGNORE_INDEX), averaged per target token, plus
next-token accuracy split by who speaks: answers (role 1) and questioner turns (role 2), so a run shows
whether the model is learning to ask as well as to answer.

With gradient accumulation the training loss is normalised by the target tokens of the whole accumulation
window (all micro-batches of one optimizer step, on every rank), not per micro-batch:
:func:`window_normalised_loss` (what Hugging Face's Trainer does with ``num_items_in_batch``). A step then
takes the gradient of the window's token-mean loss, whatever the split into micro-batches and ranks.
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
    loss_sum: torch.Tensor        # summed cross-entropy over target tokens (differentiable)
    n_targets: torch.Tensor       # target tokens in the batch
    answer_correct: torch.Tensor  # greedy next-token hits on answer targets
    answer_total: torch.Tensor
    question_correct: torch.Tensor
    question_total: torch.Tensor


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) booleans: which next-token predictions are trained on (labels are shifted by one here, as in
    :func:`sft_token_stats`)."""
    return labels[:, 1:] != IGNORE_INDEX


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens of a batch: the ``n_targets`` that :func:`sft_token_stats` will report for it."""
    return target_mask(labels).sum()


def window_normalised_loss(loss_sum: torch.Tensor, window_targets: torch.Tensor, *, accumulate: int,
                           world_size: int) -> torch.Tensor:
    """The loss one micro-batch returns so that an optimizer step follows the token mean of its whole window.

    ``window_targets`` counts the target tokens of all micro-batches of the step on all ranks. Lightning divides
    every micro-batch's loss by ``accumulate`` (``trainer.accumulate_grad_batches``, also for a shorter last
    window of an epoch) and data parallelism averages gradients over ``world_size`` ranks; the factor
    ``accumulate * world_size`` undoes both, so the accumulated gradient is exactly that of
    ``sum(loss_sum over the window) / window_targets``. A window without targets contributes zero."""
    return loss_sum * (accumulate * world_size) / window_targets.to(loss_sum.dtype).clamp(min=1)


def sft_token_stats(logits: torch.Tensor, labels: torch.Tensor, target_role: torch.Tensor) -> TokenStats:
    """``logits`` (B, L, V) predict position t+1 from position t; ``labels`` and ``target_role`` are (B, L)
    aligned with the inputs (the shift happens here). The loss is computed in float32 (or float64 for float64
    logits)."""
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    shifted_roles = target_role[:, 1:]
    targets = target_mask(labels)
    n_targets = targets.sum()
    upcast = shifted_logits if shifted_logits.dtype == torch.float64 else shifted_logits.float()
    summed = F.cross_entropy(upcast.reshape(-1, shifted_logits.shape[-1]),
                             shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    # a batch without targets (cannot come from SFTDataset, which always keeps one answer) contributes zero
    loss = summed / n_targets.clamp(min=1)
    with torch.no_grad():
        hits = (shifted_logits.argmax(dim=-1) == shifted_labels) & targets
        answers = targets & (shifted_roles == ANSWER_ROLE)
        questions = targets & (shifted_roles == QUESTION_ROLE)
        stats = TokenStats(loss=loss, loss_sum=summed, n_targets=n_targets,
                           answer_correct=(hits & answers).sum(), answer_total=answers.sum(),
                           question_correct=(hits & questions).sum(), question_total=questions.sum())
    return stats
