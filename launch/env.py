"""Where this process sits in the job: rank, local rank, world size and rendezvous address.

Read from the environment the launchers set: torchrun and the deepspeed launcher both export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The ranks per node come from
LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed launcher), else WORLD_SIZE (one node).

A task that `srun` started (one task per rank; SLURM_STEP_ID and SLURM_PROCID are set, RANK is
not) takes its place from Slurm: rank SLURM_PROCID, world SLURM_STEP_NUM_TASKS (or
SLURM_NTASKS), local rank SLURM_LOCALID, ranks on this node from SLURM_STEP_TASKS_PER_NODE at
SLURM_NODEID. The master is MASTER_ADDR if set (our sbatch scripts export the first node's
address), else the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST), where Slurm's
block and cyclic distributions put task 0; the port is MASTER_PORT if set, else derived from the
job id (`port_for_job`), so every task of a job computes the same one. The batch shell itself
(no SLURM_STEP_ID) is not a rank: a process started there directly is a single process.

With neither RANK nor WORLD_SIZE nor an srun task, the process is a single plain process (world
size 1). Inconsistent values are errors that name the variables.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from launch.hostlist import HostlistError, expand_hostlist, expand_tasks_per_node


class LaunchEnvError(RuntimeError):
    pass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """`single`, `torchrun` (also the deepspeed launcher, which sets the same variables) or
    `slurm` (a task started by srun)."""
    restart_count: int = 0
    """How often the job was restarted: by Slurm (SLURM_RESTART_COUNT: requeues, node
    failures) or by torchrun (TORCHELASTIC_RESTART_COUNT: `pretrain train --max-restarts`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={env[name]!r} is not an integer") from None


def free_port() -> int:
    """A TCP port on localhost that is free right now (for single-process rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_for_job(job_id: int) -> int:
    """The rendezvous port of a Slurm job: 20000-29999, a function of the job id only (the same
    on every node and after a requeue; different for neighbouring jobs and array tasks). Clear of
    Ray's default ports (10001-19999, 52365) and of Linux's ephemeral range (32768-)."""
    return 20000 + job_id % 10000


def _restart_count(env: dict[str, str]) -> int:
    return sum(_int_var(env, k) for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")
               if env.get(k))


def is_srun_task(environ: dict[str, str] | None = None) -> bool:
    """Started by srun as one task of a job step (not the batch shell, not torchrun below)."""
    env = os.environ if environ is None else environ
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def read_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """This process's place in the job, from `environ` (default: os.environ)."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" not in env and "WORLD_SIZE" not in env:
        if is_srun_task(env):
            return _read_slurm_env(env)
        return DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single", _restart_count(env))
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in required if k not in env]
    if missing:
        present = [k for k in required if k in env]
        raise LaunchEnvError(
            f"incomplete launch environment: {', '.join(missing)} not set "
            f"(but {', '.join(present)} {'is' if len(present) == 1 else 'are'}). "
            "Start training with `pretrain train CONFIG --nproc N`, torchrun or deepspeed."
        )
    rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
    port = _int_var(env, "MASTER_PORT")
    # torchrun exports LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; neither: one node.
    local_world_var = next((k for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in env), None)
    local_world = _int_var(env, local_world_var) if local_world_var else world
    local_world_name = local_world_var or "WORLD_SIZE"
    problems = []
    if world < 1:
        problems.append(f"WORLD_SIZE={world} must be at least 1")
    if not 0 <= rank < max(world, 1):
        problems.append(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if local_world < 1 or local_world > max(world, 1):
        problems.append(f"{local_world_name}={local_world} is outside [1, WORLD_SIZE={world}]")
    if "LOCAL_RANK" in env:
        local_rank = _int_var(env, "LOCAL_RANK")
        if not 0 <= local_rank < max(local_world, 1):
            problems.append(
                f"LOCAL_RANK={local_rank} is outside [0, {local_world_name}={local_world})")
    else:  # ranks fill nodes in order (what torchrun and deepspeed do)
        local_rank = rank % max(local_world, 1)
    if not env["MASTER_ADDR"].strip():
        problems.append("MASTER_ADDR is empty")
    if not 1 <= port <= 65535:
        problems.append(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    if problems:
        raise LaunchEnvError("inconsistent launch environment: " + "; ".join(problems))
    return DistEnv(rank, local_rank, world, local_world, env["MASTER_ADDR"], port, "torchrun",
                   _restart_count(env))


def _first_of(env: dict[str, str], *names: str) -> tuple[str, str] | tuple[None, None]:
    """(name, value) of the first variable set, or (None, None)."""
    for name in names:
        if env.get(name, "").strip():
            return name, env[name]
    return None, None


def _read_slurm_env(env: dict[str, str]) -> DistEnv:
    """An srun task's place: see the module docstring."""
    problems: list[str] = []

    def need(*names: str) -> tuple[str, str] | tuple[None, None]:
        name, value = _first_of(env, *names)
        if name is None:
            problems.append(f"{' or '.join(names)} not set")
        return name, value

    def integer(name: str | None) -> int | None:
        if name is None:
            return None
        try:
            return _int_var(env, name)
        except LaunchEnvError as e:
            problems.append(str(e))
            return None

    rank = integer(need("SLURM_PROCID")[0])
    world_name = need("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")[0]
    world = integer(world_name)
    local_rank = integer(need("SLURM_LOCALID")[0])
    node_id = integer(need("SLURM_NODEID")[0])
    tpn_name, tpn = need("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    nodes_name, nodelist = need("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    job_name, _ = need("SLURM_JOB_ID", "SLURM_JOBID")
    job_id = integer(job_name)
    if problems:
        raise LaunchEnvError("incomplete Slurm task environment: " + "; ".join(problems)
                             + ". Start the ranks with srun (one task per rank), or use "
                             "`pretrain submit train`.")

    per_node: list[int] = []
    hosts: list[str] = []
    try:
        per_node = expand_tasks_per_node(tpn)
    except HostlistError as e:
        problems.append(f"{tpn_name}: {e}")
    try:
        hosts = expand_hostlist(nodelist)
    except HostlistError as e:
        problems.append(f"{nodes_name}: {e}")
    if world < 1:
        problems.append(f"{world_name}={world} must be at least 1")
    elif not 0 <= rank < world:
        problems.append(f"SLURM_PROCID={rank} is outside [0, {world_name}={world})")
    if per_node and sum(per_node) != world:
        problems.append(f"{tpn_name}={tpn!r} adds up to {sum(per_node)} tasks but "
                        f"{world_name}={world}")
    if per_node and hosts and len(per_node) != len(hosts):
        problems.append(f"{tpn_name}={tpn!r} lists {len(per_node)} nodes but "
                        f"{nodes_name}={nodelist!r} has {len(hosts)}")
    local_world = 0
    if per_node and not 0 <= node_id < len(per_node):
        problems.append(f"SLURM_NODEID={node_id} is outside the {len(per_node)} nodes of "
                        f"{tpn_name}={tpn!r}")
    elif per_node:
        local_world = per_node[node_id]
        if not 0 <= local_rank < local_world:
            problems.append(f"SLURM_LOCALID={local_rank} is outside [0, {local_world}) (the "
                            f"tasks on node {node_id} by {tpn_name}={tpn!r})")
    master = env.get("MASTER_ADDR", "").strip() or (hosts[0] if hosts else "")
    port = (integer("MASTER_PORT") if env.get("MASTER_PORT", "").strip()
            else port_for_job(job_id))
    if port is not None and not 1 <= port <= 65535:
        problems.append(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    if problems:
        raise LaunchEnvError("inconsistent Slurm task environment: " + "; ".join(problems))
    return DistEnv(rank, local_rank, world, local_world, master, port, "slurm",
                   _restart_count(env))


def export_torch_env(env: DistEnv) -> None:
    """Set the variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank), LOCAL_WORLD_SIZE=str(env.local_world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
