"""`pretrain report DIR... [--out OUT]`: a markdown and CSV table of the runs (point, nodes,
GPUs, tokens/s, tokens/s per GPU, MFU, step time, peak memory and the planner's prediction,
final training and validation loss, wall time) and PNG plots: loss against tokens, throughput
against nodes with the ideal line and scaling efficiency, loss against training compute with a
fitted power law L(C) = a C^-b + c (pretrain/report.py). DIR is a sweep directory, a run
directory or a directory of run directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="table and plots of a sweep's runs", description=__doc__)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep or run directories")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write (default: <first DIR>/report)")


def run(args: argparse.Namespace) -> int:
    from pretrain.report import ReportError, build_report

    out = args.out or Path(args.dirs[0]) / "report"
    try:
        text, out = build_report(args.dirs, out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"written to {out}: report.md, report.csv, report.json, loss_vs_tokens.png, "
          "throughput_vs_nodes.png, loss_vs_compute.png")
    return 0
