"""`pretrain submit --dry-run` and the scripts it renders, without a cluster: the directives,
the quoting (bash itself reads the values back), arrays, config errors before submission; and
the stop request that the sbatch scripts rely on, with real signals and a real process group."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY_CONFIG, run_cli

HOSTILE = [
    "run.name=it's \"$(touch /tmp/pwned)\" ; rm -rf ~ ; `id` & $HOME | x > y",
    "run.name=new\nline; echo injected",
    "run.name=back\\slash \\\" '\\''",
    "run.name=%j %x ${SLURM_JOB_ID} !! \t tab",
]


def dry_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(["submit", *args, "--dry-run"], check=check, timeout=60)


def bash_values(script: str, *names: str, env: dict | None = None) -> dict[str, list[str]]:
    """Let bash evaluate the script's variable assignments and print the resulting values."""
    start, end = script.index("\nPYTHON="), script.index("\nlog() {")
    dump = "".join(f'printf "%s\\0" "{n}" "${{#{n}[@]}}" "${{{n}[@]}}"\n' for n in names)
    proc = subprocess.run(["bash", "-c", script[start:end] + "\n" + dump],
                          capture_output=True, env={**os.environ, **(env or {})}, check=True)
    fields, out = proc.stdout.decode().split("\0"), {}
    while fields and fields[0]:
        name, n = fields[0], int(fields[1])
        out[name], fields = fields[2:2 + n], fields[2 + n:]
    return out


def directives(script: str) -> dict[str, str | None]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line[len("#SBATCH "):].partition("=")
            out[name] = value or None
    return out


def test_dry_run_prints_a_valid_script_with_the_requested_resources(tmp_path):
    proc = dry_run("train", str(TINY_CONFIG), f"run.dir={tmp_path / 'run'}", "--nodes", "4",
                   "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj",
                   "--qos", "high", "--time", "2-00:00:00", "--constraint", "h100&ib",
                   "--exclusive", "--mail-user", "me@example.org", "--mail-type", "END,FAIL",
                   "--mem", "0", "--cpus-per-task", "12", "--signal-seconds", "300",
                   "--sbatch-arg=--reservation=big day")
    script = proc.stdout
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # parses as bash
    d = directives(script)
    assert d["--nodes"] == "4" and d["--gpus-per-node"] == "8"
    assert d["--ntasks-per-node"] == "8"  # one rank per GPU
    assert d["--cpus-per-task"] == "12" and d["--mem"] == "0"
    assert d["--partition"] == "gpu" and d["--account"] == "proj" and d["--qos"] == "high"
    assert d["--time"] == "2-00:00:00" and d["--constraint"] == '"h100&ib"'
    assert "--exclusive" in d and d["--mail-type"] == "END,FAIL"
    assert d["--signal"] == "USR1@300" and "--requeue" in d  # to the ranks: no `B:`
    assert d["--reservation"] == '"big day"'
    assert d["--output"] == f"{tmp_path}/run/slurm/pretrain-run-%j.out"
    assert d["--open-mode"] == "append"
    assert 'srun --kill-on-bad-exit=1 --label "$PYTHON" -m pretrain.train' in script
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_cpu_job_asks_for_no_gpus(tmp_path):
    d = directives(dry_run("train", str(TINY_CONFIG), f"run.dir={tmp_path}", "--nodes", "2",
                           "--gpus-per-node", "0").stdout)
    assert "--gpus-per-node" not in d and d["--ntasks-per-node"] == "1"
    d = directives(dry_run("train", str(TINY_CONFIG), f"run.dir={tmp_path}", "--nodes", "1",
                           "--ntasks-per-node", "2", "--no-requeue").stdout)
    assert d["--ntasks-per-node"] == "2" and "--no-requeue" in d


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_overrides_reach_bash_verbatim(value, tmp_path):
    config = tmp_path / "my configs $(id)" / "it's `a` config.yaml"
    config.parent.mkdir()
    config.write_text(f"defaults:\n  - {TINY_CONFIG}\n")
    run_dir = tmp_path / "run dir \"q\" 'a' $HOME %j"
    script = dry_run("train", str(config), value, f"run.dir={run_dir}", "--nodes", "1").stdout
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    got = bash_values(script, "CONFIG", "OVERRIDES")
    assert got["CONFIG"] == [str(config)]
    assert got["OVERRIDES"] == [value, f"run.dir={run_dir}"]
    # directives: the output path keeps its quotes, `%` of the directory is not a pattern
    out = directives(script)["--output"]
    assert out.startswith('"') and "%%j/slurm/" in out and out.endswith('-%j.out"')


def test_values_an_sbatch_directive_cannot_carry_are_refused(tmp_path):
    proc = dry_run("train", str(TINY_CONFIG), f"run.dir={tmp_path}", "--nodes", "1",
                   "--job-name", "two\nlines", check=False)
    assert proc.returncode == 2 and "newline" in proc.stderr


def test_config_errors_are_reported_before_anything_is_submitted(tmp_path):
    # the batch rule is checked for the job's world size: 2 nodes x 4 GPUs = 8 ranks
    proc = run_cli(["submit", "train", str(TINY_CONFIG), f"run.dir={tmp_path / 'r'}",
                    "train.global_batch_size=16", "train.micro_batch_size=4",
                    "--nodes", "2", "--gpus-per-node", "4"], check=False,
                   env={"PATH": "/nonexistent"})  # sbatch unreachable: never called
    assert proc.returncode == 2
    assert "train.global_batch_size" in proc.stderr and "data-parallel size 8" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_without_sbatch_the_saved_script_is_named(tmp_path):
    proc = run_cli(["submit", "train", str(TINY_CONFIG), f"run.dir={tmp_path / 'r'}",
                    "--nodes", "1"], check=False, env={"PATH": "/nonexistent"})
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr
    saved = list((tmp_path / "r" / "slurm").glob("train-*.sbatch"))
    assert len(saved) == 1 and str(saved[0]) in proc.stderr


def test_array_tasks_get_their_own_overrides_and_run_dirs(tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# lr sweep\noptim.lr=1e-3\n\n'run.name=two words' optim.lr=3e-3\n")
    script = dry_run("train", str(TINY_CONFIG), f"run.dir={tmp_path / 'sw'}", "--nodes", "1",
                     "--array-overrides", str(sweep), "--array-parallel", "1").stdout
    d = directives(script)
    assert d["--array"] == "0-1%1" and d["--output"].endswith("pretrain-sw-%A_%a.out")
    for task, expected in [("0", ["optim.lr=1e-3", f"run.dir={tmp_path / 'sw' / '0'}"]),
                           ("1", ["run.name=two words", "optim.lr=3e-3",
                                  f"run.dir={tmp_path / 'sw' / '1'}"])]:
        got = bash_values(script, "OVERRIDES", env={"SLURM_ARRAY_TASK_ID": task})
        assert got["OVERRIDES"] == [f"run.dir={tmp_path / 'sw'}", *expected]
    # tasks sharing a run directory would resume each other's checkpoints
    sweep.write_text(f"optim.lr=1e-3 run.dir={tmp_path}/x\noptim.lr=2e-3 run.dir={tmp_path}/x\n")
    proc = dry_run("train", str(TINY_CONFIG), "--nodes", "1", "--array-overrides", str(sweep),
                   check=False)
    assert proc.returncode == 2 and "array tasks 0 and 1 share run.dir" in proc.stderr


def test_prepare_job_starts_ray_on_every_node(tmp_path):
    script = dry_run("prepare", str(TINY_CONFIG), f"run.dir={tmp_path}", "--nodes", "3",
                     "--cpus-per-task", "16", "--force").stdout
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    d = directives(script)
    assert d["--nodes"] == "3" and d["--ntasks-per-node"] == "1" and d["--cpus-per-task"] == "16"
    assert "ray-node --head" in script and "--nodes=2 --ntasks=2" in script
    assert "export RAY_AUTH_MODE=token" in script
    assert '"data.ray_address=$RAY_ADDRESS_" --force' in script


def test_accelerate_config_is_generated_from_ours(tmp_path):
    out = tmp_path / "acc.yaml"
    run_cli(["accelerate-config", str(TINY_CONFIG), "train.device=cpu", "--nodes", "2",
             "--nproc-per-node", "4", "--main-ip", "10.0.0.1", "--output", str(out)])
    acc = yaml.safe_load(out.read_text())
    assert acc["num_machines"] == 2 and acc["num_processes"] == 8
    assert acc["distributed_type"] == "MULTI_GPU" and acc["use_cpu"] is True
    assert acc["main_process_ip"] == "10.0.0.1" and acc["mixed_precision"] == "no"


# ---- the stop request -------------------------------------------------------------------

def test_a_signal_only_sets_the_flag():
    from pretrain.stop import StopRequest

    stop = StopRequest().install()
    try:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert stop.signum == signal.SIGUSR1
        import torch

        assert stop.agreed(torch.device("cpu")) == signal.SIGUSR1  # no process group: local
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


AGREE = r"""
import os, signal, sys, torch, torch.distributed as dist
from pretrain.stop import StopRequest
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank,
                        world_size=2)
stop = StopRequest().install()
answers = [stop.agreed(torch.device("cpu"))]    # nobody signalled
if rank == 1:
    os.kill(os.getpid(), signal.SIGUSR1)        # only rank 1 is told to stop
answers.append(stop.agreed(torch.device("cpu")))
print(answers, flush=True)
dist.destroy_process_group()
"""


def test_ranks_agree_on_a_stop_that_only_one_of_them_received():
    from launch.env import free_port

    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(r), port], env=env,
                              stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [f"[None, {int(signal.SIGUSR1)}]\n"] * 2
