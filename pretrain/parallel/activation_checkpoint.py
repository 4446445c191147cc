"""Activation checkpointing, applied from outside the model.

Each transformer block is wrapped so that activations are recomputed in the backward pass
instead of being kept from the forward pass. Two policies:

* `full`: keep only the block's input; the backward pass reruns the whole block's forward.
  Memory per block drops to its input, at the cost of one more forward (~1/3 more FLOPs).
* `selective` (op-level, as torchtitan's "op" mode): keep the outputs of the matmuls and of the
  attention kernel, recompute the cheap element-wise work between them (layer norms, GELU,
  residual adds, dropout). Saves the memory of those intermediates for almost no compute.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
)

Policy = Literal["full", "selective"]

_aten = torch.ops.aten
_SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    *(getattr(_aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    ) if hasattr(_aten, name)),
}
"""Ops whose outputs selective checkpointing keeps (the expensive ones to recompute)."""


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedBlock(nn.Module):
    def __init__(self, block: nn.Module, policy: Policy = "full"):
        super().__init__()
        if policy not in ("full", "selective"):
            raise ValueError(f"activation checkpointing policy must be 'full' or 'selective', "
                             f"got {policy!r}")
        self.block = block
        self.policy = policy

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.block(*args, **kwargs)
        extra = {}
        if self.policy == "selective":
            extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts,
                                                    _keep_matmuls_and_attention)
        # Non-reentrant checkpointing supports keyword arguments and restores the RNG state, so
        # dropout masks in the recomputation equal those of the forward pass.
        return checkpoint(self.block, *args, use_reentrant=False, **extra, **kwargs)


BLOCK_LISTS = ("h", "blocks", "layers")
"""Names under which model families keep their stacks of transformer blocks."""


def apply_activation_checkpointing(model: nn.Module, policy: Policy = "full") -> int:
    """Wrap every block of every block list (BLOCK_LISTS) in the model; returns how many."""
    wrapped = 0
    for module in list(model.modules()):
        for name in BLOCK_LISTS:
            blocks = getattr(module, name, None)
            if not isinstance(blocks, nn.ModuleList):
                continue
            for i, block in enumerate(blocks):
                if not isinstance(block, CheckpointedBlock):
                    blocks[i] = CheckpointedBlock(block, policy)
                    wrapped += 1
    if wrapped == 0:
        raise ValueError(f"{type(model).__name__} has no block list ({BLOCK_LISTS}) to checkpoint")
    return wrapped
