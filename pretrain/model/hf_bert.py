"""Map our BERT onto Hugging Face transformers' BertForMaskedLM / BertForPreTraining and back.

Every weight is a rename (both use nn.Linear's [out, in]); the sentence head selects the class:
none -> BertForMaskedLM, nsp or sop -> BertForPreTraining (its cls.seq_relationship is the same
2-way classifier on the pooled [CLS]; for sop its label 1 means "swapped"). A model built with
bias=False exports zero biases, and sinusoidal positions export as the position table: both
exact for inference. Post-norm LayerNorm blocks with an ungated feed-forward and scaled
attention are what BERT computes; other settings are refused, each named.

transformers is imported only inside the functions that need it (an optional dependency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.model.bert import BERT
from pretrain.model.hf_compat import hf_export_problems, require_hf_expressible
from pretrain.model.layers import LearnedPositions

if TYPE_CHECKING:
    from transformers import BertConfig

HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def export_problems(cfg: ModelConfig) -> list[str]:
    """Settings of `cfg` that BertForMaskedLM / BertForPreTraining cannot express."""
    out = []
    if cfg.norm != "layernorm":
        out.append(f"model.norm={cfg.norm!r}: BERT normalizes with LayerNorm")
    if cfg.norm_position != "post":
        out.append(f"model.norm_position={cfg.norm_position!r}: BERT blocks are post-norm")
    if cfg.gated_ffn:
        out.append("model.gated_ffn=true: BERT's feed-forward is not gated")
    if not cfg.scale_attn_scores:
        out.append("model.scale_attn_scores=false: BERT scales attention scores by 1/sqrt(d)")
    return out + hf_export_problems(cfg)


def hf_config(model: BERT, *, pad_token_id: int | None = None) -> "BertConfig":
    from transformers import BertConfig

    require_hf_expressible(hf_class_name(model.cfg), export_problems(model.cfg))
    cfg = model.cfg
    return BertConfig(
        vocab_size=model.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_width,
        hidden_act=HF_ACTIVATION[cfg.activation], hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention.dropout,
        max_position_embeddings=cfg.max_seq_len, type_vocab_size=max(cfg.type_vocab_size, 1),
        initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps,
        pad_token_id=pad_token_id, tie_word_embeddings=cfg.tie_embeddings,
        architectures=[hf_class_name(model.cfg)],
    )


def hf_class_name(cfg: ModelConfig) -> str:
    return "BertForMaskedLM" if cfg.sentence_head == "none" else "BertForPreTraining"


def _names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face's (both nn.Linear layout)."""
    pre = "bert."  # BertForMaskedLM and BertForPreTraining keep the encoder under `bert`
    names = {
        "embeddings.wte.weight": f"{pre}embeddings.word_embeddings.weight",
        "embeddings.wpe.weight": f"{pre}embeddings.position_embeddings.weight",
        "embeddings.wtt.weight": f"{pre}embeddings.token_type_embeddings.weight",
        "embeddings.ln.weight": f"{pre}embeddings.LayerNorm.weight",
        "embeddings.ln.bias": f"{pre}embeddings.LayerNorm.bias",
        "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
        "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
        "mlm_head.ln.weight": "cls.predictions.transform.LayerNorm.weight",
        "mlm_head.ln.bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm_head.decoder.weight": "cls.predictions.decoder.weight",
        "mlm_head.bias": "cls.predictions.bias",
    }
    if cfg.sentence_head != "none":
        names.update({"pooler.weight": f"{pre}pooler.dense.weight",
                      "pooler.bias": f"{pre}pooler.dense.bias",
                      "sentence_head.weight": "cls.seq_relationship.weight",
                      "sentence_head.bias": "cls.seq_relationship.bias"})
    block = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
             "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
             "ln_1": "attention.output.LayerNorm", "mlp.c_fc": "intermediate.dense",
             "mlp.c_proj": "output.dense", "ln_2": "output.LayerNorm"}
    for i in range(cfg.n_layer):
        for ours, theirs in block.items():
            for p in ("weight", "bias"):
                names[f"encoder.h.{i}.{ours}.{p}"] = f"{pre}encoder.layer.{i}.{theirs}.{p}"
    return names


@torch.no_grad()
def to_hf_state_dict(model: BERT) -> dict[str, Tensor]:
    """The Hugging Face state dict of `model` (new contiguous tensors; zeros where we have no
    bias, the sinusoidal table as the position table)."""
    require_hf_expressible(hf_class_name(model.cfg), export_problems(model.cfg))
    ours = dict(model.state_dict())
    if not isinstance(model.embeddings.wpe, LearnedPositions):
        ours["embeddings.wpe.weight"] = model.embeddings.wpe.table
    if model.embeddings.wtt is None:  # no token types: a zero table adds nothing
        ours["embeddings.wtt.weight"] = torch.zeros(1, model.cfg.d_model)
    sd = {}
    for name, hf_name in _names(model.cfg).items():
        if name in ours:
            sd[hf_name] = ours[name]
        elif name.endswith("bias"):  # model.bias=false
            weight = ours[name[: -len("bias")] + "weight"]
            n = weight.size(0) if name != "mlm_head.bias" else model.vocab_size
            sd[hf_name] = torch.zeros(n, dtype=weight.dtype)
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def config_from_hf(hf: "BertConfig", state_dict: dict[str, Tensor]) -> dict:
    """Our `model:` keys for a Hugging Face BERT (problems raise ValueError, each named)."""
    problems = []
    inv = {v: k for k, v in HF_ACTIVATION.items()}
    if hf.hidden_act not in inv:
        problems.append(f"hidden_act={hf.hidden_act!r} (supported: {sorted(inv)})")
    if getattr(hf, "position_embedding_type", "absolute") not in (None, "absolute"):
        problems.append(f"position_embedding_type={hf.position_embedding_type!r}")
    if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
        problems.append("is_decoder / add_cross_attention (BERT as a decoder)")
    if "cls.predictions.transform.dense.weight" not in state_dict:
        problems.append("no masked-LM head (cls.predictions.*): save a BertForMaskedLM or "
                        "BertForPreTraining")
    if problems:
        raise ValueError("cannot import this BERT: " + "; ".join(problems))
    return {
        "family": "bert", "n_layer": hf.num_hidden_layers, "n_head": hf.num_attention_heads,
        "d_model": hf.hidden_size, "d_ff": hf.intermediate_size,
        "max_seq_len": hf.max_position_embeddings, "vocab_size": hf.vocab_size,
        "positions": "learned", "norm": "layernorm", "norm_position": "post",
        "activation": inv[hf.hidden_act], "gated_ffn": False, "scale_attn_scores": True,
        "type_vocab_size": hf.type_vocab_size,
        "sentence_head": "nsp" if "cls.seq_relationship.weight" in state_dict else "none",
        "dropout": hf.hidden_dropout_prob, "bias": True,
        "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", True)),
        "init_std": hf.initializer_range, "norm_eps": hf.layer_norm_eps,
        "attention": {"kind": "dense", "dropout": hf.attention_probs_dropout_prob},
    }


def state_dict_from_hf(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict from a Hugging Face BERT's (for a model built from config_from_hf)."""
    out = {ours: state_dict[theirs] for ours, theirs in _names(cfg).items()}
    if cfg.tie_embeddings:  # one tensor, as in the model
        out["mlm_head.decoder.weight"] = out["embeddings.wte.weight"]
    return out
