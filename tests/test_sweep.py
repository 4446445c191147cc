"""Sweeps and reports: a local sweep on the embedded corpus is interrupted and resumed, and its
report has the table and the plots; sweep files are validated as a whole; a Slurm sweep groups
its points into one job array per node count."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_CONFIG, losses_by_step, run_cli, train_records

STEPS = 60


def sweep_file(path: Path, data_dir: Path, out: Path, **extra) -> Path:
    text = f"""
base: {TINY_CONFIG}
name: tiny-scaling
dir: {out}
overrides:
  data.dir: {data_dir}
  train.max_steps: {STEPS}
  checkpoint.interval: 20
  train.eval_interval: 30
grid:
  model.n_layer: [1, 2]
  nodes: [1, 2]
"""
    for key, value in extra.items():
        text += f"{key}:\n" + "".join(f"  {line}\n" for line in value.strip().splitlines())
    path.write_text(text)
    return path


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


@pytest.mark.slow
def test_local_sweep_resumes_after_interruption_and_reports(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    spec = sweep_file(tmp_path / "tiny.yaml", tiny_data, out)
    names = ["n_layer1-n1", "n_layer1-n2", "n_layer2-n1", "n_layer2-n2"]
    cmd = [sys.executable, "-m", "pretrain.cli", "sweep", str(spec), "--local"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    # interrupt the second point (2 ranks) once it is training
    deadline = time.monotonic() + 240
    while steps_logged(out / names[1]) < 5:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the second point did not start training"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, first[-3000:]
    assert "SIGTERM: point n_layer1-n2 stopped with a checkpoint" in first
    stopped = max(losses_by_step(out / names[1]))
    assert stopped < STEPS and (out / names[1] / "checkpoints" /
                                f"step-{stopped:08d}" / "COMPLETE").is_file()
    assert max(losses_by_step(out / names[0])) == STEPS
    assert not (out / names[2]).exists() and not (out / names[3]).exists()

    again = run_cli(["sweep", str(spec), "--local"]).stdout
    assert f"point 1/4 {names[0]} (1 rank(s)): finished, skipped" in again
    assert f"point 2/4 {names[1]} (2 rank(s)): resuming" in again
    assert f"resumed from step {stopped}" in again
    assert f"point 3/4 {names[2]} (1 rank(s)): starting" in again
    assert "all 4 point(s) finished" in again
    for name in names:  # every point trained every step, once (the replay overwrote nothing)
        assert sorted(losses_by_step(out / name)) == list(range(1, STEPS + 1)), name
        point = json.loads((out / name / "point.json").read_text())
        assert point["point"] == name and point["world_size"] == point["nodes"]
        saved = (out / name / "config.yaml").read_text()
        assert f"name: tiny-scaling/{name}" in saved
    third = run_cli(["sweep", str(spec), "--local"]).stdout
    assert third.count("finished, skipped") == 4

    report = run_cli(["report", str(out)]).stdout
    check_report(out / "report", names, report)


def check_report(report_dir: Path, names: list[str], stdout: str) -> None:
    import matplotlib.image
    from PIL import Image

    md = (report_dir / "report.md").read_text()
    assert md in stdout
    header = ("| point | nodes | GPUs | tokens/s | tokens/s per GPU | MFU | step time (s) | "
              "peak mem (GiB) | planned (GiB) | final loss | final val loss | wall time |")
    assert header in md
    rows = list(csv.DictReader((report_dir / "report.csv").open()))
    assert [r["point"] for r in rows] == names
    for r in rows:
        assert int(r["gpus"]) == int(r["nodes"]) and float(r["tokens_per_sec"]) > 0
        assert float(r["peak_mem_bytes"]) > 0 and float(r["final_val_loss"]) > 0
        assert float(r["wall_time"]) > 0 and int(r["steps"]) == STEPS
        assert f"| {r['point']} | {r['nodes']} | {r['gpus']} |" in md
    data = json.loads((report_dir / "report.json").read_text())
    for png in ("loss_vs_tokens", "throughput_vs_nodes", "loss_vs_compute"):
        path = report_dir / f"{png}.png"
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG"
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.std() > 0.01
    drawn = data["plots"]
    labels = [s["label"] for s in drawn["loss_vs_tokens"]]
    assert labels == [f"{n} {kind}" for n in names for kind in ("train", "val")]
    train_series = drawn["loss_vs_tokens"][0]
    assert len(train_series["x"]) == STEPS and train_series["x"] == sorted(train_series["x"])
    # one throughput series per model size, over nodes 1 and 2, with its ideal line
    thr = {s["label"]: s for s in drawn["throughput_vs_nodes"]}
    assert set(thr) == {"model.n_layer=1 measured", "model.n_layer=1 ideal",
                        "model.n_layer=2 measured", "model.n_layer=2 ideal"}
    for size in ("model.n_layer=1", "model.n_layer=2"):
        measured, ideal = thr[f"{size} measured"], thr[f"{size} ideal"]
        assert measured["x"] == ideal["x"] == [1, 2]
        assert ideal["y"][1] == pytest.approx(2 * measured["y"][0])
        assert measured["efficiency"] == pytest.approx([m / i for m, i in
                                                        zip(measured["y"], ideal["y"])])
        assert f"{100 * measured['efficiency'][1]:.1f}%" in md
    finals = next(s for s in drawn["loss_vs_compute"] if s["label"] == "final")
    assert len(finals["x"]) == 4
    fit = data["fit"]
    assert fit is not None and fit["n"] == 4 and "R^2" in md
    assert next(s for s in drawn["loss_vs_compute"] if s["label"] == "fit")


def test_sweep_file_problems_are_reported_together(tmp_path, tiny_data):
    from pretrain.sweep import SweepError, load_sweep

    spec = tmp_path / "bad.yaml"
    spec.write_text(f"""
base: {TINY_CONFIG}
dir: {tmp_path / 'out'}
colour: blue
grid:
  optim.lr: 0.001
  nodes: [1, 2]
""")
    with pytest.raises(SweepError) as e:
        load_sweep(spec)
    text = str(e.value)
    assert "colour: unknown key" in text and "grid.optim.lr: must be a non-empty list" in text
    spec.write_text(f"""
base: {TINY_CONFIG}
dir: {tmp_path / 'out'}
overrides: {{data.dir: {tiny_data}}}
points:
  - {{name: a, optim.lr: 0.001}}
  - {{name: a, optim.lr: 0.002}}
  - {{name: b, train.micro_batch_sise: 4}}
  - {{name: c, nodes: 0}}
""")
    with pytest.raises(SweepError) as e:
        load_sweep(spec)
    text = str(e.value)
    assert "both named 'a'" in text and "point 3: nodes must be an integer >= 1" in text
    spec.write_text(spec.read_text().replace("name: a, optim.lr: 0.002", "name: a2")
                    .replace("  - {name: c, nodes: 0}\n", ""))
    with pytest.raises(SweepError) as e:
        load_sweep(spec)
    assert "point 2 (b, 1 rank(s)): train.micro_batch_sise: unknown key; did you mean " \
           "train.micro_batch_size?" in str(e.value)


def test_slurm_sweep_is_one_array_per_node_count(tmp_path, tiny_data):
    """--dry-run renders the job arrays without submitting: points with the same resources
    share an array, each task carries its point's overrides, run.dir and tag; `chain` makes
    the second array wait for the first; a preset's keys become overrides."""
    out = tmp_path / "sweep"
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
base: {TINY_CONFIG}
name: tiny-scaling
dir: {out}
overrides: {{data.dir: {tiny_data}, train.max_steps: 20}}
points:
  - {{model.n_layer: 1}}
  - {{model.n_layer: 2}}
  - {{name: small, preset: models/gpt-tiny, nodes: 2, model.n_layer: 3}}
slurm: {{gpus_per_node: 0, time: '00:10:00', array_parallel: 2, chain: true}}
""")
    text = run_cli(["sweep", str(spec), "--dry-run"]).stdout
    scripts = text.split("#!/bin/bash")[1:]
    assert len(scripts) == 2, text
    one, two = scripts
    assert "#SBATCH --nodes=1" in one and "#SBATCH --array=0-1%2" in one
    assert "#SBATCH --nodes=2" in two and "#SBATCH --array=0-0%2" in two
    assert '#SBATCH --dependency="afterany:<previous array>"' in two
    assert f"run.dir={out}/n_layer1" in one and "run.name=tiny-scaling/n_layer1" in one
    assert f"run.dir={out}/n_layer2" in one
    assert "model.n_layer=3" in two and f"run.dir={out}/small" in two
    assert "model.d_model=64" in two  # from the preset
    # the preset comes first: the point's own key wins over the preset's n_layer
    assert two.index("model.n_layer=2 ") < two.index("model.n_layer=3")
    assert not out.exists()  # a dry run writes nothing


def test_shipped_sweep_files_are_valid():
    from pretrain.sweep import load_sweep

    local = load_sweep(ROOT / "configs" / "sweeps" / "gpt-tiny-cpu.yaml", local=True)
    assert [p.name for p in local.points] == ["n_layer1-n1", "n_layer1-n2", "n_layer2-n1",
                                              "n_layer2-n2"]
    scaling = load_sweep(ROOT / "configs" / "sweeps" / "gpt2-scaling.yaml")
    assert sorted({(p.nodes, p.gpus_per_node) for p in scaling.points}) == [
        (1, 8), (2, 8), (4, 8), (8, 8)]
    assert len(scaling.points) == 8
