"""Dense references for the long-context kernels (tests/test_long_attention*.py): softmax over
the full [T, T] scores with the mask a kernel implements, optionally with a position bias, and
the helpers that compare values and gradients."""

from __future__ import annotations

import math

import torch

TOL = dict(atol=1e-5, rtol=1e-5)


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


def masked_softmax_attention(scores, v, allowed):
    """Dense reference: softmax over `allowed` keys ([B|1, 1, T, S] bool); rows with none: 0."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    ok = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~ok, 0.0), dim=-1)
    return (probs @ v).masked_fill(~ok, 0.0), torch.logsumexp(scores, -1)


def assert_same_values_and_grads(out, ref, inputs, seed=7):
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, inputs, g, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, inputs, g, allow_unused=True, materialize_grads=True)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"gradient of input {i}: {m}")


def padding(lengths, T, left=False):
    pos = torch.arange(T)
    return torch.stack([(pos >= T - n) if left else (pos < n) for n in lengths])


def longformer_reference(q, k, v, qg, kg, vg, *, window, dilation, causal, is_global_BT, pad_BS,
                         bias=None, scale=None):
    """Dense softmax with the equivalent masks: window | global column for ordinary rows, every
    key for global rows (with the global projections); padding and causality everywhere.
    bias: [B|1, H|1, T, T] added to the scaled scores of every row."""
    B, _, T, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    bias = 0.0 if bias is None else bias
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = ((i - j).abs() <= window * dilation) & ((i - j) % dilation == 0)
    keys_ok = torch.ones(B, 1, 1, T, dtype=torch.bool) if pad_BS is None else pad_BS[:, None, None]
    causal_TT = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool)
    local = (band | is_global_BT[:, None, None, :]) & keys_ok & causal_TT
    out, _ = masked_softmax_attention(q @ k.transpose(-1, -2) * scale + bias, v, local)
    out_g, _ = masked_softmax_attention(qg @ kg.transpose(-1, -2) * scale + bias, vg,
                                        keys_ok & causal_TT)
    return torch.where(is_global_BT[:, None, :, None], out_g, out)


def shared_qk_reference(qk, v, *, allowed_BRTT, self_TT, bias=None, factor=1.0):
    """Per hash round: softmax of factor * q . k/|k| (+ bias [B|1, H|1, T, T]) over the allowed
    keys, the query itself only when nothing else is allowed; rounds combined by their
    log-sum-exp. allowed [B, H, R, T, T]."""
    k_unit = qk / qk.norm(dim=-1, keepdim=True)
    others = allowed_BRTT & ~self_TT
    allowed = others | (allowed_BRTT & ~others.any(-1, keepdim=True))
    scores = factor * (qk @ k_unit.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    out_r, lse_r = masked_softmax_attention(scores[:, :, None], v[:, :, None], allowed)
    ok = allowed.any(-1)
    lse_r = lse_r.masked_fill(~ok, -1e30)
    weight = torch.softmax(lse_r, dim=2)[..., None]
    return ((out_r * weight).sum(2)).masked_fill(~ok.any(2)[..., None], 0.0)


def lsh_reference_mask(kernel, qk, *, causal, pad_BS):
    """The [B, H, R, T, T] mask LSH attention implements, from the kernel's own bucket ids:
    same bucket, and key in the query's chunk or the previous one of the bucket-sorted order
    (causal: an earlier position at most chunk_len sorted places back)."""
    Bq, Hq, Tq, _ = qk.shape
    c = min(kernel.chunk_len, Tq)
    buckets = kernel.buckets(qk, pad_BS)  # [B, H, R, T]
    place = torch.argsort(torch.argsort(buckets, dim=-1, stable=True), dim=-1)
    same = buckets[..., :, None] == buckets[..., None, :]
    pi, pj = place[..., :, None], place[..., None, :]
    if causal:
        i, j = torch.arange(Tq)[:, None], torch.arange(Tq)[None, :]
        window = (j <= i) & (pi - pj <= c)
    else:
        window = (pj // c == pi // c) | (pj // c == pi // c - 1)
    allowed = same & window
    if pad_BS is not None:
        allowed = allowed & pad_BS[:, None, None, None, :]
    return allowed
