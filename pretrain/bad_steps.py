"""Steps with a non-finite loss: skipped, counted, and after too many in a row, rolled back.

A step is bad when any micro-batch's loss on any rank is NaN or inf (the ranks agree with one
all-reduce before the optimizer step), or, without ZeRO in fp32 where the trainer computes it, the
gradient norm is. The trainer then vetoes the update (parallel/deepspeed.py: the optimizer's
step does nothing; DeepSpeed still clears the accumulated gradients), so weights and Adam's
moments stay as they were; the step still consumes its batch and its place in the learning-rate
schedule. Each bad step is a line in metrics.jsonl and in <run.dir>/bad_steps.jsonl (step,
ranks, position range, the keys of its samples).

After train.max_bad_steps bad steps in a row the run rolls back: it reloads the latest complete
checkpoint and skips the batches of the bad steps since then, which <run.dir>/skipped_batches.jsonl
records (positions and sample keys): a restarted run reads it and does not feed them again, and
the data audit reports them as skipped (data_pipeline/audit.py). At most train.max_rollbacks
rollbacks happen in a run; the next streak stops it with an error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.format import sample_key

BAD_STEPS = "bad_steps.jsonl"
SKIPPED_BATCHES = "skipped_batches.jsonl"


class TrainingDiverged(RuntimeError):
    """Bad steps kept coming: no checkpoint to roll back to, or too many rollbacks."""


@dataclass(frozen=True)
class BadStep:
    step: int
    start: int
    """First global position of the step's batch."""
    stop: int
    reason: str


def sample_keys(loader, start: int, stop: int) -> list[str]:
    """Keys of the samples at global positions [start, stop) of `loader`'s stream."""
    shards = loader.manifest.splits[loader.split].shards
    keys = []
    for run in loader.order.runs(start, stop):
        keys += [sample_key(loader.split, shards[run.shard].first_sample + int(r))
                 for r in run.rows]
    return keys


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_skipped_batches(run_dir: str | os.PathLike) -> list[dict]:
    """The records of <run_dir>/skipped_batches.jsonl (none if absent); a line cut by a crash
    is ignored (the rollback that wrote it did not happen)."""
    path = Path(run_dir) / SKIPPED_BATCHES
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def skipped_positions(run_dir: str | os.PathLike) -> dict[int, str]:
    """position -> sample key of every sample a rollback took out of the stream (for
    data_pipeline.audit.check_exactly_once)."""
    out = {}
    for rec in read_skipped_batches(run_dir):
        start, stop = rec["positions"]
        out.update(zip(range(start, stop), rec["keys"]))
    return out


class BadStepTracker:
    """Every rank holds one, fed the same agreed facts, so every rank decides alike."""

    def __init__(self, run_dir: Path, is_main: bool, max_in_a_row: int, max_rollbacks: int):
        self.run_dir, self.is_main = run_dir, is_main
        self.max_in_a_row, self.max_rollbacks = max_in_a_row, max_rollbacks
        self.in_a_row: list[BadStep] = []
        self.since_checkpoint: list[BadStep] = []  # for the rollback: all, not only the streak
        records = read_skipped_batches(run_dir)
        self.skips = sorted(tuple(r["positions"]) for r in records)  # [(start, stop)]
        self.rollbacks = len({r["rollback"] for r in records})

    def skip_to(self, position: int) -> int:
        """The position to continue from: past every skipped range that `position` is in."""
        for start, stop in self.skips:
            if start <= position < stop:
                position = stop
        return position

    def good(self) -> None:
        self.in_a_row.clear()

    def bad(self, step: BadStep, keys: list[str], ranks: list[int]) -> bool:
        """Record a bad step; True when the streak calls for a rollback."""
        self.in_a_row.append(step)
        self.since_checkpoint.append(step)
        if self.is_main:
            _append(self.run_dir / BAD_STEPS, {
                "step": step.step, "reason": step.reason, "ranks": ranks,
                "positions": [step.start, step.stop], "keys": keys, "time": time.time()})
        return len(self.in_a_row) >= self.max_in_a_row

    def roll_back(self, to_step: int | None, to_position: int, loader) -> list[BadStep]:
        """Take the bad steps at or after `to_position` (the checkpoint's) out of the stream;
        returns them. Raises TrainingDiverged when that is not allowed."""
        streak = f"{len(self.in_a_row)} steps in a row ({self.in_a_row[0].step}-" \
                 f"{self.in_a_row[-1].step}) had a non-finite loss"
        if to_step is None:
            raise TrainingDiverged(
                f"{streak} and there is no checkpoint to roll back to. Their samples are listed "
                f"in {self.run_dir / BAD_STEPS}. Lower optim.lr or check the data; save "
                "checkpoints more often (checkpoint.interval) to allow rollbacks.")
        if self.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(
                f"{streak} after {self.rollbacks} rollbacks already (train.max_rollbacks): the "
                f"run diverges. Bad steps are listed in {self.run_dir / BAD_STEPS}. Lower "
                "optim.lr, check the data, or resume from an earlier checkpoint.")
        dropped = [s for s in self.since_checkpoint if s.start >= to_position]
        self.rollbacks += 1
        for s in dropped:
            if self.is_main:
                _append(self.run_dir / SKIPPED_BATCHES, {
                    "positions": [s.start, s.stop], "keys": sample_keys(loader, s.start, s.stop),
                    "step": s.step, "reason": s.reason, "rollback": self.rollbacks,
                    "rolled_back_to": to_step, "time": time.time()})
            self.skips.append((s.start, s.stop))
        self.skips.sort()
        self.in_a_row.clear()
        self.since_checkpoint.clear()
        return dropped
