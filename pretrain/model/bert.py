"""BERT: a bidirectional encoder trained as a masked language model (Devlin et al. 2019).

    tokens -> embeddings: ln(wte + wpe + wtt(token types)) -> dropout
           -> encoder: n_layer post-norm blocks (blocks.py), bidirectional self-attention
              (dense, Longformer or LSH), padding keys masked                  -> x [B, T, D]
    masked LM head:  ln(act(dense(x))) @ wte^T + bias -> logits [B, T, V]    (tied decoder)
    sentence head:   pooler tanh(dense(x[:, 0])) -> Linear(D, 2)             (nsp / sop only)

With the presets (configs/models/bert-*.yaml: post-norm LayerNorm, exact GELU, learned
positions, 2 token types) logits equal Hugging Face's BertForMaskedLM / BertForPreTraining
(hf_bert.py). Init as BERT: every Linear/Embedding ~ N(0, init_std), biases 0, norms 1/0.

The loss is the masked-LM cross-entropy over the positions whose label is not ignore_index
(the head runs on those rows only, unless logits are asked for) plus, with a sentence head and
sentence_labels, the sentence-pair cross-entropy (BERT's sum of the two). Metrics: mlm_loss,
mlm_accuracy and, with a sentence head, <head>_loss and <head>_accuracy.

Shape legend: B batch, T sequence length, D d_model, V vocabulary, N predicted positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.model.blocks import TransformerStack, self_attention_context
from pretrain.model.flops import transformer_flops_per_token
from pretrain.model.layers import (
    LearnedPositions,
    LMCrossEntropy,
    ModelOutput,
    activate,
    build_norm,
    build_positions,
    init_normal_,
)


class BertEmbeddings(nn.Module):
    """Token + absolute position + token type embeddings, normalized, then dropout."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = build_positions(cfg.positions, cfg.max_seq_len, cfg.d_model)
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.ln = build_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        x_BTD = self.wte(input_ids) + self.wpe(input_ids.size(1)).to(self.wte.weight.dtype)
        if self.wtt is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x_BTD = x_BTD + self.wtt(types)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given to a BERT built with model.type_vocab_size=0")
        return self.drop(self.ln(x_BTD))


class MaskedLMHead(nn.Module):
    """BERT's prediction head: a dense + activation + norm transform, then the vocabulary
    projection (decoder, tied to the token embedding when model.tie_embeddings) plus a bias."""

    # Tensor parallelism splits the decoder over the vocabulary (the model's LM head) and the
    # bias with it; the transform before it stays whole on every rank.
    tp_plan = {"bias": "shard:0", "dense": "replicate"}

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.ln = build_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if cfg.bias else None

    def forward(self, x_ND: Tensor) -> Tensor:
        logits = self.decoder(self.ln(activate(self.dense(x_ND), self.activation)))
        return logits + self.bias if self.bias is not None else logits


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if cfg.family != "bert":
            raise ValueError(f"BERT built from a config with model.family={cfg.family!r}")
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}")
        self.cfg = cfg.model_copy(deep=True)
        self.vocab_size = vocab_size
        self.embeddings = BertEmbeddings(cfg, vocab_size)
        self.encoder = TransformerStack(cfg, cfg.n_layer, causal=False, cross=False)
        self.mlm_head = MaskedLMHead(cfg, vocab_size)
        if cfg.tie_embeddings:
            self.mlm_head.decoder.weight = self.embeddings.wte.weight
        self.pooler = self.sentence_head = None
        if cfg.sentence_head != "none":
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.sentence_head = nn.Linear(cfg.d_model, 2)
        self.lm_loss = LMCrossEntropy()  # a module, so tensor parallelism can swap it
        init_normal_(self, cfg.init_std)

    def encode(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states [B, T, D]; attention_mask [B, T]: 1/True = real token."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        padding = attention_mask.bool() if attention_mask is not None else None
        return self.encoder(self.embeddings(input_ids, token_type_ids), padding_mask_BT=padding)

    def sentence_logits(self, x_BTD: Tensor) -> Tensor:
        """[B, 2] from the [CLS] position through the pooler."""
        return self.sentence_head(torch.tanh(self.pooler(x_BTD[:, 0])))

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        sentence_labels: Tensor | None = None,
        ignore_index: int = -100,
        return_logits: bool = False,
    ) -> ModelOutput:
        """labels [B, T]: the original token at predicted positions, ignore_index elsewhere.
        sentence_labels [B]: 0/1 for the sentence head (see data_pipeline/objectives)."""
        x_BTD = self.encode(input_ids, token_type_ids, attention_mask)
        sentence = self.sentence_logits(x_BTD) if self.sentence_head is not None else None
        if labels is None:
            return ModelOutput(logits=self.mlm_head(x_BTD), sentence_logits=sentence)

        if return_logits:
            logits_BTV = self.mlm_head(x_BTD)
            loss, n_targets = self.lm_loss(logits_BTV, labels, ignore_index)
            chosen = labels != ignore_index
            logits_NV, labels_N = logits_BTV[chosen], labels[chosen]
        else:  # the head only where there is something to predict
            chosen = labels != ignore_index
            logits_NV, labels_N = self.mlm_head(x_BTD[chosen]), labels[chosen]
            loss, n_targets = self.lm_loss(logits_NV, labels_N, ignore_index)
            logits_BTV = None
        correct = (self.lm_loss.predictions(logits_NV) == labels_N).sum()
        metrics = {"mlm_loss": loss.detach(),
                   "mlm_accuracy": (correct / n_targets.clamp(min=1)).detach()}
        if sentence is not None and sentence_labels is not None:
            # Mean over the rows with a label (a row the loader skipped has ignore_index; 0, not
            # NaN, when none has).
            counted = (sentence_labels != ignore_index).sum().clamp(min=1)
            sentence_loss = F.cross_entropy(sentence.float(), sentence_labels,
                                            ignore_index=ignore_index, reduction="sum") / counted
            name = self.cfg.sentence_head
            metrics[f"{name}_loss"] = sentence_loss.detach()
            metrics[f"{name}_accuracy"] = (sentence.argmax(-1) == sentence_labels).sum() / counted
            loss = loss + sentence_loss
        return ModelOutput(logits=logits_BTV, loss=loss, n_targets=n_targets, metrics=metrics,
                           sentence_logits=sentence if return_logits else None)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied matrix counts once); non_embedding leaves out the token,
        position and token type embeddings and an untied decoder (flops.py's N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            emb = self.embeddings
            n -= emb.wte.weight.numel()
            if isinstance(emb.wpe, LearnedPositions):
                n -= emb.wpe.weight.numel()
            if emb.wtt is not None:
                n -= emb.wtt.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.mlm_head.decoder.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """6 N + 12 L H Q T (flops.py); counts the head on every token, an upper bound. T: the
        keys each query is scored against (seq_len for dense attention)."""
        return transformer_flops_per_token(
            n_params=self.num_params(non_embedding=True), n_layer=self.cfg.n_layer,
            n_head=self.cfg.n_head, head_dim=self.cfg.d_model // self.cfg.n_head,
            seq_len=self_attention_context(self, seq_len))
