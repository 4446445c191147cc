"""Deterministic sample order of the infinite training stream.

The training data is an endless sequence of epochs over one split. A global POSITION p (counted in
samples over all ranks and epochs) fully determines the sample served there:

    epoch  = p // N,  offset = p % N            (N = samples in the split)
    epoch's shard order   = permutation seeded by (seed, epoch)
    shard's sample order  = permutation seeded by (seed, epoch, shard)

`offset` is mapped to (shard, row) through the cumulative sample counts of the shards in the
epoch's permuted order, so locating a position costs a binary search and never reads a shard.
With shuffle=False both permutations are the identity: position p is sample p % N.

Seeding goes through numpy's SeedSequence (never Python's hash(), which is salted per process).
Each kind of permutation carries its own tag as the first entropy word: SeedSequence pads its
entropy with zeros, so untagged (seed, epoch) and (seed, epoch, 0) would give the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

_SHARD_ORDER_TAG = 0x53484152  # "SHAR"
_SAMPLE_ORDER_TAG = 0x53414D50  # "SAMP"
_CACHE = 4  # permutations kept per kind; a batch touches at most a few shards and two epochs


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


@dataclass(frozen=True)
class Run:
    """Consecutive global positions that fall into one shard of one epoch."""

    start: int
    """Global position of the first sample of the run."""
    epoch: int
    shard: int
    """Index of the shard in the split's shard list (manifest order)."""
    rows: np.ndarray
    """[n] int64: row within the shard (sample index - shard.first_sample) of each position."""


class StreamOrder:
    """Maps global positions to (epoch, shard, row) for one split, seed and shuffle setting."""

    def __init__(self, shard_sizes: Sequence[int], seed: int, shuffle: bool = True) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any() or sizes.sum() == 0:
            raise ValueError(f"need at least one sample in a list of shard sizes, got {list(sizes)}")
        self.sizes = sizes
        self.seed = int(seed)
        self.shuffle = shuffle
        self.samples_per_epoch = int(sizes.sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows: dict[tuple[int, int], np.ndarray] = {}

    def shard_order(self, epoch: int) -> np.ndarray:
        """[S] int64: the shard indices in the order epoch `epoch` visits them."""
        return self._epoch(epoch)[0]

    def sample_rows(self, epoch: int, shard: int) -> np.ndarray:
        """[shard size] int64: the rows of `shard` in the order epoch `epoch` visits them."""
        key = (epoch, shard)
        rows = self._rows.get(key)
        if rows is None:
            n = int(self.sizes[shard])
            if self.shuffle:
                rows = _rng(_SAMPLE_ORDER_TAG, self.seed, epoch, shard).permutation(n)
            else:
                rows = np.arange(n, dtype=np.int64)
            _put(self._rows, key, rows)
        return rows

    def runs(self, start: int, stop: int) -> Iterator[Run]:
        """The positions [start, stop) as runs of consecutive positions within one shard."""
        if start < 0 or stop < start:
            raise ValueError(f"bad position range [{start}, {stop})")
        n_epoch = self.samples_per_epoch
        p = start
        while p < stop:
            epoch, offset = divmod(p, n_epoch)
            order, bounds = self._epoch(epoch)
            # bounds[k] = first in-epoch offset of slot k; 'right' skips empty shards.
            slot = int(np.searchsorted(bounds, offset, side="right")) - 1
            shard = int(order[slot])
            lo = offset - int(bounds[slot])
            n = min(stop - p, int(bounds[slot + 1]) - offset)
            yield Run(p, epoch, shard, self.sample_rows(epoch, shard)[lo : lo + n])
            p += n

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, shard, row) of one position."""
        run = next(self.runs(position, position + 1))
        return run.epoch, run.shard, int(run.rows[0])

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order [S], slot bounds [S + 1]) of an epoch."""
        if epoch < 0:
            raise ValueError(f"negative epoch {epoch}")
        cached = self._epochs.get(epoch)
        if cached is None:
            n = len(self.sizes)
            if self.shuffle:
                order = _rng(_SHARD_ORDER_TAG, self.seed, epoch).permutation(n)
            else:
                order = np.arange(n, dtype=np.int64)
            bounds = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(self.sizes[order], out=bounds[1:])
            cached = (order, bounds)
            _put(self._epochs, epoch, cached)
        return cached


def _put(cache: dict, key: object, value: object) -> None:
    """Insert into a small FIFO cache (dicts keep insertion order)."""
    if len(cache) >= _CACHE:
        del cache[next(iter(cache))]
    cache[key] = value
