"""Optimiser and learning-rate schedule, from timm.

AdamW with no weight decay on biases, norms, the position embedding and the cls token, and
optionally layer-wise learning-rate decay (Clark et al., ELECTRA; Bao et al., BEiT); a
linear warm-up then cosine decay, stepped once per optimiser step.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from vit.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # timm puts 1-D parameters (biases, norm weights) and model.no_weight_decay() names
    # in a group without weight decay. The fused kernel updates every tensor in one call;
    # on a CPU torch otherwise updates them one by one, and the default model's update
    # takes 1.6 ms instead of 0.4 ms (of a 50 ms training step)
    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=True,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> CosineLRScheduler:
    """Cosine decay over all optimiser steps after a linear warm-up; ``step_update(step)``."""
    total = steps_per_epoch * epochs
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
