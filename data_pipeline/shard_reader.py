"""Read and validate one prepared WebDataset shard into a [samples, sample_len] numpy array.

A shard (see format.py) is a tar of `<key>.tokens.npy` members. Reading one:
  1. reads the file (missing file: MissingShardError, also a FileNotFoundError),
  2. checks its sha256 against the manifest (optional, on by default),
  3. walks the tar with webdataset's tar iterator and groups members by key,
  4. decodes each sample's .npy into its row: row = sample index - shard.first_sample.

Fast path: a shard exactly as the pipeline's SplitWriter lays it out (members in key order, each
with the expected tar header, .npy header and padding; the archive's end) is checked and
decoded with numpy as a whole: every byte but the tokens is compared with the expected layout
(packing.MemberLayout), then the tokens are one strided copy. Anything else -- another writer's
tar, a damaged shard -- takes the general path below, which reports what is wrong.

General path: decoding parses the .npy header once per shard and then copies each sample's
payload with np.frombuffer when its header bytes are identical (they are for one writer), so
there is no per-token Python work. Every problem raises ShardError naming the shard file, the
sample key where there is one, and what to do.

`read_shard_lenient` (data.on_corrupt: skip) runs the same checks but marks the rows a problem
concerns instead of raising: every row for a missing shard or a checksum that differs, else the
samples that are missing (a truncated tar keeps the complete ones before the cut) or do not
decode.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib import format as npy_format
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data_pipeline.format import TOKENS_FIELD, ShardInfo, sample_index, sample_key
from data_pipeline.packing import MemberLayout

FIX = (
    "The prepared data is damaged or out of date: re-run `pretrain prepare CONFIG --force` "
    "to rebuild it."
)


class ShardError(ValueError):
    """A shard does not match its manifest entry or the prepared-data format."""


class MissingShardError(ShardError, FileNotFoundError):
    """A shard listed in the manifest is not there."""


class _Problems:
    """Where read_shard's checks report: raise at the first problem (strict), or mark the rows
    it concerns as corrupt and go on (lenient: data.on_corrupt: skip)."""

    def __init__(self, strict: bool, n: int) -> None:
        self.strict = strict
        self.bad = np.zeros(n, dtype=bool)  # [n] rows that cannot be trusted
        self.reasons: dict[int, str] = {}  # row -> why (first problem)
        self.shard_reason: str | None = None  # the whole shard is bad, and why
        self.truncated: ShardError | None = None  # the tar ended early (lenient)

    def row(self, row: int, error: ShardError) -> None:
        if self.strict:
            raise error
        if not self.bad[row]:
            self.bad[row] = True
            self.reasons[row] = str(error)

    def shard(self, error: Exception) -> None:
        if self.strict:
            raise error
        self.bad[:] = True
        self.shard_reason = self.shard_reason or str(error)

    def ignore(self, error: ShardError) -> None:
        """A problem that concerns no row of the shard (a stray member): the rows it should
        have been are reported missing."""
        if self.strict:
            raise error

    def reason(self, row: int) -> str:
        return self.reasons.get(row) or self.shard_reason or "?"


def read_shard(
    path: str | Path,
    info: ShardInfo,
    split: str,
    sample_len: int,
    dtype: str | np.dtype,
    verify_checksum: bool = True,
    context: str = "",
) -> np.ndarray:
    """Return the shard's samples as a [info.samples, sample_len] array of `dtype`.

    Row i holds sample `info.first_sample + i` (by key, whatever the order inside the tar).
    `context` (e.g. "needed for position 123") is appended to error messages.
    """
    return _read(path, info, split, sample_len, dtype, verify_checksum, context,
                 _Problems(True, info.samples))


def read_shard_lenient(
    path: str | Path,
    info: ShardInfo,
    split: str,
    sample_len: int,
    dtype: str | np.dtype,
    verify_checksum: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(rows [n, sample_len], corrupt [n] bool, reasons [n]: why each corrupt row is) of a shard
    that may be damaged: what read_shard raises for marks rows instead (data.on_corrupt: skip).

    A missing file or a checksum that differs from the manifest marks every row: the manifest
    checksums whole shards, so no byte of a changed shard can be trusted. Without checksums,
    a truncated shard keeps the samples before the cut, and a sample that does not decode, or
    is missing, is marked alone. Corrupt rows hold zeros.
    """
    problems = _Problems(False, info.samples)
    rows = _read(path, info, split, sample_len, dtype, verify_checksum, "", problems)
    if problems.bad.any():
        rows[problems.bad] = 0
    reasons = [problems.reason(i) if bad else "" for i, bad in enumerate(problems.bad.tolist())]
    return rows, problems.bad, reasons


def _read(path: str | Path, info: ShardInfo, split: str, sample_len: int,
          dtype: str | np.dtype, verify_checksum: bool, context: str,
          problems: _Problems) -> np.ndarray:
    path = Path(path)
    where = f" ({context})" if context else ""
    dtype = np.dtype(dtype)
    rows = np.zeros((info.samples, sample_len), dtype=dtype)  # calloc: free until written
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.shard(MissingShardError(
            f"shard {path} listed in the manifest is missing{where}. {FIX}"))
        return rows
    except OSError as e:
        problems.shard(ShardError(f"cannot read shard {path}: {e.strerror or e}{where}. {FIX}"))
        return rows
    if verify_checksum:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            problems.shard(ShardError(
                f"shard {path}: sha256 {digest[:16]}... does not match the manifest's "
                f"{info.sha256[:16]}... ({len(data)} bytes){where}. {FIX}"
            ))
            return rows
    uniform = _read_uniform(data, info, split, sample_len, dtype)
    if uniform is not None:
        return uniform
    seen = np.zeros(info.samples, dtype=bool)
    header = b""  # .npy header of the last sample decoded the slow way; identical ones are fast
    payload = sample_len * dtype.itemsize
    for key, fields in _samples(data, path, where, problems):
        try:
            row = _row(key, info, split, path, where)
        except ShardError as e:
            problems.ignore(e)
            continue
        if seen[row]:
            problems.row(row, ShardError(f"shard {path}: sample {key} occurs twice{where}. {FIX}"))
            continue
        seen[row] = True
        raw = fields.get(TOKENS_FIELD)
        if raw is None:
            problems.row(row, ShardError(
                f"shard {path}: sample {key} has no {TOKENS_FIELD} member (has: "
                f"{sorted(fields)}){where}. {FIX}"
            ))
            continue
        if header and len(raw) == len(header) + payload and raw.startswith(header):
            rows[row] = np.frombuffer(raw, dtype=dtype, count=sample_len, offset=len(header))
            continue
        try:
            rows[row], header = _decode_npy(raw, key, path, sample_len, dtype, where)
        except ShardError as e:
            problems.row(row, e)
    if not seen.all():
        missing = np.flatnonzero(~seen)
        names = ", ".join(sample_key(split, info.first_sample + int(i)) for i in missing[:3])
        error = ShardError(
            f"shard {path} holds {int(seen.sum())} samples but the manifest lists {info.samples} "
            f"(missing {len(missing)}, e.g. {names}){where}. {FIX}"
        )
        if problems.truncated:
            error = problems.truncated
        for i in missing.tolist():
            problems.row(i, error)
    return rows


def _read_uniform(
    data: bytes, info: ShardInfo, split: str, sample_len: int, dtype: np.dtype
) -> np.ndarray | None:
    """The rows of a shard laid out exactly as SplitWriter writes it, else None."""
    n = info.samples
    try:
        layout = MemberLayout(split, sample_len, dtype)
    except (ValueError, AssertionError):
        return None
    body = n * layout.size
    if n == 0 or len(data) != body + MemberLayout.end_bytes(body):
        return None
    members = np.frombuffer(data, dtype=np.uint8, count=body).reshape(n, layout.size)
    try:
        expected = layout.headers(info.first_sample, n)
    except ValueError:
        return None
    if not (np.array_equal(members[:, : layout.payload.start], expected)
            and not members[:, layout.payload.stop :].any()
            and not np.frombuffer(data, dtype=np.uint8, offset=body).any()):
        return None
    return np.ascontiguousarray(members[:, layout.payload]).view(dtype).reshape(n, sample_len)


def _samples(data: bytes, path: Path, where: str,
             problems: _Problems) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample, grouping consecutive tar members by key. A tar that
    ends early or is garbled raises ShardError, or (lenient) ends the samples there: the
    complete ones before the damage are kept."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                problems.ignore(ShardError(
                    f"shard {path}: member {member['fname']!r} is not <key>.<field>{where}. {FIX}"
                ))
                continue
            if prefix != key:
                if key is not None:
                    yield key, fields
                key, fields = prefix, {}
            if suffix in fields:
                problems.ignore(ShardError(
                    f"shard {path}: member {member['fname']} occurs twice{where}. {FIX}"))
                continue
            fields[suffix] = member["data"]
    except (tarfile.TarError, OSError, EOFError) as e:
        error = ShardError(
            f"shard {path} is truncated or not a valid tar file ({type(e).__name__}: "
            f"{str(e).split(' @ ')[0]}){where}. {FIX}"
        )
        if problems.strict:
            raise error from None
        problems.truncated = error  # the rows never seen are reported with this reason
    if key is not None:
        yield key, fields


def _row(key: str, info: ShardInfo, split: str, path: Path, where: str) -> int:
    try:
        index = sample_index(key)
    except ValueError:
        index = -1
    if index < 0 or sample_key(split, index) != key:
        raise ShardError(
            f"shard {path}: sample key {key!r} is not a {split!r} key like "
            f"{sample_key(split, info.first_sample)!r}{where}. {FIX}"
        )
    row = index - info.first_sample
    if not 0 <= row < info.samples:
        raise ShardError(
            f"shard {path}: sample {key} is outside the shard's range of {info.samples} samples "
            f"from {sample_key(split, info.first_sample)} (wrong sample count?){where}. {FIX}"
        )
    return row


def _decode_npy(
    raw: bytes, key: str, path: Path, sample_len: int, dtype: np.dtype, where: str
) -> tuple[np.ndarray, bytes]:
    """Parse one .npy payload strictly; return (tokens [sample_len], header bytes)."""
    fp = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(fp)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _fortran_order, found = read(fp)  # 1-D: order is moot
    except (ValueError, EOFError, SyntaxError) as e:
        raise ShardError(f"shard {path}: sample {key} is not a valid .npy array ({e}){where}. {FIX}") from None
    if found != dtype:
        raise ShardError(
            f"shard {path}: sample {key} has dtype {found}, the manifest says {dtype}{where}. {FIX}"
        )
    if shape != (sample_len,):
        raise ShardError(
            f"shard {path}: sample {key} has shape {shape}, expected ({sample_len},) "
            f"(sample_len from the manifest){where}. {FIX}"
        )
    start = fp.tell()
    if len(raw) - start != sample_len * dtype.itemsize:
        raise ShardError(
            f"shard {path}: sample {key} holds {len(raw) - start} payload bytes, expected "
            f"{sample_len * dtype.itemsize}{where}. {FIX}"
        )
    return np.frombuffer(raw, dtype=dtype, count=sample_len, offset=start), raw[:start]
