"""`pretrain sweep SWEEP_FILE [--local] [--dry-run]`: run every point of a sweep (a base config
and a grid or list of overrides), each in its own run directory: by default as Slurm job arrays
(one per node count), with --local one after another here. Re-running skips finished points and
resumes unfinished ones (pretrain/sweep.py; the file format is in configs/README.md)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep's points as Slurm job arrays or locally",
                       description=__doc__)
    p.add_argument("sweep_file", help="YAML sweep file, e.g. configs/sweeps/gpt-tiny-scaling.yaml")
    p.add_argument("--local", action="store_true",
                   help="run the points here, one after another (nodes x ranks_per_node ranks "
                        "each), instead of submitting them to Slurm")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run (the commands, or the sbatch scripts) and stop")


def run(args: argparse.Namespace) -> int:
    from launch.sbatch import SubmitError
    from pretrain.sweep import SweepError, load_sweep, run_local, submit_slurm

    try:
        sweep = load_sweep(args.sweep_file, local=args.local)
        print(f"[sweep] {sweep.name}: {len(sweep.points)} point(s) of {sweep.base} in "
              f"{sweep.dir}", flush=True)
        if args.local:
            return run_local(sweep, dry_run=args.dry_run)
        return submit_slurm(sweep, dry_run=args.dry_run)
    except (SweepError, SubmitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
