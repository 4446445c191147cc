"""Activation checkpointing applied from outside: gradients are unchanged, the work is not.

`full` reruns each block's forward in the backward pass (its matmuls included); `selective`
keeps the matmul and attention outputs and reruns only the element-wise ops. Counted with a
dispatch mode over forward + backward of a 2-block GPT: the forward GELU runs once per block
without checkpointing and twice with either policy; matmul FLOPs grow only with `full`. Loss and
every gradient equal the unwrapped model's.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ModelConfig
from pretrain.model import build_model
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def _run(model, ids):
    """(loss, gradients by unwrapped name, forward GELU calls, matmul FLOPs) of fwd + bwd."""
    ops, flops = _OpCounter(), FlopCounterMode(display=False)
    with flops, ops:
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
    # Wrapped blocks add ".block" to parameter names: compare under the unwrapped names.
    grads = {n.replace(".block.", "."): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, ops.calls[torch.ops.aten.gelu.default], flops.get_total_flops()


def test_checkpointing_keeps_gradients_and_recomputes_what_the_policy_says():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=32, dropout=0.1)
    base = build_model(cfg, 128).train()
    ids = torch.randint(0, 128, (2, 33))
    results = {}
    for policy in (None, "selective", "full"):
        model = copy.deepcopy(base)
        if policy:
            assert apply_activation_checkpointing(model, policy) == 2
        torch.manual_seed(1)  # the same dropout masks in every run
        results[policy] = _run(model, ids)
    loss, grads, gelus, flops = results[None]
    for policy in ("selective", "full"):
        assert torch.equal(results[policy][0], loss)
        for name, g in grads.items():
            torch.testing.assert_close(results[policy][1][name], g, rtol=1e-5, atol=1e-7,
                                       msg=f"{policy}: gradient of {name}")
    assert (gelus, results["selective"][2], results["full"][2]) == (2, 4, 4)
    assert results["selective"][3] == flops < results["full"][3]


def test_unknown_policy_is_refused():
    model = build_model(ModelConfig(n_layer=1, n_head=1, d_model=8, max_seq_len=4), 16)
    with pytest.raises(ValueError, match="'full' or 'selective', got 'some'"):
        apply_activation_checkpointing(model, "some")
