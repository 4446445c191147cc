"""The planner's peak memory per rank against the peak measured in real CPU training runs.

Each layout trains a GPT for a few steps through `pretrain train` (DeepSpeed on gloo, real
processes), which logs peak_mem_bytes and base_mem_bytes (pretrain/metrics.py: the anonymous
part of the resident set's high-water mark, and of the resident set before the model was built,
leaving out library code mapped from files); `pretrain plan`'s
model (pretrain/planner.py) predicts peak - base for the same config and layout. glibc is told
to serve every allocation of 64 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_), so that freed
tensors leave the resident set at once, as they leave a GPU's allocated memory, and the ranks
lock the pages mapped at their memory base (PRETRAIN_MEMORY_LOCK_PAGES, pretrain/metrics.py), so
that library code paged out and back in during the run does not move the figures.

What the planner does not count is the run's fixed cost (the thread pools and objects DeepSpeed
and torch create after the base, gloo's buffers): measured here as the peak - base of the
0.14M-parameter gpt-tiny in the same layout, and shown beside each figure.

    python benchmarks/planner_memory.py              # 7 layouts, 2 steps each (~4 min on 2 cores)
    python benchmarks/planner_memory.py --tiny       # one small layout (smoke test)

The last line is the worst ratio predicted / measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout

from benchmarks.common import load_line, machine_line, table, write_synthetic_data  # noqa: E402

ACTIVATIONS = ["model.n_layer=4", "model.d_model=256", "model.n_head=4",
               "model.vocab_size=32768", "train.micro_batch_size=32"]
STATES = ["model.n_layer=16", "model.d_model=512", "model.n_head=8", "model.vocab_size=8192",
          "train.micro_batch_size=1"]
LAYOUTS = {  # name: (ranks, overrides)
    "ZeRO-0, activations": (1, [*ACTIVATIONS, "parallel.zero_stage=0"]),
    "ZeRO-0, activations, ckpt": (1, [*ACTIVATIONS, "parallel.zero_stage=0",
                                      "train.activation_checkpointing=true"]),
    "ZeRO-2, activations": (2, [*ACTIVATIONS, "parallel.zero_stage=2"]),
    "ZeRO-0, states": (2, [*STATES, "parallel.zero_stage=0"]),
    "ZeRO-1, states": (2, [*STATES, "parallel.zero_stage=1"]),
    "ZeRO-2, states": (2, [*STATES, "parallel.zero_stage=2"]),
    "ZeRO-3, states": (2, [*STATES, "parallel.zero_stage=3"]),
}
TINY = {"ZeRO-0, small": (1, ["model.n_layer=2", "model.d_model=64", "model.vocab_size=1024",
                              "train.micro_batch_size=4", "parallel.zero_stage=0"])}
CONFIG = ROOT / "configs" / "gpt-tiny.yaml"


def train(data_dir: Path, run_dir: Path, ranks: int, overrides: list[str], steps: int) -> int:
    """Train and return the measured peak - base (bytes, largest over ranks and steps)."""
    args = [f"data.dir={data_dir}", f"run.dir={run_dir}", f"train.max_steps={steps}",
            "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
            "train.log_interval=1", "logging.progress=false", *overrides]
    cmd = [sys.executable, "-m", "pretrain.cli", "train", str(CONFIG), *args]
    if ranks > 1:
        cmd += ["--nproc", str(ranks)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PRETRAIN_MEMORY_LOCK_PAGES": "1",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_mem_bytes"] - r["base_mem_bytes"] for r in lines if "peak_mem_bytes" in r)


def predicted(data_dir: Path, ranks: int, overrides: list[str]) -> tuple[float, int]:
    from pretrain.config_io import load_config
    from pretrain.planner import Layout, plan

    cfg = load_config(CONFIG, [f"data.dir={data_dir}", *overrides], world_size=ranks)
    p = plan(cfg, Layout.from_config(cfg, 1, ranks, device="cpu"))
    return p.peak, p.params.total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="one small layout (smoke test)")
    ap.add_argument("--no-fixed", action="store_true",
                    help="skip the gpt-tiny runs that measure each layout's fixed cost")
    args = ap.parse_args()
    layouts = TINY if args.tiny else LAYOUTS
    MiB = 2**20
    rows, ratios = [], []
    fixed: dict[tuple, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_data(data, samples=4096, seq_len=32, vocab_size=512)
        for i, (name, (ranks, overrides)) in enumerate(layouts.items()):
            measured = train(data, Path(tmp) / f"run{i}", ranks, overrides, args.steps)
            peak, n_params = predicted(data, ranks, overrides)
            stage = next(o for o in overrides if o.startswith("parallel.zero_stage"))
            key = (ranks, stage)
            if not args.no_fixed and not args.tiny and key not in fixed:
                fixed[key] = train(data, Path(tmp) / f"tiny{i}", ranks, [stage], args.steps)
            base = fixed.get(key)
            ratios.append(peak / measured)
            rows.append([name, ranks, f"{n_params / 1e6:.1f}", f"{peak / MiB:.0f}",
                         f"{measured / MiB:.0f}", f"{peak / measured:.3f}",
                         "-" if base is None else f"{base / MiB:.0f}",
                         "-" if base is None else f"{(peak + base) / measured:.3f}"])
            print(json.dumps({"layout": name, "ranks": ranks, "predicted": peak,
                              "measured": measured, "fixed": base}), flush=True)
    print()
    print(machine_line())
    print(load_line())
    print(f"date: {datetime.date.today()}; {args.steps} steps per run; sequence 32; fp32")
    print(table(["layout", "ranks", "params M", "predicted MiB", "measured MiB",
                 "pred/meas", "fixed MiB", "(pred+fixed)/meas"], rows))
    worst = max(ratios, key=lambda r: abs(r - 1))
    print(f"ratio predicted / measured peak, worst layout: {worst:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
