"""What every benchmark prints around its table: the machine, the load, the timing helpers.

Benchmarks compare against a baseline measured in the same run, so they alternate the two in
rounds and keep each side's best round (the least disturbed by other processes on the machine).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (f"machine: {platform.node()} {cpu}, {os.cpu_count()} cores{gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def load_line() -> str:
    """1/5/15-minute load averages (above the core count, a figure is disturbed)."""
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def best_of(rounds: int, contenders: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run each contender once per round, alternating; each call returns its own timing."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(fn())
    return times


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table: the first column left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:,.0f}" if abs(c) >= 100 else f"{c:.3g}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def write_synthetic_data(data_dir: str | os.PathLike, *, samples: int, seq_len: int,
                         vocab_size: int = 8192, shard_bytes: int = 16 * 2**20,
                         seed: int = 0):
    """A prepared-data directory of `samples` random training samples of seq_len + 1 token ids,
    written by the pipeline's own SplitWriter (the same tar shards `pretrain prepare` writes),
    with a word-level tokenizer.json of `vocab_size` tokens and the manifest, written last.
    Returns the Manifest."""
    from pathlib import Path

    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    from data_pipeline.format import (
        TOKENIZER_NAME, Manifest, SplitInfo, TokenizerInfo, sha256_file,
    )
    from data_pipeline.packing import SplitWriter

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    eos = "<|endoftext|>"
    tok = Tokenizer(models.WordLevel({eos: 0} | {f"t{i}": i for i in range(1, vocab_size)},
                                     unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(data_dir / TOKENIZER_NAME))
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    sample_len = seq_len + 1
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", samples), ("val", 0)):
        writer = SplitWriter(data_dir, split, sample_len, dtype, shard_bytes)
        for start in range(0, n, 65536):  # bounded memory: 64Ki samples at a time
            rows = min(65536, n - start)
            writer.write(rng.integers(0, vocab_size, (rows, sample_len), dtype=np.int64)
                         .astype(dtype))
        shards = writer.close()
        splits[split] = SplitInfo(documents=0, samples=writer.samples,
                                  tokens=writer.samples * sample_len, shards=shards)
    manifest = Manifest(
        seq_len=seq_len, sample_len=sample_len, dtype=dtype,
        tokenizer=TokenizerInfo(sha256=sha256_file(data_dir / TOKENIZER_NAME),
                                vocab_size=vocab_size, eos_token=eos, eos_id=0,
                                special_tokens={eos: 0}),
        splits=splits, stats={"synthetic": True}, config_hash="synthetic",
    )
    manifest.save(data_dir)
    return manifest
