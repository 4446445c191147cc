"""What every benchmark prints around its table: the machine, the load, the timing helpers.

Benchmarks compare against a baseline measured in the same run, so they alternate the two in
rounds and keep each side's best round (the least disturbed by other processes on the machine).
"""

from __future__ import annotations

import os
import platform
import time
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
    """1/5/15-minute load averages: a figure measured at a load above the core count is disturbed."""
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def best_of(rounds: int, contenders: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run each contender once per round, alternating; each call returns its own timing."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(fn())
    return times


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
