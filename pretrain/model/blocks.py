"""The transformer block and the stack of blocks that every family is built from.

    pre-norm  (GPT-2, T5):             post-norm (original Transformer, BERT):
      x = x + attn(ln_1(x))              x = ln_1(x + attn(x))
      x = x + cross(ln_x(x), enc)        x = ln_x(x + cross(x, enc))      decoders of t5 only
      x = x + mlp(ln_2(x))               x = ln_2(x + mlp(x))

A block is the same code in every family; what differs is given to it: the norm (LayerNorm or
RMSNorm), the feed-forward (plain or gated), whether it has cross-attention (a decoder of an
encoder-decoder), and, per call, whether its self-attention is causal, which keys are padding
and the additive attention bias (T5's relative positions). Names follow GPT-2 (ln_1, attn,
ln_2, mlp), so GPT's state dict is unchanged and Hugging Face mappings stay one line each.

`TransformerStack` is n blocks plus what belongs to the stack as a whole: the final norm of a
pre-norm stack (a post-norm stack ends normalized already) and T5's relative position bias,
computed once per forward and shared by all blocks (as in T5).

Shape legend: B batch, T positions of this stack, S positions of the context (encoder output),
D d_model, H heads.
"""

from __future__ import annotations

from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.model.attention import KVCache, MultiHeadAttention, build_attention_kernel
from pretrain.model.layers import RelativePositionBias, build_feed_forward, build_norm


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
        attn_bias: Tensor | None = None,
        context_BSD: Tensor | None = None,
        context_padding_mask_BS: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """key_padding_mask_BS / attn_bias: for self-attention (keys of this stack);
        context_*: the encoder output and its padding, for cross-attention."""
        x_BTD = self._residual(x_BTD, self.ln_1, lambda h: self.attn(
            h, causal=causal, key_padding_mask_BS=key_padding_mask_BS, attn_bias=attn_bias,
            kv_cache=kv_cache))
        if self.cross_attn is not None:
            x_BTD = self._residual(x_BTD, self.ln_x, lambda h: self.cross_attn(
                h, context_BSD=context_BSD, causal=False,
                key_padding_mask_BS=context_padding_mask_BS))
        return self._residual(x_BTD, self.ln_2, self.mlp)


def build_block(cfg: ModelConfig, *, cross: bool = False) -> TransformerBlock:
    """A block as `model:` config describes it; `cross` adds cross-attention (decoders)."""

    def attention(is_cross: bool) -> MultiHeadAttention:
        return MultiHeadAttention(
            cfg.d_model, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
            attn_dropout=cfg.attention.dropout, kernel=build_attention_kernel(cfg.attention),
            cross=is_cross, scale_scores=cfg.scale_attn_scores,
        )

    return TransformerBlock(
        attention(False), build_feed_forward(cfg), build_norm(cfg), build_norm(cfg),
        cross_attn=attention(True) if cross else None, ln_x=build_norm(cfg) if cross else None,
        pre_norm=cfg.norm_position == "pre",
    )


class TransformerStack(nn.Module):
    """n_layer blocks, the final norm of a pre-norm stack, and the stack's relative position
    bias when model.positions=relative. Used by BERT (encoder) and T5 (encoder, decoder)."""

    def __init__(self, cfg: ModelConfig, n_layer: int, *, causal: bool, cross: bool) -> None:
        super().__init__()
        self.causal = causal
        self.rel_bias = None
        if cfg.positions == "relative":
            self.rel_bias = RelativePositionBias(
                cfg.n_head, bidirectional=not causal, num_buckets=cfg.relative_buckets,
                max_distance=cfg.relative_max_distance)
        self.h = nn.ModuleList(build_block(cfg, cross=cross) for _ in range(n_layer))
        self.ln_f = build_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()

    def forward(
        self,
        x_BTD: Tensor,
        *,
        padding_mask_BT: Tensor | None = None,
        context_BSD: Tensor | None = None,
        context_padding_mask_BS: Tensor | None = None,
    ) -> Tensor:
        """padding_mask_BT: bool, True = real token (keys of self-attention)."""
        T = x_BTD.size(1)
        bias = None
        if self.rel_bias is not None:
            bias = self.rel_bias(T, T).to(x_BTD.dtype)  # [1, H, T, T], shared by all blocks
        for block in self.h:
            x_BTD = block(x_BTD, causal=self.causal, key_padding_mask_BS=padding_mask_BT,
                          attn_bias=bias, context_BSD=context_BSD,
                          context_padding_mask_BS=context_padding_mask_BS)
        return self.ln_f(x_BTD)
