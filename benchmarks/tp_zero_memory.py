"""Memory per rank of parameters + gradients + optimizer states: TP 1/2/4 x ZeRO 0-3.

Each grid runs as real processes (gloo, CPU): the model is built whole from the seed, split by
apply_tensor_parallel, handed to DeepSpeed with our generated config and mpu, and trained for a
few steps on random tokens. glibc is told to serve every allocation of 64 KiB or more with mmap
(MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident memory (RSS) at once.

What is measured: the highest RSS right after each micro-step's backward and after each
engine.step() of the steps after the first (when parameters, gradients and Adam states all
exist), after garbage collection, for two
depths of the same model (--layers and 2 x --layers). The difference between the two, over the
difference in parameters this rank holds, is the memory per parameter: fixed costs (Python,
torch, DeepSpeed's runtime and its fixed-size communication buckets) cancel out. The peak RSS
over the whole run (which also holds ZeRO-3's gathered layers and other transients) is printed
for reference.

Prediction, fp32 (this is CPU: 4-byte weights and gradients), Psi_r = parameters this rank
holds after the tensor-parallel split (split weights / tp + replicated ones), D = data-parallel
size:

    ZeRO-0   4 Psi_r params + 4 Psi_r grads + 8 Psi_r Adam moments          = 16   Psi_r
    ZeRO-1   4 + 4 + (4 fp32 master + 8 Adam) / D                            = 8 + 12/D
    ZeRO-2   4 + (4 + 12) / D                                                = 4 + 16/D
    ZeRO-3   (4 + 4 + 12) / D                                                = 20/D

(DeepSpeed's ZeRO optimizers keep an fp32 master partition even when the model is fp32.) The
shrink is each grid's figure over TP1 ZeRO-0's, measured against predicted.

Each step accumulates --accum (default 2) micro-batches. That is where ZeRO-1 and ZeRO-2 differ:
ZeRO-1 accumulates whole gradients and reduce-scatters them at the last micro-step, ZeRO-2
reduces each micro-step's gradients into its partition at once. With one micro-step per step
DeepSpeed's ZeRO-1 also partitions the gradients before engine.backward() returns, so after
backward it holds what ZeRO-2 holds (the whole gradient only inside backward).

The DeepSpeed config is the one the trainer generates (`build_ds_config`). Its ZeRO reduce
bucket is sized to the model (parallel.reduce_bucket_size, default max(d_model^2, 2^20)
elements): a fixed buffer per rank, which cancels in the difference. `3d` runs ZeRO-3 with
DeepSpeed's own default bucket (5e8 elements) instead, for comparison: larger than these models,
ZeRO-3 fills it with the whole unpartitioned gradient, 4 bytes per parameter that the
prediction does not have (and that stop growing only at 5e8 parameters: 2 GB fp32, 1 GB bf16).

    python benchmarks/tp_zero_memory.py                       # TP 1 2 4 x ZeRO 0-3, DP=2
    python benchmarks/tp_zero_memory.py --tp 1 --zero 3 3d    # the bucket's effect
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
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


DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # reduce_bucket_size when a config does not set it


def worker(rank: int, world: int, port: int, args, tp: int, zero_name: str, out: str) -> None:
    zero = int(zero_name[0])
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
        "parallel": {"tensor_parallel": tp, "zero_stage": zero,
                     "reduce_bucket_size": DEEPSPEED_DEFAULT_BUCKET if zero_name == "3d"
                     else None},
        "train": {"micro_batch_size": 1, "grad_accum_steps": args.accum},
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
        ds_config = build_ds_config(cfg, world, "fp32")
        engine, _ = init_engine(model, build_optimizer(cfg, param_groups(model, 0.1)), None,
                                ds_config, mpu=dims)
        gen = torch.Generator().manual_seed(dims.dp_rank)
        state = 0
        for step in range(args.steps):
            for _ in range(args.accum):  # engine.step() steps the optimizer at the last one
                ids = torch.randint(0, args.vocab, (1, args.seq + 1), generator=gen)
                engine.backward(engine(ids[:, :-1], ids[:, 1:]).loss)
                if step >= 1:  # Adam's states exist from the first step on
                    gc.collect()
                    state = max(state, rss())
                engine.step()
                if step >= 1:
                    gc.collect()
                    state = max(state, rss())
    got = torch.tensor([state - base, sampler.peak - base], dtype=torch.float64)
    dist.all_reduce(got, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "tp": tp, "dp": dims.dp, "zero": zero_name, "layers": args.layers, "psi_r": psi_r,
            "state": got[0].item(), "peak": got[1].item()}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4, help="and twice as many (see above)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--zero", nargs="+", default=["0", "1", "2", "3"],
                    choices=["0", "1", "2", "3", "3d"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accum", type=int, default=2,
                    help="micro-steps per step: gradients live across them (see above)")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # must be set before the process
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from launch.env import free_port

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            for zero in args.zero:
                for layers in (args.layers, 2 * args.layers):
                    out = os.path.join(tmp, "result.json")
                    run = argparse.Namespace(**{**vars(args), "layers": layers})
                    mp.spawn(worker, args=(tp * args.dp, free_port(), run, tp, zero, out),
                             nprocs=tp * args.dp, join=True)
                    rows[tp, zero, layers] = json.loads(Path(out).read_text())
                    print(json.dumps(rows[tp, zero, layers]), flush=True)
    table = []
    for tp in args.tp:
        for zero in args.zero:
            small, big = rows[tp, zero, args.layers], rows[tp, zero, 2 * args.layers]
            d_psi = big["psi_r"] - small["psi_r"]
            table.append({"tp": tp, "zero": zero, "psi_r": big["psi_r"], "peak": big["peak"],
                          "measured": (big["state"] - small["state"]) / d_psi,
                          "predicted": predicted_bytes(1, int(zero[0]), args.dp),
                          "measured_total": (big["state"] - small["state"]) / d_psi * big["psi_r"]})
    base = table[0]  # the first grid: TP1 ZeRO-0 by default
    from benchmarks.common import load_line, machine_line

    print(f"\n{machine_line()}, DeepSpeed {deepspeed_version()}, {datetime.date.today()}")
    print(load_line())
    print(f"model: d={args.d_model}, {args.layers} vs {2 * args.layers} layers, {args.heads} "
          f"heads, vocab {args.vocab}; fp32; DP={args.dp}; {args.steps} steps of {args.accum} "
          "micro-steps")
    print(f"shrink relative to TP{base['tp']} ZeRO-{base['zero']}; Psi_r and memory of the "
          f"{2 * args.layers}-layer model")
    print(f"{'grid':<12}{'Psi_r (M)':>10}{'B/param meas.':>15}{'B/param pred.':>15}"
          f"{'MiB/rank':>10}{'shrink meas.':>14}{'shrink pred.':>14}{'diff':>8}{'peak MiB':>10}")
    worst = 1.0
    for r in table:
        sm = r["measured_total"] / base["measured_total"]
        sp = r["predicted"] * r["psi_r"] / (base["predicted"] * base["psi_r"])
        if abs(sm / sp - 1) > abs(worst - 1):
            worst = sm / sp
        print(f"TP{r['tp']} ZeRO-{r['zero']:<5}{r['psi_r'] / 1e6:>10.2f}{r['measured']:>15.2f}"
              f"{r['predicted']:>15.2f}{r['measured_total'] / 2**20:>10.0f}{sm:>14.3f}"
              f"{sp:>14.3f}{sm / sp - 1:>+8.1%}{r['peak'] / 2**20:>10.0f}")
    print(f"ratio measured / predicted shrink, farthest grid: {worst:.3f}x")


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__

if __name__ == "__main__":
    main()
