"""Typed, validated configuration of a pretraining run.

Every section is a pydantic model with a docstring under each field (they are the reference in
configs/README.md). Types and single-field ranges are checked by pydantic; checks that involve
several fields, or the world size, live in `validate_config`, which collects every problem
before failing. Loading YAML files, `defaults:` composition, dotted command-line overrides and
the error messages that name the key and the file are in `pretrain.config_io`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class RunConfig(Section):
    dir: str = "runs/default"
    """Run directory. Holds checkpoints/, metrics.jsonl, tensorboard/, audit/ and the resolved
    config. Running the same command again with the same run.dir resumes from its latest
    checkpoint."""
    name: str | None = None
    """Free-form name of the run, written into metrics and reports (default: the run.dir's name)."""
    seed: int = Field(1234, ge=0)
    """Seed of model initialization, dropout and data order. Same seed, same run."""


class AttentionConfig(Section):
    kind: Literal["dense"] = "dense"
    """Attention kernel. `dense` is PyTorch scaled_dot_product_attention (flash/memory-efficient
    kernels on GPU). Long-context kernels plug in here under other names."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the attention probabilities."""


class ModelConfig(Section):
    family: Literal["gpt"] = "gpt"
    """Model family. `gpt`: decoder-only causal language model."""
    n_layer: int = Field(4, ge=1)
    """Number of transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide d_model."""
    d_model: int = Field(256, ge=8)
    """Width of the residual stream."""
    d_ff: int | None = Field(None, ge=1)
    """Hidden width of the feed-forward network (default 4 * d_model)."""
    max_seq_len: int = Field(256, ge=2)
    """Longest sequence the model accepts (size of the learned position table); at least
    data.seq_len."""
    vocab_size: int | None = Field(None, ge=2)
    """Embedding rows. Default: the tokenizer's vocabulary rounded up to pad_vocab_multiple.
    Set explicitly only to reserve room; it must be at least the tokenizer's size."""
    pad_vocab_multiple: int = Field(64, ge=1)
    """Round the tokenizer's vocabulary up to a multiple of this for faster matmuls."""
    positions: Literal["learned", "sinusoidal"] = "learned"
    """Absolute position encoding added to the token embeddings."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings and residual branches."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2 has them)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    init_std: float = Field(0.02, gt=0.0)
    """Standard deviation of the normal init; residual output projections are scaled by
    1/sqrt(2 * n_layer) as in GPT-2."""
    norm_eps: float = Field(1e-5, gt=0.0)
    """Epsilon of the LayerNorms."""
    attention: AttentionConfig = AttentionConfig()
    """Attention kernel and its settings."""


class TokenizerConfig(Section):
    path: str | None = None
    """An existing Hugging Face tokenizer.json to use as is. Default: train a byte-level BPE
    tokenizer on the training split of the corpus."""
    vocab_size: int = Field(8192, ge=300)
    """Vocabulary size of the trained tokenizer (special tokens included)."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur this often to be merged."""
    special_tokens: list[str] = ["<|endoftext|>", "<|pad|>"]
    """Special tokens added to the vocabulary, in this order (ids 0, 1, ...)."""
    eos_token: str = "<|endoftext|>"
    """Token appended to every document; must be one of special_tokens (or of the loaded
    tokenizer's vocabulary)."""
    train_max_bytes: int = Field(200_000_000, ge=1)
    """Train the tokenizer on at most this many bytes of training documents (in document
    order)."""


class DataConfig(Section):
    sources: list[str] = ["stdlib"]
    """Input files: paths, directories (searched recursively) or glob patterns. The word
    `stdlib` means the .py sources of the running interpreter's standard library, the embedded
    default corpus."""
    exclude: list[str] = []
    """Glob patterns of files to leave out (matched against the absolute path). The `stdlib`
    source always leaves out site-packages and the test suites."""
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    """How to read the sources. `auto` goes by extension: .jsonl/.json lines, .parquet, else text
    (one document per file)."""
    text_field: str = "text"
    """JSONL field or Parquet column that holds the document text."""
    dir: str = "data/stdlib"
    """Where `pretrain prepare` writes the tokenizer, the shards and manifest.json, and where
    training reads them."""
    seq_len: int = Field(256, ge=2)
    """Tokens per training sequence. Samples are packed with seq_len + 1 tokens so that inputs
    and next-token targets both have seq_len."""
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    """Fraction of documents that go to the validation split (chosen by a hash of the document
    id, so the split does not depend on the number of workers)."""
    shard_bytes: int = Field(16 * 2**20, ge=4096)
    """Target size of one WebDataset tar shard, in bytes."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """Tokenizer to train or load."""
    ray_address: str | None = None
    """Ray cluster to run the pipeline on (`auto` or host:port). Default: a local Ray started
    for the job, bound to localhost."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs the local Ray may use (default: all)."""
    num_workers: int = Field(1, ge=0)
    """DataLoader worker processes per data-parallel rank (0: load in the training process)."""
    shuffle: bool = True
    """Shuffle shard order and samples within a shard, as a function of (seed, epoch)."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest when it is opened."""
    audit: bool = False
    """Record, per rank, the position, epoch and id of every consumed sample under
    <run.dir>/audit/, to prove exactly-once coverage."""


class ParallelConfig(Section):
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters sharded
    over data-parallel ranks."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on the CPU (ZeRO stage 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU (ZeRO stage 3 only)."""
    tensor_parallel: int = Field(1, ge=1)
    """Tensor-parallel degree (Megatron-style): every layer's weights are split over this many
    consecutive ranks (attention heads, feed-forward columns, vocabulary rows); the data-parallel
    size is the world size divided by it. Must divide the world size, model.n_head, the
    feed-forward width and the vocabulary (model.pad_vocab_multiple or model.vocab_size)."""
    sequence_parallel: bool = False
    """With tensor_parallel > 1, also split the activations between the tensor-parallel
    regions (LayerNorm, dropout, residual adds) along the sequence: activation memory of those
    parts shrinks by tensor_parallel at the same communication volume. Needs data.seq_len
    divisible by tensor_parallel. No effect with tensor_parallel = 1."""
    tensor_parallel_across_nodes: bool = False
    """Allow tensor-parallel groups that span nodes (when tensor_parallel does not divide the
    ranks per node). Off by default: tensor parallelism all-reduces in every layer and is slow
    over the network."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: `auto` is NCCL on GPU and gloo on CPU."""
    timeout_minutes: float = Field(10.0, gt=0)
    """Timeout of collective operations; a rank that stops answering fails the run after it."""


class OptimConfig(Section):
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate of AdamW, reached at the end of warmup."""
    min_lr: float = Field(1e-4, ge=0.0)
    """Learning rate at the end of the decay."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay on weight matrices and embeddings (not on biases or norms)."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW beta1 and beta2."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warmup from 0 to lr over this many optimizer steps."""
    decay_steps: int | None = Field(None, ge=1)
    """Optimizer steps over which lr decays to min_lr (default: train.max_steps)."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0: no clipping)."""


class TrainConfig(Section):
    max_steps: int = Field(300, ge=1)
    """Optimizer steps to train for."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per rank per forward/backward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated before each optimizer step."""
    global_batch_size: int | None = Field(None, ge=1)
    """Sequences per optimizer step over all ranks. Default: micro_batch_size * grad_accum_steps
    * data-parallel size; if set, it must equal that product."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision: `auto` is bf16 on a GPU that supports it and fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""
    eval_interval: int = Field(100, ge=0)
    """Evaluate on the validation split every this many steps (0: only before and after)."""
    eval_batches: int | None = Field(20, ge=1)
    """Micro-batches per rank per evaluation (null: the whole validation split)."""
    log_interval: int = Field(10, ge=1)
    """Write a training line to metrics.jsonl every this many steps."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""


class CheckpointConfig(Section):
    interval: int = Field(100, ge=0)
    """Save every this many optimizer steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Keep the newest this many complete checkpoints; older ones are deleted."""
    resume: Literal["auto", "never"] = "auto"
    """`auto`: continue from the latest complete checkpoint in <run.dir>/checkpoints if there is
    one. `never`: refuse to start if the run directory already holds checkpoints."""
    save_final: bool = True
    """Save a checkpoint when training ends."""


class LoggingConfig(Section):
    tensorboard: bool = True
    """Write TensorBoard event files under <run.dir>/tensorboard."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    peak_tflops: float | None = Field(None, gt=0.0)
    """Peak dense TFLOP/s of one device, for MFU. Default: known GPUs by name (H100, A100...);
    on CPU no MFU is reported unless this is set."""


class Config(Section):
    """A whole run. Every section has defaults; YAML files and overrides change them."""

    run: RunConfig = RunConfig()
    """Run directory, name and seed."""
    model: ModelConfig = ModelConfig()
    """Model family, size and architecture choices."""
    data: DataConfig = DataConfig()
    """Corpus, tokenizer, shards (`pretrain prepare`) and the training loader."""
    parallel: ParallelConfig = ParallelConfig()
    """ZeRO stage, offload, tensor parallelism, distributed backend."""
    optim: OptimConfig = OptimConfig()
    """AdamW and the learning-rate schedule."""
    train: TrainConfig = TrainConfig()
    """Steps, batch sizes, precision, evaluation cadence."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """When to save, how many to keep, whether to resume."""
    logging: LoggingConfig = LoggingConfig()
    """metrics.jsonl, TensorBoard, progress bar, MFU peak."""


def validate_config(cfg: Config, world_size: int | None = None) -> list[tuple[str, str]]:
    """Checks that involve several fields (and the world size, once known).

    Returns every problem as (dotted key, message); an empty list means the config is consistent.
    """
    problems: list[tuple[str, str]] = []
    m, d, t, p, o = cfg.model, cfg.data, cfg.train, cfg.parallel, cfg.optim
    if m.d_model % m.n_head:
        problems.append(("model.n_head", f"must divide model.d_model={m.d_model}, got {m.n_head}"))
    if d.seq_len > m.max_seq_len:
        problems.append(
            ("data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
             "lower data.seq_len or raise model.max_seq_len")
        )
    if o.min_lr > o.lr:
        problems.append(("optim.min_lr", f"{o.min_lr} is above optim.lr={o.lr}"))
    problems += tensor_parallel_problems(cfg)
    if p.offload_params and p.zero_stage != 3:
        problems.append(
            ("parallel.offload_params", f"needs parallel.zero_stage=3, got {p.zero_stage}")
        )
    if t.device == "cpu" and p.backend == "nccl":
        problems.append(("parallel.backend", "nccl needs GPUs but train.device=cpu; use gloo"))
    if (d.tokenizer.path is None and m.vocab_size is not None
            and m.vocab_size < d.tokenizer.vocab_size):
        problems.append(
            ("model.vocab_size",
             f"{m.vocab_size} is smaller than data.tokenizer.vocab_size={d.tokenizer.vocab_size}")
        )
    if p.offload_optimizer and p.zero_stage == 0:
        problems.append(("parallel.offload_optimizer", "needs parallel.zero_stage 1, 2 or 3"))
    if d.tokenizer.path is None and d.tokenizer.eos_token not in d.tokenizer.special_tokens:
        problems.append(
            ("data.tokenizer.eos_token",
             f"{d.tokenizer.eos_token!r} is not in data.tokenizer.special_tokens "
             f"{d.tokenizer.special_tokens}")
        )
    if world_size is not None and world_size < 1:
        problems.append(("world size", f"must be at least 1, got {world_size}"))
    elif world_size is not None:
        if world_size % p.tensor_parallel:
            problems.append(
                ("parallel.tensor_parallel",
                 f"{p.tensor_parallel} does not divide the world size {world_size}")
            )
        dp = data_parallel_size(cfg, world_size)
        product = t.micro_batch_size * t.grad_accum_steps * dp
        if t.global_batch_size is not None and t.global_batch_size != product:
            problems.append(
                ("train.global_batch_size",
                 f"{t.global_batch_size} != micro_batch_size {t.micro_batch_size} x "
                 f"grad_accum_steps {t.grad_accum_steps} x data-parallel size {dp} = {product}; "
                 "change one of them or leave global_batch_size unset")
            )
    return problems


def tensor_parallel_problems(cfg: Config) -> list[tuple[str, str]]:
    """What the model and data need for parallel.tensor_parallel = n: n divides the heads, the
    feed-forward width and the vocabulary (and, for sequence parallelism, the sequence)."""
    m, p, n = cfg.model, cfg.parallel, cfg.parallel.tensor_parallel
    if n == 1:
        return []
    out = []
    key = "parallel.tensor_parallel"
    if m.n_head % n:
        out.append((key, f"{n} does not divide model.n_head={m.n_head} (heads are split "
                         "over tensor-parallel ranks)"))
    d_ff = m.d_ff if m.d_ff is not None else 4 * m.d_model
    if d_ff % n:
        out.append((key, f"{n} does not divide the feed-forward width {d_ff} (model.d_ff)"))
    if m.vocab_size is not None and m.vocab_size % n:
        out.append((key, f"{n} does not divide model.vocab_size={m.vocab_size}"))
    if m.vocab_size is None and m.pad_vocab_multiple % n:
        out.append(("model.pad_vocab_multiple",
                    f"{m.pad_vocab_multiple} is not a multiple of parallel.tensor_parallel={n} "
                    "(the vocabulary is split over tensor-parallel ranks)"))
    if p.sequence_parallel and cfg.data.seq_len % n:
        out.append(("parallel.sequence_parallel",
                    f"needs data.seq_len={cfg.data.seq_len} divisible by "
                    f"parallel.tensor_parallel={n}"))
    return out


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return max(world_size // cfg.parallel.tensor_parallel, 1)


def global_batch_size(cfg: Config, world_size: int) -> int:
    t = cfg.train
    return t.micro_batch_size * t.grad_accum_steps * data_parallel_size(cfg, world_size)
