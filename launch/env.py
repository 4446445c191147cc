"""Where this process sits in the job: rank, local rank, world size and rendezvous address.

Read from the environment the launchers set: torchrun and the deepspeed launcher both export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The ranks per node come from
LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed launcher), else WORLD_SIZE (one node). With
neither RANK nor WORLD_SIZE the process is a single plain process (world size 1). Inconsistent
values are errors that name the variables.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


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
    """`single`, `torchrun` (also the deepspeed launcher, which sets the same variables)."""

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


def read_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """This process's place in the job, from `environ` (default: os.environ)."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single")
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
    return DistEnv(rank, local_rank, world, local_world, env["MASTER_ADDR"], port, "torchrun")
