"""GPT: a decoder-only causal language model in the GPT-2 layout (Radford et al. 2019).

    tokens -> wte + wpe -> dropout -> n_layer x Block -> ln_f -> lm_head -> logits
    Block:  x = x + attn(ln_1(x))   (causal self-attention)
            x = x + mlp(ln_2(x))    (GELU feed-forward)

Pre-LayerNorm, GELU with the tanh approximation (GPT-2's `gelu_new`, so logits match Hugging
Face GPT2LMHeadModel exactly; see hf_gpt2.py), output head tied to the token embedding when
model.tie_embeddings. Init as GPT-2: every Linear/Embedding weight ~ N(0, init_std), biases 0,
LayerNorms 1/0, and the two residual output projections of each block (attn.o_proj,
mlp.c_proj) ~ N(0, init_std / sqrt(2 n_layer)), so the residual stream's variance does not grow
with depth.

Attention projections are separate q_proj/k_proj/v_proj Linears (see attention.py for their
layout and how they map onto GPT-2's fused c_attn).

Shape legend: B batch, T sequence length, D d_model, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.model.attention import MultiHeadAttention, build_attention_kernel
from pretrain.model.flops import transformer_flops_per_token
from pretrain.model.layers import (
    FeedForward,
    LearnedPositions,
    LMCrossEntropy,
    ModelOutput,
    build_positions,
    layer_norm,
)


class Block(nn.Module):
    """One pre-LayerNorm transformer block with causal self-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_ff = cfg.d_ff if cfg.d_ff is not None else 4 * cfg.d_model
        self.ln_1 = layer_norm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = MultiHeadAttention(
            cfg.d_model,
            cfg.n_head,
            bias=cfg.bias,
            dropout=cfg.dropout,
            attn_dropout=cfg.attention.dropout,
            kernel=build_attention_kernel(cfg.attention),
        )
        self.ln_2 = layer_norm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = FeedForward(
            cfg.d_model, d_ff, bias=cfg.bias, dropout=cfg.dropout, activation="gelu_tanh"
        )

    def residual_projections(self) -> list[nn.Linear]:
        """The Linears that write into the residual stream (get the 1/sqrt(2 L) init)."""
        return [self.attn.o_proj, self.mlp.c_proj]

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), causal=True)
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
        return x_BTD


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if cfg.family != "gpt":
            raise ValueError(f"GPT built from a config with model.family={cfg.family!r}")
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.cfg = cfg.model_copy(deep=True)
        self.vocab_size = vocab_size

        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = build_positions(cfg.positions, cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = layer_norm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one Parameter, two uses
        self.lm_loss = LMCrossEntropy()  # a module, so tensor parallelism can swap it
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init (see module docstring). Safe to call again, e.g. after building on the
        meta device and materializing."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        for block in self.h:
            for proj in block.residual_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=resid_std)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        ignore_index: int = -100,
        return_logits: bool = False,
    ) -> ModelOutput:
        """input_ids, targets: int64 [B, T]. Targets equal to ignore_index do not count."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        T = input_ids.size(1)
        tok_BTD = self.wte(input_ids)
        pos_TD = self.wpe(T).to(tok_BTD.dtype)
        x_BTD = self.drop(tok_BTD + pos_TD)
        for block in self.h:
            x_BTD = block(x_BTD)
        x_BTD = self.ln_f(x_BTD)
        logits_BTV = self.lm_head(x_BTD)  # compute dtype; the loss upcasts to fp32
        if targets is None:
            return ModelOutput(logits=logits_BTV)
        loss, n_targets = self.lm_loss(logits_BTV, targets, ignore_index)
        return ModelOutput(
            logits=logits_BTV if return_logits else None, loss=loss, n_targets=n_targets
        )

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied matrix counts once). non_embedding leaves out the token
        embedding, the learned position table and the output head: the N of flops.py."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if isinstance(self.wpe, LearnedPositions):
                n -= self.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at context seq_len (PaLM: 6 N + 12 L H Q T, flops.py)."""
        return transformer_flops_per_token(
            n_params=self.num_params(non_embedding=True),
            n_layer=self.cfg.n_layer,
            n_head=self.cfg.n_head,
            head_dim=self.cfg.d_model // self.cfg.n_head,
            seq_len=seq_len,
        )
