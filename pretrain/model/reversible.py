"""Reversible residual layers (RevNet, Gomez et al. 2017; Reformer, Kitaev et al. 2020).

The residual stream is split into two streams, x1 and x2 (both start as the embedding x), and
each block updates them with its two branches, F = attention and G = feed-forward:

    y1 = x1 + F(x2)          x2 = y2 - G(y1)
    y2 = x2 + G(y1)          x1 = y1 - F(x2)

The right-hand column recovers a block's inputs from its outputs, so the forward pass keeps
nothing but the last outputs: in backward each block's inputs are recomputed, its branches are
run again with autograd on, and their gradients taken; activation memory is that of one block,
whatever the depth. The model's output is the mean of the two streams, (y1 + y2) / 2.

Dropout and random hashing in a branch must draw the same numbers when recomputed: the RNG
state before each branch is saved in forward and restored around its recomputation. The
recovered inputs differ from the originals by rounding only (x + F - F), so gradients equal
those of the same two-stream network with stored activations up to that rounding (checked in
tests/test_long_attention.py).

Parameters receive their gradients inside the backward pass (the branches' own autograd
graphs), exactly as under reentrant activation checkpointing; the stack's input must require
grad for backward to reach this function (the embedding output does).

Tensors the branches read besides the streams and that need gradients of their own (`aux`: the
encoder output a T5 decoder's cross-attention reads, a relative position bias computed once per
stack) are inputs of the function too: each branch gets them as extra arguments, detached, and
their gradients, summed over all blocks, leave through the function's backward to reach the
graph that made them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

Branch = Callable[..., Tensor]
"""branch(x, *aux) -> what the branch adds to its stream, same shape as x."""


class _RngState:
    """The CPU and (for a CUDA tensor) CUDA RNG states, to replay a branch's random draws."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Inside: the RNG as it was; afterwards: as it was before entering."""
        with torch.random.fork_rng(devices=[self.device] if self.device is not None else []):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, branches: Sequence[tuple[Branch, Branch]],
                *aux: Tensor | None):
        rng: list[tuple[_RngState, _RngState]] = []
        with torch.no_grad():
            for f, g in branches:
                rng_f = _RngState(x1.device)
                x1 = x1 + f(x2, *aux)
                rng_g = _RngState(x1.device)
                x2 = x2 + g(x1, *aux)
                rng.append((rng_f, rng_g))
        ctx.branches, ctx.rng = branches, rng
        ctx.save_for_backward(x1, x2, *aux)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1: Tensor, dy2: Tensor):
        y1, y2, *saved_aux = ctx.saved_tensors
        # one detached leaf per aux input: its .grad sums the contributions of every branch
        aux = [a.detach().requires_grad_(ctx.needs_input_grad[3 + i]) if a is not None else None
               for i, a in enumerate(saved_aux)]
        for (f, g), (rng_f, rng_g) in zip(reversed(ctx.branches), reversed(ctx.rng)):
            # G: x2 = y2 - G(y1); dL/dy1 gains G's vector-Jacobian product with dy2.
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_(True)
                with rng_g.replay():
                    g_out = g(y1, *aux)
                torch.autograd.backward(g_out, dy2)
            with torch.no_grad():
                x2 = y2 - g_out
                dy1 = dy1 + y1.grad
            # F: x1 = y1 - F(x2); dL/dx2 = dy2 + F's vector-Jacobian product with dy1.
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_(True)
                with rng_f.replay():
                    f_out = f(x2, *aux)
                torch.autograd.backward(f_out, dy1)
            with torch.no_grad():
                x1 = y1 - f_out
                dy2 = dy2 + x2.grad
            y1, y2 = x1.detach(), x2.detach()
            del g_out, f_out
        return (dy1, dy2, None,
                *(a.grad if a is not None and a.requires_grad else None for a in aux))


def reversible_sequence(branches: Sequence[tuple[Branch, Branch]], x: Tensor,
                        *aux: Tensor | None) -> Tensor:
    """Run blocks given as (F, G) branch pairs reversibly over x; returns (y1 + y2) / 2. Each
    branch is called as branch(stream, *aux).

    Without autograd (evaluation) the same arithmetic runs directly; with autograd, activations
    are recomputed in backward instead of stored.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return residual_two_stream(branches, x, *aux)
    y1, y2 = _ReversibleStack.apply(x, x, list(branches), *aux)
    return (y1 + y2) / 2


def residual_two_stream(branches: Sequence[tuple[Branch, Branch]], x: Tensor,
                        *aux: Tensor | None) -> Tensor:
    """The same function as reversible_sequence with ordinary autograd (activations stored):
    the reference its gradients are tested against."""
    y1 = y2 = x
    for f, g in branches:
        y1 = y1 + f(y2, *aux)
        y2 = y2 + g(y1, *aux)
    return (y1 + y2) / 2
