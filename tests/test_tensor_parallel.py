"""Tensor parallelism against the dense model: layers, cross-entropy, whole GPT, RNG, the grid.

Multi-process cases run real gloo process groups (torch.multiprocessing.spawn); every rank
asserts, and a failed assertion in any rank fails the test with its traceback.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch import nn
from torch.testing import assert_close

from conftest import ROOT

from launch.env import free_port
from pretrain.config import Config, ModelConfig, validate_config
from pretrain.model import build_model
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing
from pretrain.parallel.dims import GridError, ParallelDims
from pretrain.parallel.tensor_parallel import TensorParallelError, apply_tensor_parallel
from pretrain.parallel.tp_comm import copy_to_tp
from pretrain.parallel.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelRNG,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
)

TINY = dict(n_layer=2, n_head=4, d_model=64, max_seq_len=32)
VOCAB = 128


def spawn(fn, world: int, *args) -> None:
    mp.spawn(_bootstrap, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _bootstrap(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(ParallelDims.from_world(world, rank, world).build_groups(), *args)
    finally:
        dist.destroy_process_group()


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


# ----------------------------------------------------------------------------- layers


def _check_layers(dims: ParallelDims) -> None:
    g, r, n = dims.tp_group, dims.tp_rank, dims.tp
    torch.manual_seed(0)

    # feed-forward: column-parallel then row-parallel == dense, forward and backward
    fc, proj = nn.Linear(16, 32), nn.Linear(32, 16)
    x = torch.randn(2, 4, 16, requires_grad=True)
    dense = proj(F.gelu(fc(x)))
    dense.square().sum().backward()
    col, row = ColumnParallelLinear.from_dense(fc, g), RowParallelLinear.from_dense(proj, g)
    x_tp = x.detach().clone().requires_grad_()
    y = row(F.gelu(col(copy_to_tp(x_tp, g))))
    y.square().sum().backward()
    assert_close(y, dense)
    assert_close(x_tp.grad, x.grad)
    assert_close(col.weight.grad, fc.weight.grad.chunk(n, 0)[r])
    assert_close(col.bias.grad, fc.bias.grad.chunk(n, 0)[r])
    assert_close(row.weight.grad, proj.weight.grad.chunk(n, 1)[r])
    assert_close(row.bias.grad, proj.bias.grad)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    assert row.weight.partition_dim == 1 and not hasattr(row.bias, "tensor_model_parallel")

    # vocabulary-parallel embedding == nn.Embedding
    emb = nn.Embedding(64, 8)
    ids = torch.randint(0, 64, (3, 5))
    out = emb(ids)
    (out * torch.arange(8.0)).sum().backward()
    vp = VocabParallelEmbedding.from_dense(emb, g)
    out_tp = vp(ids)
    (out_tp * torch.arange(8.0)).sum().backward()
    assert_close(out_tp, out)
    assert_close(vp.weight.grad, emb.weight.grad.chunk(n, 0)[r])

    # vocabulary-parallel cross-entropy == F.cross_entropy, with ignored targets
    logits = (3 * torch.randn(3, 5, 64)).requires_grad_()
    targets = torch.randint(0, 64, (3, 5))
    targets[0, :2] = -100
    ref = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-100)
    ref.backward()
    local = logits.detach().chunk(n, -1)[r].clone().requires_grad_()
    loss, count = VocabParallelCrossEntropy(g, 64 // n)(local, targets)
    loss.backward()
    assert_close(loss, ref)
    assert count.item() == 13
    assert_close(local.grad, logits.grad.chunk(n, -1)[r])
    # every target ignored: loss 0 and zero gradient, not NaN
    none = VocabParallelCrossEntropy(g, 64 // n)(local, torch.full_like(targets, -100))[0]
    assert none.item() == 0.0
    # argmax across the split (accuracy metrics) == argmax of the whole; ties: the first
    logits = torch.randn(6, 64)
    logits[0, [3, 40]] = 10.0
    logits[1, [33, 63]] = 10.0
    preds = VocabParallelCrossEntropy(g, 64 // n).predictions(logits.chunk(n, -1)[r])
    assert torch.equal(preds, logits.argmax(-1)) and preds[0] == 3


def _gpt_inputs(vocab: int) -> dict:
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _bert_inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 16), generator=g)
    labels = torch.where(torch.rand(3, 16, generator=g) < 0.3, ids, -100)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 12:] = 0  # padding keys
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "token_type_ids": types,
            "sentence_labels": torch.tensor([0, 1, 1])}


def _t5_inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (2, 16), generator=g)
    labels = torch.randint(2, vocab, (2, 6), generator=g)
    labels[1, 4:] = -100
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 13:] = 0
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "decoder_input_ids": dec}


INPUTS = {"gpt": _gpt_inputs, "bert": _bert_inputs, "t5": _t5_inputs}


def _check_against_dense(dims: ParallelDims, cfg: ModelConfig,
                         sequence_parallel: bool = False) -> None:
    """The split model computes the dense model's loss, metrics and gradients; its init is the
    dense one (the shards are slices of the dense weights built from the same seed)."""
    g, r, n = dims.tp_group, dims.tp_rank, dims.tp
    torch.manual_seed(0)
    dense = build_model(cfg, VOCAB)
    torch.manual_seed(0)
    split = apply_tensor_parallel(build_model(cfg, VOCAB), dims,
                                  sequence_parallel=sequence_parallel)
    where = f"{cfg.family}/{cfg.attention.kind}"
    dense_params = dict(dense.named_parameters())
    for name, p in split.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            assert_close(torch.cat(_gather(p.detach(), g), p.partition_dim),
                         dense_params[name].detach(), atol=0, rtol=0, msg=f"{where} {name}")
        else:
            assert_close(p, dense_params[name], atol=0, rtol=0, msg=f"{where} {name}")

    inputs = INPUTS[cfg.family](VOCAB)
    torch.manual_seed(5)  # LSH rotations: the same draws in both models
    out_d = dense(**inputs)
    out_d.loss.backward()
    torch.manual_seed(5)
    out_t = split(**inputs)
    out_t.loss.backward()
    assert_close(out_t.loss, out_d.loss, msg=where)
    assert out_t.metrics.keys() == out_d.metrics.keys()
    for k in out_d.metrics:
        assert_close(out_t.metrics[k], out_d.metrics[k], msg=f"{where} {k}")
    for name, p in split.named_parameters():
        grad = dense_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            grad = grad.chunk(n, p.partition_dim)[r]
        assert_close(p.grad, grad, atol=2e-6, rtol=1e-4, msg=f"{where} {name}")


def _check_gpt(dims: ParallelDims, sequence_parallel: bool) -> None:
    """Dense GPT: the tied head shares the embedding's vocabulary shard; heads are split."""
    cfg = ModelConfig(**TINY)
    split = apply_tensor_parallel(build_model(cfg, VOCAB), dims,
                                  sequence_parallel=sequence_parallel)
    assert isinstance(split.wte, VocabParallelEmbedding) and split.lm_head.weight is split.wte.weight
    assert split.h[0].attn.n_head == 4 // dims.tp
    _check_against_dense(dims, cfg, sequence_parallel)


def _family_configs() -> dict[str, ModelConfig]:
    """Every family, with every attention kernel somewhere, and the blocks' variants: gated and
    chunked feed-forwards, reversible layers, T5's relative bias as a table and as an
    OffsetBias, Longformer's global projections, Reformer's shared query-key."""
    def preset(name: str, **overrides) -> ModelConfig:
        data = yaml.safe_load((ROOT / "configs" / "models" / f"{name}.yaml").read_text())
        return ModelConfig(**{**data["model"], "max_seq_len": 32, **overrides})

    longformer = {"kind": "longformer",
                  "longformer": {"window": 3, "dilation": [1, 2], "global_positions": [0, 5]}}
    reformer = {"kind": "reformer", "reformer": {"n_hashes": 2, "n_buckets": 4, "chunk_len": 4}}
    return {
        "bert": preset("bert-tiny"),
        "bert-longformer": preset("bert-tiny", attention=longformer, sentence_head="none",
                                  tie_embeddings=False),
        "t5": preset("t5-tiny"),
        "t5-reformer-reversible": preset("t5-tiny", attention=reformer, reversible=True,
                                         ff_chunk_size=5, gated_ffn=False, activation="relu"),
        "t5-longformer": preset("t5-tiny", attention=longformer, tie_embeddings=False),
        # the original Transformer: sinusoidal positions, post-norm LayerNorm, biases, ReLU
        "transformer": preset("transformer-base", n_layer=2, n_decoder_layer=1, n_head=4,
                              d_model=32, d_ff=64, dropout=0.0, attention={"dropout": 0.0}),
        "gpt-longformer": ModelConfig(**TINY, attention=longformer, ff_chunk_size=6),
        "gpt-reformer": ModelConfig(**TINY, attention=reformer, reversible=True),
    }


def _check_families(dims: ParallelDims) -> None:
    for cfg in _family_configs().values():
        _check_against_dense(dims, cfg)


class PerHeadTable(nn.Module):
    """A layer declaring its split as data, the way kernels and new families do."""

    tp_plan = {"table": "shard:1", "proj": "column", "gate": "replicate"}

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.arange(20.0).reshape(5, 4))  # [buckets, heads]
        self.proj = nn.Linear(8, 4)
        self.gate = nn.Linear(4, 4)


def _check_declared_plan(dims: ParallelDims) -> None:
    r, n = dims.tp_rank, dims.tp
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), VOCAB)
    model.extra = PerHeadTable()
    dense = PerHeadTable()
    dense.load_state_dict(model.extra.state_dict())
    apply_tensor_parallel(model, dims)
    assert_close(model.extra.table, dense.table.chunk(n, 1)[r], atol=0, rtol=0)
    assert model.extra.table.partition_dim == 1
    assert isinstance(model.extra.proj, ColumnParallelLinear)
    assert_close(model.extra.proj.weight, dense.proj.weight.chunk(n, 0)[r], atol=0, rtol=0)
    assert isinstance(model.extra.gate, nn.Linear)


def _check_all(dims: ParallelDims) -> None:
    _check_layers(dims)
    _check_declared_plan(dims)
    _check_gpt(dims, sequence_parallel=False)
    _check_gpt(dims, sequence_parallel=True)
    _check_families(dims)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layers_and_every_family_match_dense(tp):
    """Layers, GPT (with and without sequence parallelism), BERT and T5, with dense,
    Longformer and Reformer attention, split over tp ranks against the dense model."""
    spawn(_check_all, tp)


# ----------------------------------------------------------------------------- randomness


def _check_rng(dims: ParallelDims) -> None:
    g = dims.tp_group
    # a module under TensorParallelRNG draws its own stream per TP rank, and consumes exactly
    # one draw of the default stream (which stays equal on every rank)
    drop = nn.Dropout(0.5)
    TensorParallelRNG(dims.tp_rank).attach(drop)
    torch.manual_seed(7)
    mask = drop(torch.ones(256))
    after = torch.rand(3)
    masks, afters = _gather(mask, g), _gather(after, g)
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(afters[0], afters[1])
    torch.manual_seed(7)
    torch.randint(0, 2**62, (1,))
    assert torch.equal(torch.rand(3), after)

    # with dropout everywhere, activation checkpointing recomputes the same masks
    cfg = ModelConfig(**TINY, dropout=0.1, attention={"dropout": 0.1})
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg, VOCAB), dims, sequence_parallel=True)
        if checkpointing:
            apply_activation_checkpointing(model)
        torch.manual_seed(3)
        ids = torch.randint(0, VOCAB, (2, 17))
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
        # replicated activations drew the same masks on both ranks: the loss agrees
        losses = _gather(loss.detach().reshape(1), g)
        assert torch.equal(losses[0], losses[1])
    for a, b in zip(*grads):
        assert_close(a, b, atol=0, rtol=0)

    # Reformer under attention dropout (per-rank stream): every rank hashes its heads with the
    # rotations of the shared stream, as the unsplit module hashes all heads, and the shared
    # stream advances alike on every rank
    cfg = ModelConfig(**TINY, attention={"kind": "reformer", "dropout": 0.5, "reformer": {
        "n_hashes": 2, "n_buckets": 4, "chunk_len": 4}})
    torch.manual_seed(0)
    model = apply_tensor_parallel(build_model(cfg, VOCAB), dims)
    kernel, drawn = model.h[0].attn.kernel, []
    rotations = kernel.rotations
    kernel.rotations = lambda *a: drawn.append(rotations(*a)) or drawn[-1]
    torch.manual_seed(3)
    model(ids[:, :-1], ids[:, 1:])
    after = torch.rand(3)
    for t in (drawn[0], after):
        ranks = _gather(t, g)
        assert torch.equal(ranks[0], ranks[1])


def test_dropout_streams_per_tp_rank_survive_recomputation():
    spawn(_check_rng, 2)


# ----------------------------------------------------------------------------- grid, config


def test_parallel_dims_layout_and_mpu():
    d = ParallelDims.from_world(2, rank=5, world_size=8, local_world_size=4)
    assert (d.tp, d.dp, d.tp_rank, d.dp_rank) == (2, 4, 1, 2)
    assert d.tp_ranks() == [4, 5] and d.dp_ranks() == [1, 3, 5, 7]
    assert d.get_model_parallel_rank() == 1 and d.get_data_parallel_world_size() == 4
    assert d.get_tensor_model_parallel_src_rank() == 4


def test_parallel_dims_refuse_bad_grids():
    with pytest.raises(GridError, match="tensor_parallel=4 does not divide the world size 6"):
        ParallelDims.from_world(4, 0, 6, 6)
    # 2 nodes of 4 ranks: TP=8 would span both, TP=3 does not fit a node's 4 ranks
    with pytest.raises(GridError, match="tensor_parallel_across_nodes=true"):
        ParallelDims.from_world(8, 0, 8, 4)
    assert ParallelDims.problems(8, 8, 4, across_nodes=True) == []
    assert ParallelDims.problems(2, 8, 4) == []
    assert len(ParallelDims.problems(3, 12, 4)) == 1


def test_config_names_every_tensor_parallel_problem():
    cfg = Config(model=ModelConfig(n_head=6, d_model=96, d_ff=102, pad_vocab_multiple=6),
                 parallel={"tensor_parallel": 4, "sequence_parallel": True})
    cfg.data.seq_len = 30
    problems = dict(validate_config(cfg, world_size=8))
    messages = " | ".join(f"{k}: {m}" for k, m in validate_config(cfg, world_size=8))
    assert "does not divide model.n_head=6" in messages
    assert "feed-forward width 102" in messages
    assert "model.pad_vocab_multiple" in problems
    assert "data.seq_len=30" in messages
    cfg.parallel.tensor_parallel = 2
    cfg.model.d_ff = 128
    cfg.model.pad_vocab_multiple = 64
    assert validate_config(cfg, world_size=8) == []


def test_a_kernel_with_undeclared_projections_is_refused():
    from pretrain.model.attention import DenseAttention

    class KernelWithProjection(DenseAttention):
        def __init__(self):
            super().__init__()
            self.global_q = nn.Linear(64, 64)

    model = build_model(ModelConfig(**TINY), VOCAB)
    model.h[1].attn.kernel = KernelWithProjection()
    with pytest.raises(TensorParallelError, match=r"h\.1\.attn\.kernel .* holds nn.Linear "
                                                  r"\['global_q'\] without a tensor-parallel plan"):
        apply_tensor_parallel(model, ParallelDims(tp=2, dp=1, rank=0, world_size=2))


def test_a_model_without_a_plan_is_refused():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    dims = ParallelDims(tp=2, dp=1, rank=0, world_size=2)
    with pytest.raises(TensorParallelError, match="no tensor-parallel plan for Tiny"):
        apply_tensor_parallel(Tiny(), dims)
