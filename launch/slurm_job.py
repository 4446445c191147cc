"""Helpers that run inside a Slurm job; the sbatch scripts of slurm/ call them.

    python -m launch.slurm_job master-addr    address of the job's first node (rank 0, Ray head)
    python -m launch.slurm_job port           the job's rendezvous port (from the job id)
    python -m launch.slurm_job ray-node --head --port P        start the Ray head, block
    python -m launch.slurm_job ray-node --address HOST:PORT    start a Ray worker, block
    python -m launch.slurm_job ray-wait --address HOST:PORT --nodes N [--timeout S]

A node's address is its NodeAddr in Slurm's node table (`scontrol show node`): node names need
not resolve (several slurmd on one host, or names that differ from the hosts' DNS names), the
NodeAddr is what Slurm itself connects to. Without scontrol the name is used as is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time

from launch.env import LaunchEnvError, port_for_job
from launch.hostlist import expand_hostlist, expand_tasks_per_node


def _need(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise LaunchEnvError(f"{name} is not set: this command runs inside a Slurm job")
    return value


def node_addr(node: str) -> str:
    """NodeAddr of a node from `scontrol show node -o NODE`, else the name itself."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return node
    proc = subprocess.run([scontrol, "show", "node", "-o", node], capture_output=True,
                          text=True)
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", proc.stdout)
    return m.group(1) if proc.returncode == 0 and m else node


def first_node() -> str:
    return expand_hostlist(_need("SLURM_JOB_NODELIST"))[0]


def job_cpus_on_node(node: str) -> int | None:
    """CPUs the job holds on `node` (SLURM_JOB_CPUS_PER_NODE, `2(x3),1`, in node-list order);
    a step's own SLURM_CPUS_ON_NODE counts only the step's share."""
    per_node = os.environ.get("SLURM_JOB_CPUS_PER_NODE", "")
    try:
        counts = expand_tasks_per_node(per_node) if per_node else []
        hosts = expand_hostlist(_need("SLURM_JOB_NODELIST"))
    except ValueError:
        return None
    if node in hosts and len(counts) == len(hosts):
        return counts[hosts.index(node)]
    return None


def job_port() -> int:
    job = _need("SLURM_JOB_ID")
    try:
        return port_for_job(int(job))
    except ValueError:
        raise LaunchEnvError(f"SLURM_JOB_ID={job!r} is not an integer") from None


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
            time.sleep(0.5)


def ray_node(head: bool, port: int | None, address: str | None, timeout: float) -> None:
    """exec `ray start --block` for this node, bound to its Slurm address."""
    me = node_addr(_need("SLURMD_NODENAME"))
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.access(ray, os.X_OK):
        ray = shutil.which("ray") or "ray"
    cmd = [ray, "start", "--block", "--disable-usage-stats", f"--node-ip-address={me}"]
    cpus = job_cpus_on_node(_need("SLURMD_NODENAME"))
    if cpus:
        cmd.append(f"--num-cpus={cpus}")
    if head:
        # No dashboard: it would accept jobs (arbitrary code) from anyone who reaches it.
        cmd += ["--head", f"--port={port}", "--include-dashboard=false",
                "--dashboard-host=127.0.0.1"]
    else:
        host, _, head_port = address.rpartition(":")
        wait_for_port(host, int(head_port), timeout)
        cmd.append(f"--address={address}")
    print(f"[ray] {os.environ.get('SLURMD_NODENAME')}: {' '.join(cmd[1:])}", flush=True)
    os.execv(cmd[0], cmd)


def ray_wait(address: str, nodes: int, timeout: float) -> None:
    """Return when `nodes` Ray nodes are alive (raise TimeoutError after `timeout`)."""
    import logging

    host, _, port = address.rpartition(":")
    wait_for_port(host, int(port), timeout)
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= nodes:
                cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
                addrs = sorted(n["NodeManagerAddress"] for n in alive)
                print(f"[ray] cluster up: {len(alive)} nodes ({', '.join(addrs)}), "
                      f"{cpus:g} CPUs", flush=True)
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(alive)} of {nodes} Ray nodes joined {address} "
                                   f"within {timeout:.0f} s")
            time.sleep(1)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm_job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("master-addr", help="address of the job's first node")
    sub.add_parser("port", help="rendezvous port of this job")
    node = sub.add_parser("ray-node", help="start a Ray node here (blocks)")
    node.add_argument("--head", action="store_true")
    node.add_argument("--port", type=int)
    node.add_argument("--address", help="HOST:PORT of the head (workers)")
    node.add_argument("--timeout", type=float, default=300)
    wait = sub.add_parser("ray-wait", help="wait for the Ray nodes to join")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    try:
        if args.command == "master-addr":
            print(node_addr(first_node()))
        elif args.command == "port":
            print(job_port())
        elif args.command == "ray-node":
            if args.head == (args.address is not None) or (args.head and args.port is None):
                parser.error("ray-node needs either --head --port P or --address HOST:PORT")
            ray_node(args.head, args.port, args.address, args.timeout)
        else:
            ray_wait(args.address, args.nodes, args.timeout)
    except (LaunchEnvError, TimeoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
