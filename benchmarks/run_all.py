"""Run every benchmark (`make bench`), one after the other, each in its own process.

Each prints its table, ending in its ratio line; gpu_mfu.py runs only where a CUDA GPU is
visible. Exits non-zero if any failed.

    python benchmarks/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["train_throughput.py", "data_prep.py", "loader_throughput.py", "shard_checks.py",
           "resume_seek.py", "long_attention.py", "tp_zero_memory.py", "planner_memory.py",
           "checkpoint_io.py", "gpu_mfu.py"]


def main() -> int:
    import torch

    failed = []
    for script in SCRIPTS:
        print(f"\n=== {script} ===", flush=True)
        if script == "gpu_mfu.py" and not torch.cuda.is_available():
            print("skipped: no CUDA GPU visible (run it on a GPU machine)", flush=True)
            continue
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script)])
        print(f"({script}: {time.perf_counter() - t:.0f} s, exit {rc})", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
