"""Sweeps: many runs of one base config, one per point of a grid or list, each with its own run
directory and tag, run one after another here or as Slurm job arrays.

    pretrain sweep SWEEP_FILE [--local] [--dry-run]

A sweep file (configs/README.md, "Sweeps") names a base run config and the points:

    base: ../gpt-tiny.yaml              # relative to the sweep file
    name: lr-scaling                    # default: the file's stem
    dir: runs/sweeps/lr-scaling         # default: runs/sweeps/<name>
    overrides: {train.max_steps: 200}   # every point
    grid: {nodes: [1, 2], optim.lr: [3.0e-4, 1.0e-3]}    # every combination
    points: [{name: big, preset: models/gpt-small-cpu}]  # and/or a list (x the grid)
    slurm: {gpus_per_node: 8, time: "04:00:00", array_parallel: 4}
    local: {ranks_per_node: 1}

Point keys are dotted config keys plus `name`, `nodes`, `gpus_per_node`, `ntasks_per_node` and
`preset` (config fragments merged first, e.g. models/gpt2-small). Point i runs with the
overrides: its presets, the sweep's `overrides`, its own keys, then run.dir=<dir>/<point name>
and run.name=<sweep name>/<point name> (its tag in metrics and reports).

Every point is validated for its world size before anything runs. Re-running a sweep skips
points that finished (a complete checkpoint at train.max_steps), resumes unfinished ones from
their latest checkpoint (the trainer does that by itself in the same run.dir) and, on Slurm,
leaves points whose jobs are still queued or running alone. <dir>/sweep.json records the points
and their jobs; <run.dir>/point.json tells `pretrain report` a run's point and node count.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.format import atomic_write_text
from pretrain.config_io import ConfigError, compose_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RESERVED = ("name", "nodes", "gpus_per_node", "ntasks_per_node", "preset")
SWEEP_KEYS = ("base", "name", "dir", "overrides", "grid", "points", "slurm", "local")
SLURM_KEYS = ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task", "mem", "time",
              "partition", "account", "qos", "constraint", "exclusive", "sbatch_args", "env",
              "setup", "python", "array_parallel", "chain", "signal_seconds", "requeue",
              "max_requeues")
LOCAL_KEYS = ("ranks_per_node",)


class SweepError(ValueError):
    """A sweep file that cannot be run as written; lists every problem."""

    def __init__(self, problems: list[str], path: Path | str):
        self.problems, self.path = problems, path
        super().__init__(problems, path)

    def __str__(self) -> str:
        return f"sweep {self.path}: " + "\n  ".join(["", *self.problems]).lstrip("\n ")


@dataclass
class Point:
    name: str
    values: dict[str, Any]
    """The point's own settings as written (grid values, list entry), for names and reports."""
    overrides: list[str]
    """key=value overrides of the base config, run.dir and run.name included."""
    run_dir: Path
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None

    def ranks_per_node(self, local: bool = False, local_ranks: int | None = None) -> int:
        if local and local_ranks:
            return local_ranks
        return self.ntasks_per_node or self.gpus_per_node or 1

    def describe(self) -> dict:
        return {"name": self.name, "values": self.values, "overrides": self.overrides,
                "run_dir": str(self.run_dir), "nodes": self.nodes,
                "gpus_per_node": self.gpus_per_node, "ntasks_per_node": self.ntasks_per_node}


@dataclass
class Sweep:
    file: Path
    name: str
    base: Path
    dir: Path
    points: list[Point]
    slurm: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return self.dir / "sweep.json"


# ---------------------------------------------------------------------------------------------
# Reading a sweep file


def _value_text(value: Any) -> str:
    """An override value that config_io reads back as the same YAML value (JSON is YAML; a
    plain string stays plain where YAML would read it back unchanged)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _leaves(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _leaves(v, key + ".")
        else:
            out.append((key, v))
    return out


def _preset_overrides(entry: Any, sweep_dir: Path, problems: list[str], where: str) -> list[str]:
    """A preset (a config fragment file, relative to the sweep file or to configs/) as dotted
    overrides of every key it sets (after its own defaults)."""
    names = entry if isinstance(entry, list) else [entry]
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: preset must be a file name or a list of them, got "
                            f"{name!r}")
            continue
        found = None
        for root in (sweep_dir, CONFIGS):
            for candidate in (root / name, root / f"{name}.yaml"):
                if candidate.is_file():
                    found = candidate
                    break
            if found:
                break
        if found is None:
            problems.append(f"{where}: preset {name!r} not found next to the sweep file or "
                            f"under {CONFIGS}")
            continue
        try:
            data, _ = compose_config(found)
        except ConfigError as e:
            problems += [f"{where}: preset {name}: {p}" for p in e.problems]
            continue
        out += [f"{k}={_value_text(v)}" for k, v in _leaves(data)]
    return out


def _auto_name(values: dict[str, Any], all_keys: list[str]) -> str:
    from launch.sbatch import file_slug

    lasts = [k.rpartition(".")[2] for k in all_keys]
    parts = []
    for key, value in values.items():
        if key == "name":
            continue
        if key == "nodes":
            short = "n"
        elif key == "preset":
            names = value if isinstance(value, list) else [value]
            parts.append("+".join(Path(str(v)).stem for v in names))
            continue
        else:
            last = key.rpartition(".")[2]
            short = last if lasts.count(last) == 1 else key
        text = (f"{value:g}" if isinstance(value, float)
                else "_".join(map(str, value)) if isinstance(value, list) else str(value))
        parts.append(f"{short}{text}")
    return file_slug("-".join(parts)) if parts else ""


def _mapping(data: Any, key: str, problems: list[str]) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key}: must be a mapping, got {value!r}")
        return {}
    return value


def load_sweep(path: str | os.PathLike, *, local: bool = False) -> Sweep:
    """Read and validate a sweep file: every point's config for its world size, unique names
    and run directories. Raises SweepError listing every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepError([f"cannot read: {e.strerror}"], path) from None
    except yaml.YAMLError as e:
        raise SweepError([f"not valid YAML: {e}"], path) from None
    if not isinstance(data, dict):
        raise SweepError(["must be a mapping with base: and grid: or points:"], path)
    problems: list[str] = []
    for key in data:
        if key not in SWEEP_KEYS:
            problems.append(f"{key}: unknown key; a sweep file has {', '.join(SWEEP_KEYS)}")
    if not data.get("base"):
        problems.append("base: missing; name the run config every point starts from")
    base = (path.parent / str(data.get("base", ""))).resolve()
    if data.get("base") and not base.is_file():
        problems.append(f"base: {base} is not a file")
    name = str(data.get("name") or path.stem)
    sweep_dir = Path(data.get("dir") or Path("runs") / "sweeps" / name).expanduser().absolute()
    slurm, local_opts = _mapping(data, "slurm", problems), _mapping(data, "local", problems)
    for key in slurm:
        if key not in SLURM_KEYS:
            problems.append(f"slurm.{key}: unknown key; allowed: {', '.join(SLURM_KEYS)}")
    for key in local_opts:
        if key not in LOCAL_KEYS:
            problems.append(f"local.{key}: unknown key; allowed: {', '.join(LOCAL_KEYS)}")

    common = data.get("overrides") or {}
    if isinstance(common, list):
        common_overrides = [str(o) for o in common]
    elif isinstance(common, dict):
        common_overrides = [f"{k}={_value_text(v)}" for k, v in common.items()]
    else:
        problems.append(f"overrides: must be a mapping of key: value, got {common!r}")
        common_overrides = []
    for o in common_overrides:
        if "=" not in o:
            problems.append(f"overrides: {o!r} is not key=value")

    grid = _mapping(data, "grid", problems)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: must be a non-empty list of values, got {values!r}")
    listed = data.get("points") or [{}]
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        problems.append("points: must be a list of mappings (key: value per point)")
        listed = [{}]
    if not grid and listed == [{}]:
        problems.append("no points: give grid: (key: [values]) and/or points: (a list)")
    if problems:
        raise SweepError(problems, path)

    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    all_keys = list(dict.fromkeys([*grid, *(k for p in listed for k in p)]))
    points: list[Point] = []
    names: dict[str, int] = {}
    for i, (entry, combo) in enumerate(itertools.product(listed, combos)):
        values = {**combo, **entry}
        where = f"point {i}"
        nodes = values.get("nodes", slurm.get("nodes", 1))
        gpus = values.get("gpus_per_node", slurm.get("gpus_per_node", 0))
        tasks = values.get("ntasks_per_node", slurm.get("ntasks_per_node"))
        for key, v, least in (("nodes", nodes, 1), ("gpus_per_node", gpus, 0),
                              ("ntasks_per_node", tasks, 1)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                problems.append(f"{where}: {key} must be an integer >= {least}, got {v!r}")
        point_name = str(values.get("name") or _auto_name(values, all_keys) or f"point{i}")
        if "name" in entry and len(combos) > 1:  # a named entry of the list, at each grid point
            rest = {k: v for k, v in combo.items() if k not in entry}
            point_name = "-".join(filter(None, [point_name, _auto_name(rest, all_keys)]))
        if point_name in names:
            problems.append(f"{where} and point {names[point_name]} are both named "
                            f"{point_name!r}: give one a name:")
        names[point_name] = i
        overrides = _preset_overrides(values["preset"], path.parent, problems, where) \
            if "preset" in values else []
        overrides += common_overrides
        overrides += [f"{k}={_value_text(v)}" for k, v in values.items() if k not in RESERVED]
        run_dir = sweep_dir / point_name
        overrides += [f"run.dir={run_dir}", f"run.name={name}/{point_name}"]
        points.append(Point(point_name, values, overrides, run_dir, nodes, gpus, tasks))
    if problems:
        raise SweepError(problems, path)

    local_ranks = local_opts.get("ranks_per_node")
    for i, p in enumerate(points):
        world = p.nodes * p.ranks_per_node(local, local_ranks)
        try:
            load_config(base, p.overrides, world_size=world)
        except ConfigError as e:
            problems += [f"point {i} ({p.name}, {world} rank(s)): {q}" for q in e.problems]
    if problems:
        raise SweepError(problems, path)
    return Sweep(path.resolve(), name, base, sweep_dir, points, slurm, local_opts)


# ---------------------------------------------------------------------------------------------
# Status


def point_status(sweep: Sweep, point: Point) -> str:
    """`finished` (a complete checkpoint at train.max_steps, or with checkpoint.save_final off
    a logged step there), `unfinished` (it ran: checkpoints or metrics) or `pending`."""
    from pretrain.checkpoint import CheckpointManager
    from pretrain.metrics import read_metrics

    cfg = load_config(sweep.base, point.overrides)
    latest = CheckpointManager(point.run_dir, 1, 0, 1).latest_step()
    if latest is not None and latest >= cfg.train.max_steps:
        return "finished"
    records = read_metrics(point.run_dir)
    steps = [r["step"] for r in records if "loss" in r]
    if not cfg.checkpoint.save_final and steps and max(steps) >= cfg.train.max_steps:
        return "finished"
    return "unfinished" if latest is not None or records else "pending"


def _write_state(sweep: Sweep, jobs: dict[str, str]) -> None:
    state = {"name": sweep.name, "file": str(sweep.file), "base": str(sweep.base),
             "points": [{**p.describe(), "job": jobs.get(p.name)} for p in sweep.points]}
    sweep.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.state_path, json.dumps(state, indent=2) + "\n")


def _previous_jobs(sweep: Sweep) -> dict[str, str]:
    try:
        state = json.loads(sweep.state_path.read_text())
    except (OSError, ValueError):
        return {}
    return {p["name"]: p["job"] for p in state.get("points", []) if p.get("job")}


def _write_point(sweep: Sweep, point: Point, world: int, ranks_per_node: int) -> None:
    point.run_dir.mkdir(parents=True, exist_ok=True)
    info = {"sweep": sweep.name, "sweep_dir": str(sweep.dir), "point": point.name,
            "values": point.values, "nodes": point.nodes, "ranks_per_node": ranks_per_node,
            "world_size": world, "gpus_per_node": point.gpus_per_node}
    atomic_write_text(point.run_dir / "point.json", json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Running here, one point after another


def run_local(sweep: Sweep, dry_run: bool = False) -> int:
    """Run every point that is not finished, in order, each as `pretrain train` with
    nodes x ranks_per_node local ranks. SIGINT or SIGTERM stops the current point with a
    checkpoint (its ranks save) and ends the sweep; the same command resumes it."""
    local_ranks = sweep.local.get("ranks_per_node")
    failed: list[str] = []
    if not dry_run:
        _write_state(sweep, _previous_jobs(sweep))
    for i, point in enumerate(sweep.points):
        status = point_status(sweep, point)
        ranks = point.ranks_per_node(True, local_ranks)
        world = point.nodes * ranks
        cmd = [sys.executable, "-m", "pretrain.cli", "train", str(sweep.base), *point.overrides]
        if world > 1:
            cmd += ["--nproc", str(world)]
        head = f"[sweep] point {i + 1}/{len(sweep.points)} {point.name} ({world} rank(s))"
        if status == "finished":
            print(f"{head}: finished, skipped", flush=True)
            continue
        if dry_run:
            print(f"{head}: {status}; would run\n  {shlex.join(cmd)}", flush=True)
            continue
        print(f"{head}: {'resuming' if status == 'unfinished' else 'starting'}", flush=True)
        _write_point(sweep, point, world, ranks)
        rc, stopped_by = _run_child(cmd)
        if stopped_by:
            print(f"[sweep] {signal.Signals(stopped_by).name}: point {point.name} stopped with a "
                  f"checkpoint; run the same command to resume the sweep", flush=True)
            return 128 + stopped_by
        if rc != 0:
            print(f"[sweep] point {point.name} failed (exit {rc}); going on with the next",
                  flush=True)
            failed.append(point.name)
    if failed:
        print(f"[sweep] {len(failed)} point(s) failed: {', '.join(failed)}", flush=True)
        return 1
    if not dry_run:
        print(f"[sweep] all {len(sweep.points)} point(s) finished in {sweep.dir}\n"
              f"  report: pretrain report {shlex.quote(str(sweep.dir))}", flush=True)
    return 0


def _run_child(cmd: list[str]) -> tuple[int, int | None]:
    """Run one point; on SIGINT/SIGTERM pass SIGTERM to it (its ranks save and exit) and say
    which signal stopped it. The child has its own session, so a terminal's Ctrl-C reaches
    only this process, which turns it into the trainer's clean stop."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return rc, (received[0] if received else None)


# ---------------------------------------------------------------------------------------------
# Slurm: one job array per distinct (nodes, GPUs per node, ranks per node)


def _queued(jobs: list[str]) -> set[str]:
    """Which of these job ids (`123` or `123_4`) Slurm still has pending or running."""
    import shutil

    squeue = shutil.which("squeue")
    if not jobs or squeue is None:
        return set()
    arrays = sorted({j.split("_")[0] for j in jobs})
    proc = subprocess.run([squeue, "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)],
                          capture_output=True, text=True)
    alive = set()
    for line in proc.stdout.splitlines():
        job, _, state = line.partition(" ")
        if state.strip() in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                             "REQUEUED", "RESIZING"):
            alive.add(job.strip())
    return {j for j in jobs if j in alive}


def slurm_specs(sweep: Sweep, points: list[Point]) -> list[tuple[Any, list[Point]]]:
    """One JobSpec (launch/sbatch.py) per group of points with the same resources, in the order
    the groups first appear, each an array with one task per point."""
    from launch.sbatch import JobSpec, Resources, SubmitError, file_slug
    from pretrain.cli_launch import default_python

    s = sweep.slurm
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.nodes, p.gpus_per_node, p.ntasks_per_node), []).append(p)
    setup = ""
    if s.get("setup"):
        setup_path = (sweep.file.parent / str(s["setup"]))
        try:
            setup = setup_path.read_text().rstrip("\n")
        except OSError as e:
            raise SubmitError(f"slurm.setup {setup_path}: {e.strerror}") from None
    out = []
    for (nodes, gpus, tasks), members in groups.items():
        res = Resources(
            nodes=nodes, gpus_per_node=gpus, ntasks_per_node=tasks,
            cpus_per_task=s.get("cpus_per_task"), mem=s.get("mem"), time=s.get("time"),
            partition=s.get("partition"), account=s.get("account"), qos=s.get("qos"),
            constraint=s.get("constraint"), exclusive=bool(s.get("exclusive", False)),
            extra=[str(a) for a in s.get("sbatch_args", [])])
        spec = JobSpec(
            kind="train", config=sweep.base, overrides=[], run_dir=sweep.dir, resources=res,
            job_name=f"pretrain-sweep-{file_slug(sweep.name)}-n{nodes}",
            python=str(s.get("python") or default_python()),
            env={str(k): str(v) for k, v in (s.get("env") or {}).items()}, setup=setup,
            array_overrides=[p.overrides for p in members],
            array_parallel=s.get("array_parallel"))
        spec.signal_seconds = int(s.get("signal_seconds", 120))
        spec.requeue = bool(s.get("requeue", True))
        spec.max_requeues = int(s.get("max_requeues", 20))
        out.append((spec, members))
    return out


def submit_slurm(sweep: Sweep, dry_run: bool = False) -> int:
    """Submit every point that is neither finished nor queued, as job arrays (sbatch)."""
    from launch.sbatch import render, script_path_for, submit, write_script

    jobs = _previous_jobs(sweep)
    queued = _queued([jobs[p.name] for p in sweep.points if p.name in jobs])
    todo = []
    for p in sweep.points:
        status = point_status(sweep, p)
        if status == "finished":
            print(f"[sweep] {p.name}: finished, skipped")
        elif jobs.get(p.name) in queued:
            print(f"[sweep] {p.name}: job {jobs[p.name]} still queued or running, skipped")
        else:
            print(f"[sweep] {p.name}: {status}, "
                  f"{'to resume' if status == 'unfinished' else 'to start'}")
            todo.append(p)
    if not todo:
        print(f"[sweep] nothing to submit\n  report: pretrain report "
              f"{shlex.quote(str(sweep.dir))}")
        return 0
    previous = None
    for spec, members in slurm_specs(sweep, todo):
        if sweep.slurm.get("chain") and previous is not None:
            spec.resources.extra.append(f"--dependency=afterany:{previous}")
        if dry_run:
            print(render(spec, script_path_for(spec)))
            previous = "<previous array>"
            continue
        for p in members:
            _write_point(sweep, p, p.nodes * p.ranks_per_node(), p.ranks_per_node())
        script, _ = write_script(spec)
        job = submit(script)
        previous = job
        for i, p in enumerate(members):
            jobs[p.name] = f"{job}_{i}"
        r = spec.resources
        print(f"submitted job array {job}: {len(members)} point(s) on {r.nodes} node(s) x "
              f"{r.tasks_per_node} rank(s): {', '.join(p.name for p in members)}\n"
              f"  script: {shlex.quote(str(script))}\n"
              f"  logs:   {shlex.quote(str(spec.log_dir))}/{spec.log_pattern.replace('%A', job)}"
              .replace("%a", "<task>"))
        _write_state(sweep, jobs)
    if not dry_run:
        print(f"  follow: squeue -u $USER; when done: pretrain report "
              f"{shlex.quote(str(sweep.dir))}")
    return 0
