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


PositiveInt = Annotated[int, Field(ge=1)]


class LongformerConfig(Section):
    window: PositiveInt | list[PositiveInt] = 256
    """One-sided sliding window w: query i sees the keys i-w*dilation ... i+w*dilation (causal:
    up to i) in steps of `dilation`. One number for every layer, or a list with one per layer
    (length model.n_layer; t5: of the encoder). Memory and time grow as seq_len x w, not
    seq_len^2."""
    dilation: PositiveInt | list[PositiveInt] = 1
    """Gap between attended keys in the window (1: contiguous). One number, or one per layer."""
    global_positions: list[Annotated[int, Field(ge=0)]] = []
    """Positions with global attention ([0]: BERT's [CLS], which the sentence head reads): they
    attend to every position and every position attends to them (causal models: only earlier
    ones), through their own q/k/v projections (q_global_proj, k_global_proj, v_global_proj) as
    in the paper. Each must be below data.seq_len."""


class ReformerConfig(Section):
    n_hashes: PositiveInt = 2
    """Rounds of LSH hashing; each round sorts by bucket separately and the rounds are combined
    by their log-sum-exp. More rounds: closer to full attention, proportionally slower."""
    n_buckets: PositiveInt = 32
    """Hash buckets per round: 1 (one bucket: attention within chunks) or an even number
    (random rotations projected onto n_buckets / 2 directions and their negatives). The paper
    suggests about 2 * seq_len / chunk_len."""
    chunk_len: PositiveInt = 64
    """Length of the chunks of the bucket-sorted sequence: a query attends to keys of its own
    bucket in its chunk and the previous one (causal: the chunk_len keys before it)."""
    hash_seed: int | None = None
    """Seed of the random rotations. null: fresh rotations every forward pass, drawn from torch's
    random generator (so reproducible under run.seed and restored on resume). A number: the
    same rotations in every call."""


class AttentionConfig(Section):
    kind: Literal["dense", "longformer", "reformer"] = "dense"
    """Self-attention kernel of every family (t5: of the encoder; its decoder and every
    cross-attention stay dense). `dense`: PyTorch scaled_dot_product_attention
    (flash/memory-efficient kernels on GPU). `longformer`: sliding window + global positions
    (settings in model.attention.longformer). `reformer`: LSH attention with shared query-key
    (settings in model.attention.reformer). Both long kernels take t5's relative position bias,
    evaluated on the pairs they score. Models with a long kernel have no Hugging Face export."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the attention probabilities."""
    longformer: LongformerConfig = LongformerConfig()
    """Settings of kind=longformer (ignored by the other kinds)."""
    reformer: ReformerConfig = ReformerConfig()
    """Settings of kind=reformer (ignored by the other kinds)."""


class ModelConfig(Section):
    family: Literal["gpt", "bert", "t5"] = "gpt"
    """Model family; it also picks the objective. `gpt`: decoder-only causal LM (next-token
    prediction). `bert`: encoder with a masked-LM head (dynamic masking) and, with
    sentence_head, a pooler and a sentence-pair head. `t5`: encoder-decoder trained on span
    corruption; the original Transformer (Vaswani et al.) is a preset of it
    (configs/models/transformer-base.yaml)."""
    n_layer: int = Field(4, ge=1)
    """Number of transformer blocks (of the encoder, for t5)."""
    n_decoder_layer: int | None = Field(None, ge=1)
    """t5 only: blocks of the decoder (default n_layer)."""
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
    positions: Literal["learned", "sinusoidal", "relative"] = "learned"
    """Position information. `learned` and `sinusoidal`: absolute encodings added to the token
    embeddings. `relative` (t5 only): T5's bucketed relative position bias added to the
    attention scores, one table per stack shared by its blocks."""
    relative_buckets: int = Field(32, ge=2)
    """positions=relative: number of relative-position buckets (half exact, half log-spaced)."""
    relative_max_distance: int = Field(128, ge=2)
    """positions=relative: distances at or beyond this share the last bucket."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalization layer: LayerNorm (GPT-2, BERT) or RMSNorm (T5's scale-only norm)."""
    norm_position: Literal["pre", "post"] = "pre"
    """`pre`: x + f(norm(x)), with a final norm after the last block (GPT-2, T5). `post`:
    norm(x + f(x)), as in the original Transformer and BERT."""
    activation: Literal["gelu_tanh", "gelu", "relu"] = "gelu_tanh"
    """Feed-forward activation: `gelu_tanh` (GPT-2's tanh approximation, HF "gelu_new"),
    `gelu` (exact, BERT), `relu` (original Transformer and T5)."""
    gated_ffn: bool = False
    """Gated feed-forward, c_proj(act(c_gate(x)) * c_fc(x)): gated-GELU with
    activation=gelu_tanh, as in T5 v1.1."""
    scale_attn_scores: bool = True
    """Divide attention scores by sqrt(head_dim). T5 does not (its init absorbs the factor)."""
    type_vocab_size: int = Field(2, ge=0)
    """bert only: rows of the token-type (segment) embedding; 0 leaves it out."""
    sentence_head: Literal["none", "nsp", "sop"] = "none"
    """bert only: a pooler and a 2-way head on [CLS] trained on sentence pairs. `nsp`: is
    segment B the continuation of A or from elsewhere (BERT). `sop`: are A and B in order or
    swapped (ALBERT). `none`: masked LM only, one segment per sequence (RoBERTa)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings and residual branches."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2 and BERT have them, T5 not)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head (t5: the decoder output is then
    scaled by d_model^-0.5 first, as in T5)."""
    init_std: float = Field(0.02, gt=0.0)
    """gpt and bert: standard deviation of the normal init (gpt also scales residual output
    projections by 1/sqrt(2 * n_layer), as GPT-2). t5 uses T5's fan-in init instead."""
    norm_eps: float = Field(1e-5, gt=0.0)
    """Epsilon of the norms."""
    attention: AttentionConfig = AttentionConfig()
    """Attention kernel and its settings."""
    reversible: bool = False
    """Reversible residual layers (RevNet, as in Reformer): two residual streams, activations
    recomputed from the layer outputs in the backward pass, so activation memory does not grow
    with n_layer. Same parameters as the ordinary layers; a different function (no Hugging Face
    export). Needs norm_position=pre and no train.activation_checkpointing."""
    ff_chunk_size: int | None = Field(None, ge=1)
    """Run the feed-forward network over this many positions at a time (forward and backward):
    its [batch, seq_len, d_ff] activation is never whole in memory. null: all at once. Same
    function, recomputed once more in the backward pass."""

    @property
    def ffn_width(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer if self.n_decoder_layer is not None else self.n_layer


class ObjectiveConfig(Section):
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    """bert: fraction of the text tokens of each sequence chosen for prediction (rounded, at
    least one)."""
    mask_token_prob: float = Field(0.8, ge=0.0, le=1.0)
    """bert: of the chosen tokens, the fraction replaced by [MASK]."""
    random_token_prob: float = Field(0.1, ge=0.0, le=1.0)
    """bert: of the chosen tokens, the fraction replaced by a random non-special token; the
    rest stay unchanged."""
    noise_density: float = Field(0.15, gt=0.0, lt=1.0)
    """t5: fraction of each sample's tokens that span corruption removes into the targets."""
    mean_span_length: float = Field(3.0, ge=1.0)
    """t5: mean length of the corrupted spans."""


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
    sentinel_tokens: int = Field(0, ge=0)
    """Add this many T5 sentinel tokens <extra_id_0>, <extra_id_1>, ... after special_tokens
    (t5 needs one per corrupted span of a sample)."""

    def all_special_tokens(self) -> list[str]:
        """special_tokens followed by the sentinels, in id order."""
        return [*self.special_tokens, *sentinel_names(self.sentinel_tokens)]


def sentinel_names(n: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(n)]


FAMILY_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "gpt": (),
    "bert": ("[CLS]", "[SEP]", "[MASK]"),
    "t5": (),
}
"""Special tokens each family's objective needs by name, besides a padding token (a special
token whose name contains "pad") for bert and t5 and, for t5, sentinels <extra_id_N>."""


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
    on_bad_record: Literal["error", "skip"] = "error"
    """A JSONL line that is not valid JSON, not an object, lacks data.text_field or holds a
    non-string there; a Parquet file that is not Parquet or lacks a string data.text_field
    column. `error`: `pretrain prepare` stops, naming the file and line. `skip`: the line (the
    Parquet file) is left out, counted in the manifest and listed in <data.dir>/skipped.jsonl."""
    on_binary_file: Literal["skip", "error"] = "skip"
    """A text-format file with a NUL byte in its first 8 KiB (an image, an archive, a compiled
    file in a source tree). `skip`: left out, counted in the manifest and listed in
    <data.dir>/skipped.jsonl. `error`: `pretrain prepare` stops, naming the file."""
    on_invalid_utf8: Literal["replace", "skip", "error"] = "replace"
    """Bytes that are not valid UTF-8 (a Latin-1 file, a cut multi-byte character).
    `replace`: the document is kept with each bad sequence replaced by U+FFFD, counted per file
    in the manifest. `skip`: the document (text file, JSONL line, Parquet row) is left out and
    listed in <data.dir>/skipped.jsonl. `error`: `pretrain prepare` stops, naming the file, the
    line (row) and the byte offset."""
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
    on_corrupt: Literal["error", "skip"] = "error"
    """A shard that is missing, truncated or whose sha256 differs from the manifest, or a sample
    that does not decode. `error`: training stops, naming the shard, the position and what to
    do. `skip`: the samples that cannot be trusted are skipped (a shard whose checksum fails:
    all of it; the manifest checksums shards, not samples): their rows stay in the batch with
    nothing to predict, and they are counted in metrics.jsonl (skipped_samples), listed in
    <run.dir>/corrupt_samples/ and reported as skipped by the audit."""
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
    reduce_bucket_size: int | None = Field(None, ge=1)
    """Gradient elements ZeRO reduces at once (DeepSpeed's reduce_bucket_size; with ZeRO-3
    also the parameter prefetch bucket). Every rank keeps a buffer of this size, which ZeRO-3
    fills with whole (unpartitioned) gradients. Default: model.d_model squared (one attention
    projection, Hugging Face's `auto`), at least 2**20: large enough for efficient collectives,
    small next to the model. DeepSpeed's own default, 5e8, holds the whole gradient of any
    model below 5e8 parameters (4 bytes per parameter more under ZeRO-3 in fp32)."""
    tensor_parallel: int = Field(1, ge=1)
    """Tensor-parallel degree (Megatron-style): every layer's weights are split over this many
    consecutive ranks (attention heads, feed-forward columns, vocabulary rows); the data-parallel
    size is the world size divided by it. Must divide the world size, model.n_head, the
    feed-forward width and the vocabulary (model.pad_vocab_multiple or model.vocab_size)."""
    sequence_parallel: bool = False
    """With tensor_parallel > 1, also split the activations between the tensor-parallel
    regions (LayerNorm, dropout, residual adds) along the sequence: activation memory of those
    parts shrinks by tensor_parallel at the same communication volume. Needs data.seq_len
    divisible by tensor_parallel; GPT only, without model.reversible. No effect with
    tensor_parallel = 1."""
    tensor_parallel_across_nodes: bool = False
    """Allow tensor-parallel groups that span nodes (when tensor_parallel does not divide the
    ranks per node). Off by default: tensor parallelism all-reduces in every layer and is slow
    over the network."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: `auto` is NCCL on GPU and gloo on CPU."""
    timeout_minutes: float = Field(10.0, gt=0)
    """Timeout of collective operations (fractions allowed, e.g. 0.5). A rank that stops
    answering fails the run after it: the other ranks' error names the ranks that did not
    arrive (pretrain/hang.py)."""


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
    max_bad_steps: int = Field(5, ge=1)
    """Steps in a row with a non-finite loss (NaN or inf, on any rank) after which the run rolls
    back to its latest checkpoint and skips the batches of those steps. Each such step's update
    is skipped (weights and optimizer moments unchanged) and recorded in
    <run.dir>/bad_steps.jsonl; skipped batches go to <run.dir>/skipped_batches.jsonl."""
    max_rollbacks: int = Field(3, ge=0)
    """Rollbacks allowed in a run; the next streak of max_bad_steps bad steps stops it with an
    error (the run diverges)."""


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
    async_save: bool = False
    """Write periodic checkpoints in a background thread: training stops only for the save's
    collective part and while the state is copied to host memory (on CPU the copy overlaps the
    next forward and backward), then goes on while the copy is written. Costs host memory equal
    to this rank's share of the fp32 weights and Adam moments. At most one save is in flight;
    the final save and a stop (Slurm signal) wait until everything is on disk; a failed
    background save stops the run at the next step with the error."""
    init_from: str | None = None
    """Weights to start from when the run has no checkpoint yet: a model.safetensors written
    by `pretrain import` (continued pretraining of a Hugging Face model). Its shapes must match
    the model config."""


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
    objective: ObjectiveConfig = ObjectiveConfig()
    """Settings of the pretraining objectives applied at load time (masking, span corruption)."""
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
    problems += _attention_problems(cfg)
    if m.reversible and t.activation_checkpointing:
        problems.append(
            ("model.reversible", "reversible layers already recompute activations in the backward "
             "pass; set train.activation_checkpointing=false (or model.reversible=false)")
        )
    if m.reversible and m.norm_position != "pre":
        problems.append(
            ("model.reversible", "reversible layers need residual branches, which post-norm blocks "
             "have not (they normalize the stream itself); set model.norm_position=pre")
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
    problems += _family_problems(cfg)
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


def _family_problems(cfg: Config) -> list[tuple[str, str]]:
    """Settings that only some families have, and the special tokens each family needs."""
    problems: list[tuple[str, str]] = []
    m, d, obj = cfg.model, cfg.data, cfg.objective
    if m.positions == "relative" and m.family != "t5":
        problems.append(("model.positions", f"'relative' is implemented for t5 only, not "
                         f"model.family={m.family!r}; use 'learned' or 'sinusoidal'"))
    if m.sentence_head != "none" and m.family != "bert":
        problems.append(("model.sentence_head", f"is a bert head; model.family={m.family!r} "
                         "has none (set it to 'none')"))
    if m.sentence_head != "none" and m.type_vocab_size < 2:
        problems.append(("model.type_vocab_size", f"sentence pairs need 2 token types, got "
                         f"{m.type_vocab_size} with model.sentence_head={m.sentence_head!r}"))
    if m.n_decoder_layer is not None and m.family != "t5":
        problems.append(("model.n_decoder_layer", f"only t5 has a decoder stack, not "
                         f"model.family={m.family!r} (leave it unset)"))
    if obj.mask_token_prob + obj.random_token_prob > 1.0:
        problems.append(("objective.random_token_prob",
                         f"mask_token_prob {obj.mask_token_prob} + random_token_prob "
                         f"{obj.random_token_prob} exceed 1"))
    if m.family == "bert" and d.seq_len < 5:
        problems.append(("data.seq_len", f"bert needs at least 5 ([CLS] A [SEP] B [SEP]), "
                         f"got {d.seq_len}"))
    tok = d.tokenizer
    if tok.path is not None or m.family == "gpt":
        return problems  # a loaded tokenizer is checked against its manifest when training
    have = tok.all_special_tokens()
    missing = [t for t in FAMILY_SPECIAL_TOKENS[m.family] if t not in have]
    if not any("pad" in t.lower() for t in have):
        missing.append("a padding token (e.g. [PAD] or <pad>)")
    if missing:
        problems.append(("data.tokenizer.special_tokens",
                         f"model.family={m.family} needs {', '.join(missing)}; got {have}"))
    if m.family == "t5":
        from data_pipeline.objectives.span_corruption import span_corruption_lengths

        spans = span_corruption_lengths(d.seq_len + 1, obj.noise_density,
                                        obj.mean_span_length).noise_spans
        if tok.sentinel_tokens < spans:
            problems.append(("data.tokenizer.sentinel_tokens",
                             f"span corruption of data.seq_len + 1 = {d.seq_len + 1} tokens makes "
                             f"{spans} spans, each needing a sentinel; got {tok.sentinel_tokens}"))
    return problems


def _attention_problems(cfg: Config) -> list[tuple[str, str]]:
    """Settings of the selected attention kind that cannot work with this model and data."""
    problems: list[tuple[str, str]] = []
    m, a = cfg.model, cfg.model.attention
    if a.kind == "longformer":
        key = "model.attention.longformer"
        for name in ("window", "dilation"):
            value = getattr(a.longformer, name)
            if isinstance(value, list) and len(value) != m.n_layer:
                problems.append(
                    (f"{key}.{name}", f"lists {len(value)} values but model.n_layer={m.n_layer}; "
                     "give one per layer, or a single number for all")
                )
        positions = a.longformer.global_positions
        beyond = [p for p in positions if p >= cfg.data.seq_len]
        if beyond:
            problems.append(
                (f"{key}.global_positions", f"{beyond} not below data.seq_len={cfg.data.seq_len}")
            )
        if len(set(positions)) != len(positions):
            problems.append((f"{key}.global_positions", f"lists a position twice: {positions}"))
    if a.kind == "reformer":
        n_buckets = a.reformer.n_buckets
        if n_buckets != 1 and n_buckets % 2:
            problems.append(
                ("model.attention.reformer.n_buckets",
                 f"must be 1 or even (hashing picks the argmax over n_buckets/2 random "
                 f"directions and their negatives), got {n_buckets}")
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
    if m.ffn_width % n:
        out.append((key, f"{n} does not divide the feed-forward width {m.ffn_width} "
                         "(model.d_ff)"))
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
    if p.sequence_parallel and m.family != "gpt":
        out.append(("parallel.sequence_parallel",
                    f"is implemented for model.family=gpt only, not {m.family!r} (BERT's head "
                    "runs on the masked positions only, T5's cross-attention reads the whole "
                    "encoder output); set it to false"))
    if p.sequence_parallel and m.reversible:
        out.append(("parallel.sequence_parallel",
                    "does not combine with model.reversible (the reversible stack runs the "
                    "blocks' branches, not the blocks the sequence split hooks into); set one "
                    "to false"))
    return out


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return max(world_size // cfg.parallel.tensor_parallel, 1)


def global_batch_size(cfg: Config, world_size: int) -> int:
    t = cfg.train
    return t.micro_batch_size * t.grad_accum_steps * data_parallel_size(cfg, world_size)
