"""On-disk format of prepared data: the contract between the pipeline and the loader.

A prepared data directory holds

    tokenizer.json           Hugging Face tokenizers file
    train-000000.tar ...     WebDataset shards of the training split
    val-000000.tar ...       WebDataset shards of the validation split
    skipped.jsonl            what the pipeline left out (files, lines, rows), one JSON object a
                             line: {"file", "line" | "row" | "rows", "kind", "reason"}
    manifest.json            written last: its presence means the directory is complete

Each sample in a shard is one packed sequence of `sample_len = seq_len + 1` token ids, stored as
`<key>.tokens.npy` (a 1-D numpy array of `dtype`). The key is the split name followed by the
sample's index within its split in pipeline order, zero-padded: `train0000000042`. Keys contain
no dots, so webdataset splits them from the extension unambiguously.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SKIPPED_NAME = "skipped.jsonl"
TOKENS_FIELD = "tokens.npy"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}{index:010d}"


def sample_index(key: str) -> int:
    """Inverse of sample_key: the index within its split."""
    return int(key.lstrip("abcdefghijklmnopqrstuvwxyz"))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Model):
    name: str
    """File name relative to the data directory."""
    samples: int
    tokens: int
    bytes: int
    sha256: str
    first_sample: int
    """Index (within the split) of the shard's first sample; samples are consecutive."""


class SplitInfo(_Model):
    documents: int = 0
    samples: int = 0
    tokens: int = 0
    shards: list[ShardInfo] = []


class TokenizerInfo(_Model):
    file: str = TOKENIZER_NAME
    sha256: str
    vocab_size: int
    eos_token: str
    eos_id: int
    pad_id: int | None = None
    special_tokens: dict[str, int] = {}


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    seq_len: int
    sample_len: int
    dtype: str
    """numpy dtype of the stored token ids: uint16 when the vocabulary fits, else uint32."""
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    stats: dict = {}
    """Corpus statistics: files, documents, bytes, tokens, replaced UTF-8 errors, what was
    skipped (counts by kind; the full list is skipped.jsonl), tail tokens that did not fill a
    last sequence, seconds, tokens/s."""
    config_hash: str
    """Hash of the data config that produced this directory; a re-run with the same hash skips."""
    config: dict = {}

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> "Manifest":
        path = Path(data_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {data_dir}: the data is not prepared (or its preparation "
                "did not finish). Run `pretrain prepare CONFIG` first."
            )
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path} is not a valid manifest: {e}") from None

    def save(self, data_dir: str | os.PathLike) -> None:
        atomic_write_text(Path(data_dir) / MANIFEST_NAME, self.model_dump_json(indent=2))

    def digest(self) -> str:
        """Identity of the data: changes when any shard or the tokenizer changes."""
        payload = json.dumps(
            {
                "tok": self.tokenizer.sha256,
                "splits": {s: [sh.sha256 for sh in i.shards] for s, i in self.splits.items()},
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
