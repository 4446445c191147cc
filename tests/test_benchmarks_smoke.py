"""Smoke runs of every benchmark script with tiny sizes: each runs to the end, alone, in its own
process, and prints its table ending in a ratio line. No performance is asserted (figures live
in BENCHMARKS.md); what is checked is that `make bench` would not crash and that every script
keeps the contract "last line = ratio against a baseline measured in the same run"."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
RATIO = re.compile(r"^ratio [^:]+: \d+(\.\d+)?x?$")

SMOKE = {
    "train_throughput.py": ["--batch", "2", "--seq", "32", "--vocab", "512", "--steps", "1",
                            "--rounds", "1"],
    "data_prep.py": ["--sources", str(STDLIB / "json"), "--repeat", "1", "--rounds", "1",
                     "--vocab", "512", "--cpus", "2", "--no-cold"],
    "loader_throughput.py": ["--samples", "3000", "--batches", "20", "--steps", "1",
                             "--rounds", "1", "--workers", "0", "1"],
    "resume_seek.py": ["--gb", "0.01", "--rounds", "1"],
    "shard_checks.py": ["--samples", "500", "--batches", "20", "--rounds", "1"],
    "long_attention.py": ["--lengths", "256", "--repeats", "1", "--impls", "dense", "longformer"],
    "planner_memory.py": ["--tiny"],
    "gpu_mfu.py": ["--tiny"],
    "tp_zero_memory.py": ["--d-model", "64", "--heads", "4", "--layers", "1", "--vocab", "512",
                          "--dp", "1", "--tp", "2", "--zero", "1", "--steps", "2", "--accum", "1"],
    "checkpoint_io.py": ["--tiny"],
}


def run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / script),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script", SMOKE)
def test_benchmark_runs_and_ends_in_a_ratio(script):
    proc = run(script, SMOKE[script])
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    lines = proc.stdout.strip().splitlines()
    assert RATIO.match(lines[-1]), f"{script}: last line is not a ratio: {lines[-1]!r}"
    assert any(line.startswith("machine: ") for line in lines)
    assert any(line.startswith("load average: ") for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_gpu_benchmark_refuses_to_run_on_cpu():
    proc = run("gpu_mfu.py", [])
    assert proc.returncode != 0 and "no CUDA device is visible" in proc.stderr
    assert "--tiny" in proc.stderr and not proc.stdout
