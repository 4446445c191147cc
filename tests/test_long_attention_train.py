"""Long-context GPTs through the real trainer: DeepSpeed ZeRO-2 on 2 gloo ranks, real shards,
checkpoint, an interrupted final save, and a resume that replays the same losses."""

from __future__ import annotations

import pytest

from conftest import TINY_CONFIG, losses_by_step, run_cli

pytestmark = pytest.mark.slow

SETTINGS = {
    # per-layer windows and dilation, a global position, attention dropout
    "longformer": ["model.attention.kind=longformer", "model.attention.longformer.window=[4,6]",
                   "model.attention.longformer.dilation=[1,2]",
                   "model.attention.longformer.global_positions=[0]",
                   "model.attention.dropout=0.1"],
    # LSH with fresh random rotations every step, reversible layers, chunked feed-forward
    "reformer": ["model.attention.kind=reformer", "model.attention.reformer.chunk_len=8",
                 "model.attention.reformer.n_buckets=4", "model.attention.reformer.n_hashes=2",
                 "model.reversible=true", "model.ff_chunk_size=16", "model.dropout=0.1"],
}


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_two_ranks_zero2_train_checkpoint_and_resume(kind, tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(TINY_CONFIG), f"data.dir={tiny_data}", f"run.dir={run}",
            "parallel.zero_stage=2", "train.max_steps=6", "checkpoint.interval=3",
            "train.eval_interval=0", "train.log_interval=1", "optim.warmup_steps=1",
            *SETTINGS[kind], "--nproc", "2"]
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
