"""DPO losses against hand-computed values (math module, not torch), and their invariants."""

from __future__ import annotations

import math

import pytest
import torch

from stllava_med.dpo.losses import LOSS_TYPES, chosen_nll_loss, dpo_loss

# Two pairs: policy and reference summed answer log-probs.
CHOSEN, REJECTED = [-10.0, -4.0], [-12.0, -3.0]
REF_CHOSEN, REF_REJECTED = [-11.0, -5.0], [-11.5, -4.0]
BETA = 0.1


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def margins():
    # z = (logp_w - ref_w) - (logp_l - ref_l)
    return [(c - rc) - (r - rr) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def run(loss_type, **kwargs):
    return dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=BETA, loss_type=loss_type, **kwargs)


def test_margins_are_what_the_hand_values_assume():
    assert margins() == [1.5, 0.0]


def test_sigmoid_matches_hand_computation():
    losses, chosen_rewards, rejected_rewards = run("sigmoid")
    expected = [-log_sigmoid(BETA * z) for z in margins()]  # [log(1+e^-0.15), log 2]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[0] == pytest.approx(0.620957, abs=1e-6)  # log(1 + e^-0.15)
    assert chosen_rewards.tolist() == pytest.approx([0.1, 0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.05, 0.1])


def test_sigmoid_with_label_smoothing_is_conservative_dpo():
    eps = 0.2
    losses, _, _ = run("sigmoid", label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(BETA * z) - eps * log_sigmoid(-BETA * z) for z in margins()]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_robust_matches_hand_computation():
    eps = 0.1
    losses, _, _ = run("robust", label_smoothing=eps)
    expected = [((1 - eps) * -log_sigmoid(BETA * z) - eps * -log_sigmoid(-BETA * z)) / (1 - 2 * eps) for z in margins()]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[0] == pytest.approx((0.9 * 0.620957 - 0.1 * 0.770957) / 0.8, abs=1e-6)


def test_hinge_matches_hand_computation():
    losses, _, _ = run("hinge")
    assert losses.tolist() == pytest.approx([1 - 0.15, 1.0], abs=1e-12)
    big, _, _ = dpo_loss(t([0.0]), t([-20.0]), t([0.0]), t([0.0]), beta=BETA, loss_type="hinge")
    assert big.tolist() == [0.0]  # beta * z = 2 > 1: no loss


def test_ipo_divides_by_answer_length():
    losses, _, _ = run("ipo", chosen_lengths=t([2.0, 4.0]), rejected_lengths=t([3.0, 1.0]))
    # per-token log-ratio difference minus 1/(2 beta) = 5, squared
    deltas = [(1.0 / 2.0) - (-0.5 / 3.0), (1.0 / 4.0) - (1.0 / 1.0)]
    assert losses.tolist() == pytest.approx([(d - 5.0) ** 2 for d in deltas], abs=1e-12)
    with pytest.raises(ValueError, match="chosen_lengths"):
        run("ipo")


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_policy_equal_to_reference_gives_log2_and_zero_rewards(loss_type):
    logps = t([-7.25, -30.0, -1.5])
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.5,
                                                        loss_type=loss_type, label_smoothing=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-12)
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_gradients_raise_chosen_and_lower_rejected():
    chosen, rejected = t([-10.0]).requires_grad_(), t([-12.0]).requires_grad_()
    for loss_type in LOSS_TYPES:
        chosen.grad = rejected.grad = None
        losses, _, _ = dpo_loss(chosen, rejected, t([-10.0]), t([-12.0]), beta=BETA, loss_type=loss_type,
                                chosen_lengths=t([3.0]), rejected_lengths=t([3.0]))
        losses.sum().backward()
        assert chosen.grad.item() < 0 < rejected.grad.item(), loss_type


def test_rewards_are_detached():
    chosen = t([-1.0]).requires_grad_()
    _, chosen_rewards, _ = dpo_loss(chosen, t([-2.0]), t([-1.0]), t([-2.0]), beta=BETA)
    assert not chosen_rewards.requires_grad


def test_chosen_nll_is_per_token():
    assert chosen_nll_loss(t([-6.0, -3.0]), t([3.0, 0.0])).tolist() == [2.0, 3.0]  # zero length clamps to 1


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "kto"}, "loss_type"),
    ({"beta": 0.0}, "beta"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label smoothing"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    args = {"beta": BETA, **kwargs}
    with pytest.raises(ValueError, match=message):
        dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), **args)
