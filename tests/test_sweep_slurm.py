"""A sweep submitted to the real two-node test Slurm cluster (slurm/testing/start_cluster.sh,
the `cluster` fixture of test_slurm.py): one job array per node count, every task trains its
point in its own run directory, the report covers them, and submitting again skips them."""

from __future__ import annotations

import csv
import re

import pytest

from conftest import TINY_CONFIG, losses_by_step, run_cli
from test_slurm import cluster  # noqa: F401  (the fixture: start, skip reasons, stop)

pytestmark = pytest.mark.slow


def test_sweep_runs_as_job_arrays_and_reports(cluster, tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    spec = tmp_path / "lr.yaml"
    spec.write_text(f"""
base: {TINY_CONFIG}
name: lr-nodes
dir: {out}
overrides:
  data.dir: {tiny_data}
  train.max_steps: 20
  train.eval_interval: 10
  checkpoint.interval: 10
grid:
  nodes: [1, 2]
  optim.lr: [1.0e-3, 3.0e-3]
slurm:
  gpus_per_node: 0
""")
    proc = run_cli(["sweep", str(spec)], env=cluster.env, timeout=120)
    arrays = re.findall(r"submitted job array (\d+): 2 point\(s\) on (\d) node\(s\) x 1 rank",
                        proc.stdout)
    assert [nodes for _, nodes in arrays] == ["1", "2"], proc.stdout
    names = ["n1-lr0.001", "n1-lr0.003", "n2-lr0.001", "n2-lr0.003"]
    for job, nodes in arrays:
        for task in range(2):
            info = cluster.wait(f"{job}_{task}", timeout=240)
            log = out / "slurm" / f"pretrain-sweep-lr-nodes-n{nodes}-{job}_{task}.out"
            text = log.read_text() if log.is_file() else "(no log)"
            assert info["JobState"] == "COMPLETED", text[-3000:] + cluster.diagnostics(job)
            assert f"world {nodes} (tp 1 x dp {nodes})" in text and "training finished at step 20" \
                in text
    for name in names:
        assert sorted(losses_by_step(out / name)) == list(range(1, 21)), name

    report = run_cli(["report", str(out)]).stdout
    rows = list(csv.DictReader((out / "report" / "report.csv").open()))
    assert [(r["point"], r["nodes"], r["gpus"]) for r in rows] == [
        (n, n[1], n[1]) for n in names]
    assert "| optim.lr=0.001 | 2 | 2 |" in report  # the scaling table, per learning rate

    again = run_cli(["sweep", str(spec)], env=cluster.env, timeout=120).stdout
    assert again.count("finished, skipped") == 4 and "nothing to submit" in again
