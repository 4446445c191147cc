"""Model families and their shared parts. `build_model` turns `model:` config into a module.

No torch.distributed, DeepSpeed or Ray here: parallelism is applied to these modules from the
outside (trainer / parallelize code).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pretrain.config import ModelConfig
from pretrain.model.attention import (
    ATTENTION_KERNELS,
    AttentionKernel,
    DenseAttention,
    MultiHeadAttention,
    OffsetBias,
    build_attention_kernel,
)
from pretrain.model.bert import BERT
from pretrain.model.gpt import GPT
from pretrain.model.layers import ModelOutput
from pretrain.model.longformer import LongformerAttention  # registers kind "longformer"
from pretrain.model.reformer import LSHAttention  # registers kind "reformer"
from pretrain.model.t5 import T5

MODEL_FAMILIES: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "gpt": GPT, "bert": BERT, "t5": T5,
}
"""Constructors by `model.family`; each takes (model config, final vocabulary size)."""


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """Build the model of `cfg.family` with `vocab_size` embedding rows (the resolved size:
    model.vocab_size or the tokenizer's rounded up to pad_vocab_multiple, decided by the caller)."""
    try:
        family = MODEL_FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(
            f"model.family={cfg.family!r} is not implemented; "
            f"choose one of {sorted(MODEL_FAMILIES)}"
        ) from None
    return family(cfg, vocab_size)


__all__ = [
    "ATTENTION_KERNELS",
    "AttentionKernel",
    "BERT",
    "DenseAttention",
    "GPT",
    "LSHAttention",
    "LongformerAttention",
    "MODEL_FAMILIES",
    "ModelOutput",
    "MultiHeadAttention",
    "OffsetBias",
    "T5",
    "build_attention_kernel",
    "build_model",
]
