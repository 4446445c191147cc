"""Long-context kernels inside the families: BERT with Longformer and a global [CLS], T5's
encoder with Longformer or LSH attention and its relative position bias (the OffsetBias hook),
reversible T5 stacks, Hugging Face export refusals, the long BERT preset.

The references are the same models with every long kernel swapped for a dense one that applies
the equivalent [T, T] mask and the bias evaluated on the full grid: values and gradients of
every parameter must agree (fp32, 1e-5)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from long_attention_refs import (
    TOL,
    assert_same_values_and_grads,
    longformer_reference,
    lsh_reference_mask,
    padding,
    randn,
    shared_qk_reference,
)

from pretrain.config import AttentionConfig, ModelConfig
from pretrain.config_io import load_config
from pretrain.model import BERT, T5, LongformerAttention, LSHAttention, OffsetBias, build_model
from pretrain.model import blocks as blocks_module
from pretrain.model.attention import AttentionKernel, DenseAttention
from pretrain.model.hf_bert import hf_config as bert_hf_config
from pretrain.model.hf_bert import to_hf_state_dict as bert_to_hf
from pretrain.model.hf_t5 import to_hf_state_dict as t5_to_hf
from pretrain.model.layers import RelativePositionBias
from pretrain.model.reversible import residual_two_stream

# ----------------------------------------------------------------------------- dense references


class LongformerDense(AttentionKernel):
    """A LongformerAttention's function computed densely (tests/long_attention_refs.py): the
    same projections, the equivalent mask, an OffsetBias evaluated on the whole [T, T] grid."""

    scores_all_pairs = False

    def __init__(self, kernel: LongformerAttention) -> None:
        super().__init__()
        self.projections = kernel.projections
        self.window, self.dilation = kernel.window, kernel.dilation
        self.global_positions = kernel.global_positions

    def forward(self, q, k, v, *, causal, key_padding_mask_BS=None, attn_bias=None,
                dropout_p=0.0, scale=None, q_global=None, k_global=None, v_global=None):
        B, _, T, _ = q.shape
        is_global = torch.zeros(B, T, dtype=torch.bool)
        is_global[:, [p for p in self.global_positions if p < T]] = True
        bias = attn_bias.dense(T, T, q.device) if attn_bias is not None else None
        glob = [t if t is not None else d for t, d in ((q_global, q), (k_global, k), (v_global, v))]
        return longformer_reference(q, k, v, *glob, window=self.window, dilation=self.dilation,
                                    causal=causal, is_global_BT=is_global,
                                    pad_BS=key_padding_mask_BS, bias=bias, scale=scale)


class LSHDense(AttentionKernel):
    """An LSHAttention's function computed densely over the mask its own buckets give."""

    projections = LSHAttention.projections
    scores_all_pairs = False

    def __init__(self, kernel: LSHAttention) -> None:
        super().__init__()
        self.lsh = kernel

    def forward(self, q, k, v, *, causal, key_padding_mask_BS=None, attn_bias=None,
                dropout_p=0.0, scale=None):
        T, d = q.size(2), q.size(3)
        allowed = lsh_reference_mask(self.lsh, q.detach(), causal=causal,
                                     pad_BS=key_padding_mask_BS)
        bias = attn_bias.dense(T, T, q.device) if attn_bias is not None else None
        i = torch.arange(T)
        return shared_qk_reference(q, v, allowed_BRTT=allowed, self_TT=i[:, None] == i[None, :],
                                   bias=bias, factor=1.0 if scale is None else scale * math.sqrt(d))


DENSE_REFERENCE = {LongformerAttention: LongformerDense, LSHAttention: LSHDense}


def dense_reference_of(model):
    """A copy of `model` whose long kernels are their dense references."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        kernel = getattr(module, "kernel", None)
        if type(kernel) in DENSE_REFERENCE:
            module.kernel = DENSE_REFERENCE[type(kernel)](kernel)
    return ref


def assert_same_loss_and_grads(model, ref, **batch):
    losses, grads = [], []
    for m in (model, ref):
        m.zero_grad()
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads[1][name], **TOL, msg=lambda m: f"{name}: {m}")
    return grads[0]


# ----------------------------------------------------------------------------- kernels + bias

B, H, T, d = 2, 3, 37, 8


def relative_bias(causal: bool, seed: int = 9) -> RelativePositionBias:
    """T5's bias with few buckets, so that exact and log-spaced buckets both occur."""
    torch.manual_seed(seed)
    rel = RelativePositionBias(H, bidirectional=not causal, num_buckets=8, max_distance=20)
    torch.nn.init.normal_(rel.relative_attention_bias.weight)
    return rel


def test_offset_bias_is_the_relative_bias_table():
    rel = relative_bias(causal=False)
    bias = OffsetBias(rel.of_offsets)
    torch.testing.assert_close(bias.dense(T, T, torch.device("cpu")), rel(T, T), atol=0, rtol=0)
    # with a KV cache: queries are the last T of S positions
    torch.testing.assert_close(bias.dense(5, T, torch.device("cpu")), rel(5, T, offset=T - 5),
                               atol=0, rtol=0)
    per_head = torch.randint(-30, 30, (H, 4, 6))  # offsets of every head: head h's own column
    want = torch.stack([rel.relative_attention_bias(rel.bucket(per_head[h]))[..., h]
                        for h in range(H)])
    torch.testing.assert_close(rel.of_offsets(per_head), want, atol=0, rtol=0)


@pytest.mark.parametrize("causal, scale", [(False, 1.0), (True, None)],
                         ids=["bidirectional_unscaled", "causal"])
def test_longformer_with_relative_bias_equals_dense_reference(causal, scale):
    """Window, dilation, static and per-batch global positions, padding, T5's bias and T5's
    unscaled scores: values and gradients (q, k, v, the global projections, the bias table)."""
    rel = relative_bias(causal)
    q, k, v, qg, kg, vg = (randn(B, H, T, d, seed=s) for s in range(6))
    pad_BS = padding([37, 31], T)
    per_batch = torch.zeros(B, T, dtype=torch.bool)
    per_batch[0, [5, 30]] = True
    kernel = LongformerAttention(3, 2, [0])
    out = kernel(q, k, v, causal=causal, key_padding_mask_BS=pad_BS, scale=scale,
                 attn_bias=OffsetBias(rel.of_offsets), global_mask_BT=per_batch,
                 q_global=qg, k_global=kg, v_global=vg)
    is_global = per_batch.clone()
    is_global[:, 0] = True
    ref = longformer_reference(q, k, v, qg, kg, vg, window=3, dilation=2, causal=causal,
                               is_global_BT=is_global, pad_BS=pad_BS, bias=rel(T, T), scale=scale)
    table = rel.relative_attention_bias.weight
    assert_same_values_and_grads(out, ref, [q, k, v, qg, kg, vg, table])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_lsh_with_relative_bias_equals_dense_reference(causal):
    """Several rounds, buckets and chunks, padding, T5's bias evaluated at each chunk's pairs from
    their original positions, unscaled scores: values and gradients (qk, v, the bias table)."""
    T_ = 45
    rel = relative_bias(causal)
    qk, v = randn(2, H, T_, 8, seed=3), randn(2, H, T_, 8, seed=4)
    pad_BS = padding([45, 38], T_)
    kernel = LSHAttention(n_hashes=3, n_buckets=4, chunk_len=8, hash_seed=11)
    out = kernel(qk, qk, v, causal=causal, key_padding_mask_BS=pad_BS, scale=1.0,
                 attn_bias=OffsetBias(rel.of_offsets))
    allowed = lsh_reference_mask(kernel, qk.detach(), causal=causal, pad_BS=pad_BS)
    i = torch.arange(T_)
    ref = shared_qk_reference(qk, v, allowed_BRTT=allowed, self_TT=i[:, None] == i[None, :],
                              bias=rel(T_, T_), factor=math.sqrt(8))
    assert_same_values_and_grads(out, ref, [qk, v, rel.relative_attention_bias.weight])


def test_long_kernels_refuse_a_bias_tensor_and_dense_takes_both():
    q = torch.randn(1, 2, 8, 4)
    rel = RelativePositionBias(2, bidirectional=True, num_buckets=8, max_distance=16)
    for kernel in (LongformerAttention(2), LSHAttention(n_buckets=2, chunk_len=4)):
        with pytest.raises(ValueError, match="Pass the bias as an OffsetBias"):
            kernel(q, q, q, causal=False, attn_bias=rel(8, 8))
    dense = DenseAttention()
    k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    torch.testing.assert_close(dense(q, k, v, causal=True, attn_bias=OffsetBias(rel.of_offsets)),
                               dense(q, k, v, causal=True, attn_bias=rel(8, 8)))


# ----------------------------------------------------------------------------- in the families

BERT_LONG = dict(family="bert", n_layer=2, n_head=2, d_model=16, max_seq_len=64,
                 norm_position="post", activation="gelu", sentence_head="sop", dropout=0.0,
                 attention=AttentionConfig(kind="longformer", longformer=dict(
                     window=[3, 5], dilation=[1, 2], global_positions=[0])))
T5_BASE = dict(family="t5", n_layer=2, n_decoder_layer=1, n_head=2, d_model=16, max_seq_len=64,
               positions="relative", relative_buckets=8, relative_max_distance=20,
               norm="rmsnorm", bias=False, scale_attn_scores=False, activation="relu",
               dropout=0.0)
T5_ATTENTION = {
    "longformer": AttentionConfig(kind="longformer", longformer=dict(
        window=[3, 4], dilation=[1, 2], global_positions=[0])),
    "reformer": AttentionConfig(kind="reformer", reformer=dict(
        n_hashes=2, n_buckets=4, chunk_len=8, hash_seed=5)),
}


def ids(seed, *shape, vocab=50):
    return torch.randint(4, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_bert_longformer_with_global_cls_equals_dense_reference():
    """Bidirectional windows per layer, [CLS] global (its own projections), padding: the masked
    LM and sentence-order losses and every gradient equal the dense reference."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**BERT_LONG), 50)
    assert isinstance(model, BERT)
    kernels = [b.attn.kernel for b in model.encoder.h]
    assert [(k.window, k.dilation, k.global_positions) for k in kernels] == [(3, 1, (0,)),
                                                                             (5, 2, (0,))]
    x = ids(0, 2, 40)
    mask = padding([40, 29], 40).long()
    labels = torch.full_like(x, -100)
    labels[:, 3::4] = x[:, 3::4]
    batch = dict(input_ids=x, labels=labels, attention_mask=mask,
                 token_type_ids=(torch.arange(40) >= 20).long().expand(2, -1),
                 sentence_labels=torch.tensor([0, 1]))
    grads = assert_same_loss_and_grads(model, dense_reference_of(model), **batch)
    assert grads["encoder.h.0.attn.q_global_proj.weight"].abs().sum() > 0

    # [CLS] is global: with one layer, its output depends on the last token, a token in the
    # middle does not (beyond its window), and every token depends on [CLS].
    one = build_model(ModelConfig(**{**BERT_LONG, "n_layer": 1, "attention": AttentionConfig(
        kind="longformer", longformer=dict(window=3, global_positions=[0]))}), 50).eval()
    emb = one.embeddings(x[:1]).detach().requires_grad_(True)
    out = one.encoder(emb)
    w = torch.randn(16)  # not a plain sum: that of a LayerNorm's output is constant

    def reach(row):  # [T, D]: d (output at row) / d (input everywhere)
        return torch.autograd.grad(out[0, row] @ w, emb, retain_graph=True)[0][0]

    assert reach(0)[39].abs().sum() > 0 and reach(20)[39].abs().sum() == 0
    assert reach(20)[0].abs().sum() > 0 and reach(20)[23].abs().sum() > 0  # bidirectional


@pytest.mark.parametrize("kind", list(T5_ATTENTION))
def test_t5_long_encoder_with_relative_bias_equals_dense_reference(kind):
    """The encoder runs the long kernel with T5's relative bias (an OffsetBias), the decoder and
    cross-attention stay dense: loss and every gradient, the bias tables included, equal the
    model whose encoder kernels are dense with the equivalent mask and the same bias."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**T5_BASE, attention=T5_ATTENTION[kind]), 50)
    assert isinstance(model, T5) and not model.encoder.dense_bias and model.decoder.dense_bias
    assert all(type(b.attn.kernel) is DenseAttention for b in model.decoder.h)
    x, y = ids(1, 2, 33), ids(2, 2, 9)
    batch = dict(input_ids=x, labels=y, decoder_input_ids=torch.roll(y, 1, dims=1),
                 attention_mask=padding([33, 26], 33).long())
    grads = assert_same_loss_and_grads(model, dense_reference_of(model), **batch)
    assert grads["encoder.rel_bias.relative_attention_bias.weight"].abs().sum() > 0
    assert grads["decoder.rel_bias.relative_attention_bias.weight"].abs().sum() > 0


@pytest.mark.parametrize("kind", ["dense", "longformer"])
def test_reversible_t5_gradients_equal_stored_activation_gradients(kind, monkeypatch):
    """Reversible encoder and decoder: the decoder's cross-attention reads the encoder output
    and the stacks read their relative bias (a tensor for dense kernels, an OffsetBias for
    Longformer). Every gradient equals ordinary autograd over the same two-stream function,
    with dropout drawn identically (replayed in the reversible backward)."""
    attention = T5_ATTENTION.get(kind, AttentionConfig())
    cfg = ModelConfig(**{**T5_BASE, "dropout": 0.1}, attention=attention, reversible=True)
    torch.manual_seed(0)
    model = build_model(cfg, 50).double().train()
    x, y = ids(1, 2, 20), ids(2, 2, 7)
    batch = dict(input_ids=x, labels=y, decoder_input_ids=torch.roll(y, 1, dims=1))
    results = []
    for reference in (False, True):
        if reference:  # the same branches with ordinary autograd
            monkeypatch.setattr(blocks_module, "reversible_sequence", residual_two_stream)
        model.zero_grad()
        torch.manual_seed(1)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-10, rtol=1e-8,
                                   msg=lambda m: f"{name}: {m}")
    for stack in ("encoder", "decoder"):  # aux inputs got their gradients back
        assert grads[f"{stack}.rel_bias.relative_attention_bias.weight"].abs().sum() > 0
    assert grads["encoder.h.0.attn.o_proj.weight"].abs().sum() > 0  # through the cross-attention


def test_hf_export_of_bert_and_t5_with_long_kernels_is_refused():
    bert = build_model(ModelConfig(**BERT_LONG), 50)
    for export in (bert_to_hf, lambda m: bert_hf_config(m, pad_token_id=0)):
        with pytest.raises(ValueError, match=r"BertForPreTraining cannot express .*"
                                             r"model.attention.kind='longformer'"):
            export(bert)
    t5 = build_model(ModelConfig(**T5_BASE, attention=T5_ATTENTION["reformer"], reversible=True),
                     50)
    with pytest.raises(ValueError) as info:
        t5_to_hf(t5)
    text = str(info.value)
    assert "T5ForConditionalGeneration" in text and "model.attention.kind='reformer'" in text
    assert "model.reversible=true" in text


LONG_BERT = Path(__file__).resolve().parents[1] / "configs" / "bert-long-4k.yaml"


def test_long_bert_preset_builds_a_4k_model_that_takes_a_step():
    cfg = load_config(LONG_BERT, world_size=2)
    assert cfg.data.seq_len == cfg.model.max_seq_len == 4096
    assert cfg.model.family == "bert" and cfg.parallel.zero_stage == 2
    torch.manual_seed(0)
    model = build_model(cfg.model, 512)
    assert [(b.attn.kernel.window, b.attn.kernel.global_positions) for b in model.encoder.h] == [
        (64, (0,)), (128, (0,))]
    x = ids(3, 1, 4096, vocab=512)
    labels = torch.full_like(x, -100)
    labels[:, 1::7] = x[:, 1::7]
    out = model(x, labels, sentence_labels=torch.tensor([1]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters())
