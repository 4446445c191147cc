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
built with bias=False exports zero biases, which is exact. HF's activation is "gelu_new", the
tanh approximation our GPT uses.

The model must be whole (not sharded by ZeRO-3 or tensor parallelism): gather it first.
transformers is imported only inside the functions that need it (an optional dependency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pretrain.model.gpt import GPT
from pretrain.model.hf_compat import require_hf_expressible
from pretrain.model.layers import LearnedPositions

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel


def gpt_to_hf_config(model: GPT, *, eos_token_id: int | None = None) -> "GPT2Config":
    """The GPT2Config describing `model` (dropouts copied; call .eval() for inference)."""
    from transformers import GPT2Config

    require_hf_expressible(model.cfg, "GPT2LMHeadModel")
    cfg = model.cfg
    return GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_ff if cfg.d_ff is not None else 4 * cfg.d_model,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        scale_attn_weights=True,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def _bias_or_zeros(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    return bias if bias is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


@torch.no_grad()
def gpt_to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """GPT2LMHeadModel state dict holding `model`'s weights (new contiguous tensors)."""
    require_hf_expressible(model.cfg, "GPT2LMHeadModel")
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
