"""Map our T5 onto Hugging Face transformers' T5ForConditionalGeneration and back.

Every weight is a rename. Per block, Hugging Face numbers the sublayers: encoder layer.0 =
self-attention (ln_1, attn), layer.1 = feed-forward (ln_2, mlp); decoder layer.0 = self,
layer.1 = cross-attention (ln_x, cross_attn -> EncDecAttention), layer.2 = feed-forward. The
relative position bias of a stack lives in its block 0's self-attention. The gated
feed-forward's c_gate / c_fc / c_proj are wi_0 / wi_1 / wo.

Only what T5 computes exports: relative positions, pre-norm RMSNorm, no biases, unscaled
attention scores, and an activation T5Config's feed_forward_proj can name; anything else (the
original-Transformer preset, for one) is refused with the setting named. Some transformers
versions (5.x) always tie T5's head to the embedding; an untied model is then refused rather
than exported wrong (checked on the class itself, not by version number).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.model.hf_compat import hf_export_problems, require_hf_expressible
from pretrain.model.t5 import T5

if TYPE_CHECKING:
    from transformers import T5Config

_FF_PROJ = {("relu", False): "relu", ("gelu", False): "gelu", ("gelu_tanh", False): "gelu_new",
            ("relu", True): "gated-relu", ("gelu_tanh", True): "gated-gelu"}


def _head_tied_always() -> bool:
    """Whether this transformers' T5 ties lm_head to the embedding even when asked not to."""
    from transformers import T5Config, T5ForConditionalGeneration

    tiny = T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                    tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(tiny)
    return model.lm_head.weight is model.shared.weight


def export_problems(cfg: ModelConfig) -> list[str]:
    """Settings of `cfg` that T5ForConditionalGeneration cannot express."""
    out = []
    if cfg.positions != "relative":
        out.append(f"model.positions={cfg.positions!r}: T5 has relative position bias only")
    if cfg.norm != "rmsnorm":
        out.append(f"model.norm={cfg.norm!r}: T5 normalizes with RMSNorm")
    if cfg.norm_position != "pre":
        out.append(f"model.norm_position={cfg.norm_position!r}: T5 blocks are pre-norm")
    if cfg.bias:
        out.append("model.bias=true: T5 has no biases")
    if cfg.scale_attn_scores:
        out.append("model.scale_attn_scores=true: T5 does not scale attention scores")
    if (cfg.activation, cfg.gated_ffn) not in _FF_PROJ:
        out.append(f"model.activation={cfg.activation!r} with gated_ffn={cfg.gated_ffn}: T5's "
                   f"feed_forward_proj names {sorted(_FF_PROJ.values())}")
    if not cfg.tie_embeddings and _head_tied_always():
        import transformers

        out.append(f"model.tie_embeddings=false: transformers {transformers.__version__} always "
                   "ties T5's lm_head to the shared embedding")
    return out + hf_export_problems(cfg)


def hf_config(model: T5, *, pad_token_id: int, eos_token_id: int) -> "T5Config":
    from transformers import T5Config

    require_hf_expressible(hf_class_name(model.cfg), export_problems(model.cfg))
    cfg = model.cfg
    return T5Config(
        vocab_size=model.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.n_head,
        d_ff=cfg.ffn_width, num_layers=cfg.n_layer, num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.n_head, relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=_FF_PROJ[cfg.activation, cfg.gated_ffn],
        tie_word_embeddings=cfg.tie_embeddings, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id, decoder_start_token_id=pad_token_id,
        architectures=["T5ForConditionalGeneration"],
    )


def hf_class_name(cfg: ModelConfig) -> str:
    return "T5ForConditionalGeneration"


def _names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face's (both nn.Linear layout, no biases)."""
    names = {"shared.weight": "shared.weight", "lm_head.weight": "lm_head.weight"}
    ff = ({"mlp.c_gate": "wi_0", "mlp.c_fc": "wi_1"} if cfg.gated_ffn else {"mlp.c_fc": "wi"})
    ff["mlp.c_proj"] = "wo"
    for stack, n_layer, cross in (("encoder", cfg.n_layer, False),
                                  ("decoder", cfg.decoder_layers, True)):
        names[f"{stack}.rel_bias.relative_attention_bias.weight"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        names[f"{stack}.ln_f.weight"] = f"{stack}.final_layer_norm.weight"
        for i in range(n_layer):
            ours, theirs = f"{stack}.h.{i}", f"{stack}.block.{i}.layer"
            names[f"{ours}.ln_1.weight"] = f"{theirs}.0.layer_norm.weight"
            for p in "qkvo":
                names[f"{ours}.attn.{p}_proj.weight"] = f"{theirs}.0.SelfAttention.{p}.weight"
            if cross:
                names[f"{ours}.ln_x.weight"] = f"{theirs}.1.layer_norm.weight"
                for p in "qkvo":
                    names[f"{ours}.cross_attn.{p}_proj.weight"] = (
                        f"{theirs}.1.EncDecAttention.{p}.weight")
            f = 2 if cross else 1
            names[f"{ours}.ln_2.weight"] = f"{theirs}.{f}.layer_norm.weight"
            for o, t in ff.items():
                names[f"{ours}.{o}.weight"] = f"{theirs}.{f}.DenseReluDense.{t}.weight"
    return names


@torch.no_grad()
def to_hf_state_dict(model: T5) -> dict[str, Tensor]:
    require_hf_expressible(hf_class_name(model.cfg), export_problems(model.cfg))
    ours = model.state_dict()
    sd = {theirs: ours[name] for name, theirs in _names(model.cfg).items()}
    sd["encoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def config_from_hf(hf: "T5Config", state_dict: dict[str, Tensor]) -> dict:
    """Our `model:` keys for a Hugging Face T5 (problems raise ValueError, each named)."""
    inv = {v: k for k, v in _FF_PROJ.items()}
    problems = []
    if hf.feed_forward_proj not in inv:
        problems.append(f"feed_forward_proj={hf.feed_forward_proj!r} (supported: {sorted(inv)})")
    if hf.d_kv * hf.num_heads != hf.d_model:
        problems.append(f"d_kv * num_heads = {hf.d_kv * hf.num_heads} != d_model = {hf.d_model} "
                        "(our attention projects d_model to d_model)")
    tied = state_dict["lm_head.weight"].data_ptr() == state_dict["shared.weight"].data_ptr()
    scaled = getattr(hf, "scale_decoder_outputs", getattr(hf, "tie_word_embeddings", True))
    if tied != bool(scaled):
        problems.append(f"lm_head {'tied' if tied else 'untied'} but decoder outputs "
                        f"{'' if scaled else 'not '}scaled: we scale exactly when tied")
    if problems:
        raise ValueError("cannot import this T5: " + "; ".join(problems))
    activation, gated = inv[hf.feed_forward_proj]
    return {
        "family": "t5", "n_layer": hf.num_layers, "n_decoder_layer": hf.num_decoder_layers,
        "n_head": hf.num_heads, "d_model": hf.d_model, "d_ff": hf.d_ff,
        "vocab_size": hf.vocab_size, "positions": "relative",
        "relative_buckets": hf.relative_attention_num_buckets,
        "relative_max_distance": hf.relative_attention_max_distance, "norm": "rmsnorm",
        "norm_position": "pre", "activation": activation, "gated_ffn": gated,
        "scale_attn_scores": False, "dropout": hf.dropout_rate, "bias": False,
        "tie_embeddings": tied, "norm_eps": hf.layer_norm_epsilon,
        "max_seq_len": getattr(hf, "n_positions", None) or 512,  # a bound only: relative bias
        "attention": {"kind": "dense", "dropout": hf.dropout_rate},
    }


def state_dict_from_hf(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {ours: state_dict[theirs] for ours, theirs in _names(cfg).items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["shared.weight"]
    return out
