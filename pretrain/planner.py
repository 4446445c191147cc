"""Memory and step-time planner: what a run needs per GPU, before it is launched.

    pretrain plan CONFIG --nodes N --gpus-per-node G [--gpu-memory GiB] [--tflops X]

This module is the one place that predicts memory. Everything is per rank (one rank per GPU):

* Model states (`model_state_bytes`), for Psi_r = parameters this rank holds after the
  tensor-parallel split (`ParamCounts.per_rank`) and D = data-parallel ranks (DeepSpeed keeps
  an fp32 master partition in its ZeRO optimizers even for an fp32 model):

      fp32 (CPU)   params      grads       optimizer (master + Adam m, v)
      ZeRO-0       4           4           8                          = 16      Psi_r
      ZeRO-1       4           4           (4 + 8) / D                = 8 + 12/D
      ZeRO-2       4           4 / D       12 / D                     = 4 + 16/D
      ZeRO-3       4 / D       4 / D       12 / D                     = 20/D

      bf16 / fp16  params      grads              optimizer
      ZeRO-0       2           2 + 4 (fp32 acc.)  12 / D (BF16_Optimizer partitions it) *
      ZeRO-1       2           2 + 4 / D          12 / D              = 4 + 16/D
      ZeRO-2       2           (2 + 4) / D        12 / D              = 2 + 18/D
      ZeRO-3       2 / D       (2 + 4) / D        12 / D              = 20/D
      * fp16 ZeRO-0 (FP16_Optimizer): 2 + 2 + 12, nothing partitioned.

  `offload_optimizer` moves the optimizer column (and the fp32 gradient partition) to host
  memory; `offload_params` (ZeRO-3) the parameters too. `benchmarks/tp_zero_memory.py` measures
  these per-parameter figures (without transients) at TP x ZeRO.
* Activations (`activation_bytes`): what autograd keeps for the backward pass, counted from the
  model code (blocks.py, attention.py, layers.py) tensor by tensor, plus what joins it at its
  worst moment (the gradients of the loss head's logits, the largest tensors of a small model,
  or the block being recomputed under activation checkpointing). The count equals the tensors
  autograd saves, family by family (tests/test_planner.py).
* Transients (`transient_bytes`): the gradients with DeepSpeed's reduction buffer at the end of
  backward, and the gradients with the optimizer's temporaries during its step; ZeRO-3's
  gathered parameters, which stay alive between uses in forward and backward.
* The peak (`peak_bytes`) is parameters + optimizer states + the largest of the three moments:
  forward/backward (activations, with ZeRO-3's gathered parameters), gradient reduction (also
  with them), optimizer step.

What is not counted: the process itself (on GPU, the CUDA context and NCCL's buffers, which
torch.cuda.max_memory_allocated does not see either, hence the headroom; on CPU the
interpreter and library code, and the thread pools and objects DeepSpeed and torch create while
the run starts, a fixed 6-9 MB). `PeakMemory` in pretrain/metrics.py measures what is counted:
peak - base.
Measured against CPU runs in BENCHMARKS.md ("Planner").

Step time comes from the FLOPs model of pretrain/model/flops.py (6 N + 12 L H Q T per token,
one more forward with activation checkpointing) at an assumed fraction of the device's peak
(`mfu`). Communication is not modelled: measure with a sweep (docs/SCALING.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pretrain.config import Config, ModelConfig
from pretrain.model.layers import LOSS_BLOCK_BYTES
from pretrain.parallel.deepspeed import persistence_threshold, reduce_bucket_size

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
"""DeepSpeed's default stage3_max_live_parameters (our generated config keeps it). The reduce
bucket and ZeRO-3's persistence threshold are the generated config's (parallel/deepspeed.py:
reduce_bucket_size, persistence_threshold)."""


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model, by what tensor parallelism does with them."""

    total: int
    split: int
    """Split over the tensor-parallel ranks: q/k/v/o and feed-forward weights (and the biases
    of the column-parallel ones), vocabulary embeddings and LM heads, per-head tables."""
    replicated: int
    """On every tensor-parallel rank: norms, position tables, row-parallel biases, heads that
    are not over the vocabulary."""
    small: int = 0
    """Parameters in tensors below ZeRO-3's persistence threshold (10 x d_model elements in
    the generated DeepSpeed config), which ZeRO-3 keeps whole on every rank."""
    non_embedding: int = 0
    """N of the FLOPs model (flops.py)."""
    largest: int = 0
    """Elements of the largest parameter tensor (optimizer temporaries are per tensor)."""
    flops_per_token: float = 0.0
    """Training FLOPs per token from the model itself (flops.py), with the attention context
    of its kernels (sliding-window and LSH attention score fewer keys than the sequence)."""

    def per_rank(self, tp: int) -> int:
        """Psi_r: the parameters one rank holds at tensor-parallel degree `tp`."""
        return math.ceil(self.split / tp) + self.replicated


_COLUMN = ("q_proj", "k_proj", "v_proj", "c_fc", "c_gate")
_ROW = ("o_proj", "c_proj")


def count_params(model_cfg: ModelConfig, vocab_size: int, seq_len: int = 0) -> ParamCounts:
    """Exact counts, from the family's module built on the meta device (no memory, any size);
    with `seq_len`, also the model's training FLOPs per token at that length."""
    from pretrain.model import build_model

    with torch.device("meta"):
        model = build_model(model_cfg, vocab_size)
    split = replicated = small = largest = 0
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        leaf = module_name.rpartition(".")[2]
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied matrix counts once
                continue
            seen.add(id(p))
            n = p.numel()
            largest = max(largest, n)
            small += n if n < persistence_threshold(model_cfg) else 0
            over_vocab = (isinstance(module, nn.Embedding) and module.num_embeddings == vocab_size
                          or isinstance(module, nn.Linear) and module.out_features == vocab_size)
            is_split = (leaf in _COLUMN or (leaf in _ROW and name == "weight") or over_vocab
                        or leaf == "relative_attention_bias")
            if is_split:
                split += n
            else:
                replicated += n
    return ParamCounts(total=split + replicated, split=split, replicated=replicated, small=small,
                       non_embedding=model.num_params(non_embedding=True), largest=largest,
                       flops_per_token=model.flops_per_token(seq_len) if seq_len else 0.0)


def resolve_vocab_size(cfg: Config) -> int:
    """The embedding rows a run will have: model.vocab_size, else the prepared tokenizer's (if
    data.dir holds a manifest) or data.tokenizer.vocab_size, rounded up to pad_vocab_multiple."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    tok = cfg.data.tokenizer.vocab_size
    try:
        from data_pipeline.format import Manifest

        tok = Manifest.load(cfg.data.dir).tokenizer.vocab_size
    except (FileNotFoundError, ValueError, OSError):
        pass
    m = cfg.model.pad_vocab_multiple
    return (tok + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# Model states and DeepSpeed buffers


def model_state_bytes(psi_r: int, zero_stage: int, dp: int, precision: str = "fp32", *,
                      offload_optimizer: bool = False,
                      offload_params: bool = False) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and optimizer states (module docstring table)
    for Psi_r parameters on this rank and `dp` data-parallel ranks. Offloaded parts are 0."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {zero_stage}")
    if precision == "fp32":
        params, grads, opt = {0: (4, 4, 8), 1: (4, 4, 12 / dp), 2: (4, 4 / dp, 12 / dp),
                              3: (4 / dp, 4 / dp, 12 / dp)}[zero_stage]
    elif precision in ("bf16", "fp16"):
        if zero_stage == 0:
            params, grads, opt = (2, 6, 12 / dp) if precision == "bf16" else (2, 2, 12)
        else:
            params, grads, opt = {1: (2, 2 + 4 / dp, 12 / dp), 2: (2, 6 / dp, 12 / dp),
                                  3: (2 / dp, 6 / dp, 12 / dp)}[zero_stage]
    else:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if offload_optimizer and zero_stage > 0:
        opt = 0.0
        grads -= 4 / dp if precision != "fp32" else 0  # the fp32 partition lives on the host
    if offload_params and zero_stage == 3:
        params = 0.0
    return {"params": params * psi_r, "grads": grads * psi_r, "optimizer": opt * psi_r}


def transient_bytes(params: ParamCounts, psi_r: int, zero_stage: int, dp: int, precision: str,
                    device: str, *, reduce_bucket: int,
                    offload_optimizer: bool = False) -> dict[str, float]:
    """Per rank, what exists besides the parameters and optimizer states at the two moments
    that are not the forward/backward pass (each includes the gradients of that moment), and
    ZeRO-3's gathered parameters, which live through forward and backward. A GPU allocates a
    bucket whole; a CPU commits only the pages the gradients fill.

    * gradient reduction (end of backward): ZeRO-0 all-reduces the gradients through a flat
      copy of them (even on one rank); ZeRO-1/2/3 through a bucket of `reduce_bucket` elements
      (parallel.reduce_bucket_size), fp32 for ZeRO-1, the compute dtype otherwise, next to their
      gradient partition.
    * optimizer step: torch's AdamW makes two temporaries of each tensor it updates (sqrt(v)
      and the quotient): per parameter for ZeRO-0, of the whole fp32 partition for ZeRO 1-3,
      which hold their gradient partition in fp32 at that moment (ZeRO-1/2 the reduced
      partition and its fp32 copy: DeepSpeed's stage 1 and 2 share that code, and stage 1 has
      dropped the whole gradients once they are reduced; ZeRO-3 its fp32 partition).
    * gradient buffers: what DeepSpeed allocates once and keeps (BF16_Optimizer's fp32
      gradients; ZeRO-3's flat gradient partition).
    * gathered params (ZeRO-3): up to stage3_max_live_parameters (1e9) gathered parameters
      stay alive between their uses in forward and backward, so a model below that size is
      whole on every rank, next to its partition, until backward has used it: not at the
      optimizer step (measured, BENCHMARKS.md section 7).
    """
    b = BYTES[precision]
    grads = model_state_bytes(psi_r, zero_stage, dp, precision)["grads"]
    bucket = reduce_bucket if device == "gpu" else min(reduce_bucket, psi_r)
    partition = psi_r / dp
    out: dict[str, float] = {}
    temps = 0.0 if offload_optimizer else 2 * 4 * partition  # AdamW on the fp32 partition
    if zero_stage == 0 and precision == "bf16":
        # BF16_Optimizer: an fp32 gradient buffer allocated at the start, bf16 gradients
        # reduced through a flat copy, the fp32 master partitioned as in ZeRO-1
        out["gradient buffers"] = 4 * psi_r
        out["gradient reduction"] = 2 * 2 * psi_r
        out["optimizer step"] = temps
    elif zero_stage == 0:  # fp32 (torch's AdamW per parameter) or fp16 (fp32 grads at the step)
        out["gradient reduction"] = grads + psi_r * b
        out["optimizer step"] = grads + (4 * psi_r if b == 2 else 0) + 2 * 4 * params.largest
    elif zero_stage in (1, 2):
        out["gradient reduction"] = grads + bucket * (4 if zero_stage == 1 else b)
        # the reduced partition (ZeRO-2's gradients), and (fp32 model) its fp32 copy
        reduced = model_state_bytes(psi_r, 2, dp, precision)["grads"]
        fp32_grads = reduced + (4 * partition if precision == "fp32" else 0)
        out["optimizer step"] = (0.0 if offload_optimizer else fp32_grads) + temps
    else:  # ZeRO-3 allocates its flat gradient partition at the start
        out["gradient buffers"] = grads
        out["gradient reduction"] = bucket * b
        out["optimizer step"] = (0.0 if offload_optimizer else 4 * partition) + temps
    if zero_stage == 3:
        out["gathered params"] = min(DS_MAX_LIVE_PARAMETERS, psi_r) * b
    return out


# ---------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class _Stack:
    """One stack of blocks as the activation count sees it."""

    layers: int
    tokens: int
    """Positions per sequence in this stack (queries)."""
    keys: int
    """Positions attended to by self-attention (= tokens)."""
    math_attention: bool
    """Scores are materialized: a bias that needs its gradient (T5's relative positions) or
    attention dropout, on CPU (GPU kernels keep neither)."""
    mask: bool
    """A padding mask is passed to attention (BERT with a sentence head)."""
    cross_keys: int = 0
    """Encoder positions of cross-attention (T5 decoder), 0 without."""
    cpu: bool = False


def _norm_bytes(m: ModelConfig, bc: int) -> float:
    """Per token: what one norm keeps (input, output, statistics)."""
    if m.norm == "rmsnorm":  # x, x * rsqrt(var), weight * (...) and the statistics
        return (4 * m.d_model + 3 * m.d_model * bc if bc != 4 else 3 * m.d_model * 4) + 4
    return 2 * m.d_model * bc + 8  # input, output, mean and rstd in fp32


def _ffn_bytes(m: ModelConfig, bc: int, tp: int) -> float:
    """Per token: the feed-forward's hidden tensors ([F/tp] each): GELU keeps its input and
    output, ReLU its output; the gated form adds the gate and the product."""
    units = {(False, False): 2, (False, True): 1, (True, False): 4, (True, True): 3}[
        (m.gated_ffn, m.activation == "relu")]
    return units * m.ffn_width / tp * bc


def _attention_bytes(m: ModelConfig, s: _Stack, bc: int, tp: int) -> float:
    """Per token (query): one self-attention's q, k, v and output (o_proj's input), plus the
    softmax statistics, or the [H, S] probabilities when scores are materialized; with a
    padding mask, the kernel's float copy of the [B, 1, 1, S] mask and the copy of the output
    that zeroes fully masked rows."""
    d_local, h_local = m.d_model / tp, m.n_head / tp
    out = 4 * d_local * bc
    if s.math_attention:
        out += h_local * s.keys * bc * (3 if m.attention.dropout > 0 else 1)
    else:
        out += h_local * 4  # log-sum-exp
    if s.mask:
        out += s.keys * bc / s.tokens + (0 if s.math_attention else d_local * bc)
    return out


def _block_bytes(m: ModelConfig, s: _Stack, bc: int, tp: int) -> float:
    """Per query token: everything one block keeps for backward."""
    per_token = 2 * _norm_bytes(m, bc) + _attention_bytes(m, s, bc, tp) + _ffn_bytes(m, bc, tp)
    dropouts = 2
    if s.cross_keys:
        d_local = m.d_model / tp
        # q and output per query; k and v over the encoder positions
        per_token += _norm_bytes(m, bc) + 2 * d_local * bc + (m.n_head / tp) * 4
        per_token += 2 * d_local * bc * s.cross_keys / s.tokens
        dropouts += 1
    if m.dropout > 0:
        per_token += dropouts * m.d_model * _mask_bytes(bc, s)
    return per_token


def _mask_bytes(bc: int, s: "_Stack") -> int:
    """A dropout mask: bool on GPU (native_dropout), the activation's dtype on CPU."""
    return bc if s.cpu else 1


def _stacks(cfg: Config, device: str) -> tuple[list[_Stack], int, int]:
    """The family's stacks, the positions the loss head sees per sequence, and the encoder
    output positions shared by a decoder's cross-attention (0 without)."""
    m, T = cfg.model, cfg.data.seq_len
    cpu_math = device == "cpu"
    dropout_math = cpu_math and m.attention.dropout > 0
    if m.family == "gpt":
        return [_Stack(m.n_layer, T, T, dropout_math, False, cpu=cpu_math)], T, 0
    if m.family == "bert":
        masked = max(1, round(cfg.objective.mask_prob * (T - 2)))
        return [_Stack(m.n_layer, T, T, dropout_math, m.sentence_head != "none",
                       cpu=cpu_math)], masked, 0
    from data_pipeline.objectives.span_corruption import span_corruption_lengths

    lengths = span_corruption_lengths(T + 1, cfg.objective.noise_density,
                                      cfg.objective.mean_span_length)
    S, Td = lengths.inputs, lengths.targets
    rel = m.positions == "relative"
    enc = _Stack(m.n_layer, S, S, dropout_math or (cpu_math and rel), False, cpu=cpu_math)
    dec = _Stack(m.decoder_layers, Td, Td, dropout_math or (cpu_math and rel), False,
                 cross_keys=S, cpu=cpu_math)
    return [enc, dec], Td, S


def activation_bytes(cfg: Config, micro_batch: int, *, tp: int = 1, precision: str = "fp32",
                     checkpointing: bool | None = None, device: str = "gpu",
                     vocab_size: int | None = None, zero_stage: int = 0) -> dict[str, float]:
    """Bytes one rank holds for the backward pass of one micro-batch.

    Returns `saved` (what autograd keeps once the forward is done: `blocks`, `embeddings`,
    `head`), `transient` (what joins it at its worst moment: the loss head's work over the
    logits, or, with checkpointing, one block's activations recomputed) and `total` = saved +
    transient. `checkpointing` (default train.activation_checkpointing): every block keeps only
    its input. GPT's and T5's loss comes from the head's input a block of rows at a time
    (layers.lm_head_cross_entropy) unless tensor parallelism splits the head or ZeRO-3 hooks
    it (`zero_stage`)."""
    m = cfg.model
    bc = BYTES[precision]
    V = (vocab_size or resolve_vocab_size(cfg)) / tp
    ckpt = cfg.train.activation_checkpointing if checkpointing is None else checkpointing
    stacks, head_tokens, enc_tokens = _stacks(cfg, device)
    B = micro_batch
    blocks = embeddings = largest_block = 0.0
    for s in stacks:
        one = _block_bytes(m, s, bc, tp) * s.tokens * B
        largest_block = max(largest_block, one)
        blocks += s.layers * (m.d_model * bc * s.tokens * B if ckpt else one)
        embeddings += 8 * s.tokens * B  # token ids kept by the embedding lookup
        if m.dropout > 0:
            embeddings += m.d_model * _mask_bytes(bc, s) * s.tokens * B
        if s.math_attention and m.positions == "relative":
            embeddings += 8 * s.tokens * s.keys  # bucket ids of the relative bias
    # the encoder's output, kept by every cross-attention k and v projection
    embeddings += m.d_model * bc * enc_tokens * B
    if m.family == "bert":  # the embedding LayerNorm's input
        embeddings += (_norm_bytes(m, bc) - m.d_model * bc) * stacks[0].tokens * B
    if enc_tokens and m.norm_position == "pre":  # the encoder's final norm
        embeddings += (_norm_bytes(m, bc) - m.d_model * bc) * enc_tokens * B
    # the loss head: the stack's final norm, the head's own layers, and
    # - fused (LinearCrossEntropy): the gradients of the head's input [n, D] and of its weight
    #   [V, D] (fp32), prepared in forward; while it runs, its input and one block of r rows of
    #   fp32 logits turned in place into their gradient (4 V r, at most 256 MiB however many
    #   tokens)
    # - otherwise: the head's input and the logits' fp32 log-softmax, turned into its gradient in
    #   forward (SummedCrossEntropy); the logits themselves live until the loss is computed, and
    #   backward makes one fp32 product of that gradient (plus its cast to the logits' dtype)
    n = head_tokens * B
    fused = m.family != "bert" and tp == 1 and zero_stage != 3
    head = (4 * V * m.d_model if fused else 4 * V * n) + m.d_model * bc * n
    if m.norm_position == "pre":  # the final norm, whose output is that input
        head += (_norm_bytes(m, bc) - m.d_model * bc) * n
    if m.family == "bert":  # dense, activation, norm on the predicted positions
        head += (m.d_model * bc + _norm_bytes(m, bc)) * n
        if m.sentence_head != "none":  # the pooler keeps the stack output (a [CLS] view)
            head += m.d_model * bc * (stacks[0].tokens + 1) * B
    if fused:
        D, rows = m.d_model, min(n, max(1, LOSS_BLOCK_BYTES // (4 * V)))
        low = bc if bc != 4 else 0  # a block in the compute dtype beside the fp32 one
        # a block's logits in fp32 (the weight's gradient, counted in `head`, exists only from
        # the end of the first block), then its gradient with the weight gradient's share of it
        logits_moment = (4 + low) * V * rows - (4 * V * D if rows == n else 0)
        weight_moment = bc * V * rows + low * V * D
        forward = max(logits_moment, weight_moment) + 2 * D * bc * n  # with x and x / s
        backward = 4 * V * D + D * bc * n  # the scaled gradients beside the saved ones
        head_transient = max(forward, backward)
    else:
        head_transient = 4 * V * n + (bc * V * n if bc != 4 else 0)
    transient = max(head_transient, largest_block if ckpt else 0.0)
    saved = blocks + embeddings + head
    return {"blocks": blocks, "embeddings": embeddings, "head": head, "saved": saved,
            "transient": transient, "total": saved + transient}


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Layout:
    """How a run is spread: nodes x ranks per node, TP x DP, ZeRO, batch and precision."""

    nodes: int
    gpus_per_node: int
    tensor_parallel: int = 1
    zero_stage: int = 2
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    precision: str = "bf16"
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    device: str = "gpu"
    """gpu, or cpu for CPU ranks (fp32; memory is host RAM)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return max(self.world // self.tensor_parallel, 1)

    def describe(self) -> str:
        ckpt = ", activation checkpointing" if self.activation_checkpointing else ""
        off = ", optimizer offload" if self.offload_optimizer else ""
        return (f"{self.nodes} node(s) x {self.gpus_per_node} {self.device.upper()}(s): "
                f"TP{self.tensor_parallel} x DP{self.dp}, ZeRO-{self.zero_stage}, micro-batch "
                f"{self.micro_batch_size} x {self.grad_accum_steps} accumulation, "
                f"{self.precision}{ckpt}{off}")

    @classmethod
    def from_config(cls, cfg: Config, nodes: int, gpus_per_node: int, *, device: str = "gpu",
                    **changes) -> "Layout":
        precision = cfg.train.precision
        if precision == "auto":
            precision = "bf16" if device == "gpu" else "fp32"
        layout = cls(
            nodes=nodes, gpus_per_node=gpus_per_node,
            tensor_parallel=cfg.parallel.tensor_parallel, zero_stage=cfg.parallel.zero_stage,
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps, precision=precision,
            activation_checkpointing=cfg.train.activation_checkpointing,
            offload_optimizer=cfg.parallel.offload_optimizer,
            offload_params=cfg.parallel.offload_params, device=device)
        return replace(layout, **changes)


@dataclass
class Plan:
    layout: Layout
    params: ParamCounts
    psi_r: int
    memory: dict[str, float]
    """Per rank: params, grads, optimizer, activations (and their parts), transients."""
    peak: float
    capacity: float | None
    """Usable bytes per GPU (after the headroom), None when not given."""
    largest_micro_batch: int | None
    tokens_per_step: int
    flops_per_token: float
    step_time: float | None
    tokens_per_sec: float | None
    fixes: list[tuple[str, float]] = field(default_factory=list)
    """When it does not fit: (change, peak with that change) for changes that fit."""
    problems: list[str] = field(default_factory=list)
    """Why the layout is invalid (degrees that do not divide, ...)."""
    vocab_size: int = 0

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak <= self.capacity


def layout_problems(cfg: Config, layout: Layout) -> list[str]:
    out = []
    tp = layout.tensor_parallel
    if layout.world < 1:
        out.append(f"--nodes x --gpus-per-node must be at least 1, got {layout.world}")
    if layout.world % tp:
        out.append(f"tensor parallel {tp} does not divide the {layout.world} ranks")
    if layout.gpus_per_node % tp and layout.nodes > 1:
        out.append(f"tensor parallel {tp} does not divide the {layout.gpus_per_node} GPUs per "
                   "node: its groups would span nodes")
    if cfg.model.n_head % tp:
        out.append(f"tensor parallel {tp} does not divide model.n_head={cfg.model.n_head}")
    if layout.offload_params and layout.zero_stage != 3:
        out.append("parameter offload needs ZeRO-3")
    return out


def memory_breakdown(cfg: Config, layout: Layout, params: ParamCounts,
                     vocab_size: int) -> dict[str, float]:
    """Per rank: the model states of the ZeRO table (params, grads, optimizer), the
    activations of one micro-batch and their parts, and the transients (transient_bytes)."""
    psi_r = params.per_rank(layout.tensor_parallel)
    states = model_state_bytes(psi_r, layout.zero_stage, layout.dp, layout.precision,
                               offload_optimizer=layout.offload_optimizer,
                               offload_params=layout.offload_params)
    if layout.zero_stage == 3:  # small tensors stay whole on every rank
        states["params"] += params.small * BYTES[layout.precision] * (1 - 1 / layout.dp)
    act = activation_bytes(cfg, layout.micro_batch_size, tp=layout.tensor_parallel,
                           precision=layout.precision,
                           checkpointing=layout.activation_checkpointing, device=layout.device,
                           vocab_size=vocab_size, zero_stage=layout.zero_stage)
    transients = transient_bytes(params, psi_r, layout.zero_stage, layout.dp, layout.precision,
                                 layout.device, reduce_bucket=reduce_bucket_size(cfg),
                                 offload_optimizer=layout.offload_optimizer)
    return {**states, "activations": act["total"], "activations: blocks": act["blocks"],
            "activations: embeddings, loss head": act["embeddings"] + act["head"],
            "activations: transient": act["transient"], **transients}


def peak_bytes(memory: dict[str, float]) -> float:
    """Parameters + optimizer states (+ the gradient buffers DeepSpeed allocates at the
    start), plus the largest of the three moments: forward/backward (activations, and ZeRO-3's
    gathered parameters), gradient reduction (also with them), optimizer step."""
    resident = (memory["params"] + memory["optimizer"] + memory.get("gradient buffers", 0.0))
    gathered = memory.get("gathered params", 0.0)
    return resident + max(memory["activations"] + gathered,
                          memory["gradient reduction"] + gathered, memory["optimizer step"])


def plan(cfg: Config, layout: Layout, *, gpu_memory: float | None = None,
         peak_tflops: float | None = None, mfu: float = 0.4, headroom: float = 0.1,
         vocab_size: int | None = None) -> Plan:
    """Predict memory and speed of `cfg` on `layout`; see the module docstring.

    gpu_memory: bytes per GPU (None: do not judge fit); headroom: the fraction kept free for
    the CUDA context, communication buffers and fragmentation; peak_tflops: the device's dense
    peak, with mfu the fraction of it the run is assumed to reach."""
    vocab = vocab_size or resolve_vocab_size(cfg)
    params = count_params(cfg.model, vocab, cfg.data.seq_len)
    psi_r = params.per_rank(layout.tensor_parallel)
    memory = memory_breakdown(cfg, layout, params, vocab)
    peak = peak_bytes(memory)
    capacity = gpu_memory * (1 - headroom) if gpu_memory else None
    tokens_per_step = (layout.micro_batch_size * layout.grad_accum_steps * layout.dp
                       * cfg.data.seq_len)
    flops = flops_per_token(cfg, params)
    step_time = tokens_per_sec = None
    if peak_tflops:
        hardware = flops * (4 / 3 if layout.activation_checkpointing else 1)
        step_time = tokens_per_step * hardware / (layout.world * peak_tflops * 1e12 * mfu)
        tokens_per_sec = tokens_per_step / step_time
    out = Plan(layout=layout, params=params, psi_r=psi_r, memory=memory, peak=peak,
               capacity=capacity, largest_micro_batch=None, tokens_per_step=tokens_per_step,
               flops_per_token=flops, step_time=step_time, tokens_per_sec=tokens_per_sec,
               problems=layout_problems(cfg, layout), vocab_size=vocab)
    if capacity is not None:
        out.largest_micro_batch = largest_micro_batch(cfg, layout, params, vocab, capacity)
        if not out.fits:
            out.fixes = fixes(cfg, layout, params, vocab, capacity)
    return out


def flops_per_token(cfg: Config, params: ParamCounts) -> float:
    from pretrain.model.flops import transformer_flops_per_token

    if params.flops_per_token:
        return params.flops_per_token
    m = cfg.model
    layers = m.n_layer + (m.decoder_layers if m.family == "t5" else 0)
    return transformer_flops_per_token(n_params=params.non_embedding, n_layer=layers,
                                       n_head=m.n_head, head_dim=m.d_model // m.n_head,
                                       seq_len=cfg.data.seq_len)


def _peak_of(cfg: Config, layout: Layout, params: ParamCounts, vocab: int) -> float:
    return peak_bytes(memory_breakdown(cfg, layout, params, vocab))


def largest_micro_batch(cfg: Config, layout: Layout, params: ParamCounts, vocab: int,
                        capacity: float) -> int:
    """The largest micro-batch whose peak fits in `capacity` (0: not even one sequence)."""
    if _peak_of(cfg, replace(layout, micro_batch_size=1), params, vocab) > capacity:
        return 0
    lo, hi = 1, 2
    while _peak_of(cfg, replace(layout, micro_batch_size=hi), params, vocab) <= capacity:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _peak_of(cfg, replace(layout, micro_batch_size=mid), params, vocab) <= capacity:
            lo = mid
        else:
            hi = mid
    return lo


def fixes(cfg: Config, layout: Layout, params: ParamCounts, vocab: int,
          capacity: float) -> list[tuple[str, float]]:
    """Single changes (and a few pairs) that make the layout fit, cheapest first: a smaller
    micro-batch with more accumulation keeps the global batch; checkpointing costs a third
    more compute; higher ZeRO stages and tensor parallelism cost communication; offload
    costs host-device traffic; more nodes cost GPUs."""
    candidates: list[tuple[str, Layout]] = []
    m = layout.micro_batch_size
    fitting = largest_micro_batch(cfg, layout, params, vocab, capacity)
    smaller = max((d for d in range(1, min(fitting, m - 1) + 1) if m % d == 0), default=0)
    if smaller:  # the largest divisor of the micro-batch that fits keeps the global batch
        accum = layout.grad_accum_steps * (m // smaller)
        candidates.append((f"train.micro_batch_size={smaller} train.grad_accum_steps={accum}",
                           replace(layout, micro_batch_size=smaller, grad_accum_steps=accum)))
    if not layout.activation_checkpointing:
        candidates.append(("train.activation_checkpointing=true",
                           replace(layout, activation_checkpointing=True)))
    for stage in range(layout.zero_stage + 1, 4):
        candidates.append((f"parallel.zero_stage={stage}", replace(layout, zero_stage=stage)))
    tp = layout.tensor_parallel
    while tp * 2 <= layout.gpus_per_node and layout.gpus_per_node % (tp * 2) == 0 \
            and cfg.model.n_head % (tp * 2) == 0:
        tp *= 2
        candidates.append((f"parallel.tensor_parallel={tp}",
                           replace(layout, tensor_parallel=tp)))
    if not layout.offload_optimizer:
        stage = max(layout.zero_stage, 1)
        candidates.append((f"parallel.offload_optimizer=true"
                           + (f" parallel.zero_stage={stage}" if stage != layout.zero_stage
                              else ""),
                           replace(layout, offload_optimizer=True, zero_stage=stage)))
    if layout.zero_stage == 3:
        candidates.append((f"--nodes {layout.nodes * 2}", replace(layout, nodes=layout.nodes * 2)))
    if not layout.activation_checkpointing:  # pairs with checkpointing
        for name, other in list(candidates):
            if "activation_checkpointing" not in name:
                candidates.append((f"{name} train.activation_checkpointing=true",
                                   replace(other, activation_checkpointing=True)))
    out = []
    for name, candidate in candidates:
        if layout_problems(cfg, candidate):
            continue
        peak = _peak_of(cfg, candidate, params, vocab)
        if peak <= capacity:
            out.append((name, peak))
    # a pair is worth listing only if neither of its parts fits alone
    kept = [(n, p) for n, p in out
            if not any(o != n and (n.startswith(o) or n.endswith(o)) for o, _ in out)]
    return kept[:6]


def format_plan(cfg: Config, p: Plan, source: str, mfu: float, peak_tflops: float | None,
                gpu_memory: float | None) -> str:
    """The human-readable plan `pretrain plan` prints."""
    L = p.layout
    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"plan for {source}",
             f"  layout: {L.describe()}",
             f"  model: {cfg.model.family}, {p.params.total / 1e6:.1f}M parameters "
             f"({p.params.non_embedding / 1e6:.1f}M non-embedding), {p.psi_r / 1e6:.1f}M per rank "
             f"after TP{L.tensor_parallel}; sequence {cfg.data.seq_len}"]
    for problem in p.problems:
        lines.append(f"  invalid layout: {problem}")
    lines.append("  memory per rank:")
    for name, value in p.memory.items():
        if name == "activations":
            ckpt = "with" if L.activation_checkpointing else "without"
            lines.append(f"    {'activations (' + ckpt + ' checkpointing)':<44}{gib(value)}")
        elif name.startswith("activations:"):
            lines.append(f"      {name.split(': ', 1)[1]:<42}{gib(value)}")
        else:
            lines.append(f"    {name:<44}{gib(value)}")
    other = activation_bytes(cfg, L.micro_batch_size, tp=L.tensor_parallel,
                             precision=L.precision, checkpointing=not L.activation_checkpointing,
                             device=L.device, vocab_size=p.vocab_size,
                             zero_stage=L.zero_stage)["total"]
    flipped = "without" if L.activation_checkpointing else "with"
    lines.append(f"    {'(activations ' + flipped + ' checkpointing)':<44}{gib(other)}")
    lines.append(f"    {'peak':<44}{gib(p.peak)}")
    if p.capacity is not None:
        lines.append(f"  capacity: {gpu_memory / GiB:.1f} GiB per GPU, "
                     f"{p.capacity / GiB:.1f} GiB usable")
        if p.fits:
            lines.append(f"  fits: yes ({100 * p.peak / p.capacity:.0f}% of usable); largest "
                         f"micro-batch that fits: {p.largest_micro_batch}")
        else:
            lines.append(f"  fits: NO: needs {p.peak / GiB:.1f} GiB, {p.capacity / GiB:.1f} GiB "
                         f"usable; largest micro-batch that fits: {p.largest_micro_batch}")
            if p.fixes:
                lines.append("  would fit with (first is cheapest):")
                lines += [f"    {name:<60}{gib(peak)}" for name, peak in p.fixes]
            else:
                lines.append("  no single change tried fits: use more GPUs with ZeRO-3, or a "
                             "smaller model")
    lines.append(f"  FLOPs per token: {p.flops_per_token / 1e9:.3f} GFLOP (6N + 12LHQT); "
                 f"tokens per step: {p.tokens_per_step:,}")
    if p.step_time is not None:
        lines.append(f"  step time: {_seconds(p.step_time)}, {p.tokens_per_sec:,.0f} tokens/s "
                     f"({p.tokens_per_sec / L.world:,.0f} per GPU), assuming MFU "
                     f"{100 * mfu:.0f}% of {peak_tflops:g} TFLOP/s per GPU")
    return "\n".join(lines)


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
