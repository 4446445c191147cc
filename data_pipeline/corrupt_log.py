"""The list of samples a run skipped because their shard was damaged (data.on_corrupt: skip).

Each data-parallel rank appends one JSON object per skipped position it served,

    {"position": 1234, "epoch": 0, "key": "train0000000042", "shard": "train-000003.tar",
     "reason": "shard .../train-000003.tar: sha256 ... does not match the manifest's ..."}

to <dir>/<split>-rank<rank>.jsonl (the trainer's <run.dir>/corrupt_samples/), flushed with the
batch. A position is written once per file: a resumed run that serves the same positions again
(the order is a pure function of the position) finds them in the file and does not repeat them,
and neither do repeated evaluations. `read_corrupt` merges the ranks' files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline.audit import _drop_partial_line


def corrupt_file(directory: str | os.PathLike, split: str, rank: int) -> Path:
    return Path(directory) / f"{split}-rank{rank:05d}.jsonl"


class CorruptLog:
    """Appends the skipped positions of one rank and split; opened on the first write."""

    def __init__(self, directory: str | os.PathLike, split: str, rank: int) -> None:
        self.path = corrupt_file(directory, split, rank)
        self._file = None
        self._written: set[int] = set()

    def write(self, records: list[dict]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            if self.path.exists():
                self._written = {r["position"] for r in _records(self.path)}
            self._file = open(self.path, "a")
        new = [r for r in records if r["position"] not in self._written]
        if new:
            self._file.write("".join(json.dumps(r) + "\n" for r in new))
            self._file.flush()
            self._written.update(r["position"] for r in new)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _records(path: Path) -> list[dict]:
    lines = path.read_text().split("\n")
    lines.pop()  # "" after the last line break, or a line cut by a crash
    return [json.loads(line) for line in lines if line]


def read_corrupt(directory: str | os.PathLike, split: str = "train") -> dict[int, dict]:
    """{position: record} of every skipped position of `split`, over all ranks' files."""
    out: dict[int, dict] = {}
    for path in sorted(Path(directory).glob(f"{split}-rank*.jsonl")):
        for record in _records(path):
            out[record["position"]] = record
    return dict(sorted(out.items()))
