"""Attention kernels and MultiHeadAttention against a naive per-row float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pretrain.config import AttentionConfig
from pretrain.model.attention import (
    ATTENTION_KERNELS,
    DenseAttention,
    MultiHeadAttention,
    build_attention_kernel,
)


def reference_attention(q, k, v, *, causal, key_padding_mask_BS=None, attn_bias=None):
    """Row by row: softmax(q k^T / sqrt(d) + bias) v over the keys that row may see; a row that
    may see none outputs zeros. Deliberately unvectorized, independent of the kernel's masks."""
    B, H, T, d = q.shape
    S = k.size(2)
    rows = []
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = [
                    j
                    for j in range(S)
                    if (not causal or j <= i + (S - T))
                    and (key_padding_mask_BS is None or bool(key_padding_mask_BS[b, j]))
                ]
                if not keys:
                    rows.append(torch.zeros(d, dtype=q.dtype))
                    continue
                idx = torch.tensor(keys)
                scores = k[b, h, idx] @ q[b, h, i] / math.sqrt(d)
                if attn_bias is not None:
                    bias_TS = attn_bias.expand(B, H, T, S)[b, h, i]
                    scores = scores + bias_TS[idx]
                rows.append(torch.softmax(scores, dim=0) @ v[b, h, idx])
    return torch.stack(rows).view(B, H, T, d)


def make_qkv(B, H, T, S, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, S, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, S, d, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


B, H, d = 2, 3, 8
# name -> (T, S, causal, padding lengths or None, bias shape or None, left-padded)
CASES = {
    "causal": (6, 6, True, None, None, False),
    "bidirectional": (6, 6, False, None, None, False),
    "padding": (6, 6, False, [6, 4], None, False),
    "causal_left_padding": (6, 6, True, [6, 3], None, True),  # rows 0..2 of b=1 see nothing
    "bias_per_head": (5, 5, True, None, (1, H, 5, 5), False),
    "bias_per_batch_with_padding": (5, 5, False, [5, 2], (B, 1, 5, 5), False),
    "cross": (4, 7, False, [7, 5], None, False),
    "cross_with_bias": (4, 7, False, None, (B, H, 4, 7), False),
    "causal_T_lt_S": (3, 7, True, None, None, False),  # bottom-right aligned (KV cache)
}


def case_inputs(name, dtype=torch.float64):
    T, S, causal, lengths, bias_shape, left = CASES[name]
    q, k, v = make_qkv(B, H, T, S, d, dtype)
    mask = None
    if lengths is not None:
        pos = torch.arange(S)
        mask = torch.stack(
            [(pos >= S - n) if left else (pos < n) for n in lengths]
        )  # [B, S] True = real
    bias = None
    if bias_shape is not None:
        bias = torch.randn(*bias_shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        bias.requires_grad_(True)
    return q, k, v, dict(causal=causal, key_padding_mask_BS=mask, attn_bias=bias)


def grads(out, inputs, seed=2):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_matches_reference_values_and_grads_float64(name):
    q, k, v, kw = case_inputs(name)
    inputs = [t for t in (q, k, v, kw["attn_bias"]) if t is not None]
    out = DenseAttention()(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["causal", "padding", "bias_per_head", "cross"])
def test_dense_float32_close_to_float64_reference(name):
    q, k, v, kw = case_inputs(name, dtype=torch.float32)
    out = DenseAttention()(q, k, v, **kw)
    kw64 = {**kw, "attn_bias": None if kw["attn_bias"] is None else kw["attn_bias"].double()}
    ref = reference_attention(q.double(), k.double(), v.double(), **kw64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero_and_finite():
    q, k, v = make_qkv(2, 2, 4, 4, 8, dtype=torch.float32)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    bias = torch.randn(1, 2, 4, 4, requires_grad=True)
    for kw in (
        dict(causal=False, key_padding_mask_BS=mask),
        dict(causal=True, key_padding_mask_BS=mask, attn_bias=bias),
    ):
        out = DenseAttention()(q, k, v, **kw)
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # batch 1 has no real keys
        assert out[0].abs().sum() > 0
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
        # The batch element with no real keys passes no gradient anywhere.
        for g in (gq, gk, gv):
            assert torch.equal(g[1], torch.zeros_like(g[1]))
        assert gq[0].abs().sum() > 0


def test_dropout_p_is_applied():
    q, k, v = make_qkv(1, 2, 16, 16, 8, dtype=torch.float32)
    plain = DenseAttention()(q, k, v, causal=True)
    torch.manual_seed(0)
    dropped = DenseAttention()(q, k, v, causal=True, dropout_p=0.5)
    assert not torch.allclose(plain, dropped)


def test_kernel_input_checks():
    q, k, v = make_qkv(2, 2, 4, 4, 8, dtype=torch.float32)
    kernel = DenseAttention()
    with pytest.raises(TypeError, match="bool"):
        kernel(q, k, v, causal=False, key_padding_mask_BS=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        kernel(q, k, v, causal=False, key_padding_mask_BS=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        kernel(q, k, v, causal=False, attn_bias=torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="do not agree"):
        kernel(q, k[:, :, :3], v, causal=False)


def test_registry_and_builder():
    assert ATTENTION_KERNELS["dense"] is DenseAttention
    assert isinstance(build_attention_kernel(AttentionConfig(kind="dense")), DenseAttention)
    with pytest.raises(ValueError, match="not a known attention kernel"):
        build_attention_kernel(AttentionConfig.model_construct(kind="nope", dropout=0.0))


# ----------------------------------------------------------------------------- MultiHeadAttention


def mha_reference(mha: MultiHeadAttention, x, context=None, **kw):
    """Projections by hand + the reference core, in float64."""
    src = x if context is None else context
    n_head, hd = mha.n_head, mha.head_dim

    def split(t):
        return t.view(t.size(0), t.size(1), n_head, hd).transpose(1, 2)

    q = split(x @ mha.q_proj.weight.T + mha.q_proj.bias)
    k = split(src @ mha.k_proj.weight.T + mha.k_proj.bias)
    v = split(src @ mha.v_proj.weight.T + mha.v_proj.bias)
    out = reference_attention(q, k, v, **kw)
    out = out.transpose(1, 2).reshape(x.size(0), x.size(1), -1)
    return out @ mha.o_proj.weight.T + mha.o_proj.bias


def test_mha_self_and_cross_match_reference():
    torch.manual_seed(0)
    D, T, S = 24, 5, 7
    x = torch.randn(2, T, D, dtype=torch.float64)
    ctx = torch.randn(2, S, D, dtype=torch.float64)
    mask = torch.tensor([[True] * S, [True] * 4 + [False] * 3])

    self_attn = MultiHeadAttention(D, 4, kernel=DenseAttention()).double()
    out = self_attn(x, causal=True)
    assert out.shape == (2, T, D)
    torch.testing.assert_close(out, mha_reference(self_attn, x, causal=True))

    cross_attn = MultiHeadAttention(D, 4, cross=True).double()
    out = cross_attn(x, context_BSD=ctx, causal=False, key_padding_mask_BS=mask)
    assert out.shape == (2, T, D)
    ref = mha_reference(cross_attn, x, ctx, causal=False, key_padding_mask_BS=mask)
    torch.testing.assert_close(out, ref)


def test_mha_argument_errors():
    with pytest.raises(ValueError, match="must divide"):
        MultiHeadAttention(30, 4)
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="needs context_BSD"):
        MultiHeadAttention(16, 2, cross=True)(x, causal=False)
    with pytest.raises(ValueError, match="cross=False"):
        MultiHeadAttention(16, 2)(x, context_BSD=x, causal=False)


def test_mha_heads_follow_projection_width():
    """The tensor-parallel contract: slicing heads out of the projections gives modules whose
    outputs (without the output bias) sum to the full module's output."""
    torch.manual_seed(0)
    D, n_head, hd = 32, 4, 8
    full = MultiHeadAttention(D, n_head).eval()
    x = torch.randn(2, 6, D)
    want = full(x, causal=True)

    total = torch.zeros_like(want)
    for shard in range(2):
        cols = slice(shard * D // 2, (shard + 1) * D // 2)  # heads 2*shard, 2*shard+1
        part = MultiHeadAttention(D, n_head).eval()
        for name in ("q_proj", "k_proj", "v_proj"):
            src = getattr(full, name)
            lin = nn.Linear(D, D // 2)
            lin.weight.data.copy_(src.weight[cols])
            lin.bias.data.copy_(src.bias[cols])
            setattr(part, name, lin)
        part.o_proj = nn.Linear(D // 2, D)
        part.o_proj.weight.data.copy_(full.o_proj.weight[:, cols])
        part.o_proj.bias.data.copy_(full.o_proj.bias if shard == 0 else torch.zeros(D))
        part.n_head = n_head // 2
        total += part(x, causal=True)
    torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-5)


def test_mha_attention_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, attn_dropout=0.5)
    plain = MultiHeadAttention(16, 2)
    plain.load_state_dict(mha.state_dict())
    x = torch.randn(2, 8, 16)
    mha.eval()
    torch.testing.assert_close(mha(x, causal=True), plain.eval()(x, causal=True))
    mha.train()
    assert not torch.allclose(mha(x, causal=True), plain(x, causal=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_on_cuda_matches_reference(name, dtype):
    """The GPU backends (flash, memory-efficient, cuDNN) must honour the same masks, bias
    gradients and fully-masked-row rule as the CPU path."""
    q, k, v, kw = case_inputs(name)
    inputs64 = [t for t in (q, k, v, kw["attn_bias"]) if t is not None]
    ref = reference_attention(q, k, v, **kw)
    ref_grads = grads(ref, inputs64)

    def to_cuda(t):
        return None if t is None else t.detach().to("cuda", dtype).requires_grad_(t.requires_grad)

    qc, kc, vc, bc = (to_cuda(t) for t in (q, k, v, kw["attn_bias"]))
    mask = kw["key_padding_mask_BS"]
    out = DenseAttention()(
        qc, kc, vc, causal=kw["causal"], attn_bias=bc,
        key_padding_mask_BS=None if mask is None else mask.cuda(),
    )
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    inputs = [t for t in (qc, kc, vc, bc) if t is not None]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, g.to("cuda", dtype))
    for a, b in zip(got, ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, atol=5 * tol, rtol=5 * tol)


FUSION_CASES = {  # name -> (kernel config or None for a dense cross-attention, projections)
    "dense": (AttentionConfig(), 3),
    "cross": (None, 3),
    "reformer-shared-qk": (AttentionConfig(kind="reformer", reformer=dict(
        n_hashes=2, n_buckets=2, chunk_len=4, hash_seed=3)), 2),
    "longformer-global": (AttentionConfig(kind="longformer", longformer=dict(
        window=2, global_positions=[0])), 6),
}


class CountLinear(TorchFunctionMode):
    """Counts F.linear calls (nn.Linear's forward included) made inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func is F.linear
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(FUSION_CASES))
def test_fused_projections_match_separate_ones(name):
    """MultiHeadAttention computes the projections of one input with one matmul over their
    concatenated weights. It must give what calling each nn.Linear gives, outputs and every
    gradient, and must call each projection itself whenever one has a hook (DeepSpeed ZeRO-3
    gathers a module's parameters in a forward pre-hook: skipping it would read empty ones)."""
    torch.manual_seed(0)
    cfg, n_proj = FUSION_CASES[name]
    D, T = 16, 8

    def build():
        kernel = None if cfg is None else build_attention_kernel(cfg)
        return MultiHeadAttention(D, 2, kernel=kernel, cross=cfg is None)

    fused, separate = build(), build()
    separate.load_state_dict(fused.state_dict())
    calls = []
    for proj in separate.head_projections():
        proj.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    assert len(fused.head_projections()) == n_proj
    x = torch.randn(2, T, D)
    ctx = torch.randn(2, T + 3, D) if cfg is None else None
    outs, grads, matmuls = [], [], []
    for mha in (fused, separate):
        xi = x.clone().requires_grad_()
        ci = None if ctx is None else ctx.clone().requires_grad_()
        with CountLinear() as counted:
            out = mha(xi, context_BSD=ci, causal=cfg is not None)
        matmuls.append(counted.n)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + ([] if ci is None else [ci.grad])
                     + [p.grad for p in mha.parameters()])
    assert len(calls) == n_proj  # the hooked projections ran one by one
    # fused: one matmul per input (cross-attention: q of x, k and v of the context) + o_proj
    assert matmuls == [(2 if cfg is None else 1) + 1, n_proj + 1]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    for g_fused, g_separate in zip(*grads):
        torch.testing.assert_close(g_fused, g_separate, atol=1e-6, rtol=1e-6)

    # under bf16 autocast (benchmarks/gpu_mfu.py): the same bf16 matmuls, every gradient in
    # its input's dtype
    outs, grads = [], []
    for mha in (fused, separate):
        mha.zero_grad()
        xi = x.clone().requires_grad_()
        ci = None if ctx is None else ctx.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mha(xi, context_BSD=ci, causal=cfg is not None)
        out.float().pow(2).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + ([] if ci is None else [ci.grad])
                     + [p.grad for p in mha.parameters()])
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for g_fused, g_separate in zip(*grads):
        assert g_fused.dtype == g_separate.dtype == torch.float32
        torch.testing.assert_close(g_fused, g_separate, atol=5e-2, rtol=5e-2)
