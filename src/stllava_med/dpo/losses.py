"""DPO losses as pure tensor functions: one formula each, no Lightning, no I/O.

Inputs are per-pair tensors of shape ``(batch,)``. Log-probabilities are **sums** over the answer tokens
(answer + end of turn); prompt and image tokens are never targets. Rewards are ``beta * (logp - ref_logp)``
and are returned detached: they are what gets logged, not what gets optimised.

    z = (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))

- ``sigmoid`` (DPO, Rafailov et al. 2023), with conservative label smoothing ε (cDPO):
  ``-(1 - ε) log σ(βz) - ε log σ(-βz)``; ε = 0 is the paper's loss.
- ``ipo`` (Azar et al. 2023): log-ratios divided by answer length, ``(Δ - 1/(2β))²`` with
  ``Δ = ratio_w / |y_w| - ratio_l / |y_l|``.
- ``hinge`` (SLiC): ``max(0, 1 - βz)``.
- ``robust`` (Chowdhury et al. 2024), unbiased under label-flip rate ε:
  ``((1 - ε)(-log σ(βz)) - ε(-log σ(-βz))) / (1 - 2ε)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stllava_med.schema import DPO_LOSS_TYPES

LOSS_TYPES = DPO_LOSS_TYPES


def _check_inputs(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"dpo.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label smoothing is defined for the sigmoid and robust losses, not {loss_type!r}")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the (detached) implicit rewards of the chosen and rejected answers.

    ``chosen_lengths`` / ``rejected_lengths`` (answer token counts) are required by ``ipo`` only."""
    _check_inputs(beta, loss_type, label_smoothing)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "robust":
        clean = -F.logsigmoid(beta * margin)
        flipped = -F.logsigmoid(-beta * margin)
        losses = ((1.0 - label_smoothing) * clean - label_smoothing * flipped) / (1.0 - 2.0 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * margin)
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss divides log-ratios by answer length: pass chosen_lengths and rejected_lengths")
        per_token = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (per_token - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen answer, per token (the RPO / "DPO + SFT" term).

    Added to the DPO loss with its own weight (``dpo.nll_weight``) it keeps the policy from lowering the
    likelihood of both answers while their margin grows."""
    return -chosen_logps / chosen_lengths.clamp(min=1)
