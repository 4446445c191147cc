"""Learning-rate schedule: linear warmup from 0 to optim.lr, then decay to optim.min_lr."""

from __future__ import annotations

import math

from pretrain.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses lr_at(0))."""
    warmup = optim.warmup_steps
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    decay_steps = optim.decay_steps or max_steps
    if optim.schedule == "constant" or decay_steps <= warmup:
        return optim.lr
    progress = min((step - warmup) / (decay_steps - warmup), 1.0)
    if optim.schedule == "linear":
        factor = 1.0 - progress
    else:  # cosine
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


def lr_factor_fn(optim: OptimConfig, max_steps: int):
    """Multiplier of the base lr, for torch.optim.lr_scheduler.LambdaLR."""
    return lambda step: lr_at(step, optim, max_steps) / optim.lr
