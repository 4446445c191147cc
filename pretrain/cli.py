"""The `pretrain` command.

    pretrain prepare  CONFIG [key=value ...] [--force]    raw text -> tokenizer, shards, manifest
    pretrain train    CONFIG [key=value ...] [--nproc N] [--max-restarts R]
                                                          train (N local ranks through torchrun,
                                                          restarted R times if a rank fails)
    pretrain submit   train|prepare CONFIG [key=value ...] --nodes N [...]   Slurm job
    pretrain accelerate-config CONFIG --nproc-per-node P [...]   config for `accelerate launch`
    pretrain export   CHECKPOINT --out DIR               checkpoint -> Hugging Face directory
    pretrain import   HF_DIR --out RUN_DIR               Hugging Face model -> a run to continue
    pretrain generate CHECKPOINT --prompt TEXT           sample, fill [MASK] or sentinel spans
    pretrain plan     CONFIG --nodes N --gpus-per-node G  per-GPU memory, fit, step time
    pretrain sweep    SWEEP_FILE [--local] [--dry-run]   many runs: Slurm job arrays, or here
    pretrain report   DIR...                             table and plots of a sweep's runs
    pretrain checkpoint consolidate|convert SRC ...      checkpoints of any process grid
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from pretrain import cli_launch
from pretrain.commands import COMMANDS
from pretrain.config_io import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/gpt-default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.max_steps=20 run.dir=runs/x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize and shard a corpus with Ray")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the data is prepared")
    t = sub.add_parser("train", help="pretrain a model with DeepSpeed")
    _add_config_args(t)
    t.add_argument("--nproc", type=int, default=None,
                   help="start this many local ranks with torchrun (default: this process only)")
    t.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: when a rank fails (killed, crashed), torchrun restarts "
                        "all ranks up to this many times; they resume from the latest "
                        "checkpoint (default 0: the run fails)")
    cli_launch.add_parsers(sub)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options may come anywhere among the overrides (`train CFG --nproc 2 a=1 b=2`)."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # --help, or the error for a missing/unknown command
    command, rest = commands[argv[0]], argv[1:]
    if command._subparsers is not None:  # `submit train|prepare`
        kinds = command._subparsers._group_actions[0].choices
        if not rest or rest[0] not in kinds:
            return parser.parse_args(argv)
        args = kinds[rest[0]].parse_intermixed_args(rest[1:])
        args.kind = rest[0]
    else:
        args = command.parse_intermixed_args(rest)
    args.command = argv[0]
    return args


def cmd_prepare(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from data_pipeline.prepare import prepare

    prepare(cfg, force=args.force)
    return 0


def cmd_train(args) -> int:
    from launch.env import read_dist_env

    world = args.nproc or read_dist_env().world_size  # torchrun's, srun's, or 1
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError([f"--nproc must be at least 1, got {args.nproc}"])
    load_config(args.config, args.overrides, world_size=world)  # fail here, once, not per rank
    if args.nproc is None or "RANK" in os.environ:
        from pretrain.train import main as train_main

        return train_main([args.config, *args.overrides])
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if args.max_restarts < 0:
        raise ConfigError([f"--max-restarts must be at least 0, got {args.max_restarts}"])
    cmd = [torchrun, "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}",
           "-m", "pretrain.train", args.config, *args.overrides]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    os.execv(cmd[0], cmd)  # replaces this process: signals and exit code pass straight through


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from data_pipeline.sources import DataError
    from launch.env import LaunchEnvError

    commands = {"prepare": cmd_prepare, "train": cmd_train, **cli_launch.COMMANDS,
                **{name: command.run for name, command in COMMANDS.items()}}
    try:
        return commands[args.command](args)
    except (ConfigError, DataError, LaunchEnvError, *cli_launch.ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
