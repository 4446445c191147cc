"""The core shared by the blocked long-context kernels (longformer.py, reformer.py).

Both cut a sequence into blocks of b rows and let block m of queries see a window of keys: key
blocks m-1, m (and m+1), plus optional extra keys common to every block (Longformer's global
positions). Scores are [..., nb, b, W] with W = 2b|3b (+ G): O(n * W) instead of O(n^2).
Whatever is not allowed inside a window is masked; an optional additive bias of the same layout
(a relative position bias evaluated on the window's pairs) joins the scores, with its gradient.

`window_attention` is that masked softmax attention as one autograd function that keeps no
[..., b, W] tensor, and no copy of the windows, for the backward pass: it saves q, k, v (as
blocks), the mask and the output, and recomputes the probabilities in backward (the
FlashAttention recipe, on whole blocks with PyTorch ops). Both passes walk the blocks in groups,
building each group's key windows on the fly, so transient buffers stay below a fixed size
whatever the sequence length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GROUP_BYTES = 2**20
"""Budget for one group's fp32 scores buffer: blocks are processed in groups of about this size
(at least one block). Small buffers come from malloc's reused heap instead of fresh mmap'd pages
(32 MiB groups were ~20% slower on CPU, from page faults; 1-4 MiB were equally fast) and keep
transient memory small next to what is saved for backward."""


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
    need_lse: bool = False, save_probs: bool = False, bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Block m of queries attends to key blocks m-1, m (and m+1 if `ahead`) and the extra keys.

    q, k, v: [..., nb, b, d] blocks, q already scaled; missing neighbours (before the first
    block, after the last) are zero keys that `allowed` must mask. extra_k, extra_v:
    [..., 1, G, d], the same G keys for every block (broadcast over the block dim; leading dims
    broadcastable too). allowed: bool, broadcastable to [..., nb, b, W] (block dims full);
    columns are the keys of blocks m-1, m, (m+1), then the extra keys.

    Returns (out [..., nb, b, d], lse [..., nb, b, 1] or None, row_ok [..., nb, b, 1]): lse is
    the log-sum-exp of the allowed scores (differentiable; LSH combines hash rounds with it),
    computed when `need_lse`. row_ok is False for rows that may see no key: their values are
    finite and meaningless, and callers replace them by zeros. Everywhere else masked keys get
    probability exactly 0. Softmax runs in fp32 at least.

    save_probs: keep the probabilities for backward instead of recomputing them: one fp32
    [..., nb, b, W] tensor more (still O(n * W)), one matmul and softmax less. Worth it when W
    is small next to d (LSH: W = 2 * chunk_len), not for wide windows.

    bias: float, broadcastable to [..., nb, b, W] with at least 3 dims (e.g. [1, H, 1, 1, b, W]
    for Longformer's [B, H, r, nb, b, d] blocks: the same in every block), added to the scores
    (q is scaled, the bias is not). It may require grad: its gradient is the scores' gradient,
    summed over where it broadcasts.
    """
    lead, (nb, b, d) = q.shape[:-3], q.shape[-3:]
    W = allowed.size(-1)
    P = math.prod(lead)
    if allowed.shape[-3:-1] != (nb, b) or len(allowed.shape) != len(q.shape):
        raise ValueError(f"allowed {tuple(allowed.shape)} does not match q {tuple(q.shape)}")
    row_ok = allowed.any(dim=-1, keepdim=True)
    # Sequences ([nb, b, d] each) laid out one after the other: every group is contiguous.
    q3, k3, v3 = (t.reshape(P, nb, b, d) for t in (q, k, v))
    groups = _groups(P, nb, b * W * 4)
    whole_sequences = groups[0][1] == slice(0, nb)
    mask, is_flat = _flat_mask(allowed, lead, whole_sequences)
    bias_layout = None
    if bias is not None:
        bias = bias.reshape((1,) * (q.dim() - bias.dim()) + bias.shape)  # as many dims as q
        bias = bias.expand(*bias.shape[:-3], nb, b, W)  # block dims full, as the mask's
        bias, bias_flat = _flat_mask(bias, lead, whole_sequences)
        bias_layout = (lead, bias_flat)
    else:
        bias = q.new_empty(0)
    ex_k = ex_v = q.new_empty(0)
    if extra_k is not None:
        G = extra_k.size(-2)
        ex_k, ex_v = (t.expand(*lead, 1, G, d).reshape(P, 1, G, d) for t in (extra_k, extra_v))
    seed = int(torch.randint(0, 2**62, (1,))) if dropout_p > 0.0 else None  # seeded RNG
    out, lse = _WindowAttention.apply(q3, k3, v3, ex_k, ex_v, mask, (lead, is_flat), groups,
                                      ahead, dropout_p, seed, need_lse, save_probs, bias,
                                      bias_layout)
    out = out.view(*lead, nb, b, d)
    return out, (lse.view(*lead, nb, b, 1) if need_lse else None), row_ok


Group = tuple[slice, slice]
"""(sequences, blocks): whole sequences when one fits the budget, else blocks of one."""


def _groups(P: int, nb: int, block_bytes: int) -> list[Group]:
    """Groups whose fp32 scores fit GROUP_BYTES (at least one block each)."""
    if nb * block_bytes <= GROUP_BYTES:
        step = GROUP_BYTES // (nb * block_bytes)
        return [(slice(p, min(p + step, P)), slice(0, nb)) for p in range(0, P, step)]
    step = max(1, GROUP_BYTES // block_bytes)
    return [(slice(p, p + 1), slice(m, min(m + step, nb)))
            for p in range(P) for m in range(0, nb, step)]


def _flat_mask(allowed: Tensor, lead: torch.Size, whole_sequences: bool) -> tuple[Tensor, bool]:
    """`allowed` as [P, nb, b, W] when it has every leading dim, or when groups span several
    sequences (then dims it broadcasts, e.g. heads, are materialized); else as it is, and
    `_mask_rows` picks one sequence's rows without materializing them."""
    if allowed.shape[:-3] == lead or whole_sequences:
        flat = allowed.expand(*lead, *allowed.shape[-3:]).reshape(-1, *allowed.shape[-3:])
        return flat, True
    return allowed, False


def _rows_index(mask: Tensor, g: Group, lead: torch.Size, is_flat: bool) -> tuple:
    """Index of the rows of group g in `mask` (a view when used to write: no copy)."""
    ps, ns = g
    if is_flat:
        return ps, ns
    # one sequence: its index in each leading dim, 0 where the mask broadcasts
    index, p = [], ps.start
    for size, msize in reversed(list(zip(lead, mask.shape[:-3]))):
        index.append(p % size if msize != 1 else 0)
        p //= size
    return (*reversed(index), ns)


def _mask_rows(mask: Tensor, g: Group, lead: torch.Size, is_flat: bool) -> Tensor:
    """The rows of group g: [n_seq, n_blocks, b, W]."""
    rows = mask[_rows_index(mask, g, lead, is_flat)]
    return rows if is_flat else rows.unsqueeze(0)


def _window(x: Tensor, extra: Tensor | None, g: Group, ahead: bool) -> Tensor:
    """Key (or value) windows of the blocks of group g, written once into a new tensor
    [n_seq, n_blocks, W, d]: blocks m-1, m, (m+1) of the same sequence, zeros where those fall
    outside it, then the extra keys."""
    ps, ns = g
    xs = x[ps]  # [n_seq, nb, b, d]
    nb, b, d = xs.shape[-3:]
    n_g = ns.stop - ns.start
    shifts = (-1, 0, 1) if ahead else (-1, 0)
    W = len(shifts) * b + (extra.size(-2) if extra is not None else 0)
    win = x.new_empty(xs.size(0), n_g, W, d)
    for i, shift in enumerate(shifts):
        lo, hi = ns.start + shift, ns.stop + shift
        dst = win[:, :, i * b:(i + 1) * b]
        if lo < 0:
            dst[:, :-lo] = 0
        if hi > nb:
            dst[:, n_g - (hi - nb):] = 0
        dst[:, max(0, -lo):n_g - max(0, hi - nb)] = xs[:, max(lo, 0):min(hi, nb)]
    if extra is not None:
        win[:, :, len(shifts) * b:] = extra[ps]
    return win


def _scatter_window(d_full: Tensor, d_win: Tensor, d_extra: Tensor | None, g: Group,
                    ahead: bool) -> None:
    """Add the gradient of a group's windows [n_seq, n_blocks, W, d] back onto the blocks they
    were built from (blocks m-1, m, m+1 of each block m) and onto the extra keys."""
    ps, ns = g
    nb, b = d_full.size(1), d_full.size(2)
    shifts = (-1, 0, 1) if ahead else (-1, 0)
    for i, shift in enumerate(shifts):
        part = d_win[:, :, i * b:(i + 1) * b]
        lo, hi = ns.start + shift, ns.stop + shift
        src_lo, src_hi = max(0, -lo), (hi - lo) - max(0, hi - nb)
        d_full[ps, max(lo, 0):min(hi, nb)] += part[:, src_lo:src_hi]
    if d_extra is not None:
        d_extra[ps] += d_win[:, :, len(shifts) * b:].sum(dim=1, keepdim=True)


MASKED = -1e30
"""Added to masked scores. Finite, so a row with no allowed key stays finite (uniform);
exp(score - 1e30 - row max) is exactly 0 in fp32 wherever the row has an allowed key."""


def _probs(q: Tensor, k_win: Tensor, allowed: Tensor, need_lse: bool = False,
           bias: Tensor | None = None):
    """Softmax of the masked scores q k^T (+ bias) of one group, fp32 (at least), and (if
    need_lse) their log-sum-exp: s_j - log p_j at the row's largest score (where p_j is largest).

    The mask is applied by adding (allowed - 1) * 1e30: converting and adding are vectorized
    passes, several times faster on CPU than masked_fill with a bool mask."""
    s = q @ k_win.transpose(-1, -2)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if bias is not None:
        s.add_(bias)
    s.add_(allowed.to(s.dtype).sub_(1.0).mul_(-MASKED))
    s_max = s.amax(dim=-1, keepdim=True) if need_lse else None
    p = torch.softmax(s, dim=-1)
    return p, (s_max - p.amax(dim=-1, keepdim=True).log() if need_lse else None)


def _keep_mask(shape: torch.Size, p: float, seed: int, offset: int, device) -> Tensor:
    """Dropout keep-mask of one group, reproducible from (seed, group number)."""
    gen = torch.Generator(device=device).manual_seed(seed + offset)
    return torch.rand(shape, generator=gen, device=device) >= p


class _WindowAttention(torch.autograd.Function):
    """On flattened sequences: q, k, v [P, nb, b, d], extra [P, 1, G, d] (or empty)."""

    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, mask, mask_layout, groups, ahead, dropout_p,
                seed, need_lse, save_probs, bias, bias_layout):
        has_extra = extra_k.numel() > 0
        ex_k, ex_v = (extra_k, extra_v) if has_extra else (None, None)

        def bias_rows(g):
            return None if bias_layout is None else _mask_rows(bias, g, *bias_layout)

        out = torch.empty_like(q)
        lse = None
        if need_lse:
            fp32 = q.dtype in (torch.float16, torch.bfloat16)
            lse = q.new_empty(q.shape[:-1] + (1,), dtype=torch.float32 if fp32 else q.dtype)
        saved_probs = []
        for i, g in enumerate(groups):
            p, lse_g = _probs(q[g], _window(k, ex_k, g, ahead), _mask_rows(mask, g, *mask_layout),
                              need_lse, bias_rows(g))
            if need_lse:
                lse[g] = lse_g
            if save_probs:
                saved_probs.append(p)
            if dropout_p > 0.0:
                keep = _keep_mask(p.shape, dropout_p, seed, i, p.device)
                p = p * keep * (1.0 / (1.0 - dropout_p))
            torch.matmul(p.to(v.dtype), _window(v, ex_v, g, ahead), out=out[g])
        ctx.save_for_backward(q, k, v, extra_k, extra_v, mask, out, bias, *saved_probs)
        ctx.mask_layout, ctx.groups, ctx.bias_layout = mask_layout, groups, bias_layout
        ctx.ahead, ctx.has_extra = ahead, has_extra
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, extra_k, extra_v, mask, out, bias, *saved_probs = ctx.saved_tensors
        ahead, p_drop, seed = ctx.ahead, ctx.dropout_p, ctx.seed
        bias_layout = ctx.bias_layout
        d_bias = None
        if bias_layout is not None and ctx.needs_input_grad[13]:
            d_bias = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device)
        ex_k, ex_v = (extra_k, extra_v) if ctx.has_extra else (None, None)
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
        for i, g in enumerate(ctx.groups):
            qg, dog = q[g], d_out[g]
            k_win, v_win = _window(k, ex_k, g, ahead), _window(v, ex_v, g, ahead)
            if saved_probs:
                p = saved_probs[i]
            else:  # recomputed, never stored
                p, _ = _probs(qg, k_win, _mask_rows(mask, g, *ctx.mask_layout),
                              bias=None if bias_layout is None
                              else _mask_rows(bias, g, *bias_layout))
            dp = (dog @ v_win.transpose(-1, -2)).to(p.dtype)
            if p_drop > 0.0:
                keep = _keep_mask(p.shape, p_drop, seed, i, p.device)
                scale = 1.0 / (1.0 - p_drop)
                dv_win = (p * keep * scale).to(v.dtype).transpose(-1, -2) @ dog
                dp.mul_(keep).mul_(scale)
            else:
                dv_win = p.to(v.dtype).transpose(-1, -2) @ dog
            ds = dp.sub_(delta[g]).mul_(p)
            if d_bias is not None:  # d score = d bias; rows of a broadcast bias accumulate
                rows = ds if bias_layout[1] else ds[0]  # flat: [n_seq, ...]; else one sequence
                d_bias[_rows_index(d_bias, g, *bias_layout)] += rows.to(d_bias.dtype)
            ds = ds.to(q.dtype)
            torch.matmul(ds, k_win, out=dq[g])
            dk_win = ds.transpose(-1, -2) @ qg
            _scatter_window(dk, dk_win, d_ex_k, g, ahead)
            _scatter_window(dv, dv_win, d_ex_v, g, ahead)
        return (dq, dk, dv, d_ex_k, d_ex_v, None, None, None, None, None, None, None, None,
                d_bias, None)
