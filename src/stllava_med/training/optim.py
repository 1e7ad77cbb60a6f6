"""Optimisation: parameter groups (LoRA / projector / other, decay or not), AdamW and the cosine schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from stllava_med.backbone import is_lora_parameter, is_projector_parameter
from stllava_med.families import family_of
from stllava_med.schema import OptimSettings

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, *, lr: float, projector_lr: float | None = None, weight_decay: float = 0.0,
                 projector_modules: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: LoRA / other with and without weight decay, and the
    projector at its own learning rate (the paper: LoRA 2e-4 or 5e-6, projector 2e-5).

    Biases and norm weights get no weight decay (the usual convention)."""
    if projector_modules:
        def projector(name: str) -> bool:
            return is_projector_parameter(name, tuple(projector_modules))
    else:  # the family knows its projector (LLaVA's multi_modal_projector, Qwen's visual.merger, ...)
        projector = family_of(model).is_projector_parameter
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_proj = projector(name)
        no_decay = param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        key = ("projector" if is_proj else "lora" if is_lora_parameter(name) else "other") + ("_nd" if no_decay else "")
        if key not in groups:
            group_lr = projector_lr if (is_proj and projector_lr is not None) else lr
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": 0.0 if no_decay else weight_decay,
                           "name": key}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter (is LoRA enabled?)")
    return list(groups.values())


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio * total_steps`` optimizer steps, then cosine decay to
    ``min_lr_ratio`` (HF's ``get_cosine_schedule_with_warmup`` shape, per parameter group)."""
    total_steps = max(1, int(total_steps))
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure_adamw(module: LightningModule, model: nn.Module, settings: OptimSettings | Mapping[str, Any],
                    projector_modules: Sequence[str] | None = None) -> dict[str, Any]:
    """AdamW over :func:`param_groups` plus a per-step cosine schedule sized from the trainer's plan."""
    optim = settings if isinstance(settings, OptimSettings) else OptimSettings.from_config(settings)
    groups = param_groups(model, lr=float(optim.lr), projector_lr=optim.projector_lr,
                          weight_decay=float(optim.weight_decay),
                          projector_modules=projector_modules or optim.projector_modules)
    optimizer = torch.optim.AdamW(groups, betas=tuple(float(b) for b in optim.betas), eps=float(optim.eps))
    total = int(module.trainer.estimated_stepping_batches) if module._trainer is not None else 1
    if total <= 0 or total == math.inf:
        total = 1
    scheduler = cosine_with_warmup(optimizer, total, float(optim.warmup_ratio), float(optim.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


