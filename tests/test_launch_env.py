"""launch/env.py: the launch environment of a plain process, torchrun and the deepspeed launcher,
and a clear error naming the variable for every inconsistent one."""

from __future__ import annotations

import socket

import pytest

from launch.env import DistEnv, LaunchEnvError, free_port, port_for_job, read_dist_env
from launch.hostlist import HostlistError, expand_hostlist, expand_tasks_per_node

RENDEZVOUS = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_no_launcher_is_a_single_process():
    env = read_dist_env({"PATH": "/usr/bin", "LOCAL_RANK": "3"})  # LOCAL_RANK alone: no launcher
    assert env == DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single")
    assert env.is_main


def test_torchrun_environment():
    # rank 5 of 8 on two nodes of 4 (what torchrun exports)
    env = read_dist_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x", **RENDEZVOUS})
    assert env == DistEnv(5, 1, 8, 4, "10.0.0.1", 29500, "torchrun")
    assert not env.is_main


def test_deepspeed_launcher_environment():
    # the deepspeed launcher exports LOCAL_SIZE (not LOCAL_WORLD_SIZE) and CROSS_RANK/CROSS_SIZE
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                         "CROSS_RANK": "1", "CROSS_SIZE": "2", **RENDEZVOUS})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)


def test_without_local_variables_one_node_is_assumed():
    env = read_dist_env({"RANK": "2", "WORLD_SIZE": "3", **RENDEZVOUS})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (2, 2, 3, 3)
    # ranks per node known, local rank not: ranks fill nodes in order
    env = read_dist_env({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", **RENDEZVOUS})
    assert (env.local_rank, env.local_world_size) == (2, 4)


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert read_dist_env() == DistEnv(1, 1, 2, 2, "127.0.0.1", 1234, "torchrun")


@pytest.mark.parametrize("env, needle", [
    # a launch half set up: the missing variables are named
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not set"),
    ({"RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "WORLD_SIZE not set"),
    ({"WORLD_SIZE": "2", **RENDEZVOUS}, "RANK not set"),
    # values that are not integers
    ({"RANK": "zero", "WORLD_SIZE": "2", **RENDEZVOUS}, "RANK='zero' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"},
     "MASTER_PORT='http' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "", **RENDEZVOUS},
     "LOCAL_RANK='' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "two", **RENDEZVOUS},
     "LOCAL_SIZE='two' is not an integer"),
    # values that contradict each other
    ({"RANK": "0", "WORLD_SIZE": "0", **RENDEZVOUS}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "2", "WORLD_SIZE": "2", **RENDEZVOUS}, "RANK=2 is outside [0, WORLD_SIZE=2)"),
    ({"RANK": "-1", "WORLD_SIZE": "2", **RENDEZVOUS}, "RANK=-1 is outside [0, WORLD_SIZE=2)"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", **RENDEZVOUS},
     "LOCAL_RANK=2 is outside [0, WORLD_SIZE=2)"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **RENDEZVOUS},
     "LOCAL_RANK=2 is outside [0, LOCAL_WORLD_SIZE=2)"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_SIZE": "2", **RENDEZVOUS},
     "LOCAL_RANK=3 is outside [0, LOCAL_SIZE=2)"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4", **RENDEZVOUS},
     "LOCAL_WORLD_SIZE=4 is outside [1, WORLD_SIZE=2]"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0", **RENDEZVOUS},
     "LOCAL_WORLD_SIZE=0 is outside [1, WORLD_SIZE=2]"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": " ", "MASTER_PORT": "1"},
     "MASTER_ADDR is empty"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is not a TCP port"),
])
def test_inconsistent_environment_names_the_variable(env, needle):
    with pytest.raises(LaunchEnvError) as err:
        read_dist_env(env)
    assert needle in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(LaunchEnvError) as err:
        read_dist_env({"RANK": "5", "WORLD_SIZE": "2", "LOCAL_RANK": "7", **RENDEZVOUS})
    assert "RANK=5 is outside" in str(err.value) and "LOCAL_RANK=7 is outside" in str(err.value)


def test_free_port_can_be_bound():
    port = free_port()
    assert 1 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if the port were taken


# ---- Slurm: a task started by srun (one task per rank) ------------------------------------

SRUN_TASK = {  # rank 3 of 4: two nodes of two tasks, what srun exports (abridged)
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu-[07-08]", "SLURM_JOB_NODELIST": "gpu-[07-08]",
}


def test_srun_task_environment():
    env = read_dist_env({**SRUN_TASK, "SLURM_RESTART_COUNT": "2"})
    assert env == DistEnv(3, 1, 4, 2, "gpu-07", port_for_job(4242), "slurm", 2)
    # the same job id gives every task (and the requeued job) the same port
    assert port_for_job(4242) == read_dist_env({**SRUN_TASK, "SLURM_PROCID": "0",
                                                 "SLURM_LOCALID": "0",
                                                 "SLURM_NODEID": "0"}).master_port
    assert 20000 <= port_for_job(4242) < 30000 and port_for_job(4242) != port_for_job(4243)


def test_srun_task_takes_master_address_and_port_from_the_script():
    env = read_dist_env({**SRUN_TASK, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"})
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 23456)


def test_uneven_tasks_per_node():
    # 3 tasks on the first node, 1 on the second: rank 3 is the only one on node 1
    env = read_dist_env({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_LOCALID": "0"})
    assert (env.local_rank, env.local_world_size) == (0, 1)


def test_batch_shell_and_torchrun_under_srun_are_not_slurm_ranks():
    # the batch shell has SLURM_PROCID=0 and SLURM_NTASKS but is no step task: a process it
    # starts directly is a single process, not rank 0 of a world that never arrives
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    assert read_dist_env(batch).launcher == "single"
    # torchrun started by srun sets RANK: the innermost launcher wins
    env = read_dist_env({**SRUN_TASK, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                         **RENDEZVOUS})
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 1, 2)


@pytest.mark.parametrize("change, needle", [
    ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is outside [0, SLURM_STEP_NUM_TASKS=4)"),
    ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 is outside [0, 2)"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2,1"}, "adds up to 3 tasks but SLURM_STEP_NUM_TASKS=4"),
    ({"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"},
     "lists 1 nodes but SLURM_STEP_NODELIST='gpu-[07-08]' has 2"),
    ({"SLURM_NODEID": "5"}, "SLURM_NODEID=5 is outside the 2 nodes"),
    ({"SLURM_STEP_NODELIST": "gpu-[07-08"}, "unbalanced '['"),
    ({"SLURM_STEP_TASKS_PER_NODE": "two"}, "bad tasks-per-node entry 'two'"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a TCP port"),
])
def test_inconsistent_slurm_environment_names_the_variable(change, needle):
    with pytest.raises(LaunchEnvError) as err:
        read_dist_env({**SRUN_TASK, **change})
    assert needle in str(err.value)


def test_incomplete_slurm_environment_lists_what_is_missing():
    env = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_LOCALID", "SLURM_JOB_ID")}
    with pytest.raises(LaunchEnvError) as err:
        read_dist_env(env)
    assert "SLURM_LOCALID not set" in str(err.value)
    assert "SLURM_JOB_ID or SLURM_JOBID not set" in str(err.value)


@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu-[01-03,7],cpu1", ["gpu-01", "gpu-02", "gpu-03", "gpu-7", "cpu1"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("node[098-101],login", ["node098", "node099", "node100", "node101", "login"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(HostlistError):
        expand_tasks_per_node("2(x)")
