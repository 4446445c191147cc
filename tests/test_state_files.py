"""pretrain/state_files.py (boxes of whole tensors in safetensors files) and the piece-wise save
and load of sharded_state.EngineState under real DeepSpeed ZeRO 1-3 on two gloo ranks."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT
from launch.env import free_port
from pretrain.sharded_state import read_saved_shapes, read_whole
from pretrain.state_files import (
    _runs, box_of_range, read_boxes, read_index, rows_around, write_boxes,
)


def test_box_of_range_finds_exactly_the_ranges_that_are_boxes():
    assert box_of_range((4, 6), 6, 18) == ((1, 0), (2, 6))  # rows 1-2
    assert box_of_range((4, 6), 8, 11) == ((1, 2), (1, 3))  # part of row 1
    assert box_of_range((4, 6), 4, 8) is None  # crosses the end of row 0
    for shape in [(4, 6), (2, 3, 4), (5,), (3, 1, 2)]:
        n = math.prod(shape)
        grid = torch.arange(n).view(shape)
        boxes = set()  # the flat ranges of every box of the shape that is contiguous
        for offsets in itertools.product(*[range(d) for d in shape]):
            for sizes in itertools.product(*[range(1, d - o + 1) for d, o in zip(shape, offsets)]):
                flat = grid[tuple(slice(o, o + z) for o, z in zip(offsets, sizes))].flatten()
                if flat.tolist() == list(range(flat[0], flat[-1] + 1)):
                    boxes.add((int(flat[0]), int(flat[-1]) + 1))
        for start in range(n):
            for stop in range(start + 1, n + 1):
                box = box_of_range(shape, start, stop)
                assert (box is not None) == ((start, stop) in boxes), (shape, start, stop)
                if box is not None:
                    got = grid[tuple(slice(o, o + z) for o, z in zip(*box))].flatten()
                    assert got.tolist() == list(range(start, stop))
                (offsets, sizes), at = rows_around(shape, start, stop)
                rows = grid[tuple(slice(o, o + z) for o, z in zip(offsets, sizes))].flatten()
                assert rows[at: at + stop - start].tolist() == list(range(start, stop))


def test_boxes_written_by_several_ranks_read_back_as_any_box(tmp_path):
    whole = torch.arange(60, dtype=torch.float32).view(6, 10)
    bias = torch.arange(7, dtype=torch.float32)
    written = [  # four "ranks", each with its boxes: rows, part of a row, the rest
        {"w": (whole[0:4], (0, 0)), "b": (bias[0:3], (0,))},
        {"w": (whole[4:5, 0:3], (4, 0))},
        {"w": (whole[4:5, 3:10], (4, 3)), "b": (bias[3:7], (3,))},
        {"w": (whole[5:6], (5, 0))},
    ]
    for rank, boxes in enumerate(written):
        write_boxes(tmp_path / f"rank-{rank:05d}.safetensors",
                    {k: (t.contiguous(), o) for k, (t, o) in boxes.items()})
    assert read_saved_shapes(tmp_path) == {"w": (6, 10), "b": (7,)}
    got = read_whole(tmp_path)
    assert torch.equal(got["w"], whole) and torch.equal(got["b"], bias)
    # boxes that cut across what each rank wrote: DCP reads the overlaps (resharding)
    rows, part, tail = torch.empty(3, 10), torch.empty(2, 4), torch.empty(5)
    read_boxes(tmp_path, {"w": (rows, (3, 0))})
    read_boxes(tmp_path, {"w": (part, (4, 2)), "b": (tail, (2,))})
    assert torch.equal(rows, whole[3:6]) and torch.equal(part, whole[4:6, 2:6])
    assert torch.equal(tail, bias[2:7])
    # boxes whose parts are runs of bytes both in a file and in the box are read straight
    index = read_index(tmp_path)
    assert _runs(index["w"], (1, 0), (2, 10)) == [  # rows 1-2 of rank 0's rows 0-3
        (tmp_path / "rank-00000.safetensors", index["w"][0].start + 4 * 10, 0, 20)]
    assert len(_runs(index["w"], (3, 0), (3, 10))) == 4  # rows 3-5 from all four files
    assert len(_runs(index["b"], (1,), (5,))) == 2
    assert len(_runs(index["w"], (4, 2), (2, 4))) == 3  # three row segments
    assert _runs(index["w"], (0, 2), (2, 4)) is None  # two rows' middles of rank 0's rows
    rows, row, part = torch.empty(3, 10), torch.empty(1, 4), torch.empty(5)
    read_boxes(tmp_path, {"w": (rows, (3, 0)), "b": (part, (1,))})
    assert torch.equal(rows, whole[3:6]) and torch.equal(part, bias[1:6])
    read_boxes(tmp_path, {"w": (row, (4, 5))})  # inside the partial row (4, 3:10)
    assert torch.equal(row, whole[4:5, 5:9])


ZERO_PIECES = textwrap.dedent("""
    import json, os, sys, threading
    import deepspeed, torch, torch.distributed as dist
    from pretrain.parallel.dims import ParallelDims
    from pretrain.sharded_state import EngineState, name_parameters, read_whole
    from pretrain.trainer import param_groups

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, out = dist.get_rank(), sys.argv[1]
    dims = ParallelDims.from_world(1, rank, 2).build_groups()
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 7, generator=gen), torch.randn(4, 3, generator=gen)

    def engine_for(stage):
        torch.manual_seed(0)
        # 5x7 and 3x5 weights: ZeRO's partition boundaries fall inside rows
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        name_parameters(model)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=0.01)
        config = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 8,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=config, mpu=dims,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
        return engine, EngineState(engine, dims)

    def step(engine):
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()

    def state(io):  # the whole fp32 state, gathered with DeepSpeed's accessors
        io._prepare_states()  # DeepSpeed links its views of the Adam states lazily
        return {f"{k or 'model'}.{p.ckpt_name}": io._get(p, k) for p in io.params
                for k in (None, "exp_avg", "exp_avg_sq")}

    report, snapshots = {}, {}
    for stage in (1, 3):  # ZeRO-2 keeps its states as ZeRO-1 does
        engine, io = engine_for(stage)
        step(engine)
        snapshots[stage] = state(io)
        write = io.prepare_save(out, f"zero{stage}", copy=True)
        writer = threading.Timer(0.5, write)  # a background save's thread, starting late
        writer.start()
        step(engine)  # the optimizer step waits for the snapshot copy, then changes the state
        step(engine)
        writer.join()  # the files hold the state of the snapshot
        dist.barrier()
        changed = state(io)
        io.load_checkpoint(out, f"zero{stage}")
        loaded = state(io)
        whole = read_whole(os.path.join(out, f"zero{stage}", "state"))
        names = {k if k.startswith("model.") else "optim." + k: v  # the checkpoint's keys
                 for k, v in snapshots[stage].items()}
        report[stage] = {
            "gathered": sorted(p.ckpt_name for p in io.params if io._writers[id(p)][1]),
            "own": sorted(p.ckpt_name for p in io.params if io._writers[id(p)][0] is None),
            "training_changed_it": any(not torch.equal(changed[k], v)
                                       for k, v in snapshots[stage].items()),
            "optimizer_waited_for_the_copy": io.held_seconds > 0.2,
            "load_restores_the_snapshot": all(torch.equal(loaded[k], v)
                                              for k, v in snapshots[stage].items()),
            "files_hold_the_snapshot": all(torch.equal(whole[k], v) for k, v in names.items()),
            # the weights forward uses are the masters (ZeRO-3 keeps only its partition)
            "weights_are_the_masters": stage == 3 or all(
                torch.equal(p.data, loaded[f"model.{p.ckpt_name}"]) for p in io.params),
        }
    # the ZeRO-3 engine reads what ZeRO-1 wrote (other pieces, other owners)
    io.load_checkpoint(out, "zero1")
    report["zero1_into_zero3"] = all(torch.equal(state(io)[k], v)
                                     for k, v in snapshots[1].items())
    if rank == 0:
        print("RESULT " + json.dumps(report))
""")


@pytest.mark.slow
def test_zero_pieces_save_a_snapshot_and_load_back_under_every_stage(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", ZERO_PIECES, str(tmp_path)], cwd=ROOT,
        env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-6000:]
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1]
    report = json.loads(line[len("RESULT "):])
    for stage in ("1", "3"):
        r = report[stage]
        assert r["training_changed_it"] and r["load_restores_the_snapshot"], (stage, r)
        assert r["weights_are_the_masters"] and r["optimizer_waited_for_the_copy"], (stage, r)
        assert r["files_hold_the_snapshot"], (stage, r)
        # both ways of writing ran: pieces that are boxes, and gathered ones that are not
        assert r["own"] and "0.weight" in r["gathered"], (stage, r)
    assert report["zero1_into_zero3"]
