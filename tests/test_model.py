"""GPT: shapes, causality, positions, tying, init, loss, FLOPs, training, HF GPT-2 parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model import GPT, ModelOutput, build_model
from pretrain.model.flops import model_flops_utilization, transformer_flops_per_token
from pretrain.model.layers import LMCrossEntropy, lm_cross_entropy, lm_head_cross_entropy

V = 61  # odd on purpose: nothing may assume a padded vocabulary


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=16, dropout=0.0)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, vocab: int = V, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(**overrides), vocab)
    assert isinstance(model, GPT)
    return model


def tokens(B: int, T: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forward_backward_shapes():
    model = tiny_model()
    x, y = tokens(3, 16), tokens(3, 16, seed=1)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 16, V) and out.loss is None and out.n_targets is None

    out = model(x, y)
    assert out.logits is None
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.n_targets.item() == 3 * 16
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    out = model(x, y, return_logits=True)
    assert out.logits.shape == (3, 16, V)
    ref = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_low_precision_logits_fp32_loss():
    model = tiny_model().to(torch.bfloat16)
    out = model(tokens(2, 8), tokens(2, 8, seed=1), return_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32


def test_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(tokens(1, 8)[0])
    with pytest.raises(ValueError, match="targets have shape"):
        model(tokens(2, 8), tokens(2, 7))
    with pytest.raises(ValueError, match="must divide"):
        GPT(ModelConfig(n_head=3, d_model=32), V)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_causality_of_logits_and_gradients(positions):
    model = tiny_model(positions=positions).eval()
    x = tokens(2, 12)
    t = 5
    logits = model(x).logits
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % V
    logits2 = model(x2).logits
    torch.testing.assert_close(logits2[:, :t], logits[:, :t], atol=0, rtol=0)
    assert not torch.allclose(logits2[:, t:], logits[:, t:])

    # d loss(position t) / d embedding(position s) is zero exactly for s > t, nonzero for s <= t.
    captured = {}

    def keep(_module, _inputs, emb):
        emb.retain_grad()
        captured["emb"] = emb

    handle = model.wte.register_forward_hook(keep)
    y = torch.full_like(x, -100)
    y[:, t] = tokens(2, 12, seed=1)[:, t]
    model(x, y).loss.backward()
    handle.remove()
    g = captured["emb"].grad  # [B, T, D]
    assert torch.equal(g[:, t + 1 :], torch.zeros_like(g[:, t + 1 :]))
    assert (g[:, : t + 1].abs().sum(-1) > 0).all()


def test_positions_learned_vs_sinusoidal():
    learned = tiny_model(positions="learned")
    assert learned.wpe.weight.shape == (16, 32) and learned.wpe.weight.requires_grad
    assert "wpe.weight" in learned.state_dict()

    sin = tiny_model(positions="sinusoidal")
    assert not any(name.startswith("wpe") for name, _ in sin.named_parameters())
    assert not any(key.startswith("wpe") for key in sin.state_dict())  # recomputed, not saved
    table = sin.wpe(16)
    D = 32
    for p, i in [(0, 0), (3, 0), (7, 5), (15, 15), (9, 30)]:
        freq = 10000 ** (-(2 * (i // 2)) / D)
        want = math.sin(p * freq) if i % 2 == 0 else math.cos(p * freq)
        assert table[p, i].item() == pytest.approx(want, abs=1e-6)

    # Positions are really added: a sequence of one repeated token would otherwise give the
    # same hidden state (hence logits) at every position under causal attention.
    for model in (learned, sin):
        logits = model(torch.full((1, 10), 7)).logits[0]
        assert not torch.allclose(logits[0], logits[9], atol=1e-4)


def test_tied_embeddings_are_one_parameter():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.wte.weight
    assert sum(p is model.wte.weight for p in model.parameters()) == 1  # listed once
    x, y = tokens(2, 8), tokens(2, 8, seed=1)
    model(x, y).loss.backward()

    # The same weights untied: the tied gradient is the sum of both uses' gradients.
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    state = model.state_dict()
    untied.load_state_dict(state)  # lm_head.weight is in the tied state dict too
    untied(x, y).loss.backward()
    torch.testing.assert_close(
        model.wte.weight.grad, untied.wte.weight.grad + untied.lm_head.weight.grad
    )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.step()
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    extra = V * 32
    assert untied.num_params(non_embedding=False) == model.num_params(non_embedding=False) + extra


def test_init_statistics():
    L, D = 4, 256
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=L, n_head=8, d_model=D, max_seq_len=256, init_std=0.02), 1000)
    resid = 0.02 / math.sqrt(2 * L)
    for block in model.h:
        for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.c_fc):
            assert lin.weight.std().item() == pytest.approx(0.02, rel=0.03)
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        for lin in (block.attn.o_proj, block.mlp.c_proj):
            assert lin.weight.std().item() == pytest.approx(resid, rel=0.03)
            assert lin.weight.mean().abs().item() < resid * 0.02
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        for ln in (block.ln_1, block.ln_2):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight))
            assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.03)

    torch.manual_seed(0)
    wide = GPT(ModelConfig(n_layer=L, d_model=D, init_std=0.05, bias=False), 1000)
    assert wide.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.05, rel=0.03)
    assert wide.h[0].mlp.c_fc.bias is None and wide.ln_f.bias is None


def test_loss_at_init_is_log_vocab():
    vocab = 1000
    model = tiny_model(vocab=vocab, d_model=64).eval()
    loss = model(tokens(8, 16, vocab), tokens(8, 16, vocab, seed=1)).loss.item()
    assert abs(loss - math.log(vocab)) < 0.1


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_embeddings=False, d_ff=40), dict(positions="sinusoidal", bias=False)],
)
def test_num_params_and_flops_per_token(overrides):
    model = tiny_model(**overrides)
    cfg = model.cfg
    D, L, H = cfg.d_model, cfg.n_layer, cfg.n_head
    Fw = cfg.d_ff or 4 * D
    b = 1 if cfg.bias else 0
    per_layer = (4 * D * D + 4 * D * b) + (2 * D * Fw + (Fw + D) * b) + 2 * (D + D * b)
    non_embedding = L * per_layer + (D + D * b)  # blocks + ln_f
    assert model.num_params(non_embedding=True) == non_embedding

    embedding = V * D
    if cfg.positions == "learned":
        embedding += cfg.max_seq_len * D
    if not cfg.tie_embeddings:
        embedding += V * D
    assert model.num_params(non_embedding=False) == non_embedding + embedding
    assert model.num_params(non_embedding=False) == len(
        torch.cat([p.flatten() for p in model.parameters()])
    )

    T = 12
    want = 6 * non_embedding + 12 * L * H * (D // H) * T
    assert model.flops_per_token(T) == want
    assert transformer_flops_per_token(
        n_params=non_embedding, n_layer=L, n_head=H, head_dim=D // H, seq_len=T
    ) == want


def test_mfu():
    assert model_flops_utilization(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        model_flops_utilization(1.0, 1.0, 0.0)


def test_tiny_model_overfits_fixed_batch():
    model = tiny_model(vocab=32, n_layer=2, d_model=64, max_seq_len=16)
    x, y = tokens(4, 16, vocab=32), tokens(4, 16, vocab=32, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = model(x, y).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model(x, y).loss.item()
    assert first == pytest.approx(math.log(32), abs=0.2)
    assert last < 0.25, (first, last)  # from ln(32) = 3.47


def test_ignore_index():
    model = tiny_model().eval()
    x, y = tokens(2, 10), tokens(2, 10, seed=1)
    logits = model(x).logits
    keep = torch.rand(2, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    for ignore in (-100, 1):  # the default, and e.g. a pad token id
        y_masked = torch.where(keep, y, torch.full_like(y, ignore))
        keep_eff = y_masked != ignore  # with ignore=1, real targets equal to 1 drop out too
        out = model(x, y_masked, ignore_index=ignore)
        want = F.cross_entropy(logits[keep_eff], y_masked[keep_eff])
        torch.testing.assert_close(out.loss, want)
        assert out.n_targets.item() == keep_eff.sum().item()

    out = model(x, torch.full_like(y, -100))
    assert out.loss.item() == 0.0 and out.n_targets.item() == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.2, attention={"dropout": 0.2})
    x = tokens(2, 12)
    model.eval()
    torch.testing.assert_close(model(x).logits, model(x).logits, atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # the GPT-2 layout: learned positions, tied, biases
        dict(positions="sinusoidal", tie_embeddings=False, bias=False, d_ff=48),
    ],
)
def test_logits_match_hf_gpt2(overrides):
    pytest.importorskip("transformers")
    from pretrain.model.hf_gpt2 import gpt_to_hf, gpt_to_hf_state_dict

    model = tiny_model(**overrides).eval()
    with torch.no_grad():  # move biases and norms off their trivial init so they are tested
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf = gpt_to_hf(model)
    assert hf.config.activation_function == "gelu_new"
    sd = gpt_to_hf_state_dict(model)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 3 * 32)
    if model.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    x = tokens(3, 16)
    with torch.no_grad():
        ours = model(x).logits
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_build_model_unknown_family():
    with pytest.raises(ValueError, match="not implemented"):
        build_model(ModelConfig.model_construct(family="xlnet"), V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_cross_entropy_matches_torch(dtype):
    """lm_cross_entropy prepares its gradient in forward (layers.SummedCrossEntropy): loss and
    gradient must be those of autograd through F.cross_entropy on the fp32 logits, in the
    logits' dtype, with ignored targets contributing nothing, and a retained graph must give
    the same gradient twice."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g) * 5).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[0, :3] = -100
    targets[2, 6] = -100
    loss, n = lm_cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(loss * 1.5, logits, retain_graph=True)
    (again,) = torch.autograd.grad(loss * 1.5, logits)

    ref_logits = logits.detach().clone().requires_grad_()
    keep = targets != -100
    ref = F.cross_entropy(ref_logits.float()[keep], targets[keep])
    (ref_grad,) = torch.autograd.grad(ref * 1.5, ref_logits)
    assert n.item() == keep.sum().item() == 17
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again, grad, atol=0, rtol=0)
    assert (grad[0, :3] == 0).all() and (grad[2, 6] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(lm_cross_entropy(logits, targets)[0], ref, atol=1e-6,
                                   rtol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights"])
@pytest.mark.parametrize("block_rows", [1000, 4], ids=["one-block", "blocks-of-4"])
def test_lm_head_cross_entropy_matches_the_head_then_the_loss(block_rows, precision):
    """The fused head + loss (layers.LinearCrossEntropy: both gradients prepared in forward, a
    block of rows at a time) gives the loss and the gradients of x and of the head's weight that
    autograd through lm_head then F.cross_entropy gives, under autocast (matmuls in bf16,
    gradients back in the inputs' dtypes) and with bf16 weights (DeepSpeed's bf16) too, with
    ignored targets contributing nothing; a retained graph gives the same gradients twice;
    without gradients the loss is the same."""
    g = torch.Generator().manual_seed(0)
    V_, D = 50, 16
    autocast = precision == "bf16-autocast"
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    head = nn.Linear(D, V_, bias=False)
    nn.init.normal_(head.weight, std=0.5, generator=g)
    head.to(dtype)
    x = torch.randn(3, 7, D, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V_, (3, 7), generator=g)
    targets[0, :3] = -100
    targets[2, 6] = -100
    block_bytes = block_rows * 4 * V_
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, n = lm_head_cross_entropy(head, LMCrossEntropy(), x, targets,
                                        block_bytes=block_bytes)
        ref, ref_n = LMCrossEntropy()(head(x), targets)
    grads = torch.autograd.grad(loss * 1.5, (x, head.weight), retain_graph=True)
    again = torch.autograd.grad(loss * 1.5, (x, head.weight))
    ref_grads = torch.autograd.grad(ref * 1.5, (x, head.weight))
    tol = dict(atol=2e-2, rtol=2e-2) if precision != "fp32" else dict(atol=1e-6, rtol=1e-6)
    assert n.item() == ref_n.item() == 17
    torch.testing.assert_close(loss, ref, **tol)
    for ours, theirs in zip(grads, ref_grads):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, theirs, **tol)
    for ours, second in zip(grads, again):
        torch.testing.assert_close(second, ours, atol=0, rtol=0)
    assert (grads[0][0, :3] == 0).all() and (grads[0][2, 6] == 0).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain, _ = lm_head_cross_entropy(head, LMCrossEntropy(), x, targets,
                                         block_bytes=block_bytes)
    torch.testing.assert_close(plain, ref.detach(), **tol)


def test_lm_head_cross_entropy_keeps_the_head_when_someone_hooks_it():
    """A hooked head (DeepSpeed ZeRO-3 gathers weights in a pre-hook) or another loss (tensor
    parallelism's vocabulary-parallel one) runs as head(x) then loss(logits)."""
    head, calls = nn.Linear(8, 11, bias=False), []
    head.register_forward_pre_hook(lambda mod, args: calls.append("head"))
    x, targets = torch.randn(2, 3, 8), torch.randint(0, 11, (2, 3))
    loss, _ = lm_head_cross_entropy(head, LMCrossEntropy(), x, targets)
    assert calls == ["head"]
    torch.testing.assert_close(loss, F.cross_entropy(head(x).reshape(-1, 11), targets.reshape(-1)))
