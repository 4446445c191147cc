"""Attention for every model family: projections in `MultiHeadAttention`, the core in kernels.

The split is what lets BERT (bidirectional + padding), T5 (relative position bias, cross
attention), Longformer (sliding window + global tokens) and Reformer (LSH buckets) share one
module:

* `MultiHeadAttention` owns the learned parts: the head projections, the output projection,
  the head split/merge and the dropouts. It knows nothing about how scores are computed.
* An `AttentionKernel` computes only  softmax(scale q k^T + attn_bias + masks) v  on
  [B, H, T, d] tensors (scale 1/sqrt(d) unless given; long-context kernels restrict which keys
  each query sees). Kernels are sibling classes with one call signature and are chosen by name
  from `ATTENTION_KERNELS` (the `model.attention.kind` config key).
* A kernel says which head projections feed it (`AttentionKernel.projections`, argument ->
  projection name) and MultiHeadAttention builds exactly those: dense attention takes q, k, v
  from q_proj, k_proj, v_proj; Reformer's shared query-key passes one qk_proj as both q and k;
  Longformer adds q_global, k_global, v_global (keyword arguments) from their own projections.
  Kernels hold no parameters of their own.

Masks and bias, the same for every kernel:
* `causal`: query i sees key j only if j <= i + (S - T) (aligned at the bottom-right, so a
  query block appended to cached keys sees all of them; with T == S this is the usual j <= i).
* `key_padding_mask_BS`: bool [B, S], True = real token, False = padding never attended to.
* `attn_bias`: added to the scaled scores, either a float tensor broadcastable to [B, H, T, S]
  (T5's relative position bias as a table, ALiBi, ...) or an `OffsetBias`, a function of the
  offset key - query that a kernel evaluates only on the pairs it scores. Kernels that score
  every pair (`scores_all_pairs`: dense) take both; long-context kernels, whose point is never
  to build a [T, S] tensor, take only an OffsetBias. Either may require grad. Use masks, not
  -inf, to exclude.
* `scale`: multiplies q k^T; None is 1/sqrt(d). T5 passes 1.0 (unscaled scores).
* A query row whose keys are all masked (e.g. a padding query under left padding) outputs zeros
  and passes zero gradient: never NaN.

Tensor parallelism (pretrain/parallel/tensor_parallel.py, from outside the model) splits heads
by slicing the output features of every head projection (`MultiHeadAttention.head_projections()`:
q_proj, k_proj, v_proj, or qk_proj, v_proj, plus any global ones) and the input features of
o_proj. The number of heads in forward is therefore derived from the projection width
(`out_features // head_dim`), never from `n_head`, so the sliced module runs unchanged on its
share of heads. `n_head` records the count the module was built with; a TP transform updates it
for the record. Kernels treat heads independently (Reformer's random rotations are shared by all
heads, drawn from the stream every tensor-parallel rank shares), so a head-sliced module computes
exactly its share of the unsliced one.

The projections of one input (self-attention: all of them) run as one matmul over their
concatenated weights when each is a plain linear map without hooks (`is_plain_linear`);
otherwise, e.g. under DeepSpeed ZeRO-3, whose forward pre-hooks gather each module's
parameters, they run one by one. Parameters, names and slicing are the same either way.

Layout of the projections (nn.Linear, weight [out, in]): q_proj, k_proj, v_proj: [D, D], head h
owns output rows h*d:(h+1)*d; o_proj: [D, D], head h owns input columns h*d:(h+1)*d. Hugging
Face GPT-2's fused Conv1D `c_attn.weight` [D, 3D] is cat([Wq, Wk, Wv], dim=0).T (see hf_gpt2.py).

Shape legend: B batch, T query positions, S key/value positions, D d_model, H heads (local to
this module), d head dim, E = H * d projection width (D unless heads were split).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import AttentionConfig
from pretrain.model.layers import cast_to, is_plain_linear


class OffsetBias:
    """An additive attention bias that depends only on the offset  key position - query
    position, one value per head: T5's relative position bias (layers.RelativePositionBias),
    ALiBi. Query i of T sits at position i + S - T, key j at position j (the causal mask's
    alignment; T == S without a KV cache).

    fn maps int64 offsets [H | 1, ...] (a leading 1: the same offsets for every head) to float
    biases [H, ...], differentiably in its parameters. Dense attention evaluates it once on the
    [T, S] grid (`dense`); Longformer and LSH attention evaluate it only on the pairs they
    score, so the bias costs what their scores cost: O(T * window), never O(T * S).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, offsets: Tensor) -> Tensor:
        return self.fn(offsets)

    def dense(self, T: int, S: int, device: torch.device) -> Tensor:
        """The bias of every pair: [1, H, T, S]."""
        q_pos = torch.arange(S - T, S, device=device)
        k_pos = torch.arange(S, device=device)
        return self(k_pos[None, None, :] - q_pos[None, :, None])[None]


def check_attention_inputs(
    q_BHTd: Tensor,
    k_BHSd: Tensor,
    v_BHSd: Tensor,
    key_padding_mask_BS: Tensor | None,
    attn_bias: Tensor | OffsetBias | None,
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
    if isinstance(attn_bias, Tensor):
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
    elif attn_bias is not None and not isinstance(attn_bias, OffsetBias):
        raise TypeError(f"attn_bias must be a float tensor or an OffsetBias, got "
                        f"{type(attn_bias).__name__}")


def refuse_tensor_bias(kernel_name: str, attn_bias: Tensor | OffsetBias | None) -> None:
    """For kernels that score only some pairs: a [T, S] bias tensor is what they avoid."""
    if isinstance(attn_bias, Tensor):
        raise ValueError(
            f"{kernel_name} attention takes no attn_bias tensor: a [T, S] bias is the n^2 tensor "
            "it avoids. Pass the bias as an OffsetBias (a function of key - query position, "
            "evaluated on the scored pairs only), as TransformerStack does for model.positions="
            "relative, or use model.attention.kind=dense"
        )


def causal_mask_TS(T: int, S: int, device: torch.device) -> Tensor:
    """Bool [T, S], True where query i may see key j: j <= i + (S - T)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class AttentionKernel(nn.Module, abc.ABC):
    """The attention core: softmax(scale q k^T + attn_bias + masks) v.

    Subclasses implement `forward` with this signature and semantics (see the module docstring);
    they may add keyword-only inputs of their own (e.g. Longformer's q_global, global_mask_BT),
    may hold buffers but no parameters.
    """

    projections: ClassVar[dict[str, str]] = {"q": "q", "k": "k", "v": "v"}
    """Kernel argument -> name of the MultiHeadAttention projection `<name>_proj` (D -> E, heads
    laid out like q_proj) that computes it. Arguments starting with "q" project the query input,
    the others the key/value input (the same tensor in self-attention). Arguments other than q,
    k, v are passed by keyword. Two arguments naming one projection get one tensor (the same
    object in self-attention). A kernel may set its own per instance."""

    scores_all_pairs: ClassVar[bool] = True
    """Whether the kernel scores every (query, key) pair. Such kernels take attn_bias as a
    [T, S] tensor and queries against cached keys (KVCache, T < S). Kernels that score some
    pairs only (a window, a hash bucket) need the whole sequence at once and take a position
    bias only as an OffsetBias."""

    @classmethod
    def from_config(cls, cfg: AttentionConfig, layer: int = 0) -> "AttentionKernel":
        """Build the kernel of block `layer` from `model.attention`; kernels with settings
        override this."""
        return cls()

    def keys_per_query(self, seq_len: int) -> float:
        """Keys each query is scored against (summed over hash rounds), for FLOP counts
        (flops.py): seq_len for dense attention."""
        return float(seq_len)

    @abc.abstractmethod
    def forward(
        self,
        q_BHTd: Tensor,
        k_BHSd: Tensor,
        v_BHSd: Tensor,
        *,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: Tensor | OffsetBias | None = None,
        dropout_p: float = 0.0,
        scale: float | None = None,
    ) -> Tensor:
        """Returns out_BHTd, in the dtype of q."""


class DenseAttention(AttentionKernel):
    """Full attention with torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU, a fused kernel on CPU).

    Plain causal (or unmasked) self-attention takes the `is_causal=True` fast path and never
    builds a mask. Only when padding or a bias is present is a [B|1, 1|H, T, S] mask built: bool
    if there is no bias, else the bias with -inf where masked (an OffsetBias is evaluated on the
    whole [T, S] grid first).
    """

    def forward(
        self,
        q_BHTd: Tensor,
        k_BHSd: Tensor,
        v_BHSd: Tensor,
        *,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: Tensor | OffsetBias | None = None,
        dropout_p: float = 0.0,
        scale: float | None = None,
    ) -> Tensor:
        check_attention_inputs(q_BHTd, k_BHSd, v_BHSd, key_padding_mask_BS, attn_bias)
        T, S = q_BHTd.size(2), k_BHSd.size(2)
        if isinstance(attn_bias, OffsetBias):
            attn_bias = attn_bias.dense(T, S, q_BHTd.device)
        if key_padding_mask_BS is None and attn_bias is None and (not causal or T == S):
            # SDPA's is_causal is top-left aligned, which equals ours only when T == S.
            return F.scaled_dot_product_attention(
                q_BHTd, k_BHSd, v_BHSd, dropout_p=dropout_p, is_causal=causal, scale=scale
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
            q_BHTd, k_BHSd, v_BHSd, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
        if row_ok is not None:
            out_BHTd = out_BHTd.masked_fill(~row_ok, 0.0)
        return out_BHTd


ATTENTION_KERNELS: dict[str, type[AttentionKernel]] = {"dense": DenseAttention}
"""Kernel classes by `model.attention.kind`. New kernels register with
`@register_attention_kernel(name)`; pretrain.model imports every kernel module, so the registry
is complete whenever the model package is imported."""

K = TypeVar("K", bound=type[AttentionKernel])


def register_attention_kernel(name: str) -> Callable[[K], K]:
    def register(kernel_cls: K) -> K:
        if name in ATTENTION_KERNELS and ATTENTION_KERNELS[name] is not kernel_cls:
            raise ValueError(f"attention kernel {name!r} is registered twice")
        ATTENTION_KERNELS[name] = kernel_cls
        return kernel_cls

    return register


def build_attention_kernel(cfg: AttentionConfig, layer: int = 0) -> AttentionKernel:
    """The kernel of block `layer` (per-layer settings such as Longformer windows use it)."""
    try:
        kernel_cls = ATTENTION_KERNELS[cfg.kind]
    except KeyError:
        raise ValueError(
            f"model.attention.kind={cfg.kind!r} is not a known attention kernel; "
            f"choose one of {sorted(ATTENTION_KERNELS)}"
        ) from None
    return kernel_cls.from_config(cfg, layer)


class _LinearOfMany(torch.autograd.Function):
    """F.linear(x, cat(weights), cat(biases)) [.., F] without keeping the concatenated weight
    for backward: only x and the parameters themselves are saved (what separate Linears keep),
    and backward concatenates the weights again for x's gradient, a transient of F x D. The
    weights' gradients come from one [F, N] x [N, D] matmul, split by rows.

    Under autocast the matmuls run in the autocast dtype, as F.linear's would, and each
    gradient comes back in the dtype of its input (autograd does not re-enter autocast in a
    custom backward, so the casts are explicit here)."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, n: int, *weights_and_biases: Tensor) -> Tensor:
        weights, biases = weights_and_biases[:n], weights_and_biases[n:]
        device = x_ND.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else None
        ctx.save_for_backward(x_ND, *weights)
        ctx.has_bias = bool(biases)
        cast = cast_to(ctx.dtype)
        with torch.autocast(device, enabled=False):
            return F.linear(cast(x_ND), torch.cat([cast(w) for w in weights]),
                            torch.cat([cast(b) for b in biases]) if biases else None)

    @staticmethod
    def backward(ctx, grad_NF: Tensor):
        x_ND, *weights = ctx.saved_tensors
        cast = cast_to(ctx.dtype)
        sizes = [w.size(0) for w in weights]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_NF @ torch.cat([cast(w) for w in weights])).to(x_ND.dtype)
        g_MF = grad_NF.reshape(-1, grad_NF.size(-1))
        x_MD = cast(x_ND).reshape(-1, x_ND.size(-1))
        grad_w = [g.to(w.dtype) for g, w in zip((g_MF.t() @ x_MD).split(sizes), weights)]
        grad_b = [g.to(w.dtype) for g, w in zip(g_MF.sum(0).split(sizes), weights)] \
            if ctx.has_bias else []
        return grad_x, None, *grad_w, *grad_b


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
    scale_scores=False leaves the scores q.k unscaled (T5): the kernel is called with scale=1.
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
        self.kernel = kernel if kernel is not None else DenseAttention()
        # One Linear per projection the kernel consumes, in the kernel's order (dense: q, k, v).
        self.projection_names = list(dict.fromkeys(self.kernel.projections.values()))
        for name in self.projection_names:
            self.add_module(f"{name}_proj", nn.Linear(d_model, d_model, bias=bias))
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def head_projections(self) -> list[nn.Linear]:
        """The Linears whose output features are laid out by head (split by tensor
        parallelism); o_proj's input features are split the same way."""
        return [getattr(self, f"{name}_proj") for name in self.projection_names]

    def query_projections(self) -> list[nn.Linear]:
        """The head projections of the query input (q_proj, qk_proj, q_global_proj, ...)."""
        names = {name for arg, name in self.kernel.projections.items() if arg.startswith("q")}
        return [getattr(self, f"{name}_proj") for name in self.projection_names if name in names]

    def _project(self, x_BTD: Tensor, names: list[str]) -> list[Tensor]:
        """The projections `names` of one input, [B, T, E] each. When there are several and all
        are plain linear maps (`is_plain_linear`), one matmul over their concatenated weights
        computes them all, as Hugging Face GPT-2's fused c_attn does: on CPU three [D, D]
        matmuls cost measurably more than one [D, 3D] (BENCHMARKS.md section 1). The
        parameters stay separate (names, checkpoints, tensor-parallel slicing unchanged); the
        gradient of the concatenation hands each weight its own rows."""
        projs = [getattr(self, f"{name}_proj") for name in names]
        if len(projs) < 2 or not all(is_plain_linear(p) for p in projs):
            return [p(x_BTD) for p in projs]
        biases = [p.bias for p in projs]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return [p(x_BTD) for p in projs]
        weights = [p.weight for p in projs]
        out_BTF = _LinearOfMany.apply(x_BTD, len(projs), *weights,
                                      *(biases if biases[0] is not None else ()))
        return list(out_BTF.split([w.size(0) for w in weights], dim=-1))

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
        attn_bias: Tensor | OffsetBias | None = None,
        kv_cache: KVCache | None = None,
        **kernel_inputs: Tensor | None,
    ) -> Tensor:
        """kv_cache (self-attention with a kernel that scores all pairs): append this call's
        keys and values to it and attend over all of them; key_padding_mask_BS and attn_bias
        then cover the cached keys too. kernel_inputs: extra inputs of the kernel, passed
        through (e.g. Longformer's global_mask_BT [B, T], True where a token attends
        globally)."""
        if self.cross and context_BSD is None:
            raise ValueError("cross-attention needs context_BSD (the sequence to attend to)")
        if not self.cross and context_BSD is not None:
            raise ValueError(
                "context_BSD given to a self-attention module (built with cross=False)"
            )
        src_BSD = context_BSD if self.cross else x_BTD

        # The projections each input needs (self-attention: all of them on x), in kernel order.
        wanted: dict[bool, list[str]] = {True: [], False: []}  # of the query input? -> names
        for arg, name in self.kernel.projections.items():
            query_side = arg.startswith("q") or src_BSD is x_BTD
            if name not in wanted[query_side]:
                wanted[query_side].append(name)
        heads: dict[tuple[str, bool], Tensor] = {}  # (projection, of the query input) -> heads
        for query_side, names in wanted.items():
            outs = self._project(x_BTD if query_side else src_BSD, names)
            for name, out_BTE in zip(names, outs):
                heads[name, query_side] = self._split_heads(out_BTE)
        args = {arg: heads[name, arg.startswith("q") or src_BSD is x_BTD]
                for arg, name in self.kernel.projections.items()}
        if kv_cache is not None:
            if not self.kernel.scores_all_pairs:
                raise ValueError(
                    f"{type(self.kernel).__name__} needs the whole sequence at once: a KV cache "
                    "works with model.attention.kind=dense only (recompute the sequence instead)"
                )
            args["k"], args["v"] = kv_cache.update(args["k"], args["v"])
        out_BHTd = self.kernel(
            args.pop("q"),
            args.pop("k"),
            args.pop("v"),
            causal=causal,
            key_padding_mask_BS=key_padding_mask_BS,
            attn_bias=attn_bias,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=None if self.scale_scores else 1.0,
            **args,
            **kernel_inputs,
        )
        B, H, T, d = out_BHTd.shape
        out_BTE = out_BHTd.transpose(1, 2).reshape(B, T, H * d)
        return self.resid_dropout(self.o_proj(out_BTE))
