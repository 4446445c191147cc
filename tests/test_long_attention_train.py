"""Long-context models through the real trainer: DeepSpeed ZeRO-2 on 2 gloo ranks, real shards,
checkpoint, an interrupted final save, and a resume that replays the same losses. GPT with
Longformer and with Reformer + reversible layers + chunked feed-forward; the long BERT preset
(configs/bert-long-4k.yaml: Longformer, global [CLS]) on short sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, TINY_CONFIG, losses_by_step, run_cli

pytestmark = pytest.mark.slow

LONG_BERT = ROOT / "configs" / "bert-long-4k.yaml"

# name -> (config, data fixture, overrides)
SETTINGS = {
    # per-layer windows and dilation, a global position, attention dropout
    "gpt-longformer": (TINY_CONFIG, "tiny_data", [
        "model.attention.kind=longformer", "model.attention.longformer.window=[4,6]",
        "model.attention.longformer.dilation=[1,2]",
        "model.attention.longformer.global_positions=[0]", "model.attention.dropout=0.1"]),
    # LSH with fresh random rotations every step, reversible layers, chunked feed-forward
    "gpt-reformer": (TINY_CONFIG, "tiny_data", [
        "model.attention.kind=reformer", "model.attention.reformer.chunk_len=8",
        "model.attention.reformer.n_buckets=4", "model.attention.reformer.n_hashes=2",
        "model.reversible=true", "model.ff_chunk_size=16", "model.dropout=0.1"]),
    # the 4096-token preset on the tests' 32-token BERT data: windows that fit 32 tokens
    "bert-long-preset": (LONG_BERT, "bert_t5_data", [
        "data.seq_len=32", "model.attention.longformer.window=[4,6]", "train.micro_batch_size=4",
        "model.attention.dropout=0.1", "optim.lr=3e-3", "logging.progress=false",
        "logging.tensorboard=false"]),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_two_ranks_zero2_train_checkpoint_and_resume(name, request, tmp_path):
    config, data_fixture, settings = SETTINGS[name]
    data: Path = request.getfixturevalue(data_fixture)
    run = tmp_path / "run"
    args = ["train", str(config), f"data.dir={data}", f"run.dir={run}",
            "parallel.zero_stage=2", "train.max_steps=6", "checkpoint.interval=3",
            "train.eval_interval=0", "train.log_interval=1", "optim.warmup_steps=1",
            *settings, "--nproc", "2"]
    run_cli(args)
    first = losses_by_step(run)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    assert first[6] < first[1]
    # The final save "crashed" before its marker: the run resumes from step 3 and replays 4-6
    # with the same data, the same dropout and the same LSH rotations (RNG states restored).
    (run / "checkpoints" / "step-00000006" / "COMPLETE").unlink()
    proc = run_cli(args)
    assert "resumed from step 3" in proc.stdout
    again = losses_by_step(run)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(first[step], abs=1e-6, rel=0), step
