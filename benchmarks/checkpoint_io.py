"""Checkpoint save and load GB/s against a plain sequential write and read of the same bytes, and
the training stall of a synchronous save against an asynchronous one.

Real processes (gloo, CPU), one per rank: a GPT of a few hundred MB of fp32 state (masters and
Adam's two moments) under DeepSpeed ZeRO 1, 2 and 3, trained one step so every state exists. Our
side is the trainer's path: `CheckpointManager.save` / `.load` over `sharded_state.EngineState`
(marker, `latest`, train state, RNG and all). The baseline, in the same processes on the same
disk: every rank writes a new file of (checkpoint bytes / ranks) with one sequential write and an
fsync, as our writer fsyncs, and deletes its previous one (as keep_last=1 deletes the previous
checkpoint), then reads it back into a preallocated buffer. Both sides read files
they have just written the same way (no cache dropping: both are equally warm in the page cache;
`--cold` evicts both sides' files with posix_fadvise before reading). GB/s is the checkpoint's
bytes over the wall time of the slowest rank, between barriers.

Stall: the time the training loop is blocked by a save. A synchronous save blocks for all of it.
An asynchronous one (`checkpoint.async_save`) blocks for the collective part of the save; the
copy of the state into host memory and the write run in a background thread while training goes
on, and the next optimizer step waits if the copy is not done yet (that wait counts as stall
too). Both are timed as the trainer calls them, right after an optimizer step; the async round
then trains on until the write is done and reports how much slower those steps were (the
background copy and write share the cores).

The contenders alternate in rounds and each keeps its best round (the machine is shared).

    python benchmarks/checkpoint_io.py                        # d=512, 6 layers: ~280 MB
    python benchmarks/checkpoint_io.py --tiny               # smoke: seconds

The last line is the worst of save/plain and load/plain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import load_line, machine_line, table  # noqa: E402

WORLD = 2


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _timed(fn) -> float:
    """Wall time of fn on the slowest rank, between barriers."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - t0)


def _evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_write(path: Path, buf: memoryview) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(buf)
        os.fsync(f.fileno())


def plain_read(path: Path, buf: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        n = f.readinto(buf)
    assert n == len(buf), (n, len(buf))


def worker(rank: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed

    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import Config
    from pretrain.model import build_model
    from pretrain.parallel.deepspeed import build_ds_config, build_optimizer, init_engine
    from pretrain.parallel.dims import ParallelDims
    from pretrain.sharded_state import EngineState, name_parameters
    from pretrain.trainer import param_groups

    deepspeed.init_distributed("gloo", verbose=False)
    dims = ParallelDims.from_world(1, rank, WORLD).build_groups()
    cfg = Config.model_validate({
        "model": {"n_layer": args.layers, "n_head": args.heads, "d_model": args.d_model,
                  "max_seq_len": args.seq, "dropout": 0.0},
        "parallel": {"zero_stage": args.zero_stage},
        "train": {"micro_batch_size": 1, "grad_accum_steps": 1}, "optim": {"warmup_steps": 0}})
    torch.manual_seed(0)
    model = build_model(cfg.model, args.vocab)
    name_parameters(model)
    engine, _ = init_engine(model, build_optimizer(cfg, param_groups(model, 0.1)),
                            lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                            build_ds_config(cfg, WORLD, "fp32"), mpu=dims)
    gen = torch.Generator().manual_seed(rank)

    def train_step() -> float:
        t0 = time.perf_counter()
        ids = torch.randint(0, args.vocab, (1, args.seq + 1), generator=gen)
        engine.backward(engine(ids[:, :-1], ids[:, 1:]).loss)
        engine.step()
        return time.perf_counter() - t0

    train_step()  # Adam's states exist from the first step on
    state_io = EngineState(engine, dims)
    run_dir = Path(args.dir) / "run"
    mgr = CheckpointManager(run_dir, keep_last=1, rank=rank, world_size=WORLD)
    plain = Path(args.dir) / f"plain-rank{rank}.a"
    step = 0
    results: dict[str, list[float]] = {k: [] for k in (
        "save", "write", "load", "read", "stall_sync", "stall_async", "background", "step",
        "step_during")}
    nbytes = 0

    def save(background: bool) -> None:
        nonlocal step
        step += 1
        mgr.save(state_io, step, {"step": step, "samples_seen": 0}, "bench: 1\n",
                 background=background)

    for round_ in range(args.rounds):
        # 1. save, then the same bytes written plainly; load, then read plainly
        #    (the order flips every round: neither side always follows the other)
        order = ["ours", "plain"] if round_ % 2 == 0 else ["plain", "ours"]
        if not nbytes:  # the first round learns the size from a save
            save(False)
            nbytes = sum(p.stat().st_size for p in (mgr.dir / f"step-{step:08d}").rglob("*")
                         if p.is_file())
        share = memoryview(torch.rand(nbytes // WORLD // 4 + 1).numpy()).cast("B")[
            : nbytes // WORLD]
        for side in order:
            if side == "ours":
                results["save"].append(_timed(lambda: save(False)))
            else:  # a new file, then the previous one deleted: as keep_last=1 rotates ours
                previous, plain = plain, plain.with_suffix(".b" if plain.suffix == ".a" else ".a")
                results["write"].append(_timed(lambda: (plain_write(plain, share),
                                                        previous.unlink(missing_ok=True))))
        if args.cold:
            _evict([p for p in mgr.dir.rglob("*") if p.is_file()] + [plain])
        for side in order:
            if side == "ours":
                results["load"].append(_timed(lambda: mgr.load(state_io, step)))
            else:
                results["read"].append(_timed(lambda: plain_read(plain, share)))
        del share
        # 2. the stall of a save as the trainer sees it: right after an optimizer step
        baseline = [train_step() for _ in range(2)]
        results["step"].append(_slowest(min(baseline)))
        for background in ([False, True] if round_ % 2 == 0 else [True, False]):
            train_step()
            held = state_io.held_seconds
            stall = _timed(lambda: save(background))
            if background:  # train on, as the loop does, until the write is done
                t0, during = time.perf_counter(), []
                while mgr._pending is not None:
                    during.append(train_step())
                    mgr.poll()
                results["background"].append(_slowest(time.perf_counter() - t0))
                results["step_during"].append(_slowest(sum(during) / max(1, len(during))))
                # the next optimizer step may have waited for the snapshot copy: a stall too
                stall += _slowest(state_io.held_seconds - held)
            results["stall_async" if background else "stall_sync"].append(stall)
    if rank == 0:
        Path(out).write_text(json.dumps({"bytes": nbytes, **results}))
    dist.barrier()
    dist.destroy_process_group()


def run_stage(args, zero: int) -> dict:
    from launch.env import free_port

    out = Path(args.dir) / "result.json"
    run = argparse.Namespace(**{**vars(args), "zero_stage": zero})
    mp.spawn(worker, args=(free_port(), run, str(out)), nprocs=WORLD, join=True)
    result = json.loads(out.read_text())
    shutil.rmtree(Path(args.dir) / "run", ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="evict both sides' files from the page cache before reading")
    ap.add_argument("--dir", default=None,
                    help="where to write (default: a temporary directory, removed afterwards)")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke run: a tiny model, ZeRO-2 only, one round")
    args = ap.parse_args()
    if args.tiny:
        args.d_model, args.layers, args.heads, args.vocab, args.seq = 64, 1, 4, 512, 16
        args.zero, args.rounds = [2], 1
    keep = args.dir is not None
    args.dir = str(Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-")).resolve())
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print(load_line())
    print(f"model: GPT d={args.d_model}, {args.layers} layers, vocab {args.vocab}; fp32; "
          f"{WORLD} ranks (gloo); {args.rounds} alternating rounds, best of each; "
          f"{'cold' if args.cold else 'warm'} page cache; disk: {args.dir}", flush=True)
    rows, stalls, worst, worst_stall = [], [], float("inf"), float("inf")
    try:
        for zero in args.zero:
            r = run_stage(args, zero)
            print(json.dumps({"zero": zero, **r}), flush=True)
            gb = r["bytes"] / 1e9
            save, write = gb / min(r["save"]), gb / min(r["write"])
            load, read = gb / min(r["load"]), gb / min(r["read"])
            rows.append([f"ZeRO-{zero}", r["bytes"] / 1e6, save, write, save / write,
                         load, read, load / read])
            worst = min(worst, save / write, load / read)
            sync, async_ = min(r["stall_sync"]), min(r["stall_async"])
            stalls.append([f"ZeRO-{zero}", 1e3 * sync, 1e3 * async_, sync / async_,
                           1e3 * min(r["background"]), 1e3 * min(r["step"]),
                           1e3 * min(r["step_during"])])
            worst_stall = min(worst_stall, sync / async_)
    finally:
        if not keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(load_line())
    print(table(["stage", "MB", "save GB/s", "write GB/s", "save/write", "load GB/s",
                 "read GB/s", "load/read"], rows))
    print(table(["stage", "stall sync ms", "stall async ms", "sync/async", "background ms",
                 "step ms", "step ms during"], stalls))
    print(f"ratio stall of a synchronous save / an asynchronous one, worst stage: "
          f"{worst_stall:.1f}x")
    print(f"ratio checkpoint / plain GB/s, worst of save and load: {worst:.2f}x")


if __name__ == "__main__":
    main()
