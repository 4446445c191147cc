"""sbatch scripts from the templates in slurm/: options, rendering, submission.

`pretrain submit train|prepare` (pretrain/cli_submit.py) builds a `JobSpec`, `render` fills the
template `slurm/<kind>.sbatch.j2` (Jinja2), `write_script` saves it under <run.dir>/slurm/ and
`submit` hands it to sbatch. The saved script is complete: `sbatch <script>` submits it again.

Quoting: every value that reaches the shell part of a script goes through `shlex.quote` (the `q`
filter); values in `#SBATCH` lines are double-quoted with `\\` and `"` escaped, which is the
quoting sbatch's own directive parser understands. Newlines and NUL bytes cannot be quoted in a
directive and are refused. `%` in paths is doubled (sbatch expands `%j`, `%x`, ... in file names).
"""

from __future__ import annotations

import datetime as _dt
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OPTION = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*$")


class SubmitError(ValueError):
    """A job that cannot be rendered or submitted as asked; the message says what to change."""


@dataclass
class Resources:
    """What the job asks Slurm for; None leaves the cluster's default."""

    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None
    """Ranks per node: default gpus_per_node (one rank per GPU), or 1 without GPUs."""
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    mail_user: str | None = None
    mail_type: str | None = None
    extra: list[str] = field(default_factory=list)
    """Further sbatch options, each `--name=value` or `--flag`."""

    @property
    def tasks_per_node(self) -> int:
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node or 1

    def problems(self) -> list[str]:
        out = []
        if self.nodes < 1:
            out.append(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            out.append(f"--gpus-per-node must be 0 or more, got {self.gpus_per_node}")
        if self.ntasks_per_node is not None and self.ntasks_per_node < 1:
            out.append(f"--ntasks-per-node must be at least 1, got {self.ntasks_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            out.append(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        for opt in self.extra:
            name = opt.split("=", 1)[0]
            if not _OPTION.match(name):
                out.append(f"--sbatch-arg {opt!r}: expected --name=value or --flag")
        return out


@dataclass
class JobSpec:
    kind: str
    """Template name: `train` or `prepare` (slurm/<kind>.sbatch.j2)."""
    config: Path
    overrides: list[str]
    run_dir: Path
    """Where the script and the logs go (<run_dir>/slurm/)."""
    resources: Resources
    job_name: str
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=dict)
    setup: str = ""
    """Shell lines run before anything else (module load, conda activate): the user's own shell,
    included as written."""
    signal_seconds: int = 120
    requeue: bool = True
    max_requeues: int = 20
    launcher: str = "srun"
    """`srun`: one task per rank; `accelerate`: one `accelerate launch` per node."""
    array_overrides: list[list[str]] = field(default_factory=list)
    """Per array task, the overrides added to `overrides` (one sbatch array task each)."""
    array_parallel: int | None = None
    cli_args: list[str] = field(default_factory=list)
    """Options after the config and overrides (`--force` for prepare)."""
    accelerate_config: Path | None = None
    """Where the generated accelerate config is (launcher `accelerate`)."""
    accelerate_yaml: str = ""

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def log_pattern(self) -> str:
        return f"{file_slug(self.job_name)}-{'%A_%a' if self.array_overrides else '%j'}.out"

    def log_path(self, job_id: str) -> Path:
        """The log of a submitted job (of its first task for an array)."""
        name = self.log_pattern.replace("%A_%a", f"{job_id}_0").replace("%j", job_id)
        return self.log_dir / name


_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def _directive_value(value: str, what: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise SubmitError(f"{what} {value!r} contains a newline or NUL byte, which an #SBATCH "
                          "line cannot carry")
    if _PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def file_slug(name: str) -> str:
    """`name` reduced to characters that are safe and readable in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[:48].rstrip("_.") or "job"


def _path_value(path: Path) -> str:
    return str(path).replace("%", "%%")  # sbatch expands %j, %x, ... in file names


def sbatch_lines(spec: JobSpec) -> list[str]:
    """The #SBATCH directives of a job (without the `#SBATCH ` prefix)."""
    r = spec.resources
    opts: list[tuple[str, str | None]] = [
        ("job-name", spec.job_name),
        ("nodes", str(r.nodes)),
        ("ntasks-per-node", str(1 if spec.kind == "prepare" or spec.launcher == "accelerate"
                                else r.tasks_per_node)),
        ("chdir", str(spec.workdir)),
        ("output", f"{_path_value(spec.log_dir)}/{spec.log_pattern}"),
        ("open-mode", "append"),  # a requeued job appends to the same log
    ]
    if r.gpus_per_node:
        opts.append(("gpus-per-node", str(r.gpus_per_node)))
    if spec.kind == "prepare" or spec.launcher == "accelerate":
        # one task per node starts the node's processes; give it the node's CPUs
        cpus = (r.cpus_per_task or 0) * r.tasks_per_node
        if cpus:
            opts.append(("cpus-per-task", str(cpus)))
    elif r.cpus_per_task:
        opts.append(("cpus-per-task", str(r.cpus_per_task)))
    for name in ("mem", "time", "partition", "account", "qos", "constraint", "mail_user",
                 "mail_type"):
        value = getattr(r, name)
        if value is not None:
            opts.append((name.replace("_", "-"), str(value)))
    if r.exclusive:
        opts.append(("exclusive", None))
    if spec.kind == "train":
        # SIGUSR1 to every rank (not to the batch shell: no `B:`) this long before the limit
        opts.append(("signal", f"USR1@{spec.signal_seconds}"))
        opts.append(("requeue" if spec.requeue else "no-requeue", None))
    if spec.array_overrides:
        last = len(spec.array_overrides) - 1
        throttle = f"%{spec.array_parallel}" if spec.array_parallel else ""
        opts.append(("array", f"0-{last}{throttle}"))
    for extra in r.extra:
        name, eq, value = extra.partition("=")
        opts.append((name[2:], value if eq else None))
    return [f"--{name}" if value is None else f"--{name}={_directive_value(value, '--' + name)}"
            for name, value in opts]


def render(spec: JobSpec, script_path: Path) -> str:
    """The sbatch script of `spec` from slurm/<kind>.sbatch.j2."""
    import jinja2

    problems = spec.resources.problems()
    for key in spec.env:
        if not _ENV_NAME.match(key):
            problems.append(f"--env {key!r}: not a shell variable name")
    if not 1 <= spec.signal_seconds <= 65535:
        problems.append(f"--signal-seconds must be in [1, 65535] (Slurm's range), got "
                        f"{spec.signal_seconds}")
    if spec.launcher not in ("srun", "accelerate"):
        problems.append(f"--launcher must be srun or accelerate, got {spec.launcher!r}")
    if problems:
        raise SubmitError("cannot submit:\n  " + "\n  ".join(problems))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False,
        comment_start_string="{##", comment_end_string="##}",  # bash has ${#array[@]}
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    env.filters["words"] = lambda vs: " ".join(shlex.quote(str(v)) for v in vs)
    template = env.get_template(f"{spec.kind}.sbatch.j2")
    return template.render(
        spec=spec, r=spec.resources, sbatch_lines=sbatch_lines(spec), script_path=script_path,
        created=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )


def script_path_for(spec: JobSpec) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return spec.log_dir / f"{spec.kind}-{stamp}.sbatch"


def write_script(spec: JobSpec) -> tuple[Path, str]:
    path = script_path_for(spec)
    text = render(spec, path)
    spec.log_dir.mkdir(parents=True, exist_ok=True)  # sbatch needs the log directory to exist
    path.write_text(text)
    path.chmod(0o755)
    return path, text


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: submit from a machine with the Slurm "
                          f"client commands, or submit the saved script there: {script}")
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script} (exit {proc.returncode}):\n"
                          + (proc.stderr or proc.stdout).strip())
    return proc.stdout.strip().split(";")[0]
