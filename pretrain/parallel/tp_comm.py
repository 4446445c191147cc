"""The collectives of tensor parallelism, as autograd functions (Megatron's f and g operators).

A tensor-parallel region takes an input that is identical on every tensor-parallel (TP) rank and
gives back an output that is identical again; inside, each rank holds its share of the features
(attention heads, feed-forward columns, vocabulary rows):

    x ──enter──► column-parallel Linear ──► ... ──► row-parallel Linear ──exit──► y
                 (this rank's output features)      (partial sums of all input features)

    enter = copy_to_tp:       forward identity     backward all-reduce (sum of partial grads)
    exit  = reduce_from_tp:   forward all-reduce   backward identity

With sequence parallelism the activations between the regions are split along the sequence
(dim 1 of [B, T, D]) instead of replicated, so LayerNorm and dropout work on T/tp positions:

    enter = gather_seq:         forward all-gather on T      backward reduce-scatter on T
    exit  = reduce_scatter_seq: forward reduce-scatter on T  backward all-gather on T
    scatter_seq:                forward keep this rank's T/tp positions   backward all-gather

Every function is the identity when `group` is None (a world of one, or tensor_parallel=1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

SEQ_DIM = 1  # activations are [B, T, D]

# torch 2.13 renamed the tensor-in/tensor-out collectives; older versions have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_seq(x: Tensor, group) -> Tensor:
    """[B, T/n, ...] on each rank -> [B, T, ...], rank order along T."""
    n = _world(group)
    x_T = x.movedim(SEQ_DIM, 0).contiguous()  # gather along the leading dim, then move back
    out = x_T.new_empty((n * x_T.size(0), *x_T.shape[1:]))
    _all_gather_single(out, x_T, group=group)
    return out.movedim(0, SEQ_DIM)


def _reduce_scatter_seq(x: Tensor, group) -> Tensor:
    """[B, T, ...] partial sums on each rank -> [B, T/n, ...], the sum of this rank's chunk."""
    n = _world(group)
    x_T = x.movedim(SEQ_DIM, 0).contiguous()
    if x_T.size(0) % n:
        raise ValueError(f"sequence of {x_T.size(0)} positions does not split over {n} ranks")
    out = x_T.new_empty((x_T.size(0) // n, *x_T.shape[1:]))
    _reduce_scatter_single(out, x_T, group=group)
    return out.movedim(0, SEQ_DIM)


def _own_seq_chunk(x: Tensor, group) -> Tensor:
    n = _world(group)
    if x.size(SEQ_DIM) % n:
        raise ValueError(f"sequence of {x.size(SEQ_DIM)} positions does not split over {n} "
                         "tensor-parallel ranks (sequence parallelism needs data.seq_len to be "
                         "a multiple of parallel.tensor_parallel)")
    return x.chunk(n, dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


def _identity(x: Tensor, group) -> Tensor:
    return x


class _Collective(torch.autograd.Function):
    """`forward(x, group)` in the forward pass, `backward(grad, group)` in the backward: every
    tensor-parallel region below is one such pair of conjugate collectives."""

    @staticmethod
    def forward(ctx, x, group, forward, backward):
        ctx.group, ctx.backward = group, backward
        return forward(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(grad, ctx.group), None, None, None


def copy_to_tp(x: Tensor, group) -> Tensor:
    return x if group is None else _Collective.apply(x, group, _identity, _all_reduce)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return x if group is None else _Collective.apply(x, group, _all_reduce, _identity)


def gather_seq(x: Tensor, group) -> Tensor:
    return x if group is None else _Collective.apply(x, group, _all_gather_seq, _reduce_scatter_seq)


def reduce_scatter_seq(x: Tensor, group) -> Tensor:
    return x if group is None else _Collective.apply(x, group, _reduce_scatter_seq, _all_gather_seq)


def scatter_seq(x: Tensor, group) -> Tensor:
    return x if group is None else _Collective.apply(x, group, _own_seq_chunk, _all_gather_seq)
