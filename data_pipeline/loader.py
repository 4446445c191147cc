"""Deterministic, resumable, exactly-once loader of prepared WebDataset shards.

The stream and its split over ranks (see order.py for which sample sits at a position):

  * Global POSITION p counts samples over all ranks and epochs; the stream is infinite.
  * Micro-step j (counted from the start position P of this iteration) covers positions
    [P + j*M*D, P + (j+1)*M*D); rank r of D takes the contiguous M positions P + j*M*D + r*M + [0, M).
    Every position goes to exactly one rank, batches straddle epoch boundaries, and a resume at
    P with another D or M still serves each position once.
  * With W DataLoader workers, worker w builds the micro-batches j with j % W == w. torch's
    DataLoader requests from its workers round-robin and yields in request order, so the caller
    sees j = 0, 1, 2, ...; the main process asserts this on every batch.
  * The main process counts batches handed to the caller: state_dict()["position"] =
    P + yielded * M * D is the next position of ALL ranks (identical everywhere), and
    load_state_dict() makes the next iter() start there.

Batches are dicts: input_ids [M, sample_len] int64 token ids; positions [M] int64 global
positions; sample_ids [M] int64 indices of the samples within the split (key =
sample_key(split, id)); epochs [M] int64 the epoch of each position. With a `transform` (the
model family's objective, data_pipeline/objectives), batches also carry inputs =
transform(batch): the model's keyword arguments, computed in the worker that built the batch,
from nothing but the batch itself.

Damaged data (a missing or truncated shard, a checksum that differs from the manifest, a sample
that does not decode): by default (on_corrupt="error") the first use raises an error naming the
shard, the position and what to do. With on_corrupt="skip" the positions whose sample cannot be
trusted are *skipped*: they are still consumed (the position arithmetic, the split over ranks
and the resume state do not change), their rows hold the EOS token and every `*labels` tensor
of `inputs` is -100 there (no loss, no gradient), batch["skipped"] [M] bool marks them and
batch["corrupt"] says why; the loader counts them (`skipped_samples`), lists them in
`corrupt_dir` (corrupt_log.py) and records them as skipped in the audit trail.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.audit import AuditLog
from data_pipeline.corrupt_log import CorruptLog
from data_pipeline.format import Manifest, ShardInfo, sample_key
from data_pipeline.order import StreamOrder
from data_pipeline.shard_reader import FIX, ShardError, read_shard, read_shard_lenient

IGNORE_INDEX = -100
"""Label of a skipped row: the models' cross-entropy ignores it."""
ON_CORRUPT = ("error", "skip")


class _BatchStream(IterableDataset):
    """One rank's micro-batches j = 0, 1, ... (this worker's share of them).

    Batch j covers positions [start + j*M*D + r*M, ... + M), clipped to `stop` (None: endless);
    the stream ends at the first batch that starts at or after `stop`, or after `num_batches`.
    Picklable: workers get a copy and build their order tables and shard cache themselves.
    """

    def __init__(
        self,
        data_dir: Path,
        split: str,
        manifest: Manifest,
        *,
        start: int,
        stop: int | None,
        num_batches: int | None,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        verify_checksums: bool,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        on_corrupt: str = "error",
    ) -> None:
        self.data_dir, self.split = data_dir, split
        self.transform = transform
        self.skip_corrupt = on_corrupt == "skip"
        self.fill_id = manifest.tokenizer.eos_id  # the tokens of a skipped row
        self.shards: list[ShardInfo] = manifest.splits[split].shards
        self.sample_len, self.dtype = manifest.sample_len, manifest.dtype
        self.start, self.stop, self.num_batches = start, stop, num_batches
        self.m, self.rank, self.world = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.verify = seed, shuffle, verify_checksums

    def batch_start(self, j: int) -> int:
        return self.start + j * self.m * self.world + self.rank * self.m

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        order = StreamOrder([s.samples for s in self.shards], self.seed, self.shuffle)
        cache: dict[int, np.ndarray] = {}  # the current decoded shard: {shard index: [n, L]}
        j = worker
        while (self.num_batches is None or j < self.num_batches) and (
            self.stop is None or self.batch_start(j) < self.stop
        ):
            try:
                batch = self._batch(j, order, cache)
            except ShardError as e:
                # Raised again by the main process as it is: torch would wrap it in the
                # worker's traceback, and the message names the shard and the position.
                yield {"error": e}
                return
            yield batch
            j += workers

    def _load(self, run, cache: dict) -> tuple:
        """(rows, corrupt rows or None, reasons) of the shard of `run`, from the cache."""
        if run.shard not in cache:
            cache.clear()  # keep one decoded shard: positions only move forward
            info = self.shards[run.shard]
            path = self.data_dir / info.name
            if self.skip_corrupt:
                rows, bad, reasons = read_shard_lenient(
                    path, info, self.split, self.sample_len, self.dtype, self.verify)
                cache[run.shard] = (rows, bad if bad.any() else None, reasons)
            else:
                cache[run.shard] = (read_shard(
                    path, info, self.split, self.sample_len, self.dtype,
                    verify_checksum=self.verify,
                    context=f"needed for {self.split} position {run.start}, epoch {run.epoch}",
                ), None, None)
        return cache[run.shard]

    def _batch(self, j: int, order: StreamOrder, cache: dict) -> dict:
        lo = self.batch_start(j)
        hi = lo + self.m if self.stop is None else min(lo + self.m, self.stop)
        input_ids = np.empty((hi - lo, self.sample_len), dtype=np.int64)  # [m, L]
        sample_ids = np.empty(hi - lo, dtype=np.int64)  # [m]
        epochs = np.empty(hi - lo, dtype=np.int64)  # [m]
        skipped = np.zeros(hi - lo, dtype=bool) if self.skip_corrupt else None  # [m]
        corrupt: list[dict] = []  # why, for the skipped rows
        for run in order.runs(lo, hi):
            rows, bad, reasons = self._load(run, cache)
            k = run.start - lo
            input_ids[k : k + len(run.rows)] = rows[run.rows]  # widen to int64
            sample_ids[k : k + len(run.rows)] = self.shards[run.shard].first_sample + run.rows
            epochs[k : k + len(run.rows)] = run.epoch
            if bad is not None:
                for i, row in enumerate(run.rows.tolist()):
                    if bad[row]:
                        skipped[k + i] = True
                        corrupt.append({"row": k + i, "shard": self.shards[run.shard].name,
                                        "reason": reasons[row].replace(" " + FIX, "")})
        if corrupt:
            input_ids[skipped] = self.fill_id
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "positions": torch.arange(lo, hi, dtype=torch.long),
            "sample_ids": torch.from_numpy(sample_ids),
            "epochs": torch.from_numpy(epochs),
        }
        if self.skip_corrupt:
            batch["skipped"] = torch.from_numpy(skipped)
            batch["corrupt"] = corrupt
        if self.transform is not None:
            batch["inputs"] = self.transform(batch)
            if corrupt:  # nothing to predict in a skipped row
                inputs, mask = batch["inputs"], torch.from_numpy(skipped)  # [m]
                for name, value in inputs.items():
                    if name.endswith("labels"):  # a new tensor: labels may view input_ids
                        inputs[name] = value.masked_fill(
                            mask.view(-1, *[1] * (value.dim() - 1)), IGNORE_INDEX)
        return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker leaves stopping to its rank. Slurm signals every process of a job step
    (SIGUSR1 before the time limit, SIGTERM on cancel or preemption), and torch's workers die of
    SIGTERM, which would fail the rank while it finishes its step and saves a checkpoint
    (pretrain/stop.py). A worker still exits with its rank: torch's watchdog ends it when the
    parent is gone, and the job step's end kills whatever remains."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _iterate(
    stream: _BatchStream, num_workers: int, prefetch_factor: int, pin_memory: bool
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(j, batch) in order j = 0, 1, ..., in this process or through DataLoader workers."""
    if num_workers == 0:
        batches: Any = iter(stream)
        pin = pin_memory and torch.cuda.is_available()
    else:
        batches = iter(
            DataLoader(
                stream,
                batch_size=None,  # the workers build whole micro-batches
                num_workers=num_workers,
                prefetch_factor=prefetch_factor,
                pin_memory=pin_memory and torch.cuda.is_available(),
                persistent_workers=False,  # every iter() has its own start position
                # Its own generator: seeding the workers must not draw from the global RNG, or
                # a resumed run (which opens its iterator at another step) would diverge in
                # dropout from the uninterrupted one.
                generator=torch.Generator().manual_seed(0),
                worker_init_fn=_ignore_stop_signals,
            )
        )
        pin = False
    try:
        for j, batch in enumerate(batches):
            if "error" in batch:
                raise batch["error"]
            expected = stream.batch_start(j)
            got = int(batch["positions"][0]) if len(batch["positions"]) else None
            if got != expected:
                raise RuntimeError(
                    f"data loader batch {j} starts at position {got}, expected {expected}: the "
                    f"DataLoader did not return worker batches round-robin ({num_workers} workers)"
                )
            yield j, (_pin(batch) if pin else batch)
    finally:
        # Stop the workers now (on close, error or end). Left to the garbage collector, an
        # iterator caught in an exception's traceback cycle takes 5 s per worker to shut down.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _pin(batch: dict) -> dict:
    return {k: _pin(v) if isinstance(v, dict) else v.pin_memory() if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _check_layout(micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int,
                  on_corrupt: str = "error") -> None:
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def _split_of(manifest: Manifest, data_dir: Path, split: str) -> int:
    """Samples in `split`, checking that the manifest describes it consistently."""
    if split not in manifest.splits:
        raise ValueError(f"{data_dir}: the manifest has no split {split!r} (has {sorted(manifest.splits)})")
    info = manifest.splits[split]
    counted = sum(s.samples for s in info.shards)
    if counted != info.samples or counted == 0:
        raise ValueError(
            f"{data_dir}: the manifest's {split!r} split lists {info.samples} samples in "
            f"{len(info.shards)} shards holding {counted}; need a non-empty, consistent split. "
            "Re-run `pretrain prepare CONFIG --force`."
        )
    return counted


class ShardedLoader:
    """Endless, deterministic training stream of one data-parallel rank; resumable by position."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        *,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        verify_checksums: bool = True,
        audit_dir: str | os.PathLike | None = None,
        manifest: Manifest | None = None,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        on_corrupt: str = "error",
        corrupt_dir: str | os.PathLike | None = None,
    ) -> None:
        """transform: maps a batch to the model's inputs (batch["inputs"]); it must be a pure,
        picklable function of the batch so that a resumed stream gives the same inputs.
        on_corrupt: "error" or "skip" (see the module docstring); corrupt_dir: where the skipped
        positions are listed (corrupt_log.py)."""
        _check_layout(micro_batch_size, dp_rank, dp_size, num_workers, on_corrupt)
        self.data_dir = Path(data_dir)
        self.transform = transform
        self.manifest = manifest if manifest is not None else Manifest.load(self.data_dir)
        self.split = split
        self.samples_per_epoch = _split_of(self.manifest, self.data_dir, split)
        self.sample_len = self.manifest.sample_len
        self.order = StreamOrder([s.samples for s in self.manifest.splits[split].shards], seed, shuffle)
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle = int(seed), shuffle
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory, self.verify_checksums = pin_memory, verify_checksums
        self.audit = AuditLog(audit_dir, split, dp_rank) if audit_dir is not None else None
        self.on_corrupt = on_corrupt
        self.corrupt_log = (CorruptLog(corrupt_dir, split, dp_rank)
                            if corrupt_dir is not None and on_corrupt == "skip" else None)
        self.skipped_samples = 0
        """Skipped positions this rank handed out since it was made (data.on_corrupt: skip)."""
        self._skipped_taken = 0
        self._digest = self.manifest.digest()
        self._position = 0
        self._generation = 0  # only the newest iterator advances the position

    @property
    def position(self) -> int:
        """Global position of the next micro-step of all ranks."""
        return self._position

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self._position / self.samples_per_epoch

    @property
    def samples_per_step(self) -> int:
        """Samples one micro-step consumes over all ranks: M * D."""
        return self.micro_batch_size * self.dp_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from the current position on; a newer iter() or load_state_dict()
        detaches older iterators from the position."""
        self._generation += 1  # here, not in the generator: iter() itself fixes the start
        return self._run(self._generation, self._position)

    def _run(self, generation: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        stream = _BatchStream(
            self.data_dir, self.split, self.manifest,
            start=start, stop=None, num_batches=None,
            micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
            seed=self.seed, shuffle=self.shuffle, verify_checksums=self.verify_checksums,
            transform=self.transform, on_corrupt=self.on_corrupt,
        )  # fmt: skip
        for j, batch in _iterate(stream, self.num_workers, self.prefetch_factor, self.pin_memory):
            if generation == self._generation:
                self._position = start + (j + 1) * self.samples_per_step
            skipped = batch.get("skipped")
            if self.audit is not None:
                self.audit.write(
                    batch["positions"].tolist(), batch["sample_ids"].tolist(), self.samples_per_epoch,
                    skipped.tolist() if skipped is not None else None,
                )
            if batch.get("corrupt"):
                self.skipped_samples += len(batch["corrupt"])
                if self.corrupt_log is not None:
                    self.corrupt_log.write(_corrupt_records(batch, self.split, self.samples_per_epoch))
            yield batch

    def take_skipped(self) -> int:
        """Skipped positions handed out since the last call (for a metrics record)."""
        n, self._skipped_taken = self.skipped_samples - self._skipped_taken, self.skipped_samples
        return n

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self._position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "split": self.split,
            "data_digest": self._digest,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at state["position"]; refuses a state of other data, seed, shuffle or split."""
        mine = self.state_dict()
        for name in ("data_digest", "seed", "shuffle", "split"):
            if name not in state:
                raise ValueError(f"loader state has no {name!r} (keys: {sorted(state)})")
            if state[name] != mine[name]:
                raise ValueError(
                    f"cannot resume the data stream: the saved state has {name}={state[name]!r} "
                    f"but this loader has {name}={mine[name]!r} (data in {self.data_dir}). The "
                    "order of samples, and so exactly-once coverage, depends on it: resume with "
                    "the data and settings of the saved run, or start a new run."
                )
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"loader state has a bad position {position!r}")
        self._position = position
        self._generation += 1  # an iterator still open from before must not move it

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
        if self.corrupt_log is not None:
            self.corrupt_log.close()


def _corrupt_records(batch: dict, split: str, samples_per_epoch: int) -> list[dict]:
    """corrupt_log records of a batch's skipped rows."""
    out = []
    for c in batch["corrupt"]:
        position = int(batch["positions"][c["row"]])
        out.append({"position": position, "epoch": position // samples_per_epoch,
                    "key": sample_key(split, int(batch["sample_ids"][c["row"]])),
                    "shard": c["shard"], "reason": c["reason"]})
    return out


def num_eval_batches(samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> int:
    """How many batches iter_eval gives rank `dp_rank` over `samples` samples."""
    first = dp_rank * micro_batch_size
    return max(0, -(-(samples - first) // (micro_batch_size * dp_size)))


def iter_eval(
    data_dir: str | os.PathLike,
    split: str = "val",
    *,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_batches: int | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    verify_checksums: bool = True,
    manifest: Manifest | None = None,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    on_corrupt: str = "error",
    corrupt_dir: str | os.PathLike | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One unshuffled pass over this rank's disjoint slice of `split`.

    Positions 0..N-1 are strided over ranks like training batches (batch j of rank r covers
    [j*M*D + r*M, +M) clipped to N); the last batch may be short and ranks may get different
    counts (num_eval_batches tells how many). At most `max_batches` batches per rank. With
    on_corrupt="skip", damaged samples are skipped as in training (listed in `corrupt_dir`,
    once however many passes there are).
    """
    _check_layout(micro_batch_size, dp_rank, dp_size, num_workers, on_corrupt)
    data_dir = Path(data_dir)
    manifest = manifest if manifest is not None else Manifest.load(data_dir)
    samples = _split_of(manifest, data_dir, split)
    stream = _BatchStream(
        data_dir, split, manifest,
        start=0, stop=samples, num_batches=max_batches,
        micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=0, shuffle=False, verify_checksums=verify_checksums, transform=transform,
        on_corrupt=on_corrupt,
    )  # fmt: skip
    log = (CorruptLog(corrupt_dir, split, dp_rank)
           if corrupt_dir is not None and on_corrupt == "skip" else None)
    try:
        for _, batch in _iterate(stream, num_workers, prefetch_factor, pin_memory):
            if log is not None and batch.get("corrupt"):
                log.write(_corrupt_records(batch, split, samples))
            yield batch
    finally:
        if log is not None:
            log.close()
