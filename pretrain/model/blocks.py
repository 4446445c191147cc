"""The transformer block and the stack of blocks that every family is built from.

    pre-norm  (GPT-2, T5):             post-norm (original Transformer, BERT):
      x = x + attn(ln_1(x))              x = ln_1(x + attn(x))
      x = x + cross(ln_x(x), enc)        x = ln_x(x + cross(x, enc))      decoders of t5 only
      x = x + mlp(ln_2(x))               x = ln_2(x + mlp(x))

A block is the same code in every family; what differs is given to it: the norm (LayerNorm or
RMSNorm), the feed-forward (plain or gated, optionally chunked), the self-attention kernel
(dense, Longformer or LSH, per layer: attention.py), whether it has cross-attention (a decoder
of an encoder-decoder; always dense) and, per call, whether its self-attention is causal, which
keys are padding and the additive attention bias (T5's relative positions). Names follow GPT-2
(ln_1, attn, ln_2, mlp), so GPT's state dict is unchanged and Hugging Face mappings stay one
line each.

model.reversible (reversible.py, Reformer's RevNet layers; pre-norm blocks only): the stream is
split in two, each block updates one with its attention branch F (self-attention, plus
cross-attention in a decoder) and the other with its feed-forward branch G, the output is the
mean of the two streams, and activations are recomputed in backward:

      x1 = x1 + F(x2),  F(x) = a + cross(ln_x(x + a), enc),  a = attn(ln_1(x))
      x2 = x2 + G(x1),  G(x) = mlp(ln_2(x))

`run_blocks` runs a list of blocks either way; `TransformerStack` is n blocks plus what belongs
to the stack as a whole: the final norm of a pre-norm stack (a post-norm stack ends normalized
already) and T5's relative position bias, computed once per forward and shared by all blocks
(as in T5): a [1, H, T, T] tensor for dense kernels, an OffsetBias (a function of the offset,
evaluated on the pairs scored) for long-context kernels.

Shape legend: B batch, T positions of this stack, S positions of the context (encoder output),
D d_model, H heads.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pretrain.config import AttentionConfig, ModelConfig
from pretrain.model.attention import (
    DenseAttention,
    KVCache,
    MultiHeadAttention,
    OffsetBias,
    build_attention_kernel,
)
from pretrain.model.layers import RelativePositionBias, build_feed_forward, build_norm
from pretrain.model.reversible import reversible_sequence


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention and feed-forward, each a residual sublayer."""

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        ln_1: nn.Module,
        ln_2: nn.Module,
        *,
        cross_attn: MultiHeadAttention | None = None,
        ln_x: nn.Module | None = None,
        pre_norm: bool = True,
    ) -> None:
        super().__init__()
        if (cross_attn is None) != (ln_x is None):
            raise ValueError("cross_attn and its norm ln_x come together")
        self.pre_norm = pre_norm
        self.ln_1, self.attn = ln_1, attn
        self.ln_x, self.cross_attn = ln_x, cross_attn
        self.ln_2, self.mlp = ln_2, mlp

    def _residual(self, x_BTD: Tensor, norm: nn.Module, sublayer) -> Tensor:
        if self.pre_norm:
            return x_BTD + sublayer(norm(x_BTD))
        return norm(x_BTD + sublayer(x_BTD))

    def residual_projections(self) -> list[nn.Linear]:
        """The Linears that write into the residual stream (GPT-2 scales their init)."""
        out = [self.attn.o_proj, self.mlp.c_proj]
        if self.cross_attn is not None:
            out.insert(1, self.cross_attn.o_proj)
        return out

    def forward(
        self,
        x_BTD: Tensor,
        *,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: Tensor | OffsetBias | None = None,
        context_BSD: Tensor | None = None,
        context_padding_mask_BS: Tensor | None = None,
        kv_cache: KVCache | None = None,
        **kernel_inputs: Tensor | None,
    ) -> Tensor:
        """key_padding_mask_BS / attn_bias: for self-attention (keys of this stack);
        context_*: the encoder output and its padding, for cross-attention. kernel_inputs: extra
        inputs of the self-attention kernel (e.g. Longformer's global_mask_BT)."""
        x_BTD = self._residual(x_BTD, self.ln_1, lambda h: self.attn(
            h, causal=causal, key_padding_mask_BS=key_padding_mask_BS, attn_bias=attn_bias,
            kv_cache=kv_cache, **kernel_inputs))
        if self.cross_attn is not None:
            x_BTD = self._residual(x_BTD, self.ln_x, lambda h: self.cross_attn(
                h, context_BSD=context_BSD, causal=False,
                key_padding_mask_BS=context_padding_mask_BS))
        return self._residual(x_BTD, self.ln_2, self.mlp)

    # The two branches of a reversible block (module docstring); pre-norm blocks only.

    def attn_branch(
        self,
        x_BTD: Tensor,
        *,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: Tensor | OffsetBias | None = None,
        context_BSD: Tensor | None = None,
        context_padding_mask_BS: Tensor | None = None,
        kv_cache: KVCache | None = None,
        **kernel_inputs: Tensor | None,
    ) -> Tensor:
        """F(x): what self-attention (and cross-attention) add to the stream."""
        self._require_pre_norm()
        a_BTD = self.attn(self.ln_1(x_BTD), causal=causal, key_padding_mask_BS=key_padding_mask_BS,
                          attn_bias=attn_bias, kv_cache=kv_cache, **kernel_inputs)
        if self.cross_attn is None:
            return a_BTD
        return a_BTD + self.cross_attn(self.ln_x(x_BTD + a_BTD), context_BSD=context_BSD,
                                       causal=False, key_padding_mask_BS=context_padding_mask_BS)

    def mlp_branch(self, x_BTD: Tensor) -> Tensor:
        """G(x): what the feed-forward adds to the stream."""
        self._require_pre_norm()
        return self.mlp(self.ln_2(x_BTD))

    def _require_pre_norm(self) -> None:
        if not self.pre_norm:
            raise ValueError("reversible layers need pre-norm blocks (model.norm_position=pre): "
                             "a post-norm block normalizes the stream itself, not a branch")


def build_block(cfg: ModelConfig, layer: int = 0, *, cross: bool = False,
                attention: AttentionConfig | None = None) -> TransformerBlock:
    """Block number `layer` as `model:` config describes it. attention: the self-attention
    kernel's settings (default model.attention; T5's decoder passes dense ones). cross adds
    cross-attention (decoders), which is always dense."""
    attention = cfg.attention if attention is None else attention

    def mha(kernel, is_cross: bool) -> MultiHeadAttention:
        return MultiHeadAttention(
            cfg.d_model, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
            attn_dropout=attention.dropout, kernel=kernel, cross=is_cross,
            scale_scores=cfg.scale_attn_scores,
        )

    return TransformerBlock(
        mha(build_attention_kernel(attention, layer), False), build_feed_forward(cfg),
        build_norm(cfg), build_norm(cfg),
        cross_attn=mha(DenseAttention(), True) if cross else None,
        ln_x=build_norm(cfg) if cross else None, pre_norm=cfg.norm_position == "pre",
    )


def run_blocks(
    blocks: Sequence[nn.Module],
    x_BTD: Tensor,
    *,
    reversible: bool,
    attn_bias: Tensor | OffsetBias | None = None,
    context_BSD: Tensor | None = None,
    kv_caches: Sequence[KVCache] | None = None,
    **block_inputs,
) -> Tensor:
    """The blocks in order over x, with ordinary residuals or reversibly (module docstring).
    block_inputs: the per-call inputs of TransformerBlock.forward (causal, padding masks, ...);
    kv_caches: one per block."""
    caches = list(kv_caches) if kv_caches else [None] * len(blocks)
    if not reversible:
        for block, cache in zip(blocks, caches):
            x_BTD = block(x_BTD, attn_bias=attn_bias, context_BSD=context_BSD, kv_cache=cache,
                          **block_inputs)
        return x_BTD
    # Tensors that need gradients of their own go through the reversible function (aux); a
    # bias given as a function reaches its parameters from inside the branches.
    tensor_bias = attn_bias if isinstance(attn_bias, Tensor) else None

    def branches(block: TransformerBlock, cache: KVCache | None):
        def f(x: Tensor, bias: Tensor | None, context: Tensor | None) -> Tensor:
            return block.attn_branch(x, attn_bias=bias if bias is not None else attn_bias,
                                     context_BSD=context, kv_cache=cache, **block_inputs)

        def g(x: Tensor, bias: Tensor | None, context: Tensor | None) -> Tensor:
            return block.mlp_branch(x)

        return f, g

    if any(not isinstance(b, TransformerBlock) for b in blocks):
        raise ValueError("reversible layers run TransformerBlocks' branches; these blocks are "
                         "wrapped (activation checkpointing?): use one or the other")
    return reversible_sequence([branches(b, c) for b, c in zip(blocks, caches)], x_BTD,
                               tensor_bias, context_BSD)


def self_attention_context(model: nn.Module, seq_len: int) -> float:
    """Keys each query of self-attention is scored against, averaged over the blocks of
    `model` (seq_len for dense attention, about three windows for Longformer): the attention
    context T of flops.py."""
    kernels = [m.attn.kernel for m in model.modules() if isinstance(m, TransformerBlock)]
    return sum(k.keys_per_query(seq_len) for k in kernels) / len(kernels)


class TransformerStack(nn.Module):
    """n_layer blocks, the final norm of a pre-norm stack, and the stack's relative position
    bias when model.positions=relative. Used by BERT (encoder) and T5 (encoder, decoder).
    attention: the self-attention settings (default model.attention)."""

    def __init__(self, cfg: ModelConfig, n_layer: int, *, causal: bool, cross: bool,
                 attention: AttentionConfig | None = None) -> None:
        super().__init__()
        self.causal = causal
        self.reversible = cfg.reversible
        self.rel_bias = None
        if cfg.positions == "relative":
            self.rel_bias = RelativePositionBias(
                cfg.n_head, bidirectional=not causal, num_buckets=cfg.relative_buckets,
                max_distance=cfg.relative_max_distance)
        self.h = nn.ModuleList(build_block(cfg, layer, cross=cross, attention=attention)
                               for layer in range(n_layer))
        # whether the kernels take the bias as a [T, T] tensor (dense) or as a function
        self.dense_bias = all(b.attn.kernel.scores_all_pairs for b in self.h)
        self.ln_f = build_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()

    def forward(
        self,
        x_BTD: Tensor,
        *,
        padding_mask_BT: Tensor | None = None,
        context_BSD: Tensor | None = None,
        context_padding_mask_BS: Tensor | None = None,
        **kernel_inputs: Tensor | None,
    ) -> Tensor:
        """padding_mask_BT: bool, True = real token (keys of self-attention). kernel_inputs:
        extra inputs of the self-attention kernels (e.g. Longformer's global_mask_BT)."""
        T = x_BTD.size(1)
        bias = None
        if self.rel_bias is not None and self.dense_bias:
            bias = self.rel_bias(T, T).to(x_BTD.dtype)  # [1, H, T, T], shared by all blocks
        elif self.rel_bias is not None:
            bias = OffsetBias(self.rel_bias.of_offsets)
        x_BTD = run_blocks(
            self.h, x_BTD, reversible=self.reversible, attn_bias=bias, context_BSD=context_BSD,
            causal=self.causal, key_padding_mask_BS=padding_mask_BT,
            context_padding_mask_BS=context_padding_mask_BS, **kernel_inputs)
        return self.ln_f(x_BTD)
