"""Activation checkpointing, applied from outside the model.

Each transformer block is wrapped so that its activations are recomputed in the backward pass
instead of being kept from the forward pass: memory per block drops to its input, at the cost of
one more forward of the block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.block(*args, **kwargs)
        # Non-reentrant checkpointing supports keyword arguments and restores the RNG state, so
        # dropout masks in the recomputation equal those of the forward pass.
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


BLOCK_LISTS = ("h", "blocks", "layers")
"""Names under which model families keep their stacks of transformer blocks."""


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block of every block list (BLOCK_LISTS) in the model; returns how many."""
    wrapped = 0
    for module in list(model.modules()):
        for name in BLOCK_LISTS:
            blocks = getattr(module, name, None)
            if not isinstance(blocks, nn.ModuleList):
                continue
            for i, block in enumerate(blocks):
                if not isinstance(block, CheckpointedBlock):
                    blocks[i] = CheckpointedBlock(block)
                    wrapped += 1
    if wrapped == 0:
        raise ValueError(f"{type(model).__name__} has no block list ({BLOCK_LISTS}) to checkpoint")
    return wrapped
