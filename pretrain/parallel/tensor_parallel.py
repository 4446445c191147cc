"""`apply_tensor_parallel`: split a whole model over the tensor-parallel ranks, from outside it.

The model is built whole on every rank from the seed (so its weights do not depend on the
tensor-parallel degree n), then layers are replaced in place, under the same names, by their
sharded versions (tp_layers.py), each keeping its slice of the whole weights:

    MultiHeadAttention   every head projection column-parallel (each rank n_head/n heads):
                         q_proj, k_proj, v_proj, Reformer's shared qk_proj, Longformer's
                         q/k/v_global_proj (MultiHeadAttention.head_projections()); o_proj
                         row-parallel; the kernel's own declarations (below)
    FeedForward          c_fc (and a gated one's c_gate) column-parallel, c_proj row-parallel
    model plan           vocabulary embeddings -> VocabParallelEmbedding; LM heads ->
                         column-parallel over the vocabulary (logits stay split, [B, T, V/n]);
                         LM losses -> VocabParallelCrossEntropy (never gathers the logits;
                         its `predictions` finds the argmax across the split)
    declared             T5's relative position bias table: its head columns; BERT's MLM head
                         bias: with the vocabulary (see tp_plan below)
    everything else      replicated: norms, position tables, biases of row-parallel layers,
                         BERT's pooler and sentence head and the MLM head's transform

Regions. An attention or feed-forward module is one tensor-parallel region: a forward pre-hook
enters it (copy_to_tp: identity forward, all-reduce of the input gradient backward) and its
row-parallel output layer leaves it (all-reduce forward). So each block costs two all-reduces
forward and two backward, as in Megatron-LM. With sequence parallelism the activations between
regions are split along the sequence instead: the first block of each block list scatters its
input, regions enter with an all-gather and leave with a reduce-scatter, the LM head gathers
the sequence back, and the parameters used on sequence shards (norms, row-parallel biases) sum
their gradients over the TP group.

Randomness. Dropout on replicated activations must draw the same mask on every TP rank (the
trainer seeds the default stream by data-parallel rank); dropout on split heads (attention
probabilities) or on sequence shards draws from a per-TP-rank stream (TensorParallelRNG).
Random draws that must be the same on every rank inside such a module (Reformer's hash
rotations, shared by all heads) are declared "shared_rng" and come from the shared stream, so
a split module hashes its heads exactly as the unsplit one does.

Families. GPT, BERT and T5 have plans, with every attention kernel (dense, Longformer,
Reformer), reversible layers and chunked feed-forwards. Sequence parallelism is GPT's only:
BERT's MLM head runs on the masked rows only and T5's cross-attention reads the whole encoder
output, so neither has one sequence to split between the regions.

Extending (new families, attention kernels, layers):
* A model class gets a `ModelPlan` in MODEL_PLANS naming its vocabulary embeddings, LM heads,
  losses (LMCrossEntropy modules), block lists and final norms.
* A module type gets a rule in MODULE_RULES (a function that shards it in place), or declares,
  as plain data in the model file, `tp_plan = {"name": style}` with style "column" (an
  nn.Linear's output features split), "row" (input features split, output summed),
  "shard:<dim>" (a parameter or buffer split along <dim>, no communication: e.g. per-head
  tables; the name may be dotted, "table.weight"), "replicate" (an nn.Linear kept whole), or
  "shared_rng" (a method whose random draws must be equal on every TP rank).
  Attention kernels are looked at for `tp_plan` too; a kernel that holds nn.Linear layers
  without declaring them is refused rather than silently replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.model.attention import MultiHeadAttention
from pretrain.model.bert import BERT
from pretrain.model.gpt import GPT
from pretrain.model.layers import FeedForward, GatedFeedForward, LMCrossEntropy
from pretrain.model.t5 import T5
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.tp_comm import copy_to_tp, gather_seq, scatter_seq
from pretrain.parallel.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelRNG,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
    all_reduce_grad_over_tp,
    sharded_parameter,
)


class TensorParallelError(ValueError):
    """The model cannot be split as asked; the message names the module and the sizes."""


@dataclass(frozen=True)
class ModelPlan:
    """The model-level parts of a family's tensor-parallel plan (dotted module names)."""

    vocab_embeddings: tuple[str, ...]
    """nn.Embedding over the vocabulary: split by rows."""
    lm_heads: tuple[str, ...]
    """nn.Linear d_model -> vocabulary: split by output rows; shares a tied embedding's shard."""
    losses: tuple[str, ...]
    """LMCrossEntropy modules: replaced by the vocabulary-parallel cross-entropy."""
    block_lists: tuple[str, ...] = ()
    """nn.ModuleLists of blocks; under sequence parallelism they run on sequence shards."""
    final_norms: tuple[str, ...] = ()
    """Norms between the last block and an LM head (run on sequence shards under SP)."""
    sequence_parallel: bool = True
    """Whether the family supports sequence parallelism (module docstring: GPT only)."""


MODEL_PLANS: dict[type[nn.Module], ModelPlan] = {
    GPT: ModelPlan(vocab_embeddings=("wte",), lm_heads=("lm_head",), losses=("lm_loss",),
                   block_lists=("h",), final_norms=("ln_f",)),
    BERT: ModelPlan(vocab_embeddings=("embeddings.wte",), lm_heads=("mlm_head.decoder",),
                    losses=("lm_loss",), sequence_parallel=False),
    T5: ModelPlan(vocab_embeddings=("shared",), lm_heads=("lm_head",), losses=("lm_loss",),
                  sequence_parallel=False),
}


@dataclass
class TPContext:
    group: object
    rank: int
    n: int
    sequence_parallel: bool
    rng: TensorParallelRNG
    regions: list[nn.Module]
    done: set[int]
    """ids of modules already sharded (a kernel handled by its attention module)."""

    def enter(self, x):
        return gather_seq(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)


# ----------------------------------------------------------------------------- regions


def enter_region(module: nn.Module, ctx: TPContext) -> None:
    """Forward pre-hook: the module's input (first positional argument or x_BTD) and a
    cross-attention context enter the tensor-parallel region."""

    def hook(mod, args, kwargs):
        if args:
            args = (ctx.enter(args[0]), *args[1:])
        elif "x_BTD" in kwargs:
            kwargs["x_BTD"] = ctx.enter(kwargs["x_BTD"])
        if kwargs.get("context_BSD") is not None:  # never sequence-split: copied whole
            kwargs["context_BSD"] = copy_to_tp(kwargs["context_BSD"], ctx.group)
        return args, kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)
    ctx.regions.append(module)


def _apply_declared(module: nn.Module, ctx: TPContext, where: str) -> None:
    """Apply a module's `tp_plan` declaration {name: style} (module docstring)."""
    ctx.done.add(id(module))
    plan: dict[str, str] = getattr(module, "tp_plan", {}) or {}
    for name, style in plan.items():
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        child = getattr(owner, leaf, None)
        if style == "column" and isinstance(child, nn.Linear):
            setattr(owner, leaf, ColumnParallelLinear.from_dense(child, ctx.group))
        elif style == "row" and isinstance(child, nn.Linear):
            setattr(owner, leaf, RowParallelLinear.from_dense(child, ctx.group,
                                                              ctx.sequence_parallel))
        elif style.startswith("shard:") and isinstance(child, torch.Tensor):
            dim = int(style.split(":", 1)[1])
            if child.size(dim) % ctx.n:
                raise TensorParallelError(f"{where}.{name}: dimension {dim} of size "
                                          f"{child.size(dim)} does not split over "
                                          f"tensor_parallel={ctx.n}")
            if isinstance(child, nn.Parameter):
                setattr(owner, leaf, sharded_parameter(child, dim, ctx.rank, ctx.n))
            else:
                buf = child.chunk(ctx.n, dim)[ctx.rank].clone()
                buf.tensor_model_parallel, buf.partition_dim = True, dim
                owner.register_buffer(leaf, buf,
                                      persistent=leaf not in owner._non_persistent_buffers_set)
        elif style == "shared_rng" and callable(child):
            setattr(owner, leaf, ctx.rng.shared(child))
        elif style != "replicate":
            raise TensorParallelError(
                f"{where}.tp_plan[{name!r}] = {style!r}: expected 'column' or 'row' for an "
                "nn.Linear, 'shard:<dim>' for a parameter or buffer, 'shared_rng' for a method, "
                "or 'replicate'")
    undeclared = [n for n, c in module.named_children() if isinstance(c, nn.Linear)
                  and n not in plan]
    if undeclared:
        raise TensorParallelError(
            f"{where} ({type(module).__name__}) holds nn.Linear {undeclared} without a "
            "tensor-parallel plan: declare `tp_plan = {name: 'column' | 'row' | 'replicate'}` "
            "on the class, or add a rule to pretrain.parallel.tensor_parallel.MODULE_RULES")


def shard_attention(mha: MultiHeadAttention, ctx: TPContext, where: str) -> None:
    heads = mha.head_projections()[0].out_features // mha.head_dim
    if heads % ctx.n:
        raise TensorParallelError(f"{where}: {heads} attention heads do not split over "
                                  f"tensor_parallel={ctx.n}")
    for name in mha.projection_names:  # q, k, v; or qk, v; plus any global ones
        proj = getattr(mha, f"{name}_proj")
        setattr(mha, f"{name}_proj", ColumnParallelLinear.from_dense(proj, ctx.group))
    mha.o_proj = RowParallelLinear.from_dense(mha.o_proj, ctx.group, ctx.sequence_parallel)
    mha.n_head = heads // ctx.n  # for the record: forward derives heads from q_proj's width
    _apply_declared(mha.kernel, ctx, f"{where}.kernel")
    enter_region(mha, ctx)
    if mha.attn_dropout > 0:  # dropout on this rank's heads
        ctx.rng.attach(mha.kernel)
    if ctx.sequence_parallel and mha.resid_dropout.p > 0:  # dropout on this rank's positions
        ctx.rng.attach(mha.resid_dropout)


def shard_feed_forward(ff: FeedForward | GatedFeedForward, ctx: TPContext, where: str) -> None:
    """Column-parallel input projections (c_fc, and c_gate of a gated one: the element-wise
    gate pairs the same columns on each rank), row-parallel c_proj. A chunked feed-forward
    (ff_chunk_size) runs its chunks on this rank's columns and sums each chunk's output."""
    if ff.c_fc.out_features % ctx.n:
        raise TensorParallelError(f"{where}: feed-forward width {ff.c_fc.out_features} does not "
                                  f"split over tensor_parallel={ctx.n}")
    ff.c_fc = ColumnParallelLinear.from_dense(ff.c_fc, ctx.group)
    if isinstance(ff, GatedFeedForward):
        ff.c_gate = ColumnParallelLinear.from_dense(ff.c_gate, ctx.group)
    ff.c_proj = RowParallelLinear.from_dense(ff.c_proj, ctx.group, ctx.sequence_parallel)
    enter_region(ff, ctx)
    if ctx.sequence_parallel and ff.dropout.p > 0:
        ctx.rng.attach(ff.dropout)


MODULE_RULES: dict[type[nn.Module], Callable[[nn.Module, TPContext, str], None]] = {
    MultiHeadAttention: shard_attention,
    FeedForward: shard_feed_forward,
    GatedFeedForward: shard_feed_forward,
}
"""Sharding rules by module type; a rule shards its module in place (keeping child names)."""


# ----------------------------------------------------------------------------- model level


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _apply_model_plan(model: nn.Module, plan: ModelPlan, ctx: TPContext) -> None:
    new_weights: dict[int, nn.Parameter] = {}  # id(dense weight) -> its shard (tied heads)
    for name in plan.vocab_embeddings:
        emb = _get(model, name)
        if emb.num_embeddings % ctx.n:
            raise TensorParallelError(
                f"{name}: vocabulary of {emb.num_embeddings} does not split over "
                f"tensor_parallel={ctx.n}; set model.pad_vocab_multiple to a multiple of {ctx.n}")
        sharded = VocabParallelEmbedding.from_dense(emb, ctx.group)
        new_weights[id(emb.weight)] = sharded.weight
        _set(model, name, sharded)
    vocab_per_rank = None
    for name in plan.lm_heads:
        head = _get(model, name)
        if head.out_features % ctx.n:
            raise TensorParallelError(f"{name}: vocabulary of {head.out_features} does not "
                                      f"split over tensor_parallel={ctx.n}")
        sharded = ColumnParallelLinear.from_dense(head, ctx.group,
                                                  weight=new_weights.get(id(head.weight)))
        enter_region(sharded, ctx)  # under SP this gathers the sequence back
        vocab_per_rank = sharded.out_features
        _set(model, name, sharded)
    for name in plan.losses:
        if not isinstance(_get(model, name), LMCrossEntropy):
            raise TensorParallelError(f"{name} is {type(_get(model, name)).__name__}, not the "
                                      "LMCrossEntropy the plan expects")
        if vocab_per_rank is None:
            raise TensorParallelError(f"{name}: a loss to split needs an LM head in the plan")
        _set(model, name, VocabParallelCrossEntropy(ctx.group, vocab_per_rank))


def _apply_sequence_parallel(model: nn.Module, plan: ModelPlan, ctx: TPContext) -> None:
    """Blocks and final norms run on sequence shards; their replicated parameters outside the
    regions (norms) and the row-parallel biases sum their gradients over TP."""

    def scatter(mod, args):
        return (scatter_seq(args[0], ctx.group), *args[1:])

    in_region = {id(m) for r in ctx.regions for m in r.modules()}
    spans = [m for name in plan.block_lists for m in _get(model, name)]
    spans += [_get(model, name) for name in plan.final_norms]
    for name in plan.block_lists:
        _get(model, name)[0].register_forward_pre_hook(scatter)
    for span in spans:
        for module in span.modules():
            if id(module) in in_region and not isinstance(module, RowParallelLinear):
                continue
            for p in module.parameters(recurse=False):
                if isinstance(module, RowParallelLinear) and p is not module.bias:
                    continue
                if not getattr(p, "tensor_model_parallel", False):
                    p.sequence_parallel = True
                    all_reduce_grad_over_tp(p, ctx.group)


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims, *,
                          sequence_parallel: bool = False) -> nn.Module:
    """Split `model` in place over `dims`' tensor-parallel group; returns it.

    Call on the whole model (every rank built it from the same seed), before activation
    checkpointing and before DeepSpeed. A degree of 1 leaves the model untouched.
    """
    if dims.tp == 1:
        return model
    plan = MODEL_PLANS.get(type(model))
    if plan is None:
        raise TensorParallelError(
            f"no tensor-parallel plan for {type(model).__name__}: add a ModelPlan to "
            "pretrain.parallel.tensor_parallel.MODEL_PLANS")
    if sequence_parallel and not plan.sequence_parallel:
        raise TensorParallelError(f"{type(model).__name__} does not support sequence "
                                  "parallelism yet: set parallel.sequence_parallel=false")
    ctx = TPContext(group=dims.tp_group, rank=dims.tp_rank, n=dims.tp,
                    sequence_parallel=sequence_parallel, rng=TensorParallelRNG(dims.tp_rank),
                    regions=[], done=set())
    _apply_model_plan(model, plan, ctx)
    for name, module in list(model.named_modules()):
        rule = MODULE_RULES.get(type(module))
        if id(module) in ctx.done:
            continue
        if rule is not None:
            rule(module, ctx, name)
        elif getattr(module, "tp_plan", None):
            _apply_declared(module, ctx, name)
    if sequence_parallel:
        _apply_sequence_parallel(model, plan, ctx)
    model.tensor_parallel = dims.tp  # for the record (checkpoints read parameters' attributes)
    return model
