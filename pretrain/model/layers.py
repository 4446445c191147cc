"""Building blocks shared by the model families: positions (absolute and T5's relative bias),
feed-forward (plain or gated), norms (LayerNorm, RMSNorm), LM loss and output.

Shape legend: B batch, T query positions, S key positions, D d_model, F feed-forward width,
H heads, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- positions


class LearnedPositions(nn.Module):
    """A trained table of absolute position embeddings, `weight` [max_seq_len, D] (GPT-2 wpe)."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        nn.init.normal_(self.weight, std=0.02)  # the model's init_weights overrides this

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        """Embeddings of positions offset..offset+seq_len-1: [T, D] (offset: cached tokens)."""
        _check_seq_len(offset + seq_len, self.max_seq_len)
        return self.weight[offset : offset + seq_len]


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

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        _check_seq_len(offset + seq_len, self.max_seq_len)
        return self.table[offset : offset + seq_len]


def _check_seq_len(seq_len: int, max_seq_len: int) -> None:
    if seq_len > max_seq_len:
        raise ValueError(
            f"sequence of {seq_len} tokens exceeds model.max_seq_len={max_seq_len}; "
            "raise model.max_seq_len or shorten data.seq_len"
        )


def build_positions(
    kind: Literal["learned", "sinusoidal"], max_seq_len: int, d_model: int
) -> LearnedPositions | SinusoidalPositions:
    """The absolute position encoding added to token embeddings."""
    if kind == "learned":
        return LearnedPositions(max_seq_len, d_model)
    if kind == "sinusoidal":
        return SinusoidalPositions(max_seq_len, d_model)
    raise ValueError(f"model.positions={kind!r} is not an absolute encoding: 'learned', "
                     "'sinusoidal'")


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias (Raffel et al. 2020, section 2.1): a learned scalar
    per head and bucket of the distance key - query, added to the attention scores.

    Distances are bucketed as in Mesh TensorFlow: half of the buckets hold the exact small
    distances 0..n/2-1, the other half log-spaced ranges up to max_distance; everything farther
    shares the last bucket. Bidirectional (encoder) attention gives keys before and after the
    query their own halves of the buckets; unidirectional (decoder) attention only looks back.

    `relative_attention_bias` is an Embedding [buckets, H] (Hugging Face's name and layout).
    Tensor parallelism slices its columns along with the heads (`tp_plan`); every method then
    gives this rank's heads.
    """

    tp_plan = {"relative_attention_bias.weight": "shard:1"}

    def __init__(self, n_head: int, *, bidirectional: bool, num_buckets: int = 32,
                 max_distance: int = 128) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, n_head)

    def bucket(self, relative_TS: Tensor) -> Tensor:
        """Bucket index (int64, same shape) of each distance key - query."""
        n = self.num_buckets
        buckets = torch.zeros_like(relative_TS)
        if self.bidirectional:
            n //= 2
            buckets = buckets + (relative_TS > 0).long() * n  # keys after the query: upper half
            distance = relative_TS.abs()
        else:
            distance = (-relative_TS).clamp(min=0)  # only keys before the query count
        exact = n // 2
        # log-spaced buckets for exact <= distance < max_distance, the last one beyond
        log_ratio = (torch.log(distance.float().clamp(min=1) / exact)
                     / math.log(self.max_distance / exact))
        far = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)
        return buckets + torch.where(distance < exact, distance, far)

    def of_offsets(self, offsets: Tensor) -> Tensor:
        """Bias [H, ...] at offsets key - query, int64 [H | 1, ...] (per head, or the same for
        all heads): the function of an attention.OffsetBias, which long-context kernels
        evaluate on the pairs they score."""
        buckets = self.bucket(offsets)
        if buckets.size(0) == 1:  # the same offsets for every head: [..., H] -> [H, ...]
            return self.relative_attention_bias(buckets[0]).movedim(-1, 0)
        table_HN = self.relative_attention_bias.weight.t()  # head h's bias of bucket n
        return table_HN.gather(1, buckets.reshape(buckets.size(0), -1)).view(buckets.shape)

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> Tensor:
        """Bias [1, H, T, S] for queries at positions offset..offset+T-1 and keys 0..S-1."""
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        values_TSH = self.relative_attention_bias(self.bucket(k_pos - q_pos))
        return values_TSH.permute(2, 0, 1).unsqueeze(0)


# ----------------------------------------------------------------------------- feed-forward

Activation = Literal["gelu_tanh", "gelu", "relu"]
"""`gelu_tanh`: the tanh approximation of GELU used by GPT-2 (HF "gelu_new"); `gelu`: exact
erf GELU (BERT); `relu` (original T5)."""


def activate(h: Tensor, activation: Activation) -> Tensor:
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _check_activation(activation: str) -> None:
    if activation not in ("gelu_tanh", "gelu", "relu"):
        raise ValueError(f"unknown activation {activation!r}; use gelu_tanh, gelu or relu")


def run_in_chunks(fn, x_BTD: Tensor, chunk_size: int | None) -> Tensor:
    """fn over the positions of x, chunk_size at a time (Reformer's chunked feed-forward). With
    autograd on, each chunk is checkpointed (recomputed in backward), so fn's [B, T, F] hidden
    activation never exists whole, in forward or backward. Same function, same dropout masks
    (the checkpoint restores the RNG), one more forward of fn in backward. None: all at once."""
    if chunk_size is None or x_BTD.size(1) <= chunk_size:
        return fn(x_BTD)
    chunks = x_BTD.split(chunk_size, dim=1)
    if torch.is_grad_enabled():
        outs = [checkpoint(fn, c, use_reentrant=False) for c in chunks]
    else:
        outs = [fn(c) for c in chunks]
    return torch.cat(outs, dim=1)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")


class FeedForward(nn.Module):
    """Position-wise MLP: c_proj(act(c_fc(x))) then dropout. Names follow GPT-2 (mlp.c_fc,
    mlp.c_proj); c_proj is a residual output projection (scaled init). chunk_size: see
    `run_in_chunks` (model.ff_chunk_size)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        activation: Activation = "gelu_tanh",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_activation(activation)
        _check_chunk_size(chunk_size)
        self.activation = activation
        self.chunk_size = chunk_size
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return run_in_chunks(self._mlp, x_BTD, self.chunk_size)

    def _hidden(self, x_BTD: Tensor) -> Tensor:
        return activate(self.c_fc(x_BTD), self.activation)  # [B, T, F]

    def _mlp(self, x_BTD: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self._hidden(x_BTD)))


class GatedFeedForward(FeedForward):
    """Gated MLP (Shazeer 2020, "GLU Variants"): c_proj(act(c_gate(x)) * c_fc(x)) then dropout.
    With gelu_tanh this is T5 v1.1's gated-GELU (HF wi_0 = c_gate, wi_1 = c_fc, wo = c_proj).
    chunk_size: see `run_in_chunks`."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = True, **kwargs) -> None:
        super().__init__(d_model, d_ff, bias=bias, **kwargs)
        self.c_gate = nn.Linear(d_model, d_ff, bias=bias)

    def _hidden(self, x_BTD: Tensor) -> Tensor:
        return activate(self.c_gate(x_BTD), self.activation) * self.c_fc(x_BTD)  # [B, T, F]


def build_feed_forward(cfg) -> FeedForward | GatedFeedForward:
    """The feed-forward of `model:` config (model.gated_ffn, activation, d_ff, bias, dropout,
    ff_chunk_size)."""
    cls = GatedFeedForward if cfg.gated_ffn else FeedForward
    return cls(cfg.d_model, cfg.ffn_width, bias=cfg.bias, dropout=cfg.dropout,
               activation=cfg.activation, chunk_size=cfg.ff_chunk_size)


# ----------------------------------------------------------------------------- norms


def layer_norm(d_model: int, *, eps: float, bias: bool) -> nn.LayerNorm:
    """LayerNorm with a learned scale and, if `bias`, a learned shift (model.bias)."""
    return nn.LayerNorm(d_model, eps=eps, bias=bias)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019): T5's "LayerNorm", with no
    mean subtraction and no shift. The statistics are computed in fp32; the result has the
    weight's dtype when that is half precision, as in T5."""

    def __init__(self, d_model: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x_BTD: Tensor) -> Tensor:
        variance_BT1 = x_BTD.float().pow(2).mean(-1, keepdim=True)
        x_BTD = x_BTD * torch.rsqrt(variance_BT1 + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x_BTD = x_BTD.to(self.weight.dtype)
        return self.weight * x_BTD


def build_norm(cfg, d_model: int | None = None) -> nn.Module:
    """The norm of `model:` config: LayerNorm (with a shift if model.bias) or RMSNorm."""
    d = cfg.d_model if d_model is None else d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(d, eps=cfg.norm_eps)
    return layer_norm(d, eps=cfg.norm_eps, bias=cfg.bias)


NORM_TYPES = (nn.LayerNorm, RMSNorm)


@torch.no_grad()
def init_normal_(root: nn.Module, std: float) -> None:
    """GPT-2 / BERT init of every submodule: Linear, Embedding and learned position weights
    ~ N(0, std), biases 0, norm scales 1 and shifts 0."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, NORM_TYPES):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LearnedPositions):
            nn.init.normal_(module.weight, mean=0.0, std=std)


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
    metrics: detached scalars the family reports besides the loss (e.g. mlm_accuracy), each
        a mean over this micro-batch; logged as they are, averaged over steps and ranks.
    sentence_logits: [B, 2], BERT's sentence-pair head (None for other families, and with
        targets unless return_logits).
    """

    logits: Tensor | None
    loss: Tensor | None = None
    n_targets: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    sentence_logits: Tensor | None = None


def _flatten(rows_BTX: Tensor, targets_BT: Tensor) -> tuple[Tensor, Tensor]:
    """[B, T, X] rows and [B, T] targets as [N, X] and [N]; a clear error when they disagree."""
    if targets_BT.shape != rows_BTX.shape[:-1]:
        raise ValueError(
            f"targets have shape {tuple(targets_BT.shape)}, expected {tuple(rows_BTX.shape[:-1])}")
    return rows_BTX.reshape(-1, rows_BTX.size(-1)), targets_BT.reshape(-1)


def _targets(targets_N: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The gather/scatter index [N, 1] of each target (any valid one on ignored rows) and the
    fp32 mask [N, 1] of the rows that count."""
    keep_N = targets_N != ignore_index
    return torch.where(keep_N, targets_N, 0)[:, None], keep_N[:, None].to(torch.float32)


def lm_cross_entropy(
    logits_BTV: Tensor, targets_BT: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy (computed in fp32) over targets != ignore_index, and their count.

    Summed then divided by max(count, 1), so a batch with every target ignored gives loss 0
    and zero gradients instead of NaN.
    """
    logits_NV, targets_N = _flatten(logits_BTV, targets_BT)
    if torch.is_grad_enabled() and logits_NV.requires_grad:
        total = SummedCrossEntropy.apply(logits_NV, targets_N, ignore_index)
    else:  # nothing to differentiate: no gradient to prepare
        total = F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index,
                                reduction="sum")
    n_targets = (targets_BT != ignore_index).sum()
    return total / n_targets.clamp(min=1), n_targets


class SummedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index, reduction="sum"), with the
    gradient prepared in forward: softmax - one_hot(target), zero on ignored rows, is what
    backward scales by the incoming scalar.

    The same values as the autograd of log_softmax + nll_loss, with fewer passes over the
    [N, V] logits, the largest activation of a language model: log_softmax writes it once and
    turns into the gradient in place (exp_, one scatter), and backward is one multiply. The
    composed version also keeps the log-probabilities, then in backward fills a zero [N, V]
    gradient for nll_loss and runs log_softmax's backward over it. On CPU this halves the cost of
    the loss (BENCHMARKS.md section 1); the [N, V] memory held for backward is the same (one
    fp32 tensor).
    """

    @staticmethod
    def forward(ctx, logits_NV: Tensor, targets_N: Tensor, ignore_index: int) -> Tensor:
        index_N1, keep_N1 = _targets(targets_N, ignore_index)
        grad_NV = torch.log_softmax(logits_NV.float(), dim=-1)  # log-probabilities for now
        total = (-grad_NV.gather(1, index_N1) * keep_N1).sum()  # +0.0 when nothing is kept
        grad_NV.exp_().scatter_add_(1, index_N1, -keep_N1)  # softmax - one_hot on kept rows
        ctx.save_for_backward(grad_NV, keep_N1)
        ctx.logits_dtype = logits_NV.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, None, None]:
        grad_NV, keep_N1 = ctx.saved_tensors
        # out of place: a retained graph may run backward again
        return (grad_NV * (keep_N1 * grad_total)).to(ctx.logits_dtype), None, None


LOSS_BLOCK_BYTES = 256 * 2**20
"""`lm_head_cross_entropy` works through the rows of the logits in blocks of at most this many
fp32 bytes (16k tokens over a 50k vocabulary: 3.3 GB whole, 13 blocks)."""


def lm_head_cross_entropy(
    head: nn.Module, loss: nn.Module, x_BTD: Tensor, targets_BT: Tensor,
    ignore_index: int = -100, block_bytes: int = LOSS_BLOCK_BYTES,
) -> tuple[Tensor, Tensor]:
    """`loss(head(x_BTD), targets_BT, ignore_index)`: the mean cross-entropy and the target
    count, without the logits over the whole vocabulary existing at once where it can.

    It can when `head` is a plain bias-free nn.Linear without hooks and `loss` the stock
    LMCrossEntropy: `LinearCrossEntropy` then goes through blocks of rows, each block's logits
    turned into both gradients in forward. Otherwise, e.g. under tensor parallelism (a
    column-parallel head and a vocabulary-parallel loss) or DeepSpeed ZeRO-3 (whose hooks gather
    the head's weight), the logits are computed whole and `loss` reads them."""
    if not (type(loss) is LMCrossEntropy and type(head) is nn.Linear and head.bias is None
            and is_plain_linear(head)):
        return loss(head(x_BTD), targets_BT, ignore_index)
    weight_VD = head.weight
    x_ND, targets_N = _flatten(x_BTD, targets_BT)
    block_rows = max(1, block_bytes // (4 * weight_VD.size(0)))
    if torch.is_grad_enabled() and (x_ND.requires_grad or weight_VD.requires_grad):
        total = LinearCrossEntropy.apply(x_ND, weight_VD, targets_N, ignore_index, block_rows)
    else:  # nothing to differentiate (evaluation): the loss block by block, in place
        index_N1, keep_N1 = _targets(targets_N, ignore_index)
        total = sum(_exp_and_loss_(F.linear(x_ND[r:r + block_rows], weight_VD).float(),
                                   index_N1[r:r + block_rows], keep_N1[r:r + block_rows])[0]
                    for r in range(0, x_ND.size(0), block_rows))
    n_targets = (targets_BT != ignore_index).sum()
    return total / n_targets.clamp(min=1), n_targets


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits x_ND @ weight_VD.T against targets_N (ignore_index
    does not count), with both gradients prepared in forward, a block of rows at a time.

    Per block of n rows: the logits z [n, V] in the compute dtype (autocast's, as F.linear's),
    in fp32 turned in place into e = exp(z - max) and then into e - s * one_hot(target), which is
    s * (softmax - one_hot) with s the row sums of e; the loss is log s + max - z[target]. Then
    x's gradient rows G @ W and the weight gradient's share G.T @ x, with the 1/s and the mask
    of ignored targets applied to the [n, D] operands. No [n, V] tensor is allocated but the
    logits (and their fp32 copy under autocast): on CPU a fresh 32 MB buffer costs about as much
    in page faults as a pass over it, which is what log_softmax's output cost. Backward keeps
    x's gradient [N, D] and the weight's [V, D] (fp32) instead of the logits, and scales both by
    the incoming scalar: the [N, V] multiply of SummedCrossEntropy's backward becomes an
    [N + V, D] one, and the fp32 logits never exist beyond one block. The FLOPs are those of the
    head's forward and backward matmuls, as before."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, ignore_index: int,
                block_rows: int) -> Tensor:
        device = x_ND.device.type
        cast = cast_to(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                       else x_ND.dtype)  # the logits' dtype, as F.linear's
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.dtypes = x_ND.dtype, weight_VD.dtype
        with torch.autocast(device, enabled=False):
            x_ND, w_VD = cast(x_ND), cast(weight_VD)
            index_N1, keep_N1 = _targets(targets_N, ignore_index)
            total = torch.zeros((), dtype=torch.float32, device=x_ND.device)
            grad_x_blocks = []  # [n, D] each, compute dtype
            grad_w = None  # [V, D] fp32
            for r in range(0, x_ND.size(0), block_rows):
                rows, index_n1 = slice(r, r + block_rows), index_N1[r:r + block_rows]
                z_nV = (x_ND[rows] @ w_VD.t()).float()  # the logits, fp32
                loss, sum_n1 = _exp_and_loss_(z_nV, index_n1, keep_N1[rows])  # z_nV is e now
                total += loss
                # s * (softmax - one_hot) = e - s * one_hot; the 1/s and the mask of ignored
                # rows scale the [n, D] operands instead of the [n, V] one
                g_nV = cast(z_nV.scatter_add_(1, index_n1, -sum_n1))
                del z_nV  # under autocast the fp32 block goes before the matmuls
                scale_n1 = (keep_N1[rows] / sum_n1).to(g_nV.dtype)
                if need_x:
                    grad_x_blocks.append((g_nV @ w_VD).mul_(scale_n1))
                if need_w:
                    xs_nD = x_ND[rows] * scale_n1
                    if grad_w is None:
                        grad_w = (g_nV.t() @ xs_nD).float()
                    elif g_nV.dtype == grad_w.dtype:  # fp32: into the sum, no [V, D] temporary
                        grad_w.addmm_(g_nV.t(), xs_nD)
                    else:
                        grad_w += g_nV.t() @ xs_nD
            grad_x = (grad_x_blocks[0] if len(grad_x_blocks) == 1 else torch.cat(grad_x_blocks)) \
                if need_x else None
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        # out of place: a retained graph may run backward again
        return (None if grad_x is None else (grad_x * grad_total).to(x_dtype),
                None if grad_w is None else (grad_w * grad_total).to(w_dtype), None, None, None)


def _exp_and_loss_(z_nV: Tensor, index_n1: Tensor, keep_n1: Tensor) -> tuple[Tensor, Tensor]:
    """Turns fp32 logits z into e = exp(z - max) in place; returns the summed cross-entropy of
    the rows that count (log s + max - z[target]) and the row sums s [n, 1] of e."""
    target_n1 = z_nV.gather(1, index_n1)
    max_n1 = z_nV.amax(dim=-1, keepdim=True)
    sum_n1 = z_nV.sub_(max_n1).exp_().sum(dim=-1, keepdim=True)
    return ((sum_n1.log() + max_n1 - target_n1) * keep_n1).sum(), sum_n1


def cast_to(dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    return (lambda t: t) if dtype is None else (lambda t: t.to(dtype))


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module(x)` is exactly F.linear(x, module.weight, module.bias) and nothing else
    happens around it, so that a caller may compute it from the weights directly: an nn.Linear
    (or a class that declares `plain_linear = True`, such as tensor parallelism's
    ColumnParallelLinear) without forward or backward hooks. Hooks mean someone acts on the
    call: DeepSpeed ZeRO-3 hooks every module to gather its partitioned parameters just before
    its forward, so under ZeRO-3 such modules keep running as modules."""
    plain = getattr(type(module), "plain_linear", False) or (
        isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward)
    return plain and not (module._forward_pre_hooks or module._forward_hooks
                          or module._backward_pre_hooks or module._backward_hooks)


class LMCrossEntropy(nn.Module):
    """`lm_cross_entropy` as a module, so that what reads the logits over the vocabulary can be
    swapped from outside the model: tensor parallelism replaces it with a vocabulary-parallel
    version that works on vocabulary-split logits. No parameters, nothing in the state dict."""

    def forward(
        self, logits_BTV: Tensor, targets_BT: Tensor, ignore_index: int = -100
    ) -> tuple[Tensor, Tensor]:
        return lm_cross_entropy(logits_BTV, targets_BT, ignore_index)

    def predictions(self, logits_NV: Tensor) -> Tensor:
        """The most likely token of every row, int64 [...] (the first of equal maxima), for
        accuracy metrics."""
        return logits_NV.argmax(dim=-1)
