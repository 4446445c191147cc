"""Tests of the sharded loader: exactly-once coverage over ranks, workers, epochs and resumes;
determinism; seeking without reading earlier shards; errors naming the shard; eval slices;
the audit helpers. Synthetic shards (tests/shards.py), a few dozen samples each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from shards import make_dataset, replace_shard, sample_tokens

from data_pipeline.audit import audit_file, check_exactly_once, read_audit
from data_pipeline.format import Manifest, sample_key, shard_name
from data_pipeline.loader import ShardedLoader, iter_eval, num_eval_batches
from data_pipeline.order import StreamOrder
from data_pipeline.shard_reader import ShardError

TRAIN = [7, 12, 5, 9, 11]  # unequal shard sizes, N = 44
VAL = [6, 5, 8]  # N = 19
N = sum(TRAIN)
VOCAB = 500


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards")
    make_dataset(path, {"train": TRAIN, "val": VAL}, seq_len=8, vocab_size=VOCAB)
    return path


@pytest.fixture
def own_data(tmp_path) -> Path:
    """A private copy for tests that damage the data."""
    path = tmp_path / "data"
    make_dataset(path, {"train": TRAIN, "val": VAL}, seq_len=8, vocab_size=VOCAB)
    return path


def take(loader, steps: int) -> list[dict]:
    it = iter(loader)
    try:
        return [next(it) for _ in range(steps)]
    finally:
        it.close()  # shuts DataLoader workers down now


def loaders(data, dp_size, **kw) -> list[ShardedLoader]:
    return [ShardedLoader(data, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]


def run_ranks(ranks: list[ShardedLoader], steps: int) -> dict[int, int]:
    """Run every rank `steps` micro-steps; return {global position: sample id} and check content."""
    served: dict[int, int] = {}
    for loader in ranks:
        for batch in take(loader, steps):
            ids = batch["sample_ids"].tolist()
            expected = np.stack([sample_tokens(i, loader.sample_len, VOCAB) for i in ids])
            assert batch["input_ids"].dtype == torch.long
            np.testing.assert_array_equal(batch["input_ids"].numpy(), expected)
            for p, s in zip(batch["positions"].tolist(), ids):
                assert p not in served, f"position {p} served twice"
                served[p] = s
    return served


def assert_epochs_exactly_once(served: dict[int, int], upto: int) -> None:
    assert sorted(served) == list(range(upto))
    for e in range(upto // N):
        assert sorted(served[p] for p in range(e * N, (e + 1) * N)) == list(range(N)), f"epoch {e}"
    tail = [served[p] for p in range(upto // N * N, upto)]
    assert len(set(tail)) == len(tail)


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_exactly_once_over_ranks_workers_epochs(data, tmp_path, dp_size, workers):
    m = 4  # with 3 ranks a step is 12 samples: batches straddle the epoch boundary at 44
    steps = -(-5 * N // 2 // (m * dp_size))  # about 2.5 epochs
    ranks = loaders(data, dp_size, micro_batch_size=m, num_workers=workers, audit_dir=tmp_path)
    served = run_ranks(ranks, steps)
    upto = steps * m * dp_size
    assert_epochs_exactly_once(served, upto)
    assert {r.position for r in ranks} == {upto}
    # The stream is one global order, whatever the layout.
    single = run_ranks([ShardedLoader(data, micro_batch_size=1)], upto)
    assert served == single
    for r in ranks:
        r.close()
    report = check_exactly_once(tmp_path, ranks[0].manifest, upto)
    assert (report.full_epochs, report.files, report.replayed) == (2, dp_size, 0)


def test_order_visits_shards_as_blocks_and_is_deterministic():
    order = StreamOrder(TRAIN, seed=3)
    first = np.cumsum([0] + TRAIN)
    for epoch in range(3):
        runs = list(order.runs(epoch * N, (epoch + 1) * N))
        # one contiguous run per shard, each shard once, each row once
        assert sorted(r.shard for r in runs) == list(range(len(TRAIN)))
        for r in runs:
            assert sorted(r.rows.tolist()) == list(range(TRAIN[r.shard]))
        assert [r.shard for r in runs] == order.shard_order(epoch).tolist()
    ids = lambda o, e: np.concatenate([first[r.shard] + r.rows for r in o.runs(e * N, (e + 1) * N)])
    again = StreamOrder(TRAIN, seed=3)
    assert (ids(order, 0) == ids(again, 0)).all()
    assert (ids(order, 1) != ids(order, 0)).any()
    assert (ids(StreamOrder(TRAIN, seed=4), 0) != ids(order, 0)).any()
    assert ids(StreamOrder(TRAIN, seed=3, shuffle=False), 2).tolist() == list(range(N))
    # zero-sample shards are skipped
    assert [r.shard for r in StreamOrder([3, 0, 2], 0, shuffle=False).runs(0, 5)] == [0, 2]


def test_loader_determinism(data):
    stream = lambda **kw: [i for b in take(ShardedLoader(data, micro_batch_size=11, **kw), 8)
                           for i in b["sample_ids"].tolist()]  # fmt: skip
    a = stream(seed=1)
    assert a == stream(seed=1)
    assert a == stream(seed=1, num_workers=2)
    assert a[:N] != a[N : 2 * N] and sorted(a[:N]) == sorted(a[N : 2 * N])
    assert a[:N] != stream(seed=2)[:N]
    assert stream(shuffle=False)[: 2 * N] == list(range(N)) * 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(data, workers):
    kw = dict(micro_batch_size=3, num_workers=workers, seed=5)
    steps, k = 20, 7
    whole = [take(r, steps) for r in loaders(data, 2, **kw)]
    first = loaders(data, 2, **kw)
    head = [take(r, k) for r in first]
    states = [r.state_dict() for r in first]
    assert states[0] == states[1] and states[0]["position"] == k * 3 * 2
    resumed = loaders(data, 2, **kw)
    for r, s in zip(resumed, states):
        r.load_state_dict(s)
    tail = [take(r, steps - k) for r in resumed]
    for rank in range(2):
        for a, b in zip(whole[rank], head[rank] + tail[rank]):
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["positions"], b["positions"])


def test_reiterating_continues_from_state(data):
    loader = ShardedLoader(data, micro_batch_size=5, dp_rank=1, dp_size=2)
    a, b = take(loader, 3), take(loader, 2)
    assert [x["positions"][0].item() for x in a + b] == [5 + 10 * j for j in range(5)]
    assert loader.position == 50 and loader.epoch == pytest.approx(50 / N)
    stale = iter(loader)
    fresh = iter(loader)
    next(fresh)
    next(stale)  # an older iterator does not move the position
    assert loader.position == 60


def test_resume_with_other_rank_count_and_batch_size(data, tmp_path):
    """2 ranks x M=4 (crash after replaying steps past the checkpoint) -> 3 ranks x M=3 -> 1 rank
    x M=5: the audit shows every epoch covered exactly once."""
    audit = tmp_path / "audit"
    phase1 = loaders(data, 2, micro_batch_size=4, num_workers=1, audit_dir=audit, seed=9)
    for r in phase1:
        take(r, 4)
    checkpoint = phase1[0].state_dict()
    for r in phase1:
        take(r, 3)  # served and audited, then "crash": these positions are replayed below
        r.close()
    phase2 = loaders(data, 3, micro_batch_size=3, audit_dir=audit, seed=9)
    for r in phase2:
        r.load_state_dict(checkpoint)
        take(r, 9)
        r.close()
    state = phase2[2].state_dict()
    assert state["position"] == 32 + 9 * 9
    phase3 = ShardedLoader(data, micro_batch_size=5, num_workers=2, audit_dir=audit, seed=9)
    phase3.load_state_dict(state)
    take(phase3, 12)
    phase3.close()
    upto = phase3.position
    report = check_exactly_once(audit, phase3.manifest, upto)
    assert upto == 32 + 81 + 60 and report.full_epochs == 3 and report.partial_samples == upto - 3 * N
    assert report.replayed == 3 * 4 * 2 and report.files == 3
    # and the audited stream is the uninterrupted one
    reference = run_ranks([ShardedLoader(data, micro_batch_size=upto, seed=9)], 1)
    assert {p: sample_key("train", s) for p, s in reference.items()} == {
        p: k for p, (_, k) in read_audit(audit).records.items() if p < upto
    }


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_does_not_read_earlier_shards(own_data, workers):
    manifest = Manifest.load(own_data)
    order = StreamOrder(TRAIN, seed=0)
    slots = order.shard_order(1).tolist()
    start = N + sum(TRAIN[s] for s in slots[:3]) + 2  # epoch 1, inside its 4th shard
    for s in slots[:3]:  # the shards epoch 1 visits before the resume point are gone
        (own_data / manifest.splits["train"].shards[s].name).unlink()
    loader = ShardedLoader(own_data, micro_batch_size=2, num_workers=workers)
    loader.load_state_dict({**loader.state_dict(), "position": start})
    served = [p for b in take(loader, (2 * N - start) // 2) for p in b["positions"].tolist()]
    assert served == list(range(start, start + len(served))) and served[-1] >= 2 * N - 2
    first_missing = manifest.splits["train"].shards[
        next(s for s in order.shard_order(2).tolist() if s in slots[:3])
    ].name
    with pytest.raises(FileNotFoundError, match=rf"{first_missing}.*missing.*--force"):
        take(loader, N)  # epoch 2 needs the removed shards


def _expect_shard_error(data, exc, pattern, workers=0, verify=True, split="train"):
    if split == "train":
        loader = ShardedLoader(data, micro_batch_size=N, shuffle=False, num_workers=workers,
                               verify_checksums=verify)  # fmt: skip
        run = lambda: take(loader, 1)
    else:
        run = lambda: list(iter_eval(data, split, micro_batch_size=4, verify_checksums=verify))
    with pytest.raises(exc, match=pattern) as info:
        run()
    assert "pretrain prepare" in str(info.value) and "--force" in str(info.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_missing_shard_and_checksum_mismatch_name_the_shard(own_data, workers):
    name = shard_name("train", 2)
    path = own_data / name
    raw = bytearray(path.read_bytes())
    raw[700] ^= 0xFF  # inside the first member's payload
    path.write_bytes(bytes(raw))
    _expect_shard_error(own_data, ShardError, rf"{name}: sha256 .* does not match", workers)
    path.unlink()
    _expect_shard_error(own_data, FileNotFoundError, rf"{name}.*missing", workers)


def test_truncated_shard_names_the_shard(own_data):
    name = shard_name("val", 1)
    path = own_data / name
    path.write_bytes(path.read_bytes()[: 512 * 3 + 100])  # cut inside the second member
    _expect_shard_error(own_data, ShardError, rf"{name} is truncated or not a valid tar", verify=False,
                        split="val")  # fmt: skip
    _expect_shard_error(own_data, ShardError, rf"{name}: sha256", split="val")
    path.write_bytes(b"this is not a tar file at all" * 40)
    _expect_shard_error(own_data, ShardError, rf"{name} is truncated or not a valid tar", verify=False,
                        split="val")  # fmt: skip


def tokens(first: int, n: int) -> list[np.ndarray]:
    return [sample_tokens(i, 9, VOCAB).astype(np.uint16) for i in range(first, first + n)]


def test_wrong_sample_count_names_the_shard(own_data):
    replace_shard(own_data, "train", 1, tokens(7, 11))  # manifest still says 12
    _expect_shard_error(own_data, ShardError, rf"{shard_name('train', 1)} holds 11 samples but .* 12 "
                        r".*train0000000018")  # fmt: skip
    replace_shard(own_data, "train", 1, tokens(7, 13))  # one too many
    _expect_shard_error(own_data, ShardError, r"train-000001.tar: sample train0000000019 is outside")


def test_wrong_length_dtype_and_key_name_shard_and_key(own_data):
    bad = tokens(19, 5)  # shard 2 holds samples 19..23
    bad[3] = bad[3][:8]
    replace_shard(own_data, "train", 2, bad)
    _expect_shard_error(own_data, ShardError, r"train-000002.tar: sample train0000000022 has shape \(8,\)")
    bad = tokens(19, 5)
    bad[0] = bad[0].astype(np.int32)
    replace_shard(own_data, "train", 2, bad)
    _expect_shard_error(own_data, ShardError, r"train-000002.tar: sample train0000000019 has dtype int32")
    keys = [sample_key("train", i) for i in range(19, 24)]
    keys[4] = sample_key("train", 19)
    replace_shard(own_data, "train", 2, tokens(19, 5), keys=keys)
    _expect_shard_error(own_data, ShardError, r"train-000002.tar: sample train0000000019 occurs twice")
    keys[4] = "val0000000023"
    replace_shard(own_data, "train", 2, tokens(19, 5), keys=keys)
    _expect_shard_error(own_data, ShardError, r"train-000002.tar: sample key 'val0000000023' is not")


def test_error_in_worker_names_shard_and_position(own_data):
    bad = tokens(19, 5)
    bad[1] = bad[1].astype(np.uint32)
    replace_shard(own_data, "train", 2, bad)
    _expect_shard_error(own_data, ShardError, r"train-000002.tar: sample train0000000020 has dtype "
                        r"uint32, the manifest says uint16 \(needed for train position 19, epoch 0\)",
                        workers=1)  # fmt: skip


def test_load_state_dict_refuses_other_data_or_seed(data, own_data):
    state = ShardedLoader(data, micro_batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"seed=1 but this loader has seed=2"):
        ShardedLoader(data, micro_batch_size=2, seed=2).load_state_dict(state)
    replace_shard(own_data, "train", 0, tokens(1, 7))  # same shape, other content
    other = ShardedLoader(own_data, micro_batch_size=2, seed=1)
    digest = other.state_dict()["data_digest"]
    assert digest != state["data_digest"]
    with pytest.raises(ValueError, match=rf"data_digest='{state['data_digest']}' but this loader has data_digest='{digest}'"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        ShardedLoader(data, micro_batch_size=2, seed=1, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="no split 'test'"):
        ShardedLoader(data, "test", micro_batch_size=2)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_eval_covers_split_once_across_ranks(data, dp_size, workers):
    m, n = 4, sum(VAL)
    seen = []
    for r in range(dp_size):
        batches = list(iter_eval(data, micro_batch_size=m, dp_rank=r, dp_size=dp_size,
                                 num_workers=workers))  # fmt: skip
        assert len(batches) == num_eval_batches(n, m, r, dp_size)
        for b in batches:
            ids = b["sample_ids"].tolist()
            assert ids == b["positions"].tolist()  # unshuffled: position p is sample p
            assert ids == list(range(ids[0], ids[0] + len(ids))) and 1 <= len(ids) <= m
            expected = np.stack([sample_tokens(i, 9, VOCAB) for i in ids])
            np.testing.assert_array_equal(b["input_ids"].numpy(), expected)
            seen += ids
    assert sorted(seen) == list(range(n))
    capped = list(iter_eval(data, micro_batch_size=2, dp_rank=1, dp_size=2, max_batches=2))
    assert [b["positions"].tolist() for b in capped] == [[2, 3], [6, 7]]


def test_audit_check_detects_violations(tmp_path, data):
    manifest = Manifest.load(data)
    key = lambda i: sample_key("train", i)
    write = lambda rank, lines: audit_file(tmp_path, "train", rank).write_text("".join(lines))
    order = list(range(N))
    write(0, [f"{p} 0 {key(s)}\n" for p, s in enumerate(order)])
    assert check_exactly_once(tmp_path, manifest, N).full_epochs == 1
    write(0, [f"{p} 0 {key(s)}\n" for p, s in enumerate(order[:-1] + [3])])  # 3 twice, 43 never
    with pytest.raises(AssertionError, match=r"train0000000003 x2[\s\S]*never served, e.g. train0000000043"):
        check_exactly_once(tmp_path, manifest, N)
    write(0, [f"{p} 0 {key(s)}\n" for p, s in enumerate(order) if p not in (5, 6, 20)])
    with pytest.raises(AssertionError, match=r"3 positions below 44 not served: \[5, 7\), \[20, 21\)"):
        check_exactly_once(tmp_path, manifest, N)
    write(0, [f"{p} 0 {key(s)}\n" for p, s in enumerate(order)] + ["44 1 train0000000000\n"])
    write(1, ["44 1 train0000000001\n", "45 1 train0000000001\n"])  # conflict + partial-epoch repeat
    with pytest.raises(AssertionError, match=r"1 positions recorded with different samples[\s\S]*"
                       r"epoch 1: 1 samples served more than once"):  # fmt: skip
        check_exactly_once(tmp_path, manifest, N + 2)
    write(1, ["45 0 train0000000001\n"])
    with pytest.raises(AssertionError, match=r"position 45: recorded epoch 0, expected 1"):
        check_exactly_once(tmp_path, manifest, N + 2)
    # a line cut by a crash is ignored when read and dropped before appending
    write(1, ["45 1 train0000000001\n", "46 1 train00"])
    assert check_exactly_once(tmp_path, manifest, N + 2).records == N + 2
    loader = ShardedLoader(data, micro_batch_size=2, dp_rank=1, dp_size=2, audit_dir=tmp_path,
                           shuffle=False)  # fmt: skip
    take(loader, 1)
    loader.close()
    assert audit_file(tmp_path, "train", 1).read_text().splitlines()[-3:] == [
        "45 1 train0000000001", "2 0 train0000000002", "3 0 train0000000003"
    ]  # fmt: skip


def test_rejects_bad_layout(data):
    with pytest.raises(ValueError, match="dp_rank"):
        ShardedLoader(data, micro_batch_size=2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        ShardedLoader(data, micro_batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        ShardedLoader(data, micro_batch_size=1, seed=-1)
    with pytest.raises(FileNotFoundError, match="pretrain prepare"):
        ShardedLoader(data / "nowhere", micro_batch_size=1)
