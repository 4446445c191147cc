"""Tensor parallelism with ZeRO, and checkpoints that follow the run across process grids.

Every run trains the same tiny GPT on the same data with the same global batch (32 sequences:
micro-batch 16 x data-parallel size x accumulation), so whatever the grid, step s sees the same
samples and, up to the order of floating-point sums, computes the same update. One uninterrupted
single-process run is the reference for all the others; they must follow its loss curve to 1e-5.
Real DeepSpeed, real gloo processes, started through the CLI as a user would.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_CONFIG, losses_by_step, run_cli

pytestmark = pytest.mark.slow

STEPS = 24  # a little more than one epoch of small_data at 32 sequences per step
SEGMENT = 6
TOL = 1e-5


def overrides(data_dir, run_dir, *, tp: int, zero: int, accum: int, steps: int) -> list[str]:
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", "train.log_interval=1",
            "logging.progress=false", "logging.tensorboard=false", "train.eval_interval=0",
            "train.micro_batch_size=16", f"train.grad_accum_steps={accum}",
            "optim.warmup_steps=2", f"optim.decay_steps={STEPS}", "data.num_workers=0",
            f"checkpoint.interval={SEGMENT}", "checkpoint.keep_last=4",
            f"parallel.tensor_parallel={tp}", f"parallel.zero_stage={zero}",
            f"train.max_steps={steps}"]


def train(data_dir, run_dir, *, tp: int, dp: int, zero: int, steps: int, extra=()):
    """`pretrain train` on tp x dp ranks, keeping the global batch at 32."""
    args = ["train", str(TINY_CONFIG),
            *overrides(data_dir, run_dir, tp=tp, zero=zero, accum=2 // dp, steps=steps), *extra]
    return run_cli(args + (["--nproc", str(tp * dp)] if tp * dp > 1 else []))


def assert_follows(got: dict[int, float], expected: dict[int, float], steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(expected[s], abs=TOL, rel=0), (s, got[s], expected[s])


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """TP1 x DP1, no ZeRO, never interrupted; checkpoints every SEGMENT steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(small_data, run, tp=1, dp=1, zero=0, steps=STEPS)
    return run


def test_tp2_dp2_follows_the_tp1_loss_curve(small_data, reference, tmp_path):
    """20 steps at TP=2 (x DP=2, ZeRO-2, sequence parallelism, activation checkpointing)."""
    run = tmp_path / "run"
    proc = train(small_data, run, tp=2, dp=2, zero=2, steps=20,
                 extra=["parallel.sequence_parallel=true", "train.activation_checkpointing=true",
                        "checkpoint.save_final=false", "checkpoint.interval=0"])
    assert "tp 2 x dp 2 +sp" in proc.stdout
    assert_follows(losses_by_step(run), losses_by_step(reference), range(1, 21))
    # gradient norms (and so clipping) count split weights once, replicated ones once
    norms = {r["step"]: r["grad_norm"] for r in map(json.loads, open(run / "metrics.jsonl"))
             if "loss" in r}
    ref = {r["step"]: r["grad_norm"] for r in map(json.loads, open(reference / "metrics.jsonl"))
           if "loss" in r}
    assert all(norms[s] == pytest.approx(ref[s], rel=1e-4) for s in range(1, 21))


def test_checkpoints_follow_the_run_across_grids(small_data, reference, tmp_path):
    """TP2xDP2 ZeRO-1 -> TP1xDP2 ZeRO-2 -> TP2xDP1 no ZeRO -> TP1xDP1 ZeRO-3, restarting the
    same command with another grid each time: every resumed step equals the reference's, and
    the audit shows every sample of the epoch served exactly once across the four grids."""
    from data_pipeline.audit import check_exactly_once
    from data_pipeline.format import Manifest

    run = tmp_path / "run"
    chain = [(2, 2, 1), (1, 2, 2), (2, 1, 0), (1, 1, 3)]  # (tp, dp, zero stage)
    previous = None
    for i, (tp, dp, zero) in enumerate(chain):
        proc = train(small_data, run, tp=tp, dp=dp, zero=zero, steps=(i + 1) * SEGMENT,
                     extra=["data.audit=true"])
        if previous is not None:
            assert f"resumed from step {i * SEGMENT}" in proc.stdout
            assert (f"saved by TP{previous[0]}xDP{previous[1]} ZeRO-{previous[2]}, loading into "
                    f"TP{tp}xDP{dp} ZeRO-{zero}") in proc.stdout
        previous = (tp, dp, zero)
    assert_follows(losses_by_step(run), losses_by_step(reference), range(1, STEPS + 1))

    manifest = Manifest.load(small_data)
    report = check_exactly_once(run / "audit", manifest, STEPS * 32)
    assert report.full_epochs == 1 and report.partial_samples > 0
    assert report.records == STEPS * 32 and report.replayed == 0  # TP peers record once

    # consolidate from every grid: the whole model equals the reference's at the same step
    from pretrain.saved_model import consolidate, model_from_weights_file

    for i, (tp, dp, zero) in enumerate(chain):
        step = f"step-{(i + 1) * SEGMENT:08d}"
        mine = model_from_weights_file(consolidate(run / "checkpoints" / step,
                                                   tmp_path / f"{step}.st"))
        ref = model_from_weights_file(consolidate(reference / "checkpoints" / step,
                                                  tmp_path / f"ref-{step}.st"))
        theirs = ref.state_dict()
        for name, w in mine.state_dict().items():
            assert w.shape == theirs[name].shape
            torch.testing.assert_close(w, theirs[name], atol=5e-5, rtol=0, msg=f"{step} {name}")


def test_convert_then_resume_on_tp2_dp2_zero3(small_data, reference, tmp_path, capsys):
    """`pretrain checkpoint convert` writes whole tensors; TP2 x DP2 under ZeRO-3 resumes from
    them and continues the reference's curve. Consolidation and HF export work from it. (The
    offline commands run in this process: they need no process group.)"""
    from pretrain.cli import main as cli_main

    assert cli_main(["checkpoint", "convert", str(reference), str(tmp_path / "latest")]) == 0
    assert f"step-{STEPS:08d}" in capsys.readouterr().out  # a run directory: its latest
    assert cli_main(["checkpoint", "convert", str(reference), str(tmp_path / "x"),
                     "--tensor-parallel", "3"]) == 2
    assert "3 does not divide model.n_head=4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    out = tmp_path / "converted"
    assert cli_main(["checkpoint", "convert",
                     str(reference / "checkpoints" / f"step-{SEGMENT:08d}"), str(out),
                     "--tensor-parallel", "2"]) == 0
    proc = train(small_data, out, tp=2, dp=2, zero=3, steps=SEGMENT + 3,
                 extra=["checkpoint.save_final=false"])
    assert f"resumed from step {SEGMENT}" in proc.stdout
    assert_follows(losses_by_step(out), losses_by_step(reference), range(SEGMENT + 1,
                                                                          SEGMENT + 4))

    hf_dir = tmp_path / "hf"
    assert cli_main(["checkpoint", "consolidate",
                     str(out / "checkpoints" / f"step-{SEGMENT:08d}"),
                     "--out", str(tmp_path / "m.safetensors"), "--hf", str(hf_dir)]) == 0
    from transformers import GPT2LMHeadModel

    from pretrain.saved_model import model_from_weights_file

    ours = model_from_weights_file(tmp_path / "m.safetensors")
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, ours.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
