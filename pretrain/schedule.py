"""Learning-rate schedule: linear warmup from 0 to optim.lr, then decay to optim.min_lr."""

from __future__ import annotations

import math
from collections.abc import Callable

from pretrain.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses lr_at(0)).

    Warmup: steps 0..W-1 use lr*1/W, lr*2/W, ..., lr (W = warmup_steps). Decay: from lr at step W
    to min_lr at step D (D = decay_steps or max_steps, counted from step 0, warmup included),
    then min_lr. `constant` keeps lr after warmup. With D <= W the decay is over before warmup
    ends, so the steps after warmup use min_lr.
    """
    warmup = optim.warmup_steps
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = optim.decay_steps or max_steps
    if decay_steps <= warmup:
        return optim.min_lr
    progress = min((step - warmup) / (decay_steps - warmup), 1.0)
    if optim.schedule == "linear":
        factor = 1.0 - progress
    else:  # cosine
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


def lr_factor_fn(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr, for torch.optim.lr_scheduler.LambdaLR."""
    return lambda step: lr_at(step, optim, max_steps) / optim.lr
