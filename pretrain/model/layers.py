"""Building blocks shared by the model families: positions, feed-forward, norms, LM loss/output.

Shape legend: B batch, T positions, D d_model, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------- positions


class LearnedPositions(nn.Module):
    """A trained table of absolute position embeddings, `weight` [max_seq_len, D] (GPT-2 wpe)."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        nn.init.normal_(self.weight, std=0.02)  # the model's init_weights overrides this

    def forward(self, seq_len: int) -> Tensor:
        """Position embeddings of positions 0..seq_len-1: [T, D]."""
        _check_seq_len(seq_len, self.max_seq_len)
        return self.weight[:seq_len]


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position encodings (Vaswani et al. 2017, section 3.5):
    PE[p, 2i] = sin(p / 10000^(2i/D)),  PE[p, 2i+1] = cos(p / 10000^(2i/D)).

    Kept as a non-persistent buffer `table` [max_seq_len, D]: no parameters, not in checkpoints
    (it is recomputed identically at construction).
    """

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        pos_T1 = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
        inv_freq = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
        )
        table_TD = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
        table_TD[:, 0::2] = torch.sin(pos_T1 * inv_freq)
        table_TD[:, 1::2] = torch.cos(pos_T1 * inv_freq[: d_model // 2])  # odd D: one fewer cos
        self.register_buffer("table", table_TD.float(), persistent=False)

    def forward(self, seq_len: int) -> Tensor:
        _check_seq_len(seq_len, self.max_seq_len)
        return self.table[:seq_len]


def _check_seq_len(seq_len: int, max_seq_len: int) -> None:
    if seq_len > max_seq_len:
        raise ValueError(
            f"sequence of {seq_len} tokens exceeds model.max_seq_len={max_seq_len}; "
            "raise model.max_seq_len or shorten data.seq_len"
        )


def build_positions(
    kind: Literal["learned", "sinusoidal"], max_seq_len: int, d_model: int
) -> LearnedPositions | SinusoidalPositions:
    if kind == "learned":
        return LearnedPositions(max_seq_len, d_model)
    if kind == "sinusoidal":
        return SinusoidalPositions(max_seq_len, d_model)
    raise ValueError(f"model.positions={kind!r} is not one of 'learned', 'sinusoidal'")


# ----------------------------------------------------------------------------- feed-forward

Activation = Literal["gelu_tanh", "gelu", "relu"]
"""`gelu_tanh`: the tanh approximation of GELU used by GPT-2 (HF "gelu_new"); `gelu`: exact
erf GELU (BERT); `relu` (original T5)."""


class FeedForward(nn.Module):
    """Position-wise MLP: c_proj(act(c_fc(x))) then dropout. Names follow GPT-2 (mlp.c_fc,
    mlp.c_proj); c_proj is a residual output projection (scaled init)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        activation: Activation = "gelu_tanh",
    ) -> None:
        super().__init__()
        if activation not in ("gelu_tanh", "gelu", "relu"):
            raise ValueError(f"unknown activation {activation!r}; use gelu_tanh, gelu or relu")
        self.activation = activation
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTD: Tensor) -> Tensor:
        h_BTF = self.c_fc(x_BTD)
        if self.activation == "relu":
            h_BTF = F.relu(h_BTF)
        else:
            h_BTF = F.gelu(h_BTF, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h_BTF))


# ----------------------------------------------------------------------------- norms


def layer_norm(d_model: int, *, eps: float, bias: bool) -> nn.LayerNorm:
    """LayerNorm with a learned scale and, if `bias`, a learned shift (model.bias)."""
    return nn.LayerNorm(d_model, eps=eps, bias=bias)


# ----------------------------------------------------------------------------- output and loss


@dataclass
class ModelOutput:
    """What every language model's forward returns.

    logits: [B, T, V] in the compute dtype; None when targets were given unless the caller
        asked for them (return_logits=True).
    loss: fp32 scalar, mean cross-entropy over targets != ignore_index (0.0 when there are
        none); None without targets.
    n_targets: int64 scalar tensor, the number of targets that count in `loss` (for
        token-weighted averaging over micro-batches and ranks); None without targets.
    """

    logits: Tensor | None
    loss: Tensor | None = None
    n_targets: Tensor | None = None


def lm_cross_entropy(
    logits_BTV: Tensor, targets_BT: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy (computed in fp32) over targets != ignore_index, and their count.

    Summed then divided by max(count, 1), so a batch with every target ignored gives loss 0
    and zero gradients instead of NaN.
    """
    if targets_BT.shape != logits_BTV.shape[:-1]:
        raise ValueError(
            f"targets have shape {tuple(targets_BT.shape)}, expected {tuple(logits_BTV.shape[:-1])}"
        )
    V = logits_BTV.size(-1)
    total = F.cross_entropy(
        logits_BTV.reshape(-1, V).float(),
        targets_BT.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    n_targets = (targets_BT != ignore_index).sum()
    return total / n_targets.clamp(min=1), n_targets


class LMCrossEntropy(nn.Module):
    """`lm_cross_entropy` as a module, so that the loss can be swapped from outside the model:
    tensor parallelism replaces it with a vocabulary-parallel cross-entropy that works on
    vocabulary-split logits. No parameters, nothing in the state dict."""

    def forward(
        self, logits_BTV: Tensor, targets_BT: Tensor, ignore_index: int = -100
    ) -> tuple[Tensor, Tensor]:
        return lm_cross_entropy(logits_BTV, targets_BT, ignore_index)
