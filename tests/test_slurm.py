"""Slurm on a real cluster: munged, slurmctld and two slurmd (nodes n1, n2) on this machine,
started by slurm/testing/start_cluster.sh for this module and stopped after it.

Jobs are submitted the way a user does (`pretrain submit ...`), train 2-rank CPU models across
both nodes, are stopped with `scancel --signal=USR1`, requeue themselves and resume; the
losses are compared step by step with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_CONFIG, losses_by_step, run_cli, train_records
from slurm_cluster import job_log, missing_tools, start_cluster, stop_cluster, submitted_job_id

pytestmark = pytest.mark.slow

STEPS = 300  # ~20 ms each: long enough to signal a run mid-way
HOSTILE = "it's \"$(touch {s}1)\" ; touch {s}2 ; `touch {s}3` & $HOME | x>{s}4"


@pytest.fixture(scope="module")
def cluster():
    missing = missing_tools()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): `make test` "
                    "installs slurmctld, slurmd, slurm-client and munge with apt-get as root")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmctld and slurmd as root (SlurmUser=root)")
    c = start_cluster()
    yield c
    stop_cluster(c)


def overrides(data_dir, run_dir, *extra) -> list[str]:
    # dropout and a DataLoader worker: the resumed losses depend on RNG and loader state, and
    # the worker (which gets Slurm's signals too) must survive SIGUSR1
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", f"train.max_steps={STEPS}",
            "train.log_interval=1", "logging.progress=false", "logging.tensorboard=false",
            "train.micro_batch_size=4", "train.eval_interval=0", "model.dropout=0.1",
            "data.num_workers=1", "checkpoint.interval=100", "checkpoint.keep_last=2", *extra]


def submit(cluster, *args: str, check: bool = True):
    return run_cli(["submit", *args], env=cluster.env, check=check, timeout=120)


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in train_records(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def reference(cluster, tiny_data, tmp_path_factory):
    """An uninterrupted 2-node run, submitted with a config path and values that would break
    or inject into a script that did not quote them."""
    base = tmp_path_factory.mktemp("ref")
    cfg_dir = base / "my configs $HOME"
    cfg_dir.mkdir()
    config = cfg_dir / "run 'one'.yaml"
    config.write_text(f"defaults:\n  - {TINY_CONFIG}\n")
    run_dir = base / "run dir 'a' \"b\" $HOME %j"
    name = HOSTILE.format(s=base / "pwned")
    proc = submit(cluster, "train", str(config), *overrides(tiny_data, run_dir),
                  f"run.name={name}", "--nodes", "2", "--gpus-per-node", "0")
    job = submitted_job_id(proc.stdout)
    info = cluster.wait(job)
    log = job_log(proc.stdout)
    return {"job": job, "info": info, "log": log, "run_dir": run_dir, "name": name,
            "base": base, "stdout": proc.stdout}


def test_two_node_cpu_job_trains_and_its_loss_falls(reference):
    log = reference["log"].read_text()
    assert reference["info"]["JobState"] == "COMPLETED", log[-3000:]
    assert "2 node(s) x 1 rank(s)" in log and "world 2 (tp 1 x dp 2)" in log
    assert "training finished at step 300" in log
    losses = train_losses(reference["run_dir"])
    assert len(losses) == STEPS
    assert sum(losses[-20:]) / 20 < 0.9 * sum(losses[:20]) / 20
    val = [r["val_loss"] for r in train_records(reference["run_dir"]) if "val_loss" in r]
    assert len(val) == 2 and val[1] < 0.9 * val[0]  # before the first step, after the last
    records = [r for r in train_records(reference["run_dir"]) if "loss" in r]
    assert all(r["restart_count"] == 0 for r in records)
    # both ranks printed under their label: rank 0 (on n1) and rank 1 (on n2) ran
    assert any(line.startswith("0: ") for line in log.splitlines())
    assert any(line.startswith("1: ") for line in log.splitlines())


def test_hostile_values_reach_the_run_verbatim_and_inject_nothing(reference):
    run_dir, base = reference["run_dir"], reference["base"]
    assert reference["info"]["JobState"] == "COMPLETED"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["name"] == reference["name"]
    assert saved["run"]["dir"] == str(run_dir)
    assert not list(base.glob("pwned*")), "a value was executed by the job script"
    # the script was saved in the run directory and the log landed there (`%` not expanded)
    assert len(list((run_dir / "slurm").glob("train-*.sbatch"))) == 1
    assert reference["log"].parent == run_dir / "slurm" and reference["log"].is_file()


def test_preemption_at_random_moments_and_during_a_save_loses_nothing(cluster, tiny_data,
                                                                      reference, tmp_path):
    """One job, interrupted three times (three trials; the moments are seeded and printed):

    1. `scancel --signal=USR1` at a random step (what Slurm sends before the time limit): the
       ranks agree on a step, save there and exit; the job requeues itself.
    2. `scontrol requeue` at a random step of the second run: what preemption with requeue
       does, SIGTERM to every process of the job (SIGKILL after KillWait), then the job goes back
       to the queue. The ranks save the same way.
    3. `scontrol requeue` while the checkpoint of step 200 is being written (the fault
       slow_save holds it 4 s before its COMPLETE marker): the save completes and is the one
       resumed from.

    Every step, before and after each requeue, has the loss of the uninterrupted run, and the
    audit shows each sample position served exactly once with nothing replayed."""
    from data_pipeline.audit import check_exactly_once
    from data_pipeline.format import Manifest

    rng = random.Random(4242)
    usr1_at, term_at = rng.randint(20, 90), rng.randint(110, 180)
    print(f"USR1 at step >= {usr1_at}, requeue at step >= {term_at}, requeue during the save "
          "of step 200")
    run_dir = tmp_path / "run"
    proc = submit(cluster, "train", str(TINY_CONFIG),
                  *overrides(tiny_data, run_dir, "data.audit=true"), "--nodes", "2",
                  "--signal-seconds", "60", "--env", "PRETRAIN_FAULTS=slow_save:seconds=4,step=200")
    job = submitted_job_id(proc.stdout)
    ckpt = run_dir / "checkpoints" / "step-00000200"

    def wait(what: str, done) -> None:
        deadline = time.monotonic() + 240
        while not done():
            assert time.monotonic() < deadline, f"the job never got to {what}"
            assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING", "REQUEUED",
                                                    "COMPLETING"), cluster.diagnostics(job)
            time.sleep(0.1)

    def reached(step: int, restart: int):
        return lambda: any(r["step"] >= step and r["restart_count"] == restart
                           for r in train_records_so_far(run_dir))

    wait(f"step {usr1_at}", reached(usr1_at, 0))
    cluster.run("scancel", "--signal=USR1", job)
    wait(f"step {term_at} after a requeue", reached(term_at, 1))
    cluster.run("scontrol", "requeue", job)
    wait("the save of step 200", lambda: ckpt.is_dir() and not (ckpt / "COMPLETE").exists())
    cluster.run("scontrol", "requeue", job)
    info = cluster.wait(job, timeout=300)
    log = job_log(proc.stdout).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:] + cluster.diagnostics(job)
    assert info["Restarts"] == "3", log[-3000:]

    stops = [(line.split("] ")[1].split()[0], int(line.split("after step ")[1].split()[0]))
             for line in log.splitlines() if "received: stopping after step" in line]
    print(f"stopped by {stops}")
    assert [s for s, _ in stops] == ["SIGUSR1", "SIGTERM", "SIGTERM"], log[-3000:]
    assert stops[0][1] >= usr1_at and stops[1][1] >= term_at and stops[2][1] == 200
    assert f"stopped at step {stops[0][1]} by SIGUSR1 with a checkpoint: requeueing" in log
    assert "pauses 4.0 s before COMPLETE" in log  # the third requeue came during that pause
    for attempt, (_, step) in enumerate(stops, 1):
        assert f"resumed from step {step}" in log and f"Slurm restart {attempt}" in log
    assert "training finished at step 300" in log
    # every step, before and after each requeue, has the loss of the uninterrupted run
    expected, got = losses_by_step(reference["run_dir"]), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step
    restarts = {r["step"]: r["restart_count"] for r in train_records(run_dir) if "loss" in r}
    for attempt, (_, step) in enumerate(stops):
        assert restarts[step] == attempt and restarts[step + 1] == attempt + 1
    report = check_exactly_once(run_dir / "audit", Manifest.load(tiny_data), STEPS * 2 * 4)
    assert report.replayed == 0  # each run resumed exactly where the previous one stopped


def train_records_so_far(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # not a line being written
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_two_node_checkpoint_resumes_as_one_node_job_under_accelerate(cluster, reference,
                                                                     tiny_data, tmp_path):
    """The reference run's step-200 checkpoint (2 nodes x 1 rank) continues on 1 node x 2 ranks
    started by `accelerate launch` with the config generated from ours."""
    run_dir = tmp_path / "one node"
    shutil.copytree(reference["run_dir"], run_dir, ignore=shutil.ignore_patterns("slurm"))
    shutil.rmtree(run_dir / "checkpoints" / "step-00000300")
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= 200]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    proc = submit(cluster, "train", str(TINY_CONFIG), *overrides(tiny_data, run_dir),
                  "--nodes", "1", "--ntasks-per-node", "2", "--launcher", "accelerate")
    job = submitted_job_id(proc.stdout)
    info = cluster.wait(job)
    log = job_log(proc.stdout).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:] + cluster.diagnostics(job)
    assert "resumed from step 200" in log and "world 2 (tp 1 x dp 2)" in log
    acc = yaml.safe_load((run_dir / "slurm" / "accelerate_config.yaml").read_text())
    assert acc["num_machines"] == 1 and acc["num_processes"] == 2
    expected, got = losses_by_step(reference["run_dir"]), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(201, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step


def test_prepare_job_runs_ray_across_both_nodes(cluster, tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data_dir = tmp_path / "data"
    proc = submit(cluster, "prepare", str(TINY_CONFIG), f"data.dir={data_dir}",
                  f"data.sources=[{stdlib / 'json'},{stdlib / 'argparse.py'}]",
                  f"run.dir={tmp_path / 'run'}", "--nodes", "2", "--cpus-per-task", "2")
    job = submitted_job_id(proc.stdout)
    info = cluster.wait(job)
    log = job_log(proc.stdout).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:] + cluster.diagnostics(job)
    assert "cluster up: 2 nodes" in log
    assert "--head" in log and "--address=" in log  # a head on n1, a worker on n2
    assert f"prepared {data_dir}" in log and "on 4 CPUs" in log  # 2 CPUs of each node
    assert (data_dir / "manifest.json").is_file()
    assert "--include-dashboard=false" in log
    # the Ray nodes of this job (head port and worker address from the job id) ended with it
    port = 20000 + int(job) % 10000
    left = subprocess.run(["pgrep", "-f", f"ray start .*(--port={port}|:{port})"],
                          capture_output=True, text=True)
    assert left.stdout == ""


def test_array_tasks_get_their_overrides_and_a_bad_config_fails_fast(cluster, tiny_data,
                                                                     tmp_path):
    """Two array tasks, each pointing at a data directory that was never prepared: each fails
    within seconds, exit 2, with rank 0's error naming its own directory in its own log."""
    tasks = tmp_path / "sweep.txt"
    missing = [tmp_path / "no data 0", tmp_path / "no data 1"]
    tasks.write_text("# one line per task\n"
                     f"'data.dir={missing[0]}' optim.lr=0.001\n"
                     f"'data.dir={missing[1]}' optim.lr=0.002\n")
    proc = submit(cluster, "train", str(TINY_CONFIG), *overrides(tiny_data, tmp_path / "sweep"),
                  "--nodes", "1", "--ntasks-per-node", "2", "--array-overrides", str(tasks))
    job = submitted_job_id(proc.stdout)
    t0 = time.monotonic()
    for i in range(2):
        info = cluster.wait(f"{job}_{i}", timeout=120)
        log = (tmp_path / "sweep" / "slurm" / f"pretrain-sweep-{job}_{i}.out").read_text()
        # exit 2 (setup error), or 143 when srun ended rank 0 before it had exited by itself
        assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", \
            log[-3000:] + cluster.diagnostics(job)
        rank0 = [line for line in log.splitlines() if line.startswith("0: error:")]
        assert rank0 and str(missing[i]) in "\n".join(rank0), log[-3000:]
        # the same error once, from rank 0
        assert not any(line.startswith("1: error:") for line in log.splitlines())
        assert "error: training failed (exit" in log
        saved = (tmp_path / "sweep" / str(i))
        assert not (saved / "checkpoints").exists()
    assert time.monotonic() - t0 < 90


def wait_for_steps(cluster, job: str, run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").is_file() or len(train_losses(run_dir)) < steps:
        assert time.monotonic() < deadline, "the job did not start training"
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)


def rank_pid(job: str, rank: int) -> int:
    """The training process of `rank` in `job` (not its DataLoader worker, a forked child)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job}".encode() in environ
                and f"SLURM_PROCID={rank}".encode() in environ
                and b"SLURM_STEP_ID=0" in environ and parent_cmd.startswith(b"slurmstepd")):
            return int(pid)
    raise AssertionError(f"no process of rank {rank} in job {job}")


def test_scancel_makes_the_ranks_save_and_the_job_stays_cancelled(cluster, tiny_data, tmp_path):
    """SIGTERM (scancel, preemption, the time limit) also stops the ranks at a common step with
    a checkpoint, within KillWait; the job is not requeued: cancelled means cancelled."""
    run_dir = tmp_path / "run"
    proc = submit(cluster, "train", str(TINY_CONFIG), *overrides(tiny_data, run_dir),
                  "--nodes", "2")
    job = submitted_job_id(proc.stdout)
    wait_for_steps(cluster, job, run_dir, 20)
    cluster.run("scancel", job)
    info = cluster.wait(job, timeout=60)
    time.sleep(2)
    info = cluster.job(job)
    log = job_log(proc.stdout).read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", \
        log[-3000:] + cluster.diagnostics(job)
    stop_line = next(line for line in log.splitlines() if "SIGTERM received" in line)
    stopped_at = int(stop_line.split("after step ")[1].split()[0])
    ckpt = run_dir / "checkpoints" / f"step-{stopped_at:08d}"
    assert (ckpt / "COMPLETE").is_file(), log[-3000:]
    assert "the ranks stop after their current step and save" in log  # the shell waited


def test_a_rank_that_dies_fails_the_job_at_once(cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = submit(cluster, "train", str(TINY_CONFIG), *overrides(tiny_data, run_dir),
                  "--nodes", "2")
    job = submitted_job_id(proc.stdout)
    wait_for_steps(cluster, job, run_dir, 20)
    os.kill(rank_pid(job, 1), signal.SIGKILL)  # as the OOM killer would
    t0 = time.monotonic()
    info = cluster.wait(job, timeout=120)
    log = job_log(proc.stdout).read_text()
    assert info["JobState"] == "FAILED", log[-3000:] + cluster.diagnostics(job)
    assert time.monotonic() - t0 < 60  # not parallel.timeout_minutes (10) later
    assert "task 1: Killed" in log and "training failed" in log


def test_hostlist_expansion_matches_scontrol(cluster):
    from launch.hostlist import expand_hostlist

    for text in ("n[1-2]", "gpu-[01-03,7],cpu1", "r[1-2]-n[1-2]", "a[8-11]",
                 "node[098-101],login"):
        ours = expand_hostlist(text)
        theirs = cluster.run("scontrol", "show", "hostnames", text).stdout.split()
        assert ours == theirs, text
