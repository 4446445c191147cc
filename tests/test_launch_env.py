"""launch/env.py: the launch environment of a plain process, torchrun and the deepspeed launcher,
and a clear error naming the variable for every inconsistent one."""

from __future__ import annotations

import socket

import pytest

from launch.env import DistEnv, LaunchEnvError, free_port, read_dist_env

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
