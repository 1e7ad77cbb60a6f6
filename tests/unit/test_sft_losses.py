"""The stage-1 loss and token accuracies against hand computation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stllava_med.chat import IGNORE_INDEX
from stllava_med.sft.losses import sft_token_stats


def test_loss_and_accuracies_by_role():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, requires_grad=True)
    labels = torch.full((2, 6), IGNORE_INDEX)
    roles = torch.zeros(2, 6, dtype=torch.long)
    # positions 2-3 of row 0 are answer targets, position 4-5 of row 1 question targets
    labels[0, 2], labels[0, 3] = 1, 4
    roles[0, 2:4] = 1
    labels[1, 4], labels[1, 5] = 0, 2
    roles[1, 4:6] = 2
    # make exactly one answer token and one question token correct
    with torch.no_grad():
        logits[0, 1] = torch.tensor([0.0, 9.0, 0.0, 0.0, 0.0])   # predicts label[0,2] = 1 (hit)
        logits[0, 2] = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0])   # predicts 0, label[0,3] = 4 (miss)
        logits[1, 3] = torch.tensor([0.0, 0.0, 0.0, 9.0, 0.0])   # predicts 3, label[1,4] = 0 (miss)
        logits[1, 4] = torch.tensor([0.0, 0.0, 9.0, 0.0, 0.0])   # predicts 2, label[1,5] = 2 (hit)
    stats = sft_token_stats(logits, labels, roles)
    expected = sum(F.cross_entropy(logits[r, t - 1][None], torch.tensor([int(labels[r, t])]))
                   for r, t in ((0, 2), (0, 3), (1, 4), (1, 5))) / 4
    assert math.isclose(float(stats.loss.detach()), float(expected.detach()), rel_tol=1e-6)
    assert int(stats.n_targets) == 4
    assert (int(stats.answer_correct), int(stats.answer_total)) == (1, 2)
    assert (int(stats.question_correct), int(stats.question_total)) == (1, 2)
    stats.loss.backward()
    # no gradient reaches logits that predict non-target positions
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[1, 5].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0


def test_no_targets_gives_zero_loss_not_nan():
    logits = torch.randn(1, 4, 3, requires_grad=True)
    stats = sft_token_stats(logits, torch.full((1, 4), IGNORE_INDEX), torch.zeros(1, 4, dtype=torch.long))
    assert float(stats.loss.detach()) == 0.0 and int(stats.n_targets) == 0
