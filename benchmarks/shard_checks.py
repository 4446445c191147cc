"""What checking shards costs the loader: reading one shard with and without its sha256, in the
strict reader and in the lenient one of data.on_corrupt: skip, and building micro-batches from a
decoded shard in both modes.

The data: one synthetic shard of `--samples` samples of the config's seq_len (written by the
pipeline's shard writer, with a manifest) in a temporary directory. Every figure is the best of
`--rounds` repetitions (the minimum is what survives a loaded machine). `--tree DIR` imports
data_pipeline from another checkout instead, to compare before and after a change on the same
data (measurements that the other tree cannot make are left out):

    python benchmarks/shard_checks.py
    python benchmarks/shard_checks.py --tree /tmp/old-checkout

The last line is the ratio of a checked shard read to an unchecked one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpt-default.yaml"))
    ap.add_argument("--samples", type=int, default=16_000, help="samples in the shard")
    ap.add_argument("--batches", type=int, default=1500, help="micro-batches per timing")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tree", type=Path, default=None,
                    help="import data_pipeline from this checkout (default: this one)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import load_line, machine_line, table, write_synthetic_data
    from pretrain.config_io import load_config

    cfg = load_config(args.config, [])
    if args.tree is not None:  # its data_pipeline, not ours (benchmarks.common is loaded)
        sys.path.insert(0, str(args.tree.resolve()))
        for name in [m for m in sys.modules if m.split(".")[0] == "data_pipeline"]:
            del sys.modules[name]
    import data_pipeline.shard_reader as reader
    from data_pipeline.loader import ShardedLoader

    tmp = Path(tempfile.mkdtemp(prefix="bench-shard-checks-"))
    try:
        manifest = write_synthetic_data(tmp, samples=args.samples, seq_len=cfg.data.seq_len,
                                        vocab_size=cfg.data.tokenizer.vocab_size,
                                        shard_bytes=2**40)
        info = manifest.splits["train"].shards[0]
        path = tmp / info.name
        shape = ("train", manifest.sample_len, manifest.dtype)
        lenient = getattr(reader, "read_shard_lenient", None)
        rows: list[tuple[str, float, str]] = []

        def shard(name: str, fn) -> float:
            t = best(fn, args.rounds)
            rows.append((name, t * 1e3, f"{info.bytes / t / 1e6:,.0f} MB/s"))
            return t

        checked = shard("read shard, sha256", lambda: reader.read_shard(path, info, *shape, True))
        plain = shard("read shard, no sha256", lambda: reader.read_shard(path, info, *shape, False))
        if lenient is not None:
            shard("read shard lenient, sha256", lambda: lenient(path, info, *shape, True))

        def batches(**kw) -> float:
            loader = ShardedLoader(tmp, micro_batch_size=cfg.train.micro_batch_size, **kw)
            it = iter(loader)
            next(it)  # reads the shard: not timed
            t0 = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            t = time.perf_counter() - t0
            it.close()
            return t

        for name, kw in [("micro-batch, on_corrupt error", {}),
                         ("micro-batch, on_corrupt skip", {"on_corrupt": "skip"})]:
            if kw and lenient is None:
                continue
            t = min(batches(**kw) for _ in range(args.rounds))
            rows.append((name, t / args.batches * 1e3, f"{cfg.train.micro_batch_size} samples"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(machine_line())
    print(load_line())
    print(f"data_pipeline from {Path(reader.__file__).parents[1]}; one shard of {info.samples:,} "
          f"samples x {manifest.sample_len} {manifest.dtype} tokens ({info.bytes / 2**20:.1f} "
          f"MiB); best of {args.rounds}")
    print(table(["", "ms", ""], [(n, f"{ms:.3f}", note) for n, ms, note in rows]))
    print(f"ratio shard read with sha256 / without: {checked / plain:.2f}x")


if __name__ == "__main__":
    main()
