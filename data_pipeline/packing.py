"""Packing token streams into fixed-length samples and writing them as WebDataset tar shards.

`Packer` concatenates the documents of one split (each already ending in EOS) and cuts the
stream into samples of `sample_len` tokens: no padding, no document boundaries respected, the
last partial sample (the *tail*) is not written but counted. `SplitWriter` puts consecutive
samples into shards `<split>-000000.tar`, ... sized to stay within `shard_bytes`; each shard is
written under a hidden temporary name, hashed while it is written, fsynced, and only then renamed
to its final name. Tar members carry fixed metadata (mtime 0), so the same tokens give
byte-identical shards.

Every member of a split has the same layout (only the digits of the key differ), so
`MemberLayout` lays out whole blocks of samples with numpy: a tar header made once by `tarfile`,
the key's digits and the header checksum patched per row, the .npy header, the tokens, the zero
padding. The bytes are exactly those of webdataset's `TarWriter` with `mtime=0` (a test compares
them), written at memory speed instead of through a Python call chain per sample. The shard
reader uses the same layout to recognize and decode such shards in one piece.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np

from data_pipeline.format import TOKENS_FIELD, ShardInfo, sample_key, shard_name

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # stream-mode tar files are padded to whole records
_TAR_END = 2 * _TAR_BLOCK  # end-of-archive marker
_TAR_USER, _TAR_MODE = "bigdata", 0o444  # webdataset TarWriter's defaults
_KEY_DIGITS = 10  # sample_key's zero-padded index
_CHKSUM = slice(148, 154)  # a tar header's checksum: 6 octal digits, then NUL and space
_BLOCK_SAMPLES = 4096  # samples laid out per numpy block (bounds the temporary memory)


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


def _npy_header(sample_len: int, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(sample_len, dtype=dtype))
    return buf.getvalue()[: -sample_len * dtype.itemsize]


class MemberLayout:
    """The bytes of tar members `<split><index>.tokens.npy` for blocks of samples of one split."""

    def __init__(self, split: str, sample_len: int, dtype: np.dtype):
        npy = _npy_header(sample_len, dtype)
        data = len(npy) + sample_len * dtype.itemsize  # the member's file: the .npy bytes
        self.payload = slice(_TAR_BLOCK + len(npy), _TAR_BLOCK + data)
        self.size = _TAR_BLOCK + -(-data // _TAR_BLOCK) * _TAR_BLOCK  # header + data in blocks
        info = tarfile.TarInfo(f"{sample_key(split, 0)}.{TOKENS_FIELD}")
        info.size, info.mtime, info.mode = data, 0, _TAR_MODE
        info.uname = info.gname = _TAR_USER
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert len(header) == _TAR_BLOCK, "a short ASCII name needs no extended header"
        self.template = np.zeros(self.size, dtype=np.uint8)
        self.template[:_TAR_BLOCK] = np.frombuffer(header, dtype=np.uint8)
        self.template[_TAR_BLOCK : self.payload.start] = np.frombuffer(npy, dtype=np.uint8)
        self.digits = slice(len(split), len(split) + _KEY_DIGITS)
        # Checksum = sum of the header's bytes, its own field counted as spaces; all but the
        # key's digits are the same in every member.
        unsigned = header[: _CHKSUM.start] + b" " * 8 + header[_CHKSUM.start + 8 :]
        self.base_sum = sum(unsigned) - sum(header[self.digits])
        self.powers = 10 ** np.arange(_KEY_DIGITS - 1, -1, -1, dtype=np.int64)  # [10]
        self.octal = 3 * np.arange(5, -1, -1, dtype=np.int64)  # [6] shifts of the octal digits

    def _fill(self, out: np.ndarray, first: int) -> None:
        """Write the headers of members first, first+1, ... into out [n, >= payload.start]."""
        n = len(out)
        if first + n > 10**_KEY_DIGITS:
            raise ValueError(f"a split holds at most 10^{_KEY_DIGITS} samples (keys have "
                             f"{_KEY_DIGITS} digits)")
        out[:] = self.template[: out.shape[1]]
        index = np.arange(first, first + n, dtype=np.int64)
        digits = (index[:, None] // self.powers) % 10 + ord("0")  # [n, 10]
        out[:, self.digits] = digits
        chksum = self.base_sum + digits.sum(axis=1)  # [n]
        out[:, _CHKSUM] = (chksum[:, None] >> self.octal) % 8 + ord("0")

    def headers(self, first: int, n: int) -> np.ndarray:
        """[n, payload.start] uint8: what precedes the tokens in members first, ..., first+n-1."""
        out = np.empty((n, self.payload.start), dtype=np.uint8)
        self._fill(out, first)
        return out

    def layout(self, first: int, samples: np.ndarray) -> np.ndarray:
        """[n, size] uint8: the members of samples [n, sample_len], indices first, first+1, ..."""
        n = len(samples)
        out = np.empty((n, self.size), dtype=np.uint8)
        self._fill(out, first)
        out[:, self.payload] = np.ascontiguousarray(samples).view(np.uint8).reshape(n, -1)
        return out

    @staticmethod
    def end_bytes(size: int) -> int:
        """Zero bytes that close an archive of `size` bytes of members (tarfile's stream mode)."""
        return _TAR_END + (-(size + _TAR_END)) % _TAR_RECORD


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
        self._members = MemberLayout(split, sample_len, self.dtype)
        self._first = 0

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._first = self.samples

    def _finish_shard(self) -> None:
        assert self._file and self._hashing and self._tmp
        # End of archive, padded to whole records (what tarfile writes in stream mode).
        self._hashing.write(bytes(MemberLayout.end_bytes(self._hashing.size)))
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
        self._file = self._hashing = self._tmp = None

    def write(self, samples: np.ndarray) -> None:
        """samples: [n, sample_len] token ids, in split order."""
        samples = samples.astype(self.dtype, copy=False)
        done = 0
        while done < len(samples):
            if self._file is None:
                self._open()
            room = self.per_shard - (self.samples - self._first)
            n = min(len(samples) - done, room, _BLOCK_SAMPLES)
            block = self._members.layout(self.samples, samples[done : done + n])  # [n, size]
            self._hashing.write(block.reshape(-1).data)
            self.samples += n
            done += n
            if self.samples - self._first == self.per_shard:
                self._finish_shard()

    def close(self) -> list[ShardInfo]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay; no manifest points at them)."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._file = self._hashing = self._tmp = None


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
