"""`pretrain plan CONFIG --nodes N --gpus-per-node G`: per-GPU memory (parameters, gradients,
optimizer states, activations with and without checkpointing), whether it fits, the largest
micro-batch that does, step time and tokens/s from the FLOPs model, and what to change when it
does not fit (pretrain/planner.py)."""

from __future__ import annotations

import argparse
import sys

DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU memory, fit and step time of a layout",
                       description=__doc__)
    p.add_argument("config", help="YAML run config, e.g. configs/gpt-default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides (parallel.zero_stage=3, train.micro_batch_size=4, ...)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="one rank per GPU")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help=f"memory of one GPU (default {DEFAULT_GPU_MEMORY_GIB:g}; with --cpu: "
                        "host memory per rank, default not judged)")
    p.add_argument("--tflops", type=float, default=None, metavar="X",
                   help="dense peak TFLOP/s of one GPU (default logging.peak_tflops, else "
                        f"{DEFAULT_PEAK_TFLOPS:g}, an H100's bf16)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="fraction of the peak the run reaches, for the step time (default 0.4)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="T",
                   help="what-if tensor-parallel degree (default parallel.tensor_parallel)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of GPU memory kept free for the CUDA context, NCCL and "
                        "fragmentation (default 0.1)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU ranks (fp32, host memory): the layout of a gloo run")


def run(args: argparse.Namespace) -> int:
    from pretrain.config_io import ConfigError, load_config
    from pretrain.planner import GiB, Layout, format_plan, plan

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = []
    if args.nodes < 1 or args.gpus_per_node < 1:
        problems.append("--nodes and --gpus-per-node must be at least 1")
    if not 0 < args.mfu <= 1:
        problems.append(f"--mfu must be in (0, 1], got {args.mfu}")
    if not 0 <= args.headroom < 1:
        problems.append(f"--headroom must be in [0, 1), got {args.headroom}")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "gpu"
    changes = {} if args.tensor_parallel is None else {"tensor_parallel": args.tensor_parallel}
    layout = Layout.from_config(cfg, args.nodes, args.gpus_per_node, device=device, **changes)
    memory_gib = args.gpu_memory if args.gpu_memory is not None else (
        None if args.cpu else DEFAULT_GPU_MEMORY_GIB)
    tflops = args.tflops or cfg.logging.peak_tflops or (None if args.cpu else DEFAULT_PEAK_TFLOPS)
    gpu_memory = memory_gib * GiB if memory_gib else None
    p = plan(cfg, layout, gpu_memory=gpu_memory, peak_tflops=tflops, mfu=args.mfu,
             headroom=args.headroom)
    print(format_plan(cfg, p, args.config, args.mfu, tflops, gpu_memory))
    if p.problems:
        return 2
    return 1 if p.fits is False else 0
