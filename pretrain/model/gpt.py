"""GPT: a decoder-only causal language model in the GPT-2 layout (Radford et al. 2019).

    tokens -> wte + wpe -> dropout -> n_layer x block -> ln_f -> lm_head -> logits
    (with labels and no logits asked for, the loss comes from ln_f's output a block of rows at
    a time, layers.lm_head_cross_entropy: the [B, T, V] logits never exist whole)
    block (blocks.py, pre-norm):  x = x + attn(ln_1(x))   (causal self-attention: dense,
                                                           Longformer or LSH)
                                  x = x + mlp(ln_2(x))    (feed-forward, optionally chunked)
    model.reversible: two residual streams, x1 += attn(ln_1(x2)); x2 += mlp(ln_2(x1)), output
                      (x1 + x2) / 2, activations recomputed in backward (blocks.py)

With the defaults of `model:` this is GPT-2 exactly: pre-LayerNorm, GELU with the tanh
approximation (GPT-2's `gelu_new`, so logits match Hugging Face GPT2LMHeadModel; see
hf_gpt2.py), learned positions, output head tied to the token embedding. The shared blocks
also give RMSNorm, post-norm, gated feed-forwards or unscaled attention when configured; those
models train the same way but have no GPT-2 export.

Init as GPT-2: every Linear/Embedding weight ~ N(0, init_std), biases 0, norms 1/0, and the
two residual output projections of each block (attn.o_proj, mlp.c_proj) ~ N(0, init_std /
sqrt(2 n_layer)), so the residual stream's variance does not grow with depth.

Generation passes one KVCache per block (attention.py; dense attention only); positions then
start after the cached tokens.

Shape legend: B batch, T sequence length, D d_model, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.model.attention import KVCache
from pretrain.model.blocks import build_block, run_blocks, self_attention_context
from pretrain.model.flops import transformer_flops_per_token
from pretrain.model.layers import (
    LearnedPositions,
    LMCrossEntropy,
    ModelOutput,
    build_norm,
    build_positions,
    init_normal_,
    lm_head_cross_entropy,
)


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
        self.h = nn.ModuleList(build_block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = build_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one Parameter, two uses
        self.lm_loss = LMCrossEntropy()  # a module, so tensor parallelism can swap it
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init (see module docstring). Safe to call again, e.g. after building on the
        meta device and materializing."""
        init_normal_(self, self.cfg.init_std)
        resid_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for block in self.h:
            for proj in block.residual_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=resid_std)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        ignore_index: int = -100,
        return_logits: bool = False,
        kv_caches: list[KVCache] | None = None,
    ) -> ModelOutput:
        """input_ids, labels: int64 [B, T] (labels are the next tokens; ignore_index does not
        count). kv_caches: one per block, for generation (see module docstring)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        T = input_ids.size(1)
        offset = kv_caches[0].length if kv_caches else 0
        tok_BTD = self.wte(input_ids)
        pos_TD = self.wpe(T, offset).to(tok_BTD.dtype)
        x_BTD = self.drop(tok_BTD + pos_TD)
        x_BTD = run_blocks(self.h, x_BTD, reversible=self.cfg.reversible, causal=True,
                           kv_caches=kv_caches)
        x_BTD = self.ln_f(x_BTD)
        if labels is not None and not return_logits:
            # the loss from x directly: the logits over the vocabulary, the largest activation,
            # never exist whole (layers.lm_head_cross_entropy)
            loss, n_targets = lm_head_cross_entropy(self.lm_head, self.lm_loss, x_BTD, labels,
                                                    ignore_index)
            return ModelOutput(logits=None, loss=loss, n_targets=n_targets)
        logits_BTV = self.lm_head(x_BTD)  # compute dtype; the loss upcasts to fp32
        if labels is None:
            return ModelOutput(logits=logits_BTV)
        loss, n_targets = self.lm_loss(logits_BTV, labels, ignore_index)
        return ModelOutput(logits=logits_BTV, loss=loss, n_targets=n_targets)

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
        """Training FLOPs per token at context seq_len (PaLM: 6 N + 12 L H Q T, flops.py), where
        T is the number of keys each query is scored against, averaged over the layers
        (seq_len for dense attention, about 3 windows for Longformer)."""
        return transformer_flops_per_token(
            n_params=self.num_params(non_embedding=True),
            n_layer=self.cfg.n_layer,
            n_head=self.cfg.n_head,
            head_dim=self.cfg.d_model // self.cfg.n_head,
            seq_len=self_attention_context(self, seq_len),
        )
