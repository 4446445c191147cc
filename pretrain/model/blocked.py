"""The core shared by the blocked long-context kernels (longformer.py, reformer.py).

Both cut a sequence into blocks of b rows and let block m of queries see a window of keys: key
blocks m-1, m (and m+1), plus optional extra keys common to every block (Longformer's global
positions). Scores are [..., nb, b, W] with W = 2b|3b (+ G): O(n * W) instead of O(n^2).
Whatever is not allowed inside a window is masked.

`window_attention` is that masked softmax attention as one autograd function that keeps no
[..., b, W] tensor, and no copy of the windows, for the backward pass: it saves q, k, v (as
blocks), the mask and the output, and recomputes the probabilities in backward (the
FlashAttention recipe, on whole blocks with PyTorch ops). Both passes walk the blocks in groups,
building each group's key windows on the fly, so transient buffers stay below a fixed size
whatever the sequence length.
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


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, *, ahead: bool,
    extra_k: Tensor | None = None, extra_v: Tensor | None = None, dropout_p: float = 0.0,
    need_lse: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Block m of queries attends to key blocks m-1, m (and m+1 if `ahead`) and the extra keys.

    q, k, v: [..., nb, b, d] blocks, q already scaled; missing neighbours (before the first
    block, after the last) are zero keys that `allowed` must mask. extra_k, extra_v:
    [..., 1, G, d], the same G keys for every block (broadcast over the block dim). allowed:
    bool, broadcastable to [..., nb, b, W] with its block dim full; columns are the keys of
    blocks m-1, m, (m+1), then the extra keys.

    Returns (out [..., nb, b, d], lse [..., nb, b, 1] or None, row_ok [..., nb, b, 1]): lse is
    the log-sum-exp of the allowed scores (differentiable; LSH combines hash rounds with it),
    computed when `need_lse`. row_ok is False for rows that may see no key: they are given one
    key (column 0) so that everything stays finite, and callers replace their outputs by zeros;
    everywhere else masked keys get probability exactly 0. Softmax runs in fp32 at least.
    """
    row_ok = allowed.any(dim=-1, keepdim=True)
    masked = ~allowed  # a fresh tensor, safe to edit
    masked[..., :1] &= row_ok  # rows with no key: let them see column 0 (finite, zeroed later)
    seed = int(torch.randint(0, 2**62, (1,))) if dropout_p > 0.0 else None  # seeded RNG
    has_extra = extra_k is not None
    if not has_extra:
        extra_k = extra_v = q.new_empty(0)
    out, lse = _WindowAttention.apply(q, k, v, extra_k, extra_v, masked, ahead, has_extra,
                                      dropout_p, seed, need_lse)
    return out, (lse if need_lse else None), row_ok


def _groups(nb: int, per_block_bytes: int) -> list[slice]:
    """Slices of the block dim such that one group's fp32 scores fit GROUP_BYTES."""
    step = max(1, min(nb, GROUP_BYTES // max(1, per_block_bytes)))
    return [slice(i, min(i + step, nb)) for i in range(0, nb, step)]


def _shifted(x: Tensor, g: slice, shift: int) -> Tensor:
    """Blocks g.start+shift ... g.stop+shift-1 of x [..., nb, b, d]; zeros outside [0, nb)."""
    nb = x.size(-3)
    lo, hi = g.start + shift, g.stop + shift
    inside = x[..., max(lo, 0):min(hi, nb), :, :]
    if lo >= 0 and hi <= nb:
        return inside
    before = x.new_zeros(x.shape[:-3] + (max(0, -lo),) + x.shape[-2:])
    after = x.new_zeros(x.shape[:-3] + (max(0, hi - nb),) + x.shape[-2:])
    return torch.cat([before, inside, after], dim=-3)


def _window(x: Tensor, extra: Tensor | None, g: slice, ahead: bool) -> Tensor:
    """Key (or value) windows of the blocks in g: [..., n_g, W, d]."""
    parts = [_shifted(x, g, -1), x[..., g, :, :]] + ([_shifted(x, g, 1)] if ahead else [])
    if extra is not None:
        n_g = g.stop - g.start
        parts.append(extra.expand(*x.shape[:-3], n_g, *extra.shape[-2:]))
    return torch.cat(parts, dim=-2)


def _probs(q: Tensor, k_win: Tensor, masked: Tensor, need_lse: bool = False):
    """Softmax of the masked scores q k^T of one group, fp32 (at least), and (if need_lse)
    their log-sum-exp: s_j - log p_j at the row's largest score (where p_j is largest).

    Masked scores are -inf before torch's fused softmax: exp of -inf takes a faster path on CPU
    than exp of a huge finite negative number (which underflows through denormals)."""
    s = q @ k_win.transpose(-1, -2)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    s.masked_fill_(masked, float("-inf"))
    s_max = s.amax(dim=-1, keepdim=True) if need_lse else None
    p = torch.softmax(s, dim=-1)
    return p, (s_max - p.amax(dim=-1, keepdim=True).log() if need_lse else None)


def _keep_mask(shape: torch.Size, p: float, seed: int, offset: int, device) -> Tensor:
    """Dropout keep-mask of one group, reproducible from (seed, group offset)."""
    gen = torch.Generator(device=device).manual_seed(seed + offset)
    return torch.rand(shape, generator=gen, device=device) >= p


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, masked, ahead, has_extra, dropout_p, seed,
                need_lse):
        nb = q.size(-3)
        if masked.size(-3) != nb:
            raise ValueError(f"the mask has {masked.size(-3)} blocks, q has {nb}")
        ex_k, ex_v = (extra_k, extra_v) if has_extra else (None, None)
        W = masked.size(-1)
        out = torch.empty_like(q)
        lse = None
        if need_lse:
            fp32 = q.dtype in (torch.float16, torch.bfloat16)
            lse = q.new_empty(q.shape[:-1] + (1,), dtype=torch.float32 if fp32 else q.dtype)
        groups = _groups(nb, q[..., 0, :, :].numel() // q.size(-1) * W * 4)
        for g in groups:
            p, lse_g = _probs(q[..., g, :, :], _window(k, ex_k, g, ahead), masked[..., g, :, :],
                              need_lse)
            if need_lse:
                lse[..., g, :, :] = lse_g
            if dropout_p > 0.0:
                keep = _keep_mask(p.shape, dropout_p, seed, g.start, p.device)
                p.mul_(keep).mul_(1.0 / (1.0 - dropout_p))
            out[..., g, :, :] = p.to(v.dtype) @ _window(v, ex_v, g, ahead)
        ctx.save_for_backward(q, k, v, extra_k, extra_v, masked, out)
        ctx.groups, ctx.ahead, ctx.has_extra = groups, ahead, has_extra
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, extra_k, extra_v, masked, out = ctx.saved_tensors
        ahead, p_drop, seed = ctx.ahead, ctx.dropout_p, ctx.seed
        ex_k, ex_v = (extra_k, extra_v) if ctx.has_extra else (None, None)
        nb, b = q.size(-3), q.size(-2)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        d_ex_k = torch.zeros_like(extra_k) if ctx.has_extra else None
        d_ex_v = torch.zeros_like(extra_v) if ctx.has_extra else None
        if d_out is None:
            d_out = torch.zeros_like(out)
        # dS = P * (dP - delta), delta_i = sum_j P_ij dP_ij = d_out_i . out_i (with dropout
        # too); d lse / d s = P, so an lse gradient joins the same correction.
        delta = (d_out.float() * out.float()).sum(dim=-1, keepdim=True)
        if d_lse is not None:
            delta = delta - d_lse
        for g in ctx.groups:
            qg, dog = q[..., g, :, :], d_out[..., g, :, :]
            k_win, v_win = _window(k, ex_k, g, ahead), _window(v, ex_v, g, ahead)
            p, _ = _probs(qg, k_win, masked[..., g, :, :])  # recomputed, never stored
            dp = (dog @ v_win.transpose(-1, -2)).to(p.dtype)
            if p_drop > 0.0:
                keep = _keep_mask(p.shape, p_drop, seed, g.start, p.device)
                scale = 1.0 / (1.0 - p_drop)
                dv_win = (p * keep * scale).to(v.dtype).transpose(-1, -2) @ dog
                dp.mul_(keep).mul_(scale)
            else:
                dv_win = p.to(v.dtype).transpose(-1, -2) @ dog
            ds = dp.sub_(delta[..., g, :, :]).mul_(p).to(q.dtype)
            dq[..., g, :, :] = ds @ k_win
            dk_win = ds.transpose(-1, -2) @ qg
            for d_full, d_win, d_extra in ((dk, dk_win, d_ex_k), (dv, dv_win, d_ex_v)):
                _scatter_window(d_full, d_win, d_extra, g, ahead, b, nb)
        return dq, dk, dv, d_ex_k, d_ex_v, None, None, None, None, None, None


def _scatter_window(d_full: Tensor, d_win: Tensor, d_extra: Tensor | None, g: slice,
                    ahead: bool, b: int, nb: int) -> None:
    """Add the gradient of a group's windows [..., n_g, W, d] back onto the blocks it was
    built from (block m-1, m, m+1 of each block m) and onto the extra keys."""
    for i, shift in enumerate((-1, 0, 1) if ahead else (-1, 0)):
        part = d_win[..., i * b:(i + 1) * b, :]
        lo, hi = g.start + shift, g.stop + shift
        src_lo, src_hi = max(0, -lo), (hi - lo) - max(0, hi - nb)
        d_full[..., max(lo, 0):min(hi, nb), :, :] += part[..., src_lo:src_hi, :, :]
    if d_extra is not None:
        n_keys = (3 if ahead else 2) * b
        d_extra += d_win[..., n_keys:, :].sum_to_size(d_extra.shape)
