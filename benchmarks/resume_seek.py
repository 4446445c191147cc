"""Resume seek: time to the first batch after resuming at the start, middle and end of a shard set.

A ~`--gb` GB prepared directory of synthetic token ids (the config's seq_len, vocabulary and
data.shard_bytes) is written with the pipeline's own shard writer and manifest into a temporary
directory (removed afterwards unless `--keep DIR`). Then, as a resumed run does, a fresh
`ShardedLoader` (the trainer's settings: micro-batch, seed, shuffle, sha256 checks, 0 and the
config's DataLoader workers) gets `load_state_dict` at a position and the first micro-batch is
timed: construction (manifest), load_state_dict, iter() (worker start) and next().

Positions: the first, the middle and the last micro-batch of the epoch. Locating a position costs
a binary search over the manifest's shard counts; then the loader reads and decodes the whole
shard that holds it (sha256 over the file, the tar members to a [samples, seq_len + 1] array), so
the seek costs one shard read, whatever the position. Before each timed seek the shard files are
evicted from the page cache (posix_fadvise DONTNEED; `--warm` keeps them cached), so the read
is a disk read. Baseline in the same run: a plain sequential read of one shard file's bytes,
evicted the same way. Positions and worker settings alternate in rounds; each keeps its best.

    python benchmarks/resume_seek.py                    # ~1 GB, configs/gpt-default.yaml
    python benchmarks/resume_seek.py --gb 0.05 --rounds 1

The last line printed is the ratio: seek at the end over seek at the start (constant: ~1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from benchmarks.common import load_line, machine_line, table, write_synthetic_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (they are fsynced: nothing dirty is lost)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpt-default.yaml"))
    ap.add_argument("--gb", type=float, default=1.0, help="size of the shard set, in GB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", action="store_true", help="leave the shards in the page cache")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write the shard set here and keep it (reused if it is there)")
    args = ap.parse_args()

    import numpy as np

    from data_pipeline.format import Manifest
    from data_pipeline.loader import ShardedLoader
    from data_pipeline.packing import MemberLayout
    from pretrain.config_io import load_config

    cfg = load_config(args.config, [])
    m, seq, vocab = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.data.tokenizer.vocab_size
    dtype = np.dtype("uint16" if vocab <= 2**16 else "uint32")
    samples = int(args.gb * 1e9) // MemberLayout("train", seq + 1, dtype).size
    data = args.keep or Path(tempfile.mkdtemp(prefix="bench-seek-"))
    workers = sorted({0, cfg.data.num_workers})
    try:
        t0 = time.perf_counter()
        try:
            manifest = Manifest.load(data)
            if manifest.splits["train"].samples != samples or manifest.seq_len != seq:
                raise FileNotFoundError
            write_s = None
        except (FileNotFoundError, ValueError):
            manifest = write_synthetic_data(data, samples=samples, seq_len=seq, vocab_size=vocab,
                                            shard_bytes=cfg.data.shard_bytes)
            write_s = time.perf_counter() - t0
        shards = manifest.splits["train"].shards
        paths = [data / s.name for s in shards]
        n = manifest.splits["train"].samples
        positions = {"start": 0, "middle": n // 2, "end": n - m}

        def seek(w: int, position: int) -> float:
            if not args.warm:
                evict(paths)
            t = time.perf_counter()
            loader = ShardedLoader(data, micro_batch_size=m, seed=cfg.run.seed,
                                   shuffle=cfg.data.shuffle, num_workers=w,
                                   verify_checksums=cfg.data.verify_checksums)
            loader.load_state_dict({**loader.state_dict(), "position": position})
            it = iter(loader)
            batch = next(it)
            dt = time.perf_counter() - t
            assert int(batch["positions"][0]) == position
            it.close()
            return dt

        def plain_read(path: Path) -> float:
            if not args.warm:
                evict([path])
            t = time.perf_counter()
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
            return time.perf_counter() - t

        times: dict[str, list[float]] = {}
        middle_shard = paths[len(paths) // 2]
        for _ in range(args.rounds):
            times.setdefault("plain read of one shard file", []).append(plain_read(middle_shard))
            for w in workers:
                for name, p in positions.items():
                    times.setdefault(f"seek {name} ({w} workers)", []).append(seek(w, p))
    finally:
        if args.keep is None:
            shutil.rmtree(data, ignore_errors=True)

    best = {name: min(t) for name, t in times.items()}
    plain = best["plain read of one shard file"]
    rows = [(name, f"{t * 1e3:.1f}", f"{max(times[name]) * 1e3:.1f}", f"{t / plain:.1f}x")
            for name, t in best.items()]
    total = sum(s.bytes for s in shards)
    print(machine_line())
    print(load_line())
    print(f"shard set: {n:,} samples of {seq + 1} tokens ({dtype}) in {len(shards)} shards, "
          f"{total / 1e9:.2f} GB" + (f", written in {write_s:.1f} s" if write_s else ", reused")
          + f"; micro-batch {m}; shuffle {cfg.data.shuffle}; sha256 checks "
          f"{cfg.data.verify_checksums}; page cache {'warm' if args.warm else 'evicted'}; "
          f"best of {args.rounds} rounds")
    print(table(["", "best ms", "worst ms", "vs plain read"], rows))
    w = cfg.data.num_workers
    worst = max(best[f"seek {p} ({w} workers)"] for p in positions)
    print(f"worst seek ({w} workers): {worst * 1e3:.1f} ms (goal < 1000 ms)")
    ratio = best[f"seek end ({w} workers)"] / best[f"seek start ({w} workers)"]
    print(f"ratio seek end / seek start ({w} workers): {ratio:.2f}x")


if __name__ == "__main__":
    main()
