"""Generated sbatch scripts are injection-proof: rendered with hostile values everywhere a user
value goes (job name, run directory, config path, working directory, interpreter path,
overrides, job-array overrides, --env values, extra arguments) and then *run* by bash from top to
bottom, with stand-ins for srun, scontrol and the Python interpreter that record the argv and
environment they receive (srun runs its command, as the real one does).

Every hostile value carries commands that would create a file in a canary directory: `$(...)`,
backticks, closing quotes followed by `;`, `&&`, `|`, `&`, newlines, process substitution.
Each test asserts that the commands received every value verbatim and that the canary directory
is still empty. The values a #SBATCH line cannot carry (newlines) are refused, tested in
test_slurm_submit.py; a real job with hostile values runs in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launch.sbatch import JobSpec, Resources, render

# ${C} is the canary directory (with a trailing slash, so that paths need no "/").
HOSTILE = [
    "$(touch ${C}p1)",
    "`touch ${C}p2`",
    "'; touch ${C}p3; echo '",
    '"; touch ${C}p4; echo "',
    "x\ntouch ${C}p5\n",
    "a;touch ${C}p6 && touch ${C}p7 | touch ${C}p8 & ",
    "${IFS}$HOME %j %x !! * ~ \\ \t $'\\x41' end",
    "<(touch ${C}p9) >(touch ${C}p10) $((1+1)) {a,b}",
]

FAKE_PYTHON = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["INJ_LOG"], "a") as log:
    log.write(json.dumps({{"argv": args, "env": {{k: os.environ.get(k) for k in
        ("MY_VAR", "OTHER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MASTER_ADDR", "MASTER_PORT")}}}})
        + "\\n")
if args[:1] == ["-c"]:
    print("f" * 64)  # the Ray token
elif args[:3] == ["-m", "launch.slurm_job", "master-addr"]:
    print("127.0.0.1")
elif args[:3] == ["-m", "launch.slurm_job", "port"]:
    print("29500")
elif "pretrain.train" in args:
    with open(os.environ["PRETRAIN_STATUS_FILE"], "w") as f:
        f.write("finished 7\\n")
"""

FAKE_SRUN = """#!/bin/bash
# Like srun: options first (all --name or --name=value here), then the command, which runs.
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""

FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo n1; echo n2 ;;
    *) exit 1 ;;
esac
"""


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def hostile(tmp_path) -> dict:
    """Paths and values with the hostile strings, the canary directory and the fake commands."""
    canary = tmp_path / "canary"
    canary.mkdir()
    values = list(HOSTILE)
    config = tmp_path / "cfg $(touch ${C}c1) `touch ${C}c2`" / "it's \"a\" ;&|.yaml"
    config.parent.mkdir()
    config.write_text("run: {}\n")
    workdir = tmp_path / "work $(touch ${C}w1) 'w'"
    workdir.mkdir()
    python = write_exe(tmp_path / "py $(touch ${C}y1) `touch ${C}y2`" / "python",
                       FAKE_PYTHON.format(python=sys.executable))
    bin_dir = tmp_path / "bin"
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    return {
        "canary": canary, "values": values, "config": config, "workdir": workdir,
        "python": python, "bin": bin_dir, "log": tmp_path / "calls.jsonl",
        "run_dir": tmp_path / "run 'a' \"b\" $(touch ${C}r1) `touch ${C}r2` %j ; & | x",
        "job_name": "name $(touch ${C}j1) `touch ${C}j2` \"q\" 'q' ;|& %x",
        "env": {"MY_VAR": values[0] + values[4], "OTHER": values[3]},
    }


def spec_of(h: dict, kind: str, **kw) -> JobSpec:
    overrides = [f"run.name={v}" for v in h["values"]] + [f"run.dir={h['run_dir']}"]
    return JobSpec(kind=kind, config=h["config"], overrides=overrides, run_dir=h["run_dir"],
                   resources=Resources(nodes=2), job_name=h["job_name"], python=str(h["python"]),
                   workdir=h["workdir"], env=h["env"], **kw)


def run_script(h: dict, spec: JobSpec, **env: str) -> list[dict]:
    """Render `spec`, check bash parses it, run it; the calls of the fake interpreter."""
    script_path = spec.log_dir / f"{spec.kind}.sbatch"
    text = render(spec, script_path)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(text)
    full_env = {"PATH": f"{h['bin']}:{os.environ['PATH']}", "HOME": str(h["canary"].parent),
                "INJ_LOG": str(h["log"]), "C": f"{h['canary']}/", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]",
                "SLURM_NODEID": "0", **env}
    proc = subprocess.run(["bash", str(script_path)], env=full_env, capture_output=True,
                          text=True, timeout=60)
    assert sorted(os.listdir(h["canary"])) == [], "a hostile value ran as a command"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "command not found" not in proc.stderr, proc.stderr
    return [json.loads(line) for line in h["log"].read_text().splitlines()]


def test_training_script_passes_every_value_verbatim(hostile):
    spec = spec_of(hostile, "train")
    calls = run_script(hostile, spec)
    train = [c for c in calls if "pretrain.train" in c["argv"]]
    assert len(train) == 1
    assert train[0]["argv"] == ["-m", "pretrain.train", str(hostile["config"]), *spec.overrides]
    assert train[0]["env"]["MY_VAR"] == hostile["env"]["MY_VAR"]
    assert train[0]["env"]["OTHER"] == hostile["env"]["OTHER"]
    assert train[0]["env"]["MASTER_ADDR"] == "127.0.0.1"


def test_accelerate_launch_passes_every_value_verbatim(hostile):
    spec = spec_of(hostile, "train", launcher="accelerate")
    spec.accelerate_config = spec.log_dir / "accelerate $(touch ${C}a1) 'c'.yaml"
    calls = run_script(hostile, spec)
    (call,) = [c for c in calls if "accelerate.commands.launch" in c["argv"]]
    assert call["argv"] == [
        "-m", "accelerate.commands.launch", "--config_file", str(spec.accelerate_config),
        "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", "29500",
        "-m", "pretrain.train", str(hostile["config"]), *spec.overrides]
    assert call["env"]["MY_VAR"] == hostile["env"]["MY_VAR"]


def test_array_task_gets_its_hostile_overrides_verbatim(hostile):
    values = hostile["values"]
    tasks = [["optim.lr=1e-3", values[0]], [values[1], f"optim.lr={values[2]}", values[4]]]
    spec = spec_of(hostile, "train", array_overrides=tasks)
    calls = run_script(hostile, spec, SLURM_ARRAY_TASK_ID="1")
    (train,) = [c for c in calls if "pretrain.train" in c["argv"]]
    assert train["argv"] == ["-m", "pretrain.train", str(hostile["config"]), *spec.overrides,
                             *tasks[1]]


def test_prepare_script_passes_values_verbatim_and_one_ray_token(hostile):
    spec = spec_of(hostile, "prepare", cli_args=["--force"])
    calls = run_script(hostile, spec)
    by_command = {tuple(c["argv"][:3]): c for c in calls}
    nodes = [c for c in calls if c["argv"][2:3] == ["ray-node"]]
    assert sorted(c["argv"][3:] for c in nodes) == [
        ["--address", "127.0.0.1:29500"], ["--head", "--port", "29500"]]
    (prepare,) = [c for c in calls if c["argv"][:3] == ["-m", "pretrain.cli", "prepare"]]
    assert prepare["argv"] == ["-m", "pretrain.cli", "prepare", str(hostile["config"]),
                               *spec.overrides, "data.ray_address=127.0.0.1:29500", "--force"]
    # Ray's token authentication: one token, made in the job, given to every Ray process.
    tokens = {c["env"]["RAY_AUTH_TOKEN"] for c in [*nodes, prepare]}
    assert tokens == {"f" * 64}
    assert {c["env"]["RAY_AUTH_MODE"] for c in [*nodes, prepare]} == {"token"}
    assert ("-m", "launch.slurm_job", "ray-wait") in by_command


def test_the_harness_catches_a_value_quoted_the_wrong_way(hostile, monkeypatch):
    """Control: with double quotes instead of shlex.quote (a common mistake), `$(...)` runs."""
    import launch.sbatch as sbatch_mod

    monkeypatch.setattr(sbatch_mod.shlex, "quote", lambda v: f'"{v}"')
    spec = spec_of(hostile, "train")
    spec.overrides = ["run.name=$(touch ${C}p1)"]
    with pytest.raises(AssertionError, match="a hostile value ran as a command"):
        run_script(hostile, spec)
