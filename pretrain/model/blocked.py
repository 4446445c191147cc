"""Pieces shared by the blocked long-context kernels (longformer.py, reformer.py).

Both cut a sequence into blocks of b rows and let each block of queries see a window of K keys
(its own block and neighbours, plus any extra keys such as global ones): queries [..., b, d]
against keys [..., K, d], so scores are [..., b, K], O(n * K) instead of O(n^2). Whatever is not
allowed inside a window is masked.

`blocked_attention` is that masked softmax attention as one autograd function that keeps no
[..., b, K] tensor for the backward pass: it saves q, k, v, the output and the row log-sum-exp
and recomputes the probabilities in backward (the FlashAttention recipe, on whole blocks with
PyTorch ops). Forward works in place on a single scores buffer, and both passes walk the blocks
in groups so that the transient [..., b, K] buffers stay below a fixed size whatever the
sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_BYTES = 32 * 2**20
"""Budget for one group's fp32 scores buffer: blocks are processed in groups of about this
size (forward holds one such buffer, backward two)."""


def neighbour_blocks(x: Tensor, block_dim: int, *, ahead: bool) -> Tensor:
    """Blocks m-1, m (and m+1 if `ahead`) of every block m, concatenated along the dimension
    after `block_dim` (the rows of a block). Missing neighbours at the ends are zeros (bool:
    False), so a validity mask passed through here marks them invalid.

    x [..., nb, b, *f] (nb at block_dim)  ->  [..., nb, (2|3)*b, *f]
    """
    block_dim = block_dim % x.dim()
    nb = x.size(block_dim)
    zero = torch.zeros_like(x.narrow(block_dim, 0, 1))
    parts = [torch.cat([zero, x.narrow(block_dim, 0, nb - 1)], dim=block_dim), x]
    if ahead:
        parts.append(torch.cat([x.narrow(block_dim, 1, nb - 1), zero], dim=block_dim))
    return torch.cat(parts, dim=block_dim + 1)


def blocked_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """softmax(q k^T + mask) v per block, for q [..., nb, b, d] (already scaled), k, v
    [..., nb, K, d] and bool `allowed` broadcastable to [..., nb, b, K] (its block dim full).

    Returns (out [..., nb, b, d], lse [..., nb, b, 1], row_ok [..., nb, b, 1]): lse is the
    log-sum-exp of the allowed scores (differentiable; LSH combines hash rounds with it), and
    row_ok is False for rows that may see no key. Such rows get finite values (masked scores
    are the most negative finite number, not -inf) that callers replace by zeros with row_ok;
    everywhere else masked keys get probability exactly 0. Softmax runs in fp32 at least.
    """
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**62, (1,), device="cpu"))  # from torch's seeded RNG
    else:
        seed = None
    out, lse = _BlockedAttention.apply(q, k, v, allowed, dropout_p, seed)
    return out, lse, allowed.any(dim=-1, keepdim=True)


def _groups(q: Tensor, K: int, allowed: Tensor):
    """Slices of the block dim (-3) such that one group's scores fit GROUP_BYTES."""
    nb = q.size(-3)
    per_block = max(1, q[..., 0, :, :].numel() // q.size(-1) * K * 4)  # fp32 scores bytes
    step = max(1, min(nb, GROUP_BYTES // per_block))
    if allowed.size(-3) not in (1, nb):
        raise ValueError(f"allowed has {allowed.size(-3)} blocks, q {nb}")
    return [slice(i, min(i + step, nb)) for i in range(0, nb, step)]


def _scores(q: Tensor, k: Tensor, allowed: Tensor) -> Tensor:
    """fp32 (at least) masked scores q k^T of one group, a fresh buffer."""
    s = q @ k.transpose(-1, -2)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    return s.masked_fill_(~allowed, torch.finfo(s.dtype).min)


def _keep_mask(shape: torch.Size, p: float, seed: int, offset: int, device) -> Tensor:
    """Dropout keep-mask of one group, reproducible from (seed, group offset)."""
    gen = torch.Generator(device=device).manual_seed(seed + offset)
    return torch.rand(shape, generator=gen, device=device) >= p


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, allowed, dropout_p, seed):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1] + (1,), dtype=torch.float32 if q.dtype in (
            torch.float16, torch.bfloat16) else q.dtype, device=q.device)
        for g in _groups(q, k.size(-2), allowed):
            a = allowed if allowed.size(-3) == 1 else allowed[..., g, :, :]
            s = _scores(q[..., g, :, :], k[..., g, :, :], a)
            m = s.amax(dim=-1, keepdim=True)
            p = s.sub_(m).exp_()  # in place: one buffer
            z = p.sum(dim=-1, keepdim=True)
            p.div_(z)
            lse[..., g, :, :] = m + z.log()
            if dropout_p > 0.0:
                keep = _keep_mask(p.shape, dropout_p, seed, g.start, p.device)
                p.mul_(keep).mul_(1.0 / (1.0 - dropout_p))
            out[..., g, :, :] = p.to(v.dtype) @ v[..., g, :, :]
        ctx.save_for_backward(q, k, v, allowed, out, lse)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, allowed, out, lse = ctx.saved_tensors
        p_drop, seed = ctx.dropout_p, ctx.seed
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if d_out is None:
            d_out = torch.zeros_like(out)
        # delta_i = sum_j P_ij dP_ij = d_out_i . out_i (holds with dropout too)
        delta = (d_out.float() * out.float()).sum(dim=-1, keepdim=True)
        if d_lse is not None:  # d lse / d s = P: fold it into the same correction
            delta = delta - d_lse
        for g in _groups(q, k.size(-2), allowed):
            a = allowed if allowed.size(-3) == 1 else allowed[..., g, :, :]
            qg, kg, vg, dog = q[..., g, :, :], k[..., g, :, :], v[..., g, :, :], d_out[..., g, :, :]
            p = _scores(qg, kg, a).sub_(lse[..., g, :, :]).exp_()  # probabilities again
            dp = (dog @ vg.transpose(-1, -2)).to(p.dtype)
            if p_drop > 0.0:
                keep = _keep_mask(p.shape, p_drop, seed, g.start, p.device)
                scale = 1.0 / (1.0 - p_drop)
                dv[..., g, :, :] = (p * keep * scale).to(v.dtype).transpose(-1, -2) @ dog
                dp.mul_(keep).mul_(scale)
            else:
                dv[..., g, :, :] = p.to(v.dtype).transpose(-1, -2) @ dog
            ds = dp.sub_(delta[..., g, :, :]).mul_(p).to(q.dtype)  # P * (dP - delta)
            dq[..., g, :, :] = ds @ kg
            dk[..., g, :, :] = ds.transpose(-1, -2) @ qg
        return dq, dk, dv, None, None, None
