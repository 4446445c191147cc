"""`pretrain submit` (Slurm) and `pretrain accelerate-config`: the CLI of launch/.

    pretrain submit train CONFIG [key=value ...] --nodes N [--gpus-per-node G] [options]
    pretrain submit prepare CONFIG [key=value ...] --nodes N [options]
    pretrain accelerate-config CONFIG [key=value ...] [--nodes N] --nproc-per-node P

`submit` validates the config for the job's world size, renders slurm/<kind>.sbatch.j2, saves
the script under <run.dir>/slurm/ and submits it with sbatch (`--dry-run` prints it instead).
See docs/SLURM.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from launch.sbatch import JobSpec, Resources, SubmitError, file_slug, render, script_path_for, \
    submit, write_script
from pretrain.config_io import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/gpt-default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.max_steps=20 run.dir=runs/x")


def default_python() -> str:
    """This interpreter, named through the real path of its virtualenv: a venv reached through a
    symlink is the same environment, and one spelling of its path on every node keeps JIT-built
    extensions (DeepSpeed's CPU ops) from being rebuilt for another spelling."""
    if sys.prefix != sys.base_prefix:
        python = Path(sys.prefix).resolve() / "bin" / Path(sys.executable).name
        if os.access(python, os.X_OK):
            return str(python)
    return sys.executable


def _add_resource_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (sbatch options; unset ones take the cluster's default)")
    g.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    g.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one rank each (0: CPU ranks with gloo)")
    g.add_argument("--ntasks-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank")
    g.add_argument("--mem", help="memory per node, e.g. 200G")
    g.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint", help="node features, e.g. 'h100&ib'")
    g.add_argument("--exclusive", action="store_true", help="nodes not shared with other jobs")
    g.add_argument("--mail-user")
    g.add_argument("--mail-type", help="e.g. END,FAIL,REQUEUE")
    g.add_argument("--job-name", help="default: pretrain-<run name>")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="--NAME=VALUE",
                   help="any other sbatch option (repeatable), e.g. --sbatch-arg=--reservation=x")
    j = p.add_argument_group("job script")
    j.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export this variable in the job (repeatable)")
    j.add_argument("--setup", type=Path, metavar="FILE",
                   help="shell lines to run first (module load, conda activate), as written")
    j.add_argument("--python", default=default_python(),
                   help="Python interpreter on the compute nodes (default: this one)")
    j.add_argument("--dry-run", action="store_true",
                   help="print the script instead of saving and submitting it")


def add_parsers(sub) -> None:
    """Register `submit` and `accelerate-config` on the `pretrain` subparsers."""
    s = sub.add_parser("submit", help="submit a training or preparation job to Slurm",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = s.add_subparsers(dest="kind", required=True)
    t = kinds.add_parser("train", help="multi-node training job with preemption handling")
    _add_config_args(t)
    _add_resource_args(t)
    g = t.add_argument_group("preemption and sweeps")
    g.add_argument("--signal-seconds", type=int, default=120,
                   help="Slurm sends SIGUSR1 this long before the time limit: the ranks save "
                        "a checkpoint and the job requeues itself (default 120)")
    g.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="on SIGUSR1 save and stop, but do not requeue")
    g.add_argument("--max-requeues", type=int, default=20,
                   help="stop requeueing once SLURM_RESTART_COUNT reaches this (default 20)")
    g.add_argument("--launcher", choices=["srun", "accelerate"], default="srun",
                   help="srun: one task per rank (default); accelerate: `accelerate launch` "
                        "per node")
    g.add_argument("--array-overrides", type=Path, metavar="FILE",
                   help="job array: one line per task with its own key=value overrides "
                        "(shell-quoted); tasks without run.dir get run.dir=<run.dir>/<task>")
    g.add_argument("--array-parallel", type=int, default=None, metavar="K",
                   help="run at most K array tasks at once")
    p = kinds.add_parser("prepare", help="data preparation on a Ray cluster in the allocation")
    _add_config_args(p)
    _add_resource_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the data is prepared")

    a = sub.add_parser("accelerate-config",
                       help="write an `accelerate launch` config for this run")
    _add_config_args(a)
    a.add_argument("--nodes", type=int, default=1)
    a.add_argument("--nproc-per-node", type=int, required=True)
    a.add_argument("--main-ip", help="address of the machine with rank 0 (several nodes)")
    a.add_argument("--main-port", type=int, default=29500)
    a.add_argument("--output", type=Path, help="default: <run.dir>/accelerate_config.yaml")


def _read_array_overrides(path: Path) -> list[list[str]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SubmitError(f"--array-overrides {path}: {e.strerror}") from None
    tasks, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            problems.append(f"{path}:{n}: {e}")
            continue
        bad = [w for w in words if "=" not in w]
        if bad:
            problems.append(f"{path}:{n}: {bad[0]!r} is not key=value")
        tasks.append(words)
    if not tasks and not problems:
        problems.append(f"{path} lists no array task (one line of key=value overrides each)")
    if problems:
        raise SubmitError("bad --array-overrides file:\n  " + "\n  ".join(problems))
    return tasks


def _resources(args) -> Resources:
    return Resources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
        cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
        mail_user=args.mail_user, mail_type=args.mail_type, extra=list(args.sbatch_arg),
    )


def _env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise SubmitError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def build_spec(args) -> JobSpec:
    """Validate the config (for the job's world size) and describe the job."""
    res = _resources(args)
    problems = res.problems()
    if problems:
        raise SubmitError("cannot submit:\n  " + "\n  ".join(problems))
    world = res.nodes * res.tasks_per_node if args.kind == "train" else None
    cfg = load_config(args.config, args.overrides, world_size=world)
    run_dir = Path(cfg.run.dir).expanduser().absolute()
    overrides = list(args.overrides)
    array: list[list[str]] = []
    if args.kind == "train" and args.array_overrides is not None:
        dirs: dict[Path, int] = {}
        for i, task in enumerate(_read_array_overrides(args.array_overrides)):
            if not any(o.split("=", 1)[0] == "run.dir" for o in task):
                task = [*task, f"run.dir={run_dir / str(i)}"]
            try:
                task_cfg = load_config(args.config, [*overrides, *task], world_size=world)
            except ConfigError as e:
                raise ConfigError(e.problems, f"array task {i} ({shlex.join(task)})") from None
            task_dir = Path(task_cfg.run.dir).expanduser().absolute()
            if task_dir in dirs:
                raise SubmitError(f"array tasks {dirs[task_dir]} and {i} share run.dir "
                                  f"{task_dir}: each task needs its own")
            dirs[task_dir] = i
            array.append(task)
    name = args.job_name or f"pretrain-{file_slug(cfg.run.name or run_dir.name)}"
    setup = ""
    if args.setup is not None:
        try:
            setup = args.setup.read_text().rstrip("\n")
        except OSError as e:
            raise SubmitError(f"--setup {args.setup}: {e.strerror}") from None
    spec = JobSpec(
        kind=args.kind, config=Path(args.config).absolute(), overrides=overrides,
        run_dir=run_dir, resources=res, job_name=name, python=args.python,
        env=_env(args.env), setup=setup, array_overrides=array,
    )
    if args.kind == "train":
        spec.signal_seconds, spec.requeue = args.signal_seconds, args.requeue
        spec.max_requeues, spec.launcher = args.max_requeues, args.launcher
        spec.array_parallel = args.array_parallel
        if args.launcher == "accelerate":
            spec.accelerate_config = spec.log_dir / "accelerate_config.yaml"
            spec.accelerate_yaml = _accelerate_yaml(cfg, res, args.config)
    elif args.force:
        spec.cli_args = ["--force"]
    return spec


def _accelerate_yaml(cfg, res: Resources, source) -> str:
    from launch.accelerate_config import accelerate_config_yaml

    # address and port are given per job on the accelerate command line (MASTER_ADDR/PORT)
    return accelerate_config_yaml(cfg, res.nodes, res.tasks_per_node, source=str(source))


def cmd_submit(args) -> int:
    spec = build_spec(args)
    if args.dry_run:
        print(render(spec, script_path_for(spec)), end="")
        if spec.accelerate_yaml:
            print(f"# {spec.accelerate_config}:\n" + spec.accelerate_yaml, end="")
        return 0
    script, _ = write_script(spec)
    if spec.accelerate_yaml:
        spec.accelerate_config.write_text(spec.accelerate_yaml)
    job = submit(script)
    r = spec.resources
    tasks = f" x {len(spec.array_overrides)} array tasks" if spec.array_overrides else ""
    ranks = (f"{r.nodes} node(s) x {r.tasks_per_node} rank(s)" if spec.kind == "train"
             else f"Ray on {r.nodes} node(s)")
    log = spec.log_path(job)
    print(f"submitted {spec.kind} job {job} ({ranks}{tasks})")
    print(f"  script: {shlex.quote(str(script))}")
    print(f"  log:    {shlex.quote(str(log))}")
    print(f"  follow: squeue -j {job}; tail -f {shlex.quote(str(log))}")
    if spec.kind == "train":
        print(f"  stop, save and requeue: scancel --signal=USR1 {job}    cancel: scancel {job}")
    return 0


def cmd_accelerate_config(args) -> int:
    from launch.accelerate_config import accelerate_config_yaml

    if args.nodes < 1 or args.nproc_per_node < 1:
        raise SubmitError("--nodes and --nproc-per-node must be at least 1")
    cfg = load_config(args.config, args.overrides, world_size=args.nodes * args.nproc_per_node)
    out = args.output or Path(cfg.run.dir) / "accelerate_config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(accelerate_config_yaml(cfg, args.nodes, args.nproc_per_node, args.main_ip,
                                          args.main_port, source=str(args.config)))
    print(f"wrote {out}\nlaunch with: accelerate launch --config_file {shlex.quote(str(out))} "
          f"-m pretrain.train {shlex.join([str(args.config), *args.overrides])}")
    return 0


COMMANDS = {"submit": cmd_submit, "accelerate-config": cmd_accelerate_config}
ERRORS = (SubmitError,)
