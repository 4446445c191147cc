"""Long-context attention: Longformer and Reformer (LSH) kernels against dense softmax references
with the equivalent [T, T] mask (values and gradients, fp32), causality, determinism, memory
that stays O(T * window), reversible layers and chunked feed-forward, GPT integration."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from long_attention_refs import (
    TOL,
    assert_same_values_and_grads,
    longformer_reference,
    lsh_reference_mask,
    masked_softmax_attention,
    padding,
    randn,
    shared_qk_reference,
)
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import AttentionConfig, ModelConfig
from pretrain.config_io import ConfigError, load_config
from pretrain.model import GPT, LongformerAttention, LSHAttention, MultiHeadAttention, build_model
from pretrain.model import blocked
from pretrain.model.attention import OffsetBias, build_attention_kernel
from pretrain.model.hf_compat import hf_export_problems
from pretrain.model.hf_gpt2 import gpt_to_hf_state_dict
from pretrain.model.layers import FeedForward, RelativePositionBias
from pretrain.model.reversible import residual_two_stream, reversible_sequence
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

# ----------------------------------------------------------------------------- blocked core


@pytest.mark.parametrize("ahead, save_probs", [(False, True), (True, False)],
                         ids=["prev_cur_saved_probs", "prev_cur_next_recomputed"])
@pytest.mark.parametrize("group_bytes", [2**30, 300], ids=["one_group", "groups_of_blocks"])
def test_window_attention_gradcheck(group_bytes, ahead, save_probs, monkeypatch):
    """The hand-written backward (windows rebuilt and probabilities recomputed per group of
    blocks) against numerical derivatives in float64, through the output and the log-sum-exp,
    with extra keys shared by all blocks, a row that sees no key (zeroed by the caller), a mask
    broadcast over heads and an additive bias broadcast over heads and blocks (a relative
    position bias; its gradient sums over both); the values against a dense softmax over the
    same windows."""
    monkeypatch.setattr(blocked, "GROUP_BYTES", group_bytes)
    nb, b, d, G = 4, 3, 5, 2
    W = (3 if ahead else 2) * b + G
    q, k, v = (randn(1, 2, nb, b, d, seed=s, dtype=torch.float64) for s in range(3))
    ek, ev = (randn(1, 2, 1, G, d, seed=s, dtype=torch.float64) for s in (3, 4))
    allowed = torch.rand(1, 1, nb, b, W, generator=torch.Generator().manual_seed(3)) < 0.6
    allowed[..., 0, :, : b] = False  # block 0 has no previous block
    if ahead:
        allowed[..., -1, :, 2 * b: 3 * b] = False  # and the last no next one
    allowed[0, 0, 1, 2] = False  # a row with no key
    bias = randn(1, 1, 1, b, W, seed=5, dtype=torch.float64)

    def f(q, k, v, ek, ev, bias):
        out, lse, ok = blocked.window_attention(q, k, v, allowed, ahead=ahead, extra_k=ek,
                                                extra_v=ev, need_lse=True, save_probs=save_probs,
                                                bias=bias)
        return out.masked_fill(~ok, 0.0), lse.masked_fill(~ok, 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v, ek, ev, bias), fast_mode=True)
    # dense reference: the window keys written out block by block
    k_win = torch.cat([blocked.neighbour_blocks(k, -3, ahead=ahead), ek.expand(1, 2, nb, G, d)],
                      dim=-2)
    v_win = torch.cat([blocked.neighbour_blocks(v, -3, ahead=ahead), ev.expand(1, 2, nb, G, d)],
                      dim=-2)
    out, lse = f(q, k, v, ek, ev, bias)
    ref, ref_lse = masked_softmax_attention(q @ k_win.transpose(-1, -2) + bias, v_win, allowed)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.masked_fill(~allowed.any(-1), 0.0)[..., None])


def test_window_attention_dropout_matches_masked_reference():
    q, k, v = (randn(2, 3, 4, 8, 8, seed=s) for s in range(3))
    allowed = torch.ones(1, 1, 4, 8, 16, dtype=torch.bool).tril(diagonal=8)
    allowed[..., 0, :, :8] = False
    torch.manual_seed(5)
    out, _, _ = blocked.window_attention(q, k, v, allowed, ahead=False, dropout_p=0.3)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,)))
    keep = blocked._keep_mask(torch.Size([2, 3, 4, 8, 16]), 0.3, seed, 0, q.device)
    k_win, v_win = (blocked.neighbour_blocks(t, -3, ahead=False) for t in (k, v))
    scores = (q @ k_win.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    ref = (torch.softmax(scores, -1) * keep / 0.7) @ v_win
    assert 0.2 < 1 - keep.float().mean() < 0.4
    assert_same_values_and_grads(out, ref, [q, k, v])


# ----------------------------------------------------------------------------- Longformer

B, H, T, d = 2, 3, 37, 8


# name -> (window, dilation, static global positions, per-batch global positions, padding)
LONGFORMER_CASES = {
    "window": (4, 1, [], None, None),
    "dilation": (3, 2, [], None, None),
    "dilation_padding": (2, 3, [], None, ([37, 20], False)),
    "global": (3, 1, [0, 17], None, None),
    "global_dilation_per_batch_padding": (3, 2, [0], [[5, 30], [36]], ([37, 31], False)),
    "window_beyond_sequence": (64, 1, [2], None, ([37, 9], False)),
    "left_padding_empty_rows": (2, 1, [], None, ([37, 10], True)),
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", list(LONGFORMER_CASES))
def test_longformer_equals_dense_reference_fp32(name, causal):
    window, dilation, static, per_batch, pad = LONGFORMER_CASES[name]
    q, k, v, qg, kg, vg = (randn(B, H, T, d, seed=s) for s in range(6))
    pad_BS = None if pad is None else padding(pad[0], T, left=pad[1])
    extra = {}
    is_global = torch.zeros(B, T, dtype=torch.bool)
    is_global[:, static] = True
    if per_batch is not None:
        extra["global_mask_BT"] = torch.zeros(B, T, dtype=torch.bool)
        for b, positions in enumerate(per_batch):
            extra["global_mask_BT"][b, positions] = True
        is_global |= extra["global_mask_BT"]
    kernel = LongformerAttention(window, dilation, static)
    if is_global.any():
        extra.update(q_global=qg, k_global=kg, v_global=vg)
    out = kernel(q, k, v, causal=causal, key_padding_mask_BS=pad_BS, **extra)
    ref = longformer_reference(q, k, v, qg, kg, vg, window=window, dilation=dilation,
                               causal=causal, is_global_BT=is_global, pad_BS=pad_BS)
    assert out.shape == (B, H, T, d) and out.dtype == torch.float32
    assert_same_values_and_grads(out, ref, [q, k, v, qg, kg, vg])
    if name == "left_padding_empty_rows" and causal:  # rows before the first real key
        assert torch.equal(out[1, :, : T - 10], torch.zeros_like(out[1, :, : T - 10]))


def test_longformer_without_global_projections_uses_q_k_v_for_global_rows():
    q, k, v = (randn(1, 2, 20, 4, seed=s) for s in range(3))
    out = LongformerAttention(2, 1, [3])(q, k, v, causal=False)
    want = LongformerAttention(2, 1, [3])(q, k, v, causal=False, q_global=q, k_global=k,
                                          v_global=v)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    full = torch.softmax(q[0, :, 3:4] @ k[0].transpose(-1, -2) / 2.0, -1) @ v[0]  # global row
    torch.testing.assert_close(out[0, :, 3], full[:, 0], **TOL)


def test_longformer_input_errors():
    q = torch.randn(1, 2, 8, 4)
    kernel = LongformerAttention(2)
    with pytest.raises(ValueError, match="self-attention"):
        kernel(q, torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), causal=False)
    with pytest.raises(ValueError, match="no attn_bias"):
        kernel(q, q, q, causal=False, attn_bias=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="global_mask_BT must be bool"):
        kernel(q, q, q, causal=False, global_mask_BT=torch.ones(1, 8))
    with pytest.raises(ValueError, match=">= 1"):
        LongformerAttention(0)


# ----------------------------------------------------------------------------- Reformer / LSH


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("pad", [None, [24, 13]], ids=["no_padding", "padding"])
def test_lsh_one_bucket_one_chunk_is_full_shared_qk_attention(causal, pad):
    T_ = 24
    qk, v = randn(2, 3, T_, 8, seed=0), randn(2, 3, T_, 8, seed=1)
    pad_BS = None if pad is None else padding(pad, T_)
    kernel = LSHAttention(n_hashes=1, n_buckets=1, chunk_len=T_)
    out = kernel(qk, qk, v, causal=causal, key_padding_mask_BS=pad_BS)
    i, j = torch.arange(T_)[:, None], torch.arange(T_)[None, :]
    allowed = ((j <= i) if causal else torch.ones(T_, T_, dtype=torch.bool)).expand(2, 3, 1, T_,
                                                                                   T_)
    if pad_BS is not None:  # padding hashes to a bucket of its own: its queries see no key
        allowed = allowed & pad_BS[:, None, None, None, :] & pad_BS[:, None, None, :, None]
    ref = shared_qk_reference(qk, v, allowed_BRTT=allowed, self_TT=(i == j))
    if causal:  # position 0 has only itself: it attends to itself
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0], **TOL)
    else:  # and otherwise never: the diagonal has weight 0, so v[i] does not reach out[i]
        g = torch.autograd.grad(out[0, 0, 5].sum(), v, retain_graph=True)[0]
        assert torch.equal(g[0, 0, 5], torch.zeros(8))
    assert_same_values_and_grads(out, ref, [qk, v])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_lsh_equals_dense_reference_with_its_bucket_mask(causal):
    """Several buckets, rounds and chunks (T not a multiple of chunk_len): the kernel equals
    the dense softmax over the mask computed here from its bucket ids."""
    T_ = 45
    qk, v = randn(2, 2, T_, 8, seed=3), randn(2, 2, T_, 8, seed=4)
    pad_BS = padding([45, 38], T_)
    kernel = LSHAttention(n_hashes=3, n_buckets=4, chunk_len=8, hash_seed=11)
    out = kernel(qk, qk, v, causal=causal, key_padding_mask_BS=pad_BS)
    allowed = lsh_reference_mask(kernel, qk.detach(), causal=causal, pad_BS=pad_BS)
    i = torch.arange(T_)
    ref = shared_qk_reference(qk, v, allowed_BRTT=allowed, self_TT=(i[:, None] == i[None, :]))
    assert_same_values_and_grads(out, ref, [qk, v])
    assert 0.1 < allowed.float().mean() < 0.5  # a real restriction, not full attention


def test_lsh_determinism_under_seed():
    qk, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    fresh = LSHAttention(n_hashes=2, n_buckets=8, chunk_len=16)

    def run(kernel, seed):
        torch.manual_seed(seed)
        return kernel(qk, qk, v, causal=True)

    torch.testing.assert_close(run(fresh, 0), run(fresh, 0), atol=0, rtol=0)
    assert not torch.allclose(run(fresh, 0), run(fresh, 1))  # new rotations, other buckets
    fixed = LSHAttention(n_hashes=2, n_buckets=8, chunk_len=16, hash_seed=5)
    torch.testing.assert_close(run(fixed, 0), run(fixed, 1), atol=0, rtol=0)
    # the buckets are the angular LSH of the docstring: argmax over [x R, -x R] per round
    rot = fixed.rotations(8, qk.device)  # [d, R, n_buckets / 2]
    proj = torch.einsum("bhtd,drk->bhrtk", qk, rot)
    assert torch.equal(fixed.buckets(qk), torch.cat([proj, -proj], -1).argmax(-1))


def test_lsh_input_errors():
    qk = torch.randn(1, 2, 8, 4)
    kernel = LSHAttention(n_buckets=2, chunk_len=4)
    with pytest.raises(ValueError, match="shares queries and keys"):
        kernel(qk, qk.clone(), qk, causal=False)
    with pytest.raises(ValueError, match="no attn_bias"):
        kernel(qk, qk, qk, causal=False, attn_bias=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="1 or even"):
        LSHAttention(n_buckets=3)


# ----------------------------------------------------------------------------- both kernels

KERNELS = {
    "longformer": lambda: LongformerAttention(4, 2, [0, 9]),
    "reformer": lambda: LSHAttention(n_hashes=2, n_buckets=4, chunk_len=8, hash_seed=3),
}


@pytest.mark.parametrize("kind", list(KERNELS))
def test_causality_future_inputs_do_not_change_past_outputs(kind):
    """Changing q/k/v at positions >= t leaves outputs before t unchanged. For LSH the changed
    vectors hash to other buckets and move earlier positions to other places of the sorted
    sequence (and chunk), which may change the summation order: equal up to rounding, where a
    leak through chunk boundaries would change which keys are seen."""
    kernel, T_, t = KERNELS[kind](), 48, 20
    qk, v = torch.randn(2, 2, T_, 8), torch.randn(2, 2, T_, 8)
    out = kernel(qk, qk if kind == "reformer" else qk.flip(-1), v, causal=True)
    qk2, v2 = qk.clone(), v.clone()
    qk2[:, :, t:] = torch.randn(2, 2, T_ - t, 8)
    v2[:, :, t:] = torch.randn(2, 2, T_ - t, 8)
    out2 = kernel(qk2, qk2 if kind == "reformer" else qk2.flip(-1), v2, causal=True)
    torch.testing.assert_close(out[:, :, :t], out2[:, :, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, :, t:], out2[:, :, t:], atol=1e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("kind", list(KERNELS))
def test_memory_is_linear_no_tensor_is_T_by_T(kind):
    """Forward + backward at 1k and 4k tokens, with T5's relative position bias (evaluated on
    the scored pairs only): the largest tensor grows 4x (linear), and stays far below one
    [T, T] score matrix."""
    largest = {}
    rel = RelativePositionBias(2, bidirectional=False)
    for T_ in (1024, 4096):
        kernel = (LongformerAttention(16, 2, [0]) if kind == "longformer"
                  else LSHAttention(n_hashes=2, n_buckets=16, chunk_len=16))
        qk, v = randn(1, 2, T_, 8, seed=0), randn(1, 2, T_, 8, seed=1)
        with LargestTensor() as mode:
            out = kernel(qk, qk, v, causal=True, attn_bias=OffsetBias(rel.of_offsets))
            out.sum().backward()
        largest[T_] = mode.numel
        assert mode.numel < 2 * T_ * T_ / 8, (T_, mode.numel)  # 2 heads
    assert largest[4096] == pytest.approx(4 * largest[1024], rel=0.1)


# ----------------------------------------------------------------------------- reversible, FF


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, d_model=16, max_seq_len=64, dropout=0.0)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("kind", ["dense", "reformer"])
def test_reversible_gradients_equal_stored_activation_gradients(kind):
    """Same blocks, same input, same dropout and hashing draws: the reversible stack (inputs
    recomputed in backward) gives the gradients of ordinary autograd over the same two-stream
    function, for the input and every parameter."""
    torch.manual_seed(0)
    cfg = tiny_cfg(n_layer=3, dropout=0.1, attention=AttentionConfig(kind=kind, dropout=0.1),
                   reversible=True)
    model = build_model(cfg, 50).double().train()
    branches = [(partial(b.attn_branch, causal=True), b.mlp_branch) for b in model.h]
    x = torch.randn(2, 32, 16, dtype=torch.float64, requires_grad=True)
    params = [x, *model.h.parameters()]
    g = torch.randn(2, 32, 16, dtype=torch.float64)
    results = []
    for run in (reversible_sequence, residual_two_stream):
        torch.manual_seed(1)
        out = run(branches, x)
        # .backward: the reversible stack hands parameter gradients to .grad from inside its
        # backward (as reentrant checkpointing does), out of reach of autograd.grad(inputs=...)
        out.backward(g)
        results.append((out, [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert all(gr.abs().sum() > 0 for gr in grads)


def saved_activation_bytes(model, x, y) -> int:
    """Bytes the forward pass keeps for the backward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y).loss
    loss.backward()
    return total


def test_reversible_activation_memory_does_not_grow_with_depth():
    x = torch.randint(0, 50, (2, 64))
    saved = {}
    for reversible in (False, True):
        for n_layer in (2, 6):
            torch.manual_seed(0)
            model = build_model(tiny_cfg(n_layer=n_layer, reversible=reversible), 50)
            saved[reversible, n_layer] = saved_activation_bytes(model, x, x)
    assert saved[False, 6] > saved[False, 2] * 1.5  # ordinary residuals store every block
    assert saved[True, 6] == saved[True, 2]  # reversible: the same whatever the depth


def test_chunked_feed_forward_same_function_smaller_activations():
    torch.manual_seed(0)
    whole = FeedForward(16, 64, dropout=0.2)
    chunked = FeedForward(16, 64, dropout=0.2, chunk_size=8)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 40, 16, requires_grad=True)
    g = torch.randn(2, 40, 16)
    for ff in (whole, chunked):  # eval: identical values
        ff.eval()
    torch.testing.assert_close(chunked(x), whole(x), atol=1e-6, rtol=1e-6)
    chunked.train()
    torch.manual_seed(3)
    out = chunked(x)
    grads = torch.autograd.grad(out, [x, *chunked.parameters()], g)
    # reference: the same dropout draws, chunk by chunk, with ordinary autograd
    torch.manual_seed(3)
    ref = torch.cat([chunked._mlp(c) for c in x.split(8, dim=1)], dim=1)
    ref_grads = torch.autograd.grad(ref, [x, *chunked.parameters()], g)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    def saved(module):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x).sum().backward()
        return total

    whole.train()
    assert saved(chunked) < saved(whole) / 2  # no [B, T, d_ff] hidden kept


# ----------------------------------------------------------------------------- GPT and MHA


LONG_ATTENTION = {
    "longformer": AttentionConfig(kind="longformer", longformer=dict(
        window=[3, 5], dilation=[1, 2], global_positions=[0, 10])),
    "reformer": AttentionConfig(kind="reformer", reformer=dict(
        n_hashes=2, n_buckets=4, chunk_len=8, hash_seed=1)),
}


@pytest.mark.parametrize("kind", list(LONG_ATTENTION))
def test_gpt_with_long_attention_is_causal_and_trains(kind):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(attention=LONG_ATTENTION[kind]), 50)
    x = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    model.eval()
    logits = model(x).logits
    x2 = x.clone()
    x2[:, 25:] = (x2[:, 25:] + 7) % 50
    logits2 = model(x2).logits
    torch.testing.assert_close(logits[:, :25], logits2[:, :25], atol=1e-6, rtol=0)
    assert not torch.allclose(logits[:, 25:], logits2[:, 25:], atol=1e-2)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(x, x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_projections_follow_the_kernel():
    longformer = build_model(tiny_cfg(attention=LONG_ATTENTION["longformer"]), 50)
    names = {k for k in longformer.state_dict() if k.startswith("h.0.attn.")}
    assert {f"h.0.attn.{p}_proj.weight" for p in
            ("q", "k", "v", "o", "q_global", "k_global", "v_global")} <= names
    assert longformer.h[1].attn.kernel.window == 5 and longformer.h[1].attn.kernel.dilation == 2
    reformer = build_model(tiny_cfg(attention=LONG_ATTENTION["reformer"]), 50)
    attn = reformer.h[0].attn
    assert [p for p in ("q", "k", "qk", "v") if hasattr(attn, f"{p}_proj")] == ["qk", "v"]
    assert attn.head_projections() == [attn.qk_proj, attn.v_proj]
    dense = build_model(tiny_cfg(), 50)
    # flops: dense counts the sequence, long kernels their windows
    assert dense.flops_per_token(4096) > longformer.flops_per_token(4096)
    assert reformer.flops_per_token(4096) == reformer.flops_per_token(8192)


@pytest.mark.parametrize("kind", list(LONG_ATTENTION))
def test_head_sliced_modules_sum_to_the_whole(kind):
    """The tensor-parallel contract for long-context kernels: slicing every head projection
    (global ones and the shared qk included) gives modules whose outputs sum to the whole."""
    torch.manual_seed(0)
    D, n_head = 32, 4
    kernel = build_attention_kernel(LONG_ATTENTION[kind], layer=1)
    full = MultiHeadAttention(D, n_head, kernel=kernel).eval()
    x = torch.randn(2, 24, D)
    want = full(x, causal=True)
    total = torch.zeros_like(want)
    for shard in range(2):
        cols = slice(shard * D // 2, (shard + 1) * D // 2)
        part = MultiHeadAttention(D, n_head, kernel=kernel).eval()
        for name in full.projection_names:
            src, lin = getattr(full, f"{name}_proj"), nn.Linear(D, D // 2)
            lin.weight.data.copy_(src.weight[cols])
            lin.bias.data.copy_(src.bias[cols])
            setattr(part, f"{name}_proj", lin)
        part.o_proj = nn.Linear(D // 2, D)
        part.o_proj.weight.data.copy_(full.o_proj.weight[:, cols])
        part.o_proj.bias.data.copy_(full.o_proj.bias if shard == 0 else torch.zeros(D))
        total += part(x, causal=True)
    torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    """Longformer's custom autograd function under non-reentrant checkpointing (which drops
    and recomputes its saved tensors) gives the gradients of the plain model."""
    x = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(attention=LONG_ATTENTION["longformer"]), 50)
        if checkpointed:
            assert apply_activation_checkpointing(model) == 2
        model(x, x).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_reversible_chunked_gpt_trains():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(attention=LONG_ATTENTION["reformer"], reversible=True,
                                 ff_chunk_size=16), 50)
    assert isinstance(model, GPT)
    x = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(x, x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ----------------------------------------------------------------------------- config, export

LONG_PRESET = Path(__file__).resolve().parents[1] / "configs" / "gpt-long-8k.yaml"


def test_long_preset_builds_an_8k_model_that_takes_a_step():
    cfg = load_config(LONG_PRESET, world_size=2)
    assert cfg.data.seq_len == cfg.model.max_seq_len == 8192
    assert cfg.parallel.zero_stage == 2 and cfg.model.attention.kind == "longformer"
    torch.manual_seed(0)
    model = build_model(cfg.model, 512)
    assert [b.attn.kernel.window for b in model.h] == [64, 128]
    x = torch.randint(0, 512, (1, 8192))
    loss = model(x, x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_long_attention_config_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(LONG_PRESET, ["model.attention.longformer.window=[8,8,8]",
                                  "model.attention.longformer.global_positions=[0,9000,0]",
                                  "train.activation_checkpointing=true", "model.reversible=true"])
    text = str(info.value)
    assert "model.attention.longformer.window: lists 3 values but model.n_layer=2" in text
    assert "model.attention.longformer.global_positions: [9000] not below data.seq_len" in text
    assert "lists a position twice" in text
    assert "model.reversible: reversible layers already recompute" in text
    with pytest.raises(ConfigError, match="n_buckets: must be 1 or even"):
        load_config(LONG_PRESET, ["model.attention.kind=reformer",
                                  "model.attention.reformer.n_buckets=5"])
    with pytest.raises(ConfigError, match="model.attention.longformer.window"):
        load_config(LONG_PRESET, ["model.attention.longformer.window=0"])  # >= 1
    # settings of the kind not selected are not checked against the model
    load_config(LONG_PRESET, ["model.attention.kind=reformer",
                              "model.attention.longformer.window=[8,8,8]"])


def test_hf_export_refuses_long_attention_and_reversible_layers():
    model = build_model(tiny_cfg(attention=LONG_ATTENTION["reformer"], reversible=True), 50)
    with pytest.raises(ValueError) as info:
        gpt_to_hf_state_dict(model)
    assert "GPT2LMHeadModel" in str(info.value)
    assert "model.attention.kind='reformer'" in str(info.value)
    assert "model.reversible=true" in str(info.value)
    assert hf_export_problems(tiny_cfg(ff_chunk_size=4)) == []  # same function: exportable
