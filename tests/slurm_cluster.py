"""A real two-node Slurm cluster for the tests: slurm/testing/start_cluster.sh and stop_cluster.sh
around a state directory, and helpers to submit jobs and wait for them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "slurm" / "testing" / "start_cluster.sh"
STOP = ROOT / "slurm" / "testing" / "stop_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")


def missing_tools() -> list[str]:
    return [t for t in DAEMONS if shutil.which(t) is None]


@dataclass
class Cluster:
    state: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.state / "slurm.conf")}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def diagnostics(self, job_id: str) -> str:
        """The daemons' log lines about a job (for assertion messages)."""
        lines = []
        for log in sorted((self.state / "log").glob("slurm*.log")):
            lines += [f"{log.name}: {line}" for line in log.read_text().splitlines()
                      if job_id.split("_")[0] in line]
        return "\n".join(lines[-40:])

    def wait(self, job_id: str, timeout: float = 180, until=None) -> dict[str, str]:
        """Wait until the job reaches a final state (or `until(info)` holds). A requeued job
        stays PENDING (reason BeginTime) until its old credential expires, 10 s on the test
        cluster (AuthInfo cred_expire in start_cluster.sh); releasing it earlier makes the
        nodes refuse it ("Job credential revoked") and the job fails."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until is not None and until(info):
                return info
            if info.get("JobState") in FINAL_STATES and until is None:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} "
                                     f"({info.get('Reason')}) after {timeout:.0f} s")
            time.sleep(0.5)


def start_cluster() -> Cluster:
    # A short path: munge's socket lives below it (unix socket paths are limited to 107 bytes).
    state = Path(tempfile.mkdtemp(prefix="pretrain-slurm-", dir="/tmp"))
    proc = subprocess.run([str(START), str(state)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        subprocess.run([str(STOP), str(state)], capture_output=True, timeout=120)
        raise RuntimeError(f"the test Slurm cluster did not start:\n{proc.stdout}\n{proc.stderr}")
    return Cluster(state)


def stop_cluster(cluster: Cluster) -> None:
    subprocess.run([str(STOP), str(cluster.state)], capture_output=True, timeout=120)
    shutil.rmtree(cluster.state, ignore_errors=True)


def submitted_job_id(stdout: str) -> str:
    m = re.search(r"submitted \w+ job (\d+)", stdout)
    assert m, f"no job id in: {stdout}"
    return m.group(1)


def job_log(stdout: str) -> Path:
    m = re.search(r"^\s+log:\s+(.*)$", stdout, re.M)
    assert m, f"no log path in: {stdout}"
    import shlex

    return Path(shlex.split(m.group(1))[0])
