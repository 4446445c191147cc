"""Packing token streams into fixed-length samples and writing them as WebDataset tar shards.

`Packer` concatenates the documents of one split (each already ending in EOS) and cuts the
stream into samples of `sample_len` tokens: no padding, no document boundaries respected, the
last partial sample (the *tail*) is not written but counted. `SplitWriter` puts consecutive
samples into shards `<split>-000000.tar`, ... sized to stay within `shard_bytes`; each shard is
written under a hidden temporary name, hashed while it is written, fsynced, and only then renamed
to its final name. Tar members carry fixed metadata (mtime 0), so the same tokens give
byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.format import TOKENS_FIELD, ShardInfo, sample_key, shard_name

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # stream-mode tar files are padded to whole records
_TAR_END = 2 * _TAR_BLOCK  # end-of-archive marker


def npy_bytes(sample_len: int, dtype: str) -> int:
    buf = io.BytesIO()
    np.save(buf, np.zeros(sample_len, dtype=dtype))
    return buf.tell()


def samples_per_shard(sample_len: int, dtype: str, shard_bytes: int) -> int:
    """Most samples whose tar file stays within shard_bytes (at least 1)."""
    member = _TAR_BLOCK + -(-npy_bytes(sample_len, dtype) // _TAR_BLOCK) * _TAR_BLOCK
    n = max((shard_bytes - _TAR_END) // member, 1)
    while n > 1 and -(-(n * member + _TAR_END) // _TAR_RECORD) * _TAR_RECORD > shard_bytes:
        n -= 1
    return n


class _HashingFile:
    """Write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: io.BufferedWriter):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


class SplitWriter:
    """Shards of one split. Call `write` with samples in order, then `close` (or `abort`)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, sample_len: int, dtype: str,
                 shard_bytes: int):
        self.dir, self.split, self.dtype = Path(data_dir), split, np.dtype(dtype)
        self.sample_len = sample_len
        self.per_shard = samples_per_shard(sample_len, dtype, shard_bytes)
        self.shards: list[ShardInfo] = []
        self.samples = 0
        self._tmp: Path | None = None
        self._file: io.BufferedWriter | None = None
        self._hashing: _HashingFile | None = None
        self._tar: wds.TarWriter | None = None
        self._first = 0

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hashing, mtime=0)
        self._first = self.samples

    def _finish_shard(self) -> None:
        assert self._tar and self._file and self._hashing and self._tmp
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, len(self.shards))
        os.replace(self._tmp, self.dir / name)
        n = self.samples - self._first
        self.shards.append(ShardInfo(
            name=name, samples=n, tokens=n * self.sample_len, bytes=self._hashing.size,
            sha256=self._hashing.sha.hexdigest(), first_sample=self._first,
        ))
        self._tar = self._file = self._hashing = self._tmp = None

    def write(self, samples: np.ndarray) -> None:
        """samples: [n, sample_len] token ids, in split order."""
        for row in samples.astype(self.dtype, copy=False):
            if self._tar is None:
                self._open()
            self._tar.write({"__key__": sample_key(self.split, self.samples), TOKENS_FIELD: row})
            self.samples += 1
            if self.samples - self._first == self.per_shard:
                self._finish_shard()

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay; no manifest points at them)."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._hashing = self._tmp = None


class Packer:
    """Cuts one split's token stream into [n, sample_len] samples and hands them to a writer."""

    def __init__(self, writer: SplitWriter):
        self.writer = writer
        self.sample_len = writer.sample_len
        self.tokens = 0
        self._pending = np.empty(0, dtype=writer.dtype)

    def feed(self, tokens: np.ndarray) -> None:
        """tokens: 1-D ids of whole documents (each ending in EOS), in document order."""
        if not len(tokens):
            return
        self.tokens += len(tokens)
        stream = np.concatenate([self._pending, tokens]) if len(self._pending) else tokens
        n = len(stream) // self.sample_len
        if n:
            self.writer.write(stream[: n * self.sample_len].reshape(n, self.sample_len))
        self._pending = stream[n * self.sample_len:].copy()

    @property
    def tail(self) -> int:
        """Tokens that did not fill a last sample (written nowhere, counted in the stats)."""
        return len(self._pending)
