"""Memory per rank of parameters + gradients + optimizer states: TP 1/2/4 x ZeRO 0-3.

Each grid runs as real processes (gloo, CPU): the model is built whole from the seed, split by
apply_tensor_parallel, handed to DeepSpeed with our generated config and mpu, and trained for a
few steps on random tokens. A thread samples the process's resident memory (RSS) every
millisecond; the figure is the peak over model split + engine setup + steps, minus the RSS just
before the model was built (imports, process group and DeepSpeed's runtime excluded). glibc is
told to serve every allocation of 64 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_), so freed
tensors leave the RSS at once: the whole model built before the split does not linger.

Prediction, fp32 (this is CPU: 4-byte weights and gradients), Psi_r = parameters this rank
holds after the tensor-parallel split (split weights / tp + replicated ones), D = data-parallel
size:

    ZeRO-0   4 Psi_r params + 4 Psi_r grads + 8 Psi_r Adam moments          = 16   Psi_r
    ZeRO-1   4 + 4 + (4 fp32 master + 8 Adam) / D                            = 8 + 12/D
    ZeRO-2   4 + (4 + 12) / D                                                = 4 + 16/D
    ZeRO-3   (4 + 4 + 12) / D                                                = 20/D

(DeepSpeed's ZeRO optimizers keep an fp32 master partition even when the model is fp32.) The
shrink is each grid's figure over TP1 ZeRO-0's, measured against predicted.

    python benchmarks/tp_zero_memory.py                      # d=512, 8 layers, DP=2
    python benchmarks/tp_zero_memory.py --d-model 768 --layers 12 --dp 2 --tp 1 2 4
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    def __init__(self, period: float = 0.001) -> None:
        self.peak, self.period = rss(), period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def predicted_bytes(psi_r: int, zero: int, dp: int) -> float:
    per_param = {0: 16, 1: 8 + 12 / dp, 2: 4 + 16 / dp, 3: 20 / dp}[zero]
    return per_param * psi_r


def worker(rank: int, world: int, port: int, args, tp: int, zero: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pretrain.config import Config
    from pretrain.model import build_model
    from pretrain.parallel.deepspeed import build_ds_config, build_optimizer, init_engine
    from pretrain.parallel.dims import ParallelDims
    from pretrain.parallel.tensor_parallel import apply_tensor_parallel
    from pretrain.sharded_state import name_parameters
    from pretrain.trainer import param_groups

    import deepspeed

    deepspeed.init_distributed("gloo", verbose=False)
    dims = ParallelDims.from_world(tp, rank, world).build_groups()
    cfg = Config.model_validate({
        "model": {"n_layer": args.layers, "n_head": args.heads, "d_model": args.d_model,
                  "max_seq_len": args.seq, "dropout": 0.0},
        "parallel": {"tensor_parallel": tp, "zero_stage": zero},
        "train": {"micro_batch_size": 1, "grad_accum_steps": 1},
        "optim": {"warmup_steps": 0},
    })
    gc.collect()
    base = rss()
    with PeakSampler() as sampler:
        torch.manual_seed(0)
        model = build_model(cfg.model, args.vocab)
        apply_tensor_parallel(model, dims)
        name_parameters(model)
        gc.collect()
        psi_r = sum(p.numel() for p in model.parameters())
        engine, _ = init_engine(model, build_optimizer(cfg, param_groups(model, 0.1)), None,
                                build_ds_config(cfg, world, "fp32"), mpu=dims)
        gen = torch.Generator().manual_seed(dims.dp_rank)
        for _ in range(args.steps):
            ids = torch.randint(0, args.vocab, (1, args.seq + 1), generator=gen)
            engine.backward(engine(ids[:, :-1], ids[:, 1:]).loss)
            engine.step()
    peak = torch.tensor([sampler.peak - base], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "tp": tp, "dp": dims.dp, "zero": zero, "psi_r": psi_r,
            "measured": peak.item(), "predicted": predicted_bytes(psi_r, zero, dims.dp)}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # must be set before the process
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from launch.env import free_port

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            for zero in args.zero:
                out = os.path.join(tmp, f"{tp}-{zero}.json")
                mp.spawn(worker, args=(tp * args.dp, free_port(), args, tp, zero, out),
                         nprocs=tp * args.dp, join=True)
                rows.append(json.loads(Path(out).read_text()))
                print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["tp"] == 1 and r["zero"] == 0) if any(
        r["tp"] == 1 and r["zero"] == 0 for r in rows) else rows[0]
    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"{datetime.date.today()}")
    print(f"model: d={args.d_model}, {args.layers} layers, {args.heads} heads, vocab "
          f"{args.vocab}; fp32; DP={args.dp}; peak RSS over split + engine + {args.steps} steps")
    print(f"{'grid':<14}{'Psi_r (M)':>10}{'measured MiB':>14}{'predicted MiB':>15}"
          f"{'shrink meas.':>14}{'shrink pred.':>14}{'diff':>8}")
    worst = 0.0
    for r in rows:
        sm, sp = r["measured"] / base["measured"], r["predicted"] / base["predicted"]
        diff = sm / sp - 1
        worst = max(worst, abs(diff))
        print(f"TP{r['tp']} ZeRO-{r['zero']:<6}{r['psi_r'] / 1e6:>10.2f}"
              f"{r['measured'] / 2**20:>14.0f}{r['predicted'] / 2**20:>15.0f}"
              f"{sm:>14.3f}{sp:>14.3f}{diff:>+8.1%}")
    print(f"largest deviation of the measured shrink from the predicted: {worst:.1%}")


if __name__ == "__main__":
    main()
