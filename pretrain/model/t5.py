"""T5: an encoder-decoder trained on span corruption (Raffel et al. 2020), and, as a preset of
the same code, the original Transformer (Vaswani et al. 2017).

    input_ids   -> shared embedding [+ wpe] -> dropout -> encoder stack -> enc [B, S, D]
    decoder_ids -> shared embedding [+ wpe] -> dropout -> decoder stack(enc) -> x [B, T, D]
    logits = lm_head(x * D^-0.5 if tied else x)                                    [B, T, V]

    encoder block: bidirectional self-attention (input padding masked; dense, Longformer or
                   LSH by model.attention.kind), feed-forward
    decoder block: causal self-attention (dense), cross-attention over enc (dense, input
                   padding masked), feed-forward                         (blocks.py)

T5 (configs/models/t5-*.yaml): relative position bias (one table per stack, shared by its
blocks, bidirectional in the encoder and looking back only in the decoder), RMSNorm in pre-norm
blocks with a final norm per stack, no biases, unscaled attention scores, ReLU (v1.0) or
gated-GELU (v1.1, gated_ffn), head tied to the embedding with the decoder output scaled by
D^-0.5. These models equal Hugging Face's T5ForConditionalGeneration (hf_t5.py).

The original Transformer (configs/models/transformer-base.yaml): sinusoidal positions added to
the embeddings, post-norm LayerNorm blocks with biases, scaled attention, ReLU, tied
embeddings. One difference from the paper: the sqrt(D) between the tied input embedding and the
output projection is applied as T5 does, dividing the decoder output, where the paper multiplies
the embeddings.

Init as T5 (Mesh TensorFlow, and Hugging Face's with initializer_factor 1): embeddings and an
untied head ~ N(0, 1); q ~ N(0, (D d)^-1/2) when scores are unscaled (the 1/sqrt(d) moves into
the init) else N(0, D^-1/2); k, v, o and the feed-forward inputs ~ N(0, D^-1/2); feed-forward
outputs ~ N(0, F^-1/2); relative bias ~ N(0, D^-1/2); norms 1, biases 0. model.init_std is not
used.

The loss is the cross-entropy of labels (ignore_index does not count). decoder_input_ids are
the labels shifted right behind the decoder start token (the pad id in T5), as the span
corruption objective provides them.

Shape legend: B batch, S encoder positions, T decoder positions, D d_model, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.config import AttentionConfig, ModelConfig
from pretrain.model.attention import MultiHeadAttention
from pretrain.model.blocks import TransformerStack, self_attention_context
from pretrain.model.flops import transformer_flops_per_token
from pretrain.model.layers import (
    NORM_TYPES,
    FeedForward,
    GatedFeedForward,
    LearnedPositions,
    LMCrossEntropy,
    ModelOutput,
    RelativePositionBias,
    build_positions,
    lm_head_cross_entropy,
)


class T5(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if cfg.family != "t5":
            raise ValueError(f"T5 built from a config with model.family={cfg.family!r}")
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}")
        self.cfg = cfg.model_copy(deep=True)
        self.vocab_size = vocab_size
        self.shared = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = None  # absolute positions, shared by encoder and decoder (not in T5)
        if cfg.positions != "relative":
            self.wpe = build_positions(cfg.positions, cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = TransformerStack(cfg, cfg.n_layer, causal=False, cross=False)
        # The decoder's self-attention stays dense: its targets are short, and it is the
        # encoder's input that grows with the context.
        self.decoder = TransformerStack(cfg, cfg.decoder_layers, causal=True, cross=True,
                                        attention=AttentionConfig(dropout=cfg.attention.dropout))
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.lm_loss = LMCrossEntropy()  # a module, so tensor parallelism can swap it
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's init (see module docstring)."""
        D, F, d = self.cfg.d_model, self.cfg.ffn_width, self.cfg.d_model // self.cfg.n_head
        nn.init.normal_(self.shared.weight, std=1.0)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                q_std = (D * d) ** -0.5 if not module.scale_scores else D**-0.5
                queries = module.query_projections()  # q (LSH: the shared qk; global q)
                for lin in (*module.head_projections(), module.o_proj):
                    std = q_std if any(lin is q for q in queries) else D**-0.5
                    nn.init.normal_(lin.weight, std=std)
            elif isinstance(module, (FeedForward, GatedFeedForward)):
                for lin in (module.c_fc, getattr(module, "c_gate", None)):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=D**-0.5)
                nn.init.normal_(module.c_proj.weight, std=F**-0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.relative_attention_bias.weight, std=D**-0.5)
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, std=1.0)
            elif isinstance(module, NORM_TYPES):
                nn.init.ones_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def embed(self, ids_BT: Tensor) -> Tensor:
        if ids_BT.dim() != 2:
            raise ValueError(f"token ids must be [B, T], got shape {tuple(ids_BT.shape)}")
        x_BTD = self.shared(ids_BT)
        if self.wpe is not None:
            x_BTD = x_BTD + self.wpe(ids_BT.size(1)).to(x_BTD.dtype)
        elif ids_BT.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {ids_BT.size(1)} tokens exceeds model.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        return self.drop(x_BTD)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output [B, S, D]; attention_mask [B, S]: 1/True = real token."""
        padding = attention_mask.bool() if attention_mask is not None else None
        return self.encoder(self.embed(input_ids), padding_mask_BT=padding)

    def decode(self, decoder_input_ids: Tensor, enc_BSD: Tensor,
               attention_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] of the decoder over the encoder output."""
        return self.lm_head(self.decoder_output(decoder_input_ids, enc_BSD, attention_mask,
                                                decoder_attention_mask))

    def decoder_output(self, decoder_input_ids: Tensor, enc_BSD: Tensor,
                       attention_mask: Tensor | None = None,
                       decoder_attention_mask: Tensor | None = None) -> Tensor:
        """What lm_head reads [B, T, D]: the decoder's output (scaled by D^-0.5 when tied)."""
        x_BTD = self.decoder(
            self.embed(decoder_input_ids),
            padding_mask_BT=decoder_attention_mask.bool() if decoder_attention_mask is not None
            else None,
            context_BSD=enc_BSD,
            context_padding_mask_BS=attention_mask.bool() if attention_mask is not None else None,
        )
        if self.cfg.tie_embeddings:
            x_BTD = x_BTD * self.cfg.d_model**-0.5
        return x_BTD

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        decoder_input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        ignore_index: int = -100,
        return_logits: bool = False,
    ) -> ModelOutput:
        """input_ids [B, S]; decoder_input_ids, labels [B, T]."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (the labels shifted right behind the "
                             "decoder start token)")
        enc_BSD = self.encode(input_ids, attention_mask)
        x_BTD = self.decoder_output(decoder_input_ids, enc_BSD, attention_mask,
                                    decoder_attention_mask)
        if labels is not None and not return_logits:  # the logits never exist whole
            loss, n_targets = lm_head_cross_entropy(self.lm_head, self.lm_loss, x_BTD, labels,
                                                    ignore_index)
            return ModelOutput(logits=None, loss=loss, n_targets=n_targets)
        logits_BTV = self.lm_head(x_BTD)
        if labels is None:
            return ModelOutput(logits=logits_BTV)
        loss, n_targets = self.lm_loss(logits_BTV, labels, ignore_index)
        return ModelOutput(logits=logits_BTV, loss=loss, n_targets=n_targets)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied matrix counts once); non_embedding leaves out the shared
        embedding, a learned position table and an untied head (flops.py's N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.shared.weight.numel()
            if isinstance(self.wpe, LearnedPositions):
                n -= self.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """6 N + 12 L H Q T (flops.py) with L = encoder + decoder blocks: an upper bound that
        counts every token through both stacks (span corruption's targets are shorter). T: the
        keys each self-attention query is scored against, averaged over the blocks (seq_len
        for dense attention; a long-context encoder's window)."""
        return transformer_flops_per_token(
            n_params=self.num_params(non_embedding=True),
            n_layer=self.cfg.n_layer + self.cfg.decoder_layers, n_head=self.cfg.n_head,
            head_dim=self.cfg.d_model // self.cfg.n_head,
            seq_len=self_attention_context(self, seq_len))

