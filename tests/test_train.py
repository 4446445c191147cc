"""End-to-end training: real DeepSpeed on 2 gloo ranks, real shards, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_CONFIG, losses_by_step, run_cli, train_records

pytestmark = pytest.mark.slow


def base_overrides(data_dir, run_dir) -> list[str]:
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", "train.log_interval=1",
            "logging.progress=false", "train.micro_batch_size=4", "train.grad_accum_steps=1",
            "model.n_layer=2", "logging.tensorboard=true"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_with_zero(stage, tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["train", str(TINY_CONFIG), *base_overrides(tiny_data, run),
                    f"parallel.zero_stage={stage}", "train.max_steps=40", "train.eval_interval=20",
                    "checkpoint.interval=20", "checkpoint.keep_last=1", "--nproc", "2"])
    records = train_records(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "samples_seen",
                "tokens_seen"):
        assert all(r.get(key) is not None for r in train), key
    assert train[-1]["samples_seen"] == 40 * 2 * 4  # steps x ranks x micro-batch
    # evaluated before training, at step 20 and after the last step; the model learns
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < 0.9 * evals[0]["val_loss"]
    assert "validation loss:" in proc.stdout and str(run) in proc.stdout
    # keep_last=1: only the final checkpoint survives, complete and pointed to by `latest`
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-00000040"]
    assert (run / "checkpoints" / "step-00000040" / "COMPLETE").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 8
    # the reduce bucket is sized to the model (d_model^2, at least 2^20), not DeepSpeed's 5e8
    assert ds["zero_optimization"]["reduce_bucket_size"] == 2**20
    assert (run / "config.yaml").is_file()
    assert any((run / "tensorboard").iterdir())


@pytest.mark.parametrize("stage,async_save", [(2, False), (3, True)])
def test_resume_gives_the_losses_of_an_uninterrupted_run(stage, async_save, tiny_data, tmp_path):
    """With async_save the interrupted run's checkpoints are written in the background while
    it trains on; the uninterrupted reference saves synchronously."""
    # dropout and a loader worker make the test sensitive to RNG and loader state
    common = ["model.dropout=0.1", "data.num_workers=1", f"parallel.zero_stage={stage}",
              "optim.warmup_steps=2", "optim.decay_steps=12", "checkpoint.interval=3",
              "train.eval_interval=0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_cli(["train", str(TINY_CONFIG), *base_overrides(tiny_data, whole), *common,
             "train.max_steps=12", "--nproc", "2"])
    # stops after step 7 without a final save: resumes from the background save of step 6
    interrupted = [*common, f"checkpoint.async_save={str(async_save).lower()}",
                   "checkpoint.save_final=false"]
    run_cli(["train", str(TINY_CONFIG), *base_overrides(tiny_data, parts), *interrupted,
             "train.max_steps=7", "--nproc", "2"])
    proc = run_cli(["train", str(TINY_CONFIG), *base_overrides(tiny_data, parts), *interrupted,
                    "train.max_steps=12", "--nproc", "2"])
    assert "resumed from step 6" in proc.stdout
    expected, got = losses_by_step(whole), losses_by_step(parts)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step


def test_audit_proves_every_sample_seen_once_across_an_interrupted_run(small_data, tmp_path):
    """A run stops between checkpoints and is started again: it resumes from the last one,
    replays the same samples after it, and over a whole epoch plus part of the next every
    sample is served exactly once per epoch, on both ranks together."""
    from data_pipeline.audit import check_exactly_once
    from data_pipeline.format import Manifest

    manifest = Manifest.load(small_data)
    per_step = 2 * 4  # ranks x micro-batch
    steps_per_epoch = manifest.splits["train"].samples / per_step
    total = int(steps_per_epoch * 1.3)  # past the epoch boundary
    stop = int(steps_per_epoch * 0.6)  # stops 5 steps after its last checkpoint
    run = tmp_path / "run"
    common = [*base_overrides(small_data, run), "data.audit=true", "data.num_workers=1",
              "train.eval_interval=0", "logging.tensorboard=false", "parallel.zero_stage=1",
              "checkpoint.save_final=false", f"checkpoint.interval={stop - 5}"]
    run_cli(["train", str(TINY_CONFIG), *common, f"train.max_steps={stop}", "--nproc", "2"])
    proc = run_cli(["train", str(TINY_CONFIG), *common, f"train.max_steps={total}",
                    "--nproc", "2"])
    assert f"resumed from step {stop - 5}" in proc.stdout
    report = check_exactly_once(run / "audit", manifest, total * per_step)
    assert report.full_epochs == 1 and report.partial_samples > 0
    assert report.replayed == 5 * per_step  # the steps after the checkpoint, served again
    assert report.records == total * per_step


def test_resume_refuses_a_changed_model(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", str(TINY_CONFIG), *base_overrides(tiny_data, run), "train.max_steps=2"])
    proc = run_cli(["train", str(TINY_CONFIG), *base_overrides(tiny_data, run),
                    "train.max_steps=4", "model.n_layer=3"], check=False)
    assert proc.returncode != 0
    assert "model.n_layer: checkpoint has 2, config has 3" in proc.stderr


def test_config_errors_fail_before_launch(tiny_data, tmp_path):
    proc = run_cli(["train", str(TINY_CONFIG), *base_overrides(tiny_data, tmp_path / "r"),
                    "train.max_stepz=3", "train.global_batch_size=7", "--nproc", "2"],
                   check=False)
    assert proc.returncode == 2
    assert "train.max_steps" in proc.stderr  # the suggestion for the misspelt key
    assert "train.global_batch_size" in proc.stderr  # and the batch rule, in the same report
    assert not (tmp_path / "r").exists()


def test_plain_process_and_deepspeed_launcher(tiny_data, tmp_path):
    """The training entry point runs without any launcher and under `deepspeed`."""
    env_cmd = [sys.executable, "-m", "pretrain.train", str(TINY_CONFIG),
               *base_overrides(tiny_data, tmp_path / "plain"), "train.max_steps=3"]
    subprocess.run(env_cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert sorted(losses_by_step(tmp_path / "plain")) == [1, 2, 3]

    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                 "--master_port", "29533", "--module", "pretrain.train", str(TINY_CONFIG),
                 *base_overrides(tiny_data, tmp_path / "ds"), "train.max_steps=3"]
    proc = subprocess.run(deepspeed, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = [r for r in train_records(tmp_path / "ds") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[-1]["samples_seen"] == 3 * 2 * 4  # 2 ranks of micro-batch 4
