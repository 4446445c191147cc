"""Write small synthetic prepared-data directories (format.py) for tests.

make_dataset(dir, {"train": [7, 12, 5], "val": [6, 5]}) writes a real WordLevel tokenizer,
WebDataset shards of the given sizes and a valid manifest. Sample i of a split holds
sample_tokens(i, sample_len, vocab_size), so a test can check that a served row is the sample
its key says. write_shard / replace_shard build deliberately broken shards for error tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline.format import (
    TOKENIZER_NAME,
    TOKENS_FIELD,
    Manifest,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
    sample_key,
    sha256_file,
    shard_name,
)

EOS = "<|endoftext|>"


def sample_tokens(index: int, sample_len: int, vocab_size: int) -> np.ndarray:
    """[sample_len] int64 content of sample `index`; unique per index below vocab_size**2."""
    tokens = (index + np.arange(sample_len, dtype=np.int64)) % vocab_size
    tokens[0] = index % vocab_size
    if sample_len > 1:
        tokens[1] = index // vocab_size % vocab_size
    return tokens


def write_tokenizer(data_dir: str | os.PathLike, vocab_size: int) -> TokenizerInfo:
    """A word-level tokenizer over the words EOS, t1, ..., t<vocab_size - 1>."""
    vocab = {EOS: 0} | {f"t{i}": i for i in range(1, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(data_dir) / TOKENIZER_NAME
    tokenizer.save(str(path))
    return TokenizerInfo(
        sha256=sha256_file(path), vocab_size=vocab_size, eos_token=EOS, eos_id=0,
        special_tokens={EOS: 0},
    )  # fmt: skip


def write_shard(
    path: str | os.PathLike,
    split: str,
    first_sample: int,
    arrays: Sequence[np.ndarray],
    keys: Sequence[str] | None = None,
) -> ShardInfo:
    """Write `arrays` as samples first_sample, first_sample + 1, ... (or under `keys`)."""
    path = Path(path)
    keys = keys if keys is not None else [sample_key(split, first_sample + i) for i in range(len(arrays))]
    with wds.TarWriter(str(path)) as sink:
        for key, tokens in zip(keys, arrays):
            sink.write({"__key__": key, TOKENS_FIELD: tokens})
    return ShardInfo(
        name=path.name, samples=len(arrays), tokens=int(sum(a.size for a in arrays)),
        bytes=path.stat().st_size, sha256=sha256_file(path), first_sample=first_sample,
    )  # fmt: skip


def make_dataset(
    data_dir: str | os.PathLike,
    shard_sizes: dict[str, Sequence[int]],
    seq_len: int = 8,
    dtype: str = "uint16",
    vocab_size: int = 500,
) -> Manifest:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sample_len = seq_len + 1
    splits = {}
    for split, sizes in shard_sizes.items():
        shards, first = [], 0
        for i, n in enumerate(sizes):
            arrays = [sample_tokens(first + k, sample_len, vocab_size).astype(dtype) for k in range(n)]
            shards.append(write_shard(data_dir / shard_name(split, i), split, first, arrays))
            first += n
        splits[split] = SplitInfo(
            documents=first, samples=first, tokens=first * sample_len, shards=shards
        )
    manifest = Manifest(
        seq_len=seq_len, sample_len=sample_len, dtype=dtype,
        tokenizer=write_tokenizer(data_dir, vocab_size), splits=splits, config_hash="synthetic",
    )  # fmt: skip
    manifest.save(data_dir)
    return manifest


def replace_shard(
    data_dir: str | os.PathLike, split: str, index: int, arrays: Sequence[np.ndarray],
    keys: Sequence[str] | None = None, samples: int | None = None,
) -> Manifest:
    """Rewrite shard `index` with other content and update its manifest entry to match the file
    (sha256, bytes), keeping the listed sample count unless `samples` is given."""
    data_dir = Path(data_dir)
    manifest = Manifest.load(data_dir)
    old = manifest.splits[split].shards[index]
    new = write_shard(data_dir / old.name, split, old.first_sample, arrays, keys)
    manifest.splits[split].shards[index] = new.model_copy(
        update={"samples": old.samples if samples is None else samples}
    )
    manifest.save(data_dir)
    return manifest
