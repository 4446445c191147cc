"""Damaged shards at load time: a byte flipped (sha256 differs from the manifest), a truncated
shard, a missing shard, a sample that does not decode.

By default the loader stops with an error naming the shard, the position and what to do (raised
as it is from a DataLoader worker, not inside torch's worker traceback; the training command
prints it in one line). With on_corrupt="skip" the damaged samples are skipped: they keep their
positions (ranks, resume state and the exactly-once audit are unchanged), carry nothing to
predict, are listed per rank in the corrupt_samples directory and reported as skipped by the
audit; the trainer counts them in metrics.jsonl. Synthetic shards (tests/shards.py) for the
loader, the session's tiny_data for the two training runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, run_cli, train_records
from shards import make_dataset, replace_shard, sample_tokens

from data_pipeline.audit import check_exactly_once
from data_pipeline.corrupt_log import read_corrupt
from data_pipeline.format import Manifest, sample_key, shard_name
from data_pipeline.loader import IGNORE_INDEX, ShardedLoader, iter_eval
from data_pipeline.objectives import CausalLM
from data_pipeline.order import StreamOrder
from data_pipeline.shard_reader import MissingShardError, ShardError

TRAIN = [7, 12, 5, 9, 11]  # samples 0-6, 7-18, 19-23, 24-32, 33-43
N = sum(TRAIN)
VOCAB = 500
MEMBER = 2048  # tar bytes of one sample in shards.py: PAX and tar headers, .npy padded to 512


def flip_byte(path: Path, offset: int = 700) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path, members: int) -> None:
    """Keep `members` whole samples and a piece of the next."""
    path.write_bytes(path.read_bytes()[: members * MEMBER + 300])


def damage(data: Path) -> dict[int, str]:
    """Flip a byte in shard 1, delete shard 3, truncate shard 4 after 4 samples.
    Returns {damaged sample id: what the skip reason says} with checksums verified."""
    flip_byte(data / shard_name("train", 1))
    (data / shard_name("train", 3)).unlink()
    truncate(data / shard_name("train", 4), 4)
    return {**{i: "sha256" for i in range(7, 19)}, **{i: "missing" for i in range(24, 33)},
            **{i: "sha256" for i in range(33, 44)}}


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data"
    make_dataset(path, {"train": TRAIN, "val": [6, 5]}, seq_len=8, vocab_size=VOCAB)
    return path


def take(loader, steps: int) -> list[dict]:
    it = iter(loader)
    try:
        return [next(it) for _ in range(steps)]
    finally:
        it.close()


@pytest.mark.parametrize("fault", ["flip", "truncate", "missing"])
def test_default_error_names_shard_position_and_fix(data, fault):
    path = data / shard_name("train", 2)  # samples 19-23: positions 19-23 unshuffled
    {"flip": flip_byte, "truncate": lambda p: truncate(p, 2), "missing": Path.unlink}[fault](path)
    loader = ShardedLoader(data, micro_batch_size=8, shuffle=False, num_workers=1)
    expected = {"flip": rf"shard {path}: sha256 \w+\.\.\. does not match the manifest's",
                "truncate": rf"shard {path}: sha256", "missing": rf"shard {path} listed in the "
                                                                 "manifest is missing"}[fault]
    with pytest.raises(MissingShardError if fault == "missing" else ShardError,
                       match=expected) as info:
        take(loader, 3)  # batch 2 covers positions 16-23
    message = str(info.value)
    assert "(needed for train position 19, epoch 0)" in message
    assert "re-run `pretrain prepare CONFIG --force`" in message
    assert "Traceback" not in message and "worker process" not in message
    if fault == "missing":
        assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_keeps_positions_and_accounts_for_every_sample(data, tmp_path, workers):
    bad = damage(data)
    manifest = Manifest.load(data)
    audit, corrupt = tmp_path / "audit", tmp_path / "corrupt"
    m, d, steps = 4, 2, 11  # 88 positions: two epochs of 44
    ranks = [ShardedLoader(data, micro_batch_size=m, dp_rank=r, dp_size=d, seed=3,
                           num_workers=workers, on_corrupt="skip", transform=CausalLM(),
                           audit_dir=audit, corrupt_dir=corrupt) for r in range(d)]
    skipped_positions = set()
    for loader in ranks:
        for batch in take(loader, steps):
            ids, skipped = batch["sample_ids"].tolist(), batch["skipped"].tolist()
            assert skipped == [i in bad for i in ids]
            for k, (i, s) in enumerate(zip(ids, skipped)):
                row, labels = batch["input_ids"][k], batch["inputs"]["labels"][k]
                if s:  # EOS filler with nothing to predict; the inputs keep the filler
                    assert (row == 0).all() and (labels == IGNORE_INDEX).all()
                    assert (batch["inputs"]["input_ids"][k] == 0).all()
                    skipped_positions.add(int(batch["positions"][k]))
                else:  # the real sample
                    assert torch.equal(row, torch.from_numpy(sample_tokens(i, 9, VOCAB)))
                    assert torch.equal(labels, row[1:])
        assert loader.skipped_samples == loader.take_skipped() > 0
        assert loader.take_skipped() == 0
        loader.close()
    assert len(skipped_positions) == 2 * len(bad)  # both epochs

    report = check_exactly_once(audit, manifest, m * d * steps)
    assert report.full_epochs == 2 and report.records == 88
    assert {p for p, _ in report.skipped} == skipped_positions
    assert {key for _, key in report.skipped} == {sample_key("train", i) for i in bad}

    listed = read_corrupt(corrupt)
    assert set(listed) == skipped_positions
    order = StreamOrder(TRAIN, seed=3)
    for position, record in listed.items():
        epoch, shard, row = order.locate(position)
        sample = manifest.splits["train"].shards[shard].first_sample + row
        assert record["epoch"] == epoch and record["key"] == sample_key("train", sample)
        assert record["shard"] == shard_name("train", shard)
        assert bad[sample] in record["reason"] and str(data) in record["reason"]


def test_skip_resume_replays_the_same_skips_and_lists_them_once(data, tmp_path):
    damage(data)
    corrupt = tmp_path / "corrupt"
    kw = dict(micro_batch_size=3, seed=5, on_corrupt="skip")
    whole = take(ShardedLoader(data, **kw), 25)  # 75 positions
    first = ShardedLoader(data, corrupt_dir=corrupt, **kw)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()  # the checkpoint: after 5 batches
    head += [next(it) for _ in range(4)]  # served, then lost in a crash
    it.close()
    first.close()
    resumed = ShardedLoader(data, corrupt_dir=corrupt, **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, 20)
    resumed.close()
    assert state["position"] == 15 and set(state) == set(ShardedLoader(data, **kw).state_dict())
    for got, want in zip(head[:5] + tail, whole):
        for name in ("positions", "sample_ids", "skipped", "input_ids"):
            assert torch.equal(got[name], want[name]), name
    expected = {int(p) for b in whole for p, s in zip(b["positions"], b["skipped"]) if s}
    lines = (corrupt / "train-rank00000.jsonl").read_text().splitlines()
    assert len(lines) == len(expected) > 0  # the replayed positions are not listed twice
    assert set(read_corrupt(corrupt)) == expected


def test_without_checksums_only_the_damaged_samples_are_skipped(data, tmp_path):
    truncate(data / shard_name("train", 4), 4)  # samples 33-36 whole, 37-43 lost
    bad = [sample_tokens(i, 9, VOCAB).astype(np.uint16) for i in range(19, 24)]
    bad[1] = bad[1].astype(np.int32)  # sample 20 does not decode as the manifest says
    replace_shard(data, "train", 2, bad)
    batch = take(ShardedLoader(data, micro_batch_size=N, shuffle=False, verify_checksums=False,
                               on_corrupt="skip"), 1)[0]
    skipped = batch["sample_ids"][batch["skipped"]].tolist()
    assert skipped == [20, *range(37, 44)]
    reasons = {c["row"]: c["reason"] for c in batch["corrupt"]}
    assert "sample train0000000020 has dtype int32, the manifest says uint16" in reasons[20]
    assert "train-000004.tar holds 4 samples but the manifest lists 11" in reasons[40]
    served = ~batch["skipped"]
    for i, row in zip(batch["sample_ids"][served].tolist(), batch["input_ids"][served]):
        assert torch.equal(row, torch.from_numpy(sample_tokens(i, 9, VOCAB)))
    # Evaluation skips the same way, and lists each position once however often it runs.
    for _ in range(2):
        evals = list(iter_eval(data, "train", micro_batch_size=10, verify_checksums=False,
                               on_corrupt="skip", corrupt_dir=tmp_path / "c"))
        assert sum(int(b["skipped"].sum()) for b in evals) == 8
    assert sorted(read_corrupt(tmp_path / "c")) == [20, *range(37, 44)]


# ---------------------------------------------------------------------------------------------
# through the trainer

@pytest.fixture(scope="module")
def damaged_tiny(tiny_data, tmp_path_factory) -> tuple[Path, int, range]:
    """tiny_data with a byte flipped in the train shard that epoch 0 (seed 0) reads second, and
    a micro-batch size M at which rank 1 of 2 reaches that shard a step before rank 0 does:
    (data dir, M, the positions of the damaged shard within the first 10 steps)."""
    data = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(tiny_data, data)
    shards = Manifest.load(data).splits["train"].shards
    first, second = StreamOrder([s.samples for s in shards], seed=0).shard_order(0)[:2].tolist()
    flip_byte(data / shards[second].name, 2000)
    n0 = shards[first].samples  # position n0 is the damaged shard's first
    m = next(m for m in range(3, 64) if n0 % (2 * m) >= m and 20 * m > n0 + m)
    return data, m, range(n0, min(n0 + shards[second].samples, 20 * m))


def train(data: Path, run: Path, m: int, *extra: str, check: bool = True):
    return run_cli(["train", str(TINY_CONFIG), f"data.dir={data}", f"run.dir={run}",
                    "train.max_steps=10", f"train.micro_batch_size={m}", "train.eval_interval=0",
                    "checkpoint.interval=0", "data.audit=true", "train.log_interval=3", *extra,
                    "--nproc", "2"], check=check)


def test_training_stops_with_the_shard_named_by_default(damaged_tiny, tmp_path):
    """Rank 1 meets the damaged shard while rank 0 is in the step's gradient all-reduce: the
    run ends at once (not after the collective timeout), rank 1 naming shard and position."""
    data, m, damaged = damaged_tiny
    t0 = time.monotonic()
    proc = train(data, tmp_path / "run", m, check=False)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 300  # parallel.timeout_minutes is 10
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: shard "), proc.stderr[-3000:]
    assert "does not match the manifest" in errors[0]
    assert f"(needed for train position {damaged[0]}, epoch 0)" in errors[0]
    assert "pretrain prepare CONFIG --force" in errors[0]
    # No traceback from the loader or a DataLoader worker (rank 0 reports the lost peer).
    assert "shard_reader.py" not in proc.stderr and "worker process" not in proc.stderr


def test_training_skips_counts_and_lists_damaged_samples(damaged_tiny, tmp_path):
    data, m, damaged = damaged_tiny
    run = tmp_path / "run"
    train(data, run, m, "data.on_corrupt=skip")
    records = [r for r in train_records(run) if "loss" in r]
    assert [r["step"] for r in records] == [3, 6, 9, 10]
    assert sum(r["skipped_samples"] for r in records) == len(damaged)  # both ranks
    assert all(np.isfinite(r["loss"]) for r in records)
    assert sorted(read_corrupt(run / "corrupt_samples")) == list(damaged)
    report = check_exactly_once(run / "audit", Manifest.load(data), 20 * m)
    assert [p for p, _ in report.skipped] == list(damaged)


def test_bert_rows_without_labels_add_nothing_and_all_skipped_is_zero_not_nan():
    from test_families import ids, model_of, preset

    model = model_of(preset("bert-tiny"))
    x, labels, sentence = ids(3, 16), torch.full((3, 16), IGNORE_INDEX), torch.tensor([0, 1, 1])
    labels[:, [2, 5]] = ids(3, 2, seed=1)
    skipped = labels.clone()
    skipped[0], sentence_skipped = IGNORE_INDEX, torch.tensor([IGNORE_INDEX, 1, 1])
    out = model(x, skipped, sentence_labels=sentence_skipped)
    rest = model(x[1:], labels[1:], sentence_labels=sentence[1:])
    torch.testing.assert_close(out.loss, rest.loss)
    none = model(x, torch.full_like(labels, IGNORE_INDEX),
                 sentence_labels=torch.full_like(sentence, IGNORE_INDEX))
    assert none.loss.item() == 0.0
    none.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
