"""Map our GPT onto Hugging Face transformers' GPT2LMHeadModel (config and weights).

The two compute the same function (checked to 1e-5 in fp32 by tests/test_model.py), so a
trained checkpoint can be exported and loaded with `GPT2LMHeadModel` for inference.

Weight layout. HF GPT-2 uses Conv1D, whose weight is [in, out] (the transpose of nn.Linear's
[out, in]); its attention projections are fused:
    transformer.h.{i}.attn.c_attn.weight  [D, 3D] = cat([q_proj.W, k_proj.W, v_proj.W], 0).T
    transformer.h.{i}.attn.c_attn.bias    [3D]    = cat([q_proj.b, k_proj.b, v_proj.b])
    transformer.h.{i}.attn.c_proj.weight  [D, D]  = o_proj.W.T
    transformer.h.{i}.mlp.c_fc.weight     [D, F]  = mlp.c_fc.W.T
    transformer.h.{i}.mlp.c_proj.weight   [F, D]  = mlp.c_proj.W.T
Everything else (wte, wpe, ln_1, ln_2, ln_f, lm_head) is copied as is. Sinusoidal positions are
exported as the wpe table (HF would treat it as trainable; inference is identical). A model
built with bias=False exports zero biases, which is exact. HF's activation "gelu_new" is the
tanh approximation our GPT uses by default (gelu and relu map to HF's of the same name).

Import (`config_from_hf`, `state_dict_from_hf`) is the inverse: c_attn is split back into
q_proj, k_proj, v_proj and the Conv1D weights are transposed, so import -> export returns the
same tensors.

The model must be whole (not sharded by ZeRO-3 or tensor parallelism): gather it first.
transformers is imported only inside the functions that need it (an optional dependency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.model.gpt import GPT
from pretrain.model.hf_compat import hf_export_problems, require_hf_expressible
from pretrain.model.layers import LearnedPositions

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel


HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def export_problems(cfg: ModelConfig) -> list[str]:
    """Settings of `cfg` that GPT2LMHeadModel cannot express."""
    out = []
    if cfg.norm != "layernorm":
        out.append(f"model.norm={cfg.norm!r}: GPT-2 normalizes with LayerNorm")
    if cfg.norm_position != "pre":
        out.append(f"model.norm_position={cfg.norm_position!r}: GPT-2 blocks are pre-norm")
    if cfg.gated_ffn:
        out.append("model.gated_ffn=true: GPT-2's feed-forward is not gated")
    return out + hf_export_problems(cfg)


def hf_class_name(cfg: ModelConfig) -> str:
    return "GPT2LMHeadModel"


def gpt_to_hf_config(model: GPT, *, eos_token_id: int | None = None) -> "GPT2Config":
    """The GPT2Config describing `model` (dropouts copied; call .eval() for inference)."""
    from transformers import GPT2Config

    require_hf_expressible("GPT2LMHeadModel", export_problems(model.cfg))
    cfg = model.cfg
    return GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.ffn_width,
        activation_function=HF_ACTIVATION[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        scale_attn_weights=cfg.scale_attn_scores,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        architectures=["GPT2LMHeadModel"],
    )


def _bias_or_zeros(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    return bias if bias is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


@torch.no_grad()
def gpt_to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """GPT2LMHeadModel state dict holding `model`'s weights (new contiguous tensors)."""
    require_hf_expressible("GPT2LMHeadModel", export_problems(model.cfg))
    sd: dict[str, Tensor] = {}
    wte = model.wte.weight
    sd["transformer.wte.weight"] = wte
    sd["transformer.wpe.weight"] = (
        model.wpe.weight if isinstance(model.wpe, LearnedPositions) else model.wpe.table
    )

    def norm(prefix: str, ln: torch.nn.LayerNorm) -> None:
        sd[f"{prefix}.weight"] = ln.weight
        sd[f"{prefix}.bias"] = _bias_or_zeros(ln.bias, ln.weight.numel(), ln.weight)

    def conv1d(prefix: str, *linears: torch.nn.Linear) -> None:
        # Conv1D computes x @ W + b with W [in, out]; fused outputs are concatenated.
        sd[f"{prefix}.weight"] = torch.cat([lin.weight for lin in linears], dim=0).T
        sd[f"{prefix}.bias"] = torch.cat(
            [_bias_or_zeros(lin.bias, lin.out_features, lin.weight) for lin in linears]
        )

    for i, block in enumerate(model.h):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1", block.ln_1)
        conv1d(f"{p}.attn.c_attn", block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)
        conv1d(f"{p}.attn.c_proj", block.attn.o_proj)
        norm(f"{p}.ln_2", block.ln_2)
        conv1d(f"{p}.mlp.c_fc", block.mlp.c_fc)
        conv1d(f"{p}.mlp.c_proj", block.mlp.c_proj)
    norm("transformer.ln_f", model.ln_f)
    sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def gpt_to_hf(model: GPT, *, eos_token_id: int | None = None) -> "GPT2LMHeadModel":
    """A GPT2LMHeadModel (fp32, eval mode, on CPU) computing the same function as `model`."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(gpt_to_hf_config(model, eos_token_id=eos_token_id))
    state = {k: v.float().cpu() for k, v in gpt_to_hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Non-persistent buffers aside, every HF weight must come from us and vice versa.
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(
            f"GPT-2 export does not match transformers' GPT2LMHeadModel: missing {missing}, "
            f"unexpected {unexpected} (transformers version changed its layout?)"
        )
    return hf.eval()


def config_from_hf(hf: "GPT2Config", state_dict: dict[str, Tensor]) -> dict:
    """Our `model:` keys for a Hugging Face GPT-2 (problems raise ValueError, each named)."""
    inv = {v: k for k, v in HF_ACTIVATION.items()}
    problems = []
    if hf.activation_function not in inv:
        problems.append(f"activation_function={hf.activation_function!r} (supported: "
                        f"{sorted(inv)})")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if getattr(hf, "add_cross_attention", False):
        problems.append("add_cross_attention=true")
    if problems:
        raise ValueError("cannot import this GPT-2: " + "; ".join(problems))
    return {
        "family": "gpt", "n_layer": hf.n_layer, "n_head": hf.n_head, "d_model": hf.n_embd,
        "d_ff": hf.n_inner or 4 * hf.n_embd, "max_seq_len": hf.n_positions,
        "vocab_size": hf.vocab_size, "positions": "learned", "norm": "layernorm",
        "norm_position": "pre", "activation": inv[hf.activation_function], "gated_ffn": False,
        "scale_attn_scores": bool(hf.scale_attn_weights), "dropout": hf.resid_pdrop,
        "bias": True, "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", True)),
        "init_std": hf.initializer_range, "norm_eps": hf.layer_norm_epsilon,
        "attention": {"kind": "dense", "dropout": hf.attn_pdrop},
    }


def state_dict_from_hf(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict from GPT2LMHeadModel's (the inverse of gpt_to_hf_state_dict)."""
    sd = {"wte.weight": state_dict["transformer.wte.weight"],
          "wpe.weight": state_dict["transformer.wpe.weight"],
          "ln_f.weight": state_dict["transformer.ln_f.weight"],
          "ln_f.bias": state_dict["transformer.ln_f.bias"]}
    D = cfg.d_model
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            for x in ("weight", "bias"):
                sd[f"h.{i}.{ln}.{x}"] = state_dict[f"{p}.{ln}.{x}"]
        w, b = state_dict[f"{p}.attn.c_attn.weight"].T, state_dict[f"{p}.attn.c_attn.bias"]
        for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"h.{i}.attn.{name}.weight"] = w[k * D : (k + 1) * D]
            sd[f"h.{i}.attn.{name}.bias"] = b[k * D : (k + 1) * D]
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.c_fc", "mlp.c_fc"),
                             ("mlp.c_proj", "mlp.c_proj")):
            sd[f"h.{i}.{ours}.weight"] = state_dict[f"{p}.{theirs}.weight"].T
            sd[f"h.{i}.{ours}.bias"] = state_dict[f"{p}.{theirs}.bias"]
    sd["lm_head.weight"] = (sd["wte.weight"] if cfg.tie_embeddings
                            else state_dict["lm_head.weight"])
    return {k: v.contiguous() for k, v in sd.items()}
