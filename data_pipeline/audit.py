"""Audit trail of consumed training samples, and the exactly-once check over it.

With auditing on, each data-parallel rank appends one line per sample it hands to the trainer,

    <position> <epoch> <key>            a sample served
    <position> <epoch> <key> skipped    a position whose sample was damaged and skipped
                                        (data.on_corrupt: skip; see loader.py)

to <audit_dir>/<split>-rank<rank>.audit (append mode, flushed per batch). After a crash and a
resume from the last checkpoint, the positions between the checkpoint and the crash are served
and recorded again; since the order is a pure function of (seed, position) the replayed records
repeat the earlier ones, and the checks keep one record per position. A resume with another
number of ranks writes other files into the same directory, which is fine: positions, not
ranks, are what is checked.

check_exactly_once proves, from those files alone, that positions [0, upto) were all served and
that every complete epoch among them served each sample of the split exactly once, counting a
skipped sample as accounted for: its report says how many were skipped and which. Positions a
training rollback took out of the stream (<run.dir>/skipped_batches.jsonl, see
pretrain/bad_steps.py) are passed as `skipped`: they are reported as rolled back, neither
required nor counted as served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from data_pipeline.format import Manifest, sample_index, sample_key


def audit_file(audit_dir: str | os.PathLike, split: str, rank: int) -> Path:
    return Path(audit_dir) / f"{split}-rank{rank:05d}.audit"


class AuditLog:
    """Appends "<position> <epoch> <key>" lines for one rank; opened on the first write."""

    def __init__(self, audit_dir: str | os.PathLike, split: str, rank: int) -> None:
        self.path = audit_file(audit_dir, split, rank)
        self.split = split
        self._file = None

    def write(self, positions: Sequence[int], sample_ids: Sequence[int], samples_per_epoch: int,
              skipped: Sequence[bool] | None = None) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            self._file = open(self.path, "a")
        flags = skipped if skipped is not None else [False] * len(positions)
        lines = [
            f"{p} {p // samples_per_epoch} {sample_key(self.split, s)}{' skipped' if k else ''}\n"
            for p, s, k in zip(positions, sample_ids, flags)
        ]
        self._file.write("".join(lines))  # one write per batch: a crash cuts at most one line
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_partial_line(path: Path) -> None:
    """Cut a line left unfinished by a crash, so that appended records start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        tail = 1 << 16
        f.seek(max(0, size - tail))
        chunk = f.read()
        if chunk.endswith(b"\n"):
            return
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            f.truncate(size - len(chunk) + cut + 1)
        elif size <= tail:
            f.truncate(0)  # the file is one unfinished line
        else:
            raise ValueError(f"{path}: no line break in its last {tail} bytes: not an audit file")


@dataclass
class Audit:
    """The audit files of one split, one record per position (the last one written)."""

    records: dict[int, tuple[int, str]]
    """position -> (epoch, key)."""
    lines: int
    files: list[Path]
    conflicts: list[str] = field(default_factory=list)
    """Positions recorded twice with different (epoch, key): the order was not deterministic."""
    skipped: set[int] = field(default_factory=set)
    """Positions whose last record says `skipped`."""


def read_audit(audit_dir: str | os.PathLike, split: str = "train") -> Audit:
    files = sorted(Path(audit_dir).glob(f"{split}-rank*.audit"))
    if not files:
        raise FileNotFoundError(f"no {split}-rank*.audit files in {audit_dir}")
    records: dict[int, tuple[int, str]] = {}
    skipped: set[int] = set()
    conflicts: list[str] = []
    lines = 0
    for path in files:
        text = path.read_text()
        rows = text.split("\n")
        rows.pop()  # "" after the last line break, or a line cut by a crash (served again later)
        for lineno, line in enumerate(rows, 1):
            parts = line.split()
            try:
                position, epoch, key = int(parts[0]), int(parts[1]), parts[2]
                if len(parts) != 3 and parts[3:] != ["skipped"]:
                    raise ValueError
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{lineno}: malformed audit line {line!r}") from None
            old = records.get(position)
            if old is not None and old != (epoch, key):
                conflicts.append(
                    f"position {position}: {old[1]} (epoch {old[0]}) and later {key} "
                    f"(epoch {epoch}) at {path.name}:{lineno}"
                )
            records[position] = (epoch, key)
            # The last record wins: a replay after a resume may serve a repaired shard.
            (skipped.add if len(parts) == 4 else skipped.discard)(position)
            lines += 1
    return Audit(records, lines, files, conflicts, skipped)


@dataclass
class AuditReport:
    upto: int
    samples_per_epoch: int
    full_epochs: int
    partial_samples: int
    """Positions checked in the last, incomplete epoch."""
    records: int
    """Distinct positions recorded (including ones at or past `upto`)."""
    replayed: int
    """Lines that re-recorded an already recorded position (replays after a resume)."""
    files: int
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(position, key) of the positions below `upto` whose sample was skipped as damaged:
    accounted for, not served."""
    rolled_back: int = 0
    """Positions below `upto` that a rollback took out of the stream (not trained on)."""


def check_exactly_once(
    audit_dir: str | os.PathLike, manifest: Manifest, upto_position: int, split: str = "train",
    skipped: Mapping[int, str] | None = None,
) -> AuditReport:
    """Verify the audit trail of `split` over positions [0, upto_position); `skipped` maps the
    positions a rollback skipped to their sample keys.

    Raises AssertionError listing the problems: a missing position, a record whose epoch or key
    is wrong, a full epoch that misses or repeats a sample, a repeat in the partial last epoch,
    or one position recorded with two different samples.
    """
    audit = read_audit(audit_dir, split)
    n = manifest.splits[split].samples
    ids = np.full(upto_position, -1, dtype=np.int64)  # [upto] sample index served at each position
    problems = list(audit.conflicts[:5])
    if audit.conflicts:
        problems.insert(0, f"{len(audit.conflicts)} positions recorded with different samples:")
    skipped = {p: k for p, k in (skipped or {}).items() if p < upto_position}
    skipped_by_epoch: dict[int, set[int]] = {}  # samples whose place in an epoch was skipped
    for position, key in skipped.items():
        ids[position] = -2  # neither missing nor served
        skipped_by_epoch.setdefault(position // n, set()).add(sample_index(key))
    for position, (epoch, key) in audit.records.items():
        if position >= upto_position or position in skipped:
            continue
        try:
            index = sample_index(key)
        except ValueError:
            index = -1
        if not 0 <= index < n or sample_key(split, index) != key:
            problems.append(f"position {position}: {key!r} is not one of the {n} {split} keys")
        elif epoch != position // n:
            problems.append(f"position {position}: recorded epoch {epoch}, expected {position // n}")
        else:
            ids[position] = index
    missing = np.flatnonzero(ids == -1)
    if len(missing):
        problems.append(f"{len(missing)} positions below {upto_position} not served: {_ranges(missing)}")
    full_epochs = upto_position // n
    for epoch in range(-(-upto_position // n)):
        served = ids[epoch * n : min((epoch + 1) * n, upto_position)]
        counts = np.bincount(served[served >= 0], minlength=n)
        repeated = np.flatnonzero(counts > 1)
        if len(repeated):
            problems.append(
                f"epoch {epoch}: {len(repeated)} samples served more than once, e.g. "
                + ", ".join(f"{sample_key(split, int(i))} x{counts[i]}" for i in repeated[:5])
            )
        never = np.setdiff1d(np.flatnonzero(counts == 0),
                             np.fromiter(skipped_by_epoch.get(epoch, ()), dtype=np.int64))
        if epoch < full_epochs and len(never):
            problems.append(
                f"epoch {epoch}: {len(never)} samples never served, e.g. "
                + ", ".join(sample_key(split, int(i)) for i in never[:5])
            )
    if problems:
        raise AssertionError(f"audit of {audit_dir} ({split}) failed:\n  " + "\n  ".join(problems[:20]))
    return AuditReport(
        upto=upto_position,
        samples_per_epoch=n,
        full_epochs=full_epochs,
        partial_samples=upto_position - full_epochs * n,
        records=len(audit.records),
        replayed=audit.lines - len(audit.records),
        files=len(audit.files),
        skipped=sorted((p, audit.records[p][1]) for p in audit.skipped if p < upto_position),
        rolled_back=len(skipped),
    )


def _ranges(positions: np.ndarray, limit: int = 5) -> str:
    """'[a, b), [c, d), ...' for a sorted array of integers."""
    breaks = np.flatnonzero(np.diff(positions) != 1)
    starts = np.concatenate([positions[:1], positions[breaks + 1]])
    stops = np.concatenate([positions[breaks], positions[-1:]]) + 1
    out = ", ".join(f"[{a}, {b})" for a, b in list(zip(starts, stops))[:limit])
    return out + (", ..." if len(starts) > limit else "")
