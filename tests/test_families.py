"""The shared blocks and the BERT and T5 families (GPT's own tests are in test_model.py):
norms, gated feed-forward and T5's relative position buckets against reference formulas,
pre/post-norm, padding and causality, the original-Transformer preset, sampling with and
without the KV cache, and that each family can fit a batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT

from pretrain.config import ModelConfig
from pretrain.generation import Sampling, fill_spans, generate_gpt
from pretrain.model import BERT, GPT, T5, build_model
from pretrain.model.attention import KVCache, MultiHeadAttention
from pretrain.model.blocks import build_block
from pretrain.model.layers import GatedFeedForward, RelativePositionBias, RMSNorm
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

V = 61


def preset(name: str, **overrides) -> ModelConfig:
    data = yaml.safe_load((ROOT / "configs" / "models" / f"{name}.yaml").read_text())["model"]
    data.pop("defaults", None)
    return ModelConfig(**{**data, "max_seq_len": 32, **overrides})


def model_of(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, V)


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- building blocks ---------------------------------------------------------------------------
def test_rmsnorm_and_gated_feed_forward_formulas():
    x = torch.randn(2, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)
    ff = GatedFeedForward(16, 24, bias=False, activation="gelu_tanh")
    want = ff.c_proj(F.gelu(ff.c_gate(x), approximate="tanh") * ff.c_fc(x))
    torch.testing.assert_close(ff(x), want)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_equal_mesh_tensorflow(bidirectional):
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    bias = RelativePositionBias(4, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    rel = torch.arange(-300, 301)[None, :]
    want = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional,
                                                 num_buckets=32, max_distance=128)
    assert torch.equal(bias.bucket(rel), want)
    out = bias(5, 7, offset=2)  # queries 2..6 over keys 0..6
    assert out.shape == (1, 4, 5, 7)
    torch.testing.assert_close(out[0, :, 1, 3], bias.relative_attention_bias.weight[
        bias.bucket(torch.tensor(0))])  # query 3, key 3: distance 0


def test_pre_and_post_norm_blocks():
    x = torch.randn(2, 6, 32)
    for position in ("pre", "post"):
        torch.manual_seed(0)
        block = build_block(ModelConfig(d_model=32, n_head=4, norm_position=position)).eval()
        h = block.attn(block.ln_1(x) if position == "pre" else x, causal=False)
        if position == "pre":
            h = x + h
            want = h + block.mlp(block.ln_2(h))
        else:
            h = block.ln_1(x + h)
            want = block.ln_2(h + block.mlp(h))
        torch.testing.assert_close(block(x, causal=False), want)


def test_unscaled_attention_is_softmax_of_plain_dot_products():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2, bias=False, scale_scores=False).eval()
    x = torch.randn(1, 5, 16)
    q, k, v = (p(x).view(1, 5, 2, 8).transpose(1, 2) for p in
               (attn.q_proj, attn.k_proj, attn.v_proj))
    out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
    want = attn.o_proj(out.transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(attn(x, causal=False), want, atol=1e-5, rtol=1e-5)


# ---- BERT ----------------------------------------------------------------------------------------
def test_bert_padding_does_not_change_real_positions():
    model = model_of(preset("bert-tiny")).eval()
    x = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    out = model(x, attention_mask=mask).logits
    alone = model(x[1:, :7]).logits  # the second row without its padding
    torch.testing.assert_close(out[1, :7], alone[0], atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[1, 7:] = (x2[1, 7:] + 1) % V  # other padding tokens: same real outputs
    torch.testing.assert_close(model(x2, attention_mask=mask).logits[1, :7], out[1, :7])


def test_bert_loss_metrics_and_head_on_predicted_rows_only():
    model = model_of(preset("bert-tiny"))
    x = ids(3, 16)
    labels = torch.full_like(x, -100)
    labels[:, [2, 5, 9]] = ids(3, 3, seed=1)
    sentence = torch.tensor([0, 1, 1])
    out = model(x, labels, sentence_labels=sentence)
    full = model(x, labels, sentence_labels=sentence, return_logits=True)
    torch.testing.assert_close(out.loss, full.loss)
    chosen = labels != -100
    mlm = F.cross_entropy(full.logits[chosen], labels[chosen])
    sop = F.cross_entropy(full.sentence_logits, sentence)
    torch.testing.assert_close(out.loss, mlm + sop)
    assert out.n_targets.item() == 9
    acc = (full.logits[chosen].argmax(-1) == labels[chosen]).float().mean()
    torch.testing.assert_close(out.metrics["mlm_accuracy"], acc)
    assert set(out.metrics) == {"mlm_loss", "mlm_accuracy", "sop_loss", "sop_accuracy"}
    out.loss.backward()
    assert model.embeddings.wte.weight is model.mlm_head.decoder.weight  # tied
    assert all(p.grad is not None for p in model.parameters())


# ---- T5 and the original Transformer -------------------------------------------------------------
@pytest.mark.parametrize("name", ["t5-tiny", "transformer-base"])
def test_encoder_decoder_causality_and_padding(name):
    overrides = dict(n_layer=2, n_decoder_layer=1, d_model=32, d_ff=64, n_head=4, dropout=0.0,
                     attention={"dropout": 0.0}) if name == "transformer-base" else {}
    model = model_of(preset(name, **overrides)).eval()
    assert isinstance(model, T5)
    x, y = ids(2, 10), ids(2, 6, seed=1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    logits = model(x, decoder_input_ids=y, attention_mask=mask).logits
    y2 = y.clone()
    y2[:, 3] = (y2[:, 3] + 1) % V  # a later decoder token does not change earlier logits
    later = model(x, decoder_input_ids=y2, attention_mask=mask).logits
    torch.testing.assert_close(later[:, :3], logits[:, :3], atol=0, rtol=0)
    assert not torch.allclose(later[:, 3:], logits[:, 3:])
    x2 = x.clone()
    x2[0, 6:] = (x2[0, 6:] + 1) % V  # encoder padding is never attended to
    torch.testing.assert_close(model(x2, decoder_input_ids=y, attention_mask=mask).logits[0],
                               logits[0], atol=1e-5, rtol=1e-5)


def test_t5_init_and_the_transformer_preset_shape():
    cfg = preset("t5-tiny", d_model=256, d_ff=512, n_head=4)
    model = model_of(cfg)
    blk = model.encoder.h[0]
    assert model.shared.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert blk.attn.q_proj.weight.std().item() == pytest.approx((256 * 64) ** -0.5, rel=0.05)
    assert blk.attn.k_proj.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(512**-0.5, rel=0.05)
    assert model.decoder.rel_bias is not None and not model.decoder.rel_bias.bidirectional
    assert all(p.dim() == 2 or "ln" in n for n, p in model.named_parameters())  # no biases

    vaswani = ModelConfig(**yaml.safe_load(
        (ROOT / "configs/models/transformer-base.yaml").read_text())["model"])
    with torch.device("meta"):
        big = build_model(vaswani, 37000)
    assert big.encoder.rel_bias is None and isinstance(big.encoder.ln_f, torch.nn.Identity)
    assert not big.encoder.h[0].pre_norm and big.encoder.h[0].attn.scale_scores
    # 6 + 6 blocks of width 512: 44M parameters plus the 37000 x 512 shared embedding
    # (Vaswani et al. report 65M for base with this vocabulary)
    assert big.num_params(non_embedding=False) == pytest.approx(63e6, rel=0.02)


@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny"])
def test_family_fits_a_fixed_batch(name):
    model = model_of(preset(name, d_model=32, d_ff=64))
    x, y = ids(4, 16), ids(4, 8, seed=1)
    if name == "bert-tiny":
        labels = torch.full_like(x, -100)
        labels[:, ::3] = x[:, ::3]
        x = x.masked_fill(labels != -100, 4)
        kwargs = dict(labels=labels, sentence_labels=torch.tensor([0, 1, 0, 1]))
    else:
        kwargs = dict(labels=y, decoder_input_ids=torch.cat([torch.zeros(4, 1).long(),
                                                              y[:, :-1]], 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(30):
        loss = model(x, **kwargs).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first, (first, loss.item())


@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny"])
def test_activation_checkpointing_wraps_every_stack(name):
    """Recomputed blocks give the loss and gradients of stored ones (dropout included)."""
    cfg = preset(name, dropout=0.1)
    x, y = ids(2, 12), ids(2, 12, seed=1)
    kwargs = dict(decoder_input_ids=x) if name == "t5-tiny" else {}
    results = []
    for checkpointing in (False, True):
        model = model_of(cfg)
        if checkpointing:
            n = apply_activation_checkpointing(model)
            assert n == (4 if name == "t5-tiny" else 2)  # encoder (+ decoder) blocks
        torch.manual_seed(5)
        loss = model(x, y, **kwargs).loss
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1]) > 10
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# ---- generation ----------------------------------------------------------------------------------
def test_gpt_kv_cache_gives_the_tokens_of_full_recomputation():
    model = model_of(ModelConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=32)).eval()
    assert isinstance(model, GPT)
    x = ids(1, 20)
    caches = [KVCache() for _ in model.h]
    full = model(x).logits
    step1 = model(x[:, :12], kv_caches=caches).logits
    step2 = model(x[:, 12:], kv_caches=caches).logits
    torch.testing.assert_close(torch.cat([step1, step2], 1), full, atol=1e-5, rtol=1e-5)
    prompt = x[0, :5].tolist()
    for sampling in (dict(temperature=0.0), dict(temperature=0.9, top_k=10, top_p=0.9)):
        a = generate_gpt(model, prompt, max_new_tokens=20, eos_id=None,
                         sampling=Sampling(**sampling, seed=1))
        b = generate_gpt(model, prompt, max_new_tokens=20, eos_id=None,
                         sampling=Sampling(**sampling, seed=1), use_cache=False)
        assert a == b and len(a) == 20


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = Sampling(top_k=2).filtered_logits(logits).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = Sampling(top_p=0.8).filtered_logits(logits).isfinite()[0].tolist()
    assert kept == [True, True, False, False, False] and p[0] < 0.8 < p[0] + p[1]
    draws = torch.stack([Sampling(temperature=1.0, seed=s)(logits) for s in range(2000)])
    assert (draws == 0).float().mean().item() == pytest.approx(p[0].item(), abs=0.04)
    assert fill_spans([7, 100, 8, 101], [100, 1, 2, 101, 3], [100, 101]) == [7, 1, 2, 8, 3]


def test_flops_per_token():
    bert = model_of(preset("bert-tiny"))
    assert isinstance(bert, BERT)
    D, L = 64, 2
    assert bert.flops_per_token(32) == 6 * bert.num_params() + 12 * L * D * 32
    assert math.isfinite(model_of(preset("t5-tiny")).flops_per_token(32))
