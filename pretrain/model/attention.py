"""Attention for every model family: projections in `MultiHeadAttention`, the core in kernels.

The split is what lets BERT (bidirectional + padding), T5 (relative position bias, cross
attention), Longformer (sliding window + global tokens) and Reformer (LSH buckets) share one
module:

* `MultiHeadAttention` owns the learned parts: the q, k, v and output projections, the head
  split/merge and the dropouts. It knows nothing about how scores are computed.
* An `AttentionKernel` computes only  softmax(q k^T / sqrt(d) + attn_bias + masks) v  on
  [B, H, T, d] tensors. Kernels are sibling classes with one call signature and are chosen by
  name from `ATTENTION_KERNELS` (the `model.attention.kind` config key).

Masks and bias, the same for every kernel:
* `causal`: query i sees key j only if j <= i + (S - T) (aligned at the bottom-right, so a
  query block appended to cached keys sees all of them; with T == S this is the usual j <= i).
* `key_padding_mask_BS`: bool [B, S], True = real token, False = padding never attended to.
* `attn_bias`: float, added to the scaled scores, broadcastable to [B, H, T, S] (T5's learned
  relative position bias, ALiBi, ...). It may require grad. Use masks, not -inf, to exclude.
* A query row whose keys are all masked (e.g. a padding query under left padding) outputs zeros
  and passes zero gradient: never NaN.

Tensor parallelism (later, from outside the model) splits heads by slicing the output features of
q_proj/k_proj/v_proj and the input features of o_proj. The number of heads in forward is
therefore derived from the projection width (`q_proj.out_features // head_dim`), never from
`n_head`, so the sliced module runs unchanged on its share of heads. `n_head` records the count
the module was built with; a TP transform updates it for the record.

Layout of the projections (nn.Linear, weight [out, in]): q_proj, k_proj, v_proj: [D, D], head h
owns output rows h*d:(h+1)*d; o_proj: [D, D], head h owns input columns h*d:(h+1)*d. Hugging
Face GPT-2's fused Conv1D `c_attn.weight` [D, 3D] is cat([Wq, Wk, Wv], dim=0).T (see hf_gpt2.py).

Shape legend: B batch, T query positions, S key/value positions, D d_model, H heads (local to
this module), d head dim, E = H * d projection width (D unless heads were split).
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import AttentionConfig


def check_attention_inputs(
    q_BHTd: Tensor,
    k_BHSd: Tensor,
    v_BHSd: Tensor,
    key_padding_mask_BS: Tensor | None,
    attn_bias: Tensor | None,
) -> None:
    """Shape/dtype checks shared by all kernels; errors say which argument is wrong."""
    if q_BHTd.dim() != 4 or k_BHSd.dim() != 4 or v_BHSd.dim() != 4:
        raise ValueError(
            f"attention kernel expects [B, H, T, d] tensors, got q {tuple(q_BHTd.shape)}, "
            f"k {tuple(k_BHSd.shape)}, v {tuple(v_BHSd.shape)}"
        )
    if k_BHSd.shape != v_BHSd.shape or q_BHTd.shape[:2] != k_BHSd.shape[:2] or (
        q_BHTd.size(-1) != k_BHSd.size(-1)
    ):
        raise ValueError(
            f"q {tuple(q_BHTd.shape)}, k {tuple(k_BHSd.shape)}, v {tuple(v_BHSd.shape)} do not "
            "agree: k and v must be equal, and B, H, d must match q"
        )
    B, S = k_BHSd.size(0), k_BHSd.size(2)
    if key_padding_mask_BS is not None:
        if key_padding_mask_BS.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask_BS must be bool (True = real token), "
                f"got {key_padding_mask_BS.dtype}"
            )
        if tuple(key_padding_mask_BS.shape) != (B, S):
            raise ValueError(
                f"key_padding_mask_BS has shape {tuple(key_padding_mask_BS.shape)}, "
                f"expected {(B, S)}"
            )
    if attn_bias is not None:
        if not attn_bias.is_floating_point():
            raise TypeError(f"attn_bias must be a float tensor, got {attn_bias.dtype}")
        T = q_BHTd.size(2)
        try:
            torch.broadcast_shapes(attn_bias.shape, (B, q_BHTd.size(1), T, S))
        except RuntimeError:
            raise ValueError(
                f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                f"[B, H, T, S] = {[B, q_BHTd.size(1), T, S]}"
            ) from None


def causal_mask_TS(T: int, S: int, device: torch.device) -> Tensor:
    """Bool [T, S], True where query i may see key j: j <= i + (S - T)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class AttentionKernel(nn.Module, abc.ABC):
    """The attention core: softmax(q k^T / sqrt(d) + attn_bias + masks) v.

    Subclasses implement `forward` with exactly this signature and semantics (see the module
    docstring); they may hold buffers (e.g. random rotations) but no projections.
    """

    @classmethod
    def from_config(cls, cfg: AttentionConfig) -> "AttentionKernel":
        """Build the kernel from `model.attention`; kernels with settings override this."""
        return cls()

    @abc.abstractmethod
    def forward(
        self,
        q_BHTd: Tensor,
        k_BHSd: Tensor,
        v_BHSd: Tensor,
        *,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        """Returns out_BHTd, in the dtype of q."""


class DenseAttention(AttentionKernel):
    """Full attention with torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU, a fused kernel on CPU).

    Plain causal (or unmasked) self-attention takes the `is_causal=True` fast path and never
    builds a mask. Only when padding or a bias is present is a [B|1, 1, T, S] mask built: bool if
    there is no bias, else the bias with -inf where masked.
    """

    def forward(
        self,
        q_BHTd: Tensor,
        k_BHSd: Tensor,
        v_BHSd: Tensor,
        *,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        check_attention_inputs(q_BHTd, k_BHSd, v_BHSd, key_padding_mask_BS, attn_bias)
        T, S = q_BHTd.size(2), k_BHSd.size(2)
        if key_padding_mask_BS is None and attn_bias is None and (not causal or T == S):
            # SDPA's is_causal is top-left aligned, which equals ours only when T == S.
            return F.scaled_dot_product_attention(
                q_BHTd, k_BHSd, v_BHSd, dropout_p=dropout_p, is_causal=causal
            )

        # allowed: bool broadcastable to [B, H, T, S], True = may attend. None = all allowed.
        allowed = causal_mask_TS(T, S, q_BHTd.device)[None, None] if causal else None
        if key_padding_mask_BS is not None:
            pad_B11S = key_padding_mask_BS[:, None, None, :]
            allowed = pad_B11S if allowed is None else allowed & pad_B11S
        row_ok = None
        if allowed is not None:
            # A row with nothing to attend to would be softmax over all -inf = NaN. Let such
            # rows attend everywhere (finite), then zero their output below. No host sync.
            row_ok = allowed.any(dim=-1, keepdim=True)  # [B|1, 1, T, 1]
            allowed = allowed | ~row_ok

        if attn_bias is None:
            mask = allowed
        else:
            bias = attn_bias.to(q_BHTd.dtype)
            # where() broadcasts both sides: a per-head bias meets a per-batch padding mask.
            mask = bias if allowed is None else torch.where(allowed, bias, float("-inf"))
        out_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHSd, v_BHSd, attn_mask=mask, dropout_p=dropout_p
        )
        if row_ok is not None:
            out_BHTd = out_BHTd.masked_fill(~row_ok, 0.0)
        return out_BHTd


ATTENTION_KERNELS: dict[str, type[AttentionKernel]] = {"dense": DenseAttention}
"""Kernel classes by `model.attention.kind`. New kernels register here."""


def build_attention_kernel(cfg: AttentionConfig) -> AttentionKernel:
    try:
        kernel_cls = ATTENTION_KERNELS[cfg.kind]
    except KeyError:
        raise ValueError(
            f"model.attention.kind={cfg.kind!r} is not a known attention kernel; "
            f"choose one of {sorted(ATTENTION_KERNELS)}"
        ) from None
    return kernel_cls.from_config(cfg)


class KVCache:
    """Keys and values of the positions already processed, for incremental decoding: each
    forward appends its new k, v [B, H, T, d] and attends over everything cached (the causal
    mask is bottom-right aligned, so new queries see all earlier keys)."""

    def __init__(self) -> None:
        self.k_BHSd: Tensor | None = None
        self.v_BHSd: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BHSd is None else self.k_BHSd.size(2)

    def update(self, k_BHTd: Tensor, v_BHTd: Tensor) -> tuple[Tensor, Tensor]:
        if self.k_BHSd is None:
            self.k_BHSd, self.v_BHSd = k_BHTd, v_BHTd
        else:
            self.k_BHSd = torch.cat([self.k_BHSd, k_BHTd], dim=2)
            self.v_BHSd = torch.cat([self.v_BHSd, v_BHTd], dim=2)
        return self.k_BHSd, self.v_BHSd


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention: projections, head split, kernel, output projection.

    Self-attention (cross=False): q, k, v all come from x_BTD. Cross-attention (cross=True): q
    from x_BTD, k and v from context_BSD (the encoder output in T5), which is then required.
    scale_scores=False leaves the scores q.k unscaled (T5): q is multiplied by sqrt(d) before
    the kernel, whose 1/sqrt(d) then cancels, so every kernel serves both conventions.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        kernel: AttentionKernel | None = None,
        cross: bool = False,
        scale_scores: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"n_head={n_head} must divide d_model={d_model}")
        self.d_model = d_model
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.cross = cross
        self.scale_scores = scale_scores
        self.attn_dropout = attn_dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.kernel = kernel if kernel is not None else DenseAttention()
        self.resid_dropout = nn.Dropout(dropout)

    def _split_heads(self, x_BTE: Tensor) -> Tensor:
        B, T, E = x_BTE.shape
        return x_BTE.view(B, T, E // self.head_dim, self.head_dim).transpose(1, 2)  # [B,H,T,d]

    def forward(
        self,
        x_BTD: Tensor,
        *,
        context_BSD: Tensor | None = None,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """kv_cache (self-attention only): append this call's keys and values to it and attend
        over all of them; key_padding_mask_BS and attn_bias then cover the cached keys too."""
        if self.cross and context_BSD is None:
            raise ValueError("cross-attention needs context_BSD (the sequence to attend to)")
        if not self.cross and context_BSD is not None:
            raise ValueError(
                "context_BSD given to a self-attention module (built with cross=False)"
            )
        src_BSD = context_BSD if self.cross else x_BTD

        q_BHTd = self._split_heads(self.q_proj(x_BTD))
        k_BHSd = self._split_heads(self.k_proj(src_BSD))
        v_BHSd = self._split_heads(self.v_proj(src_BSD))
        if kv_cache is not None:
            k_BHSd, v_BHSd = kv_cache.update(k_BHSd, v_BHSd)
        if not self.scale_scores:
            q_BHTd = q_BHTd * math.sqrt(self.head_dim)
        out_BHTd = self.kernel(
            q_BHTd,
            k_BHSd,
            v_BHSd,
            causal=causal,
            key_padding_mask_BS=key_padding_mask_BS,
            attn_bias=attn_bias,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        B, H, T, d = out_BHTd.shape
        out_BTE = out_BHTd.transpose(1, 2).reshape(B, T, H * d)
        return self.resid_dropout(self.o_proj(out_BTE))
