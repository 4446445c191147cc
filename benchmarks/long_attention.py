"""Long-context attention: forward+backward time and peak memory against sequence length.

One attention layer (batch 1, d_model 256, 4 heads of 64) at 1k ... 16k tokens, for
* dense:        our MultiHeadAttention with PyTorch SDPA (its fused CPU flash kernel),
* longformer:   our MultiHeadAttention with LongformerAttention (window 256 each side, position
                0 global with its own q/k/v projections),
* hf-longformer: transformers' LongformerSelfAttention, same settings (attention_window=512,
                the same global position), built from a config (no download),
* reformer:     our MultiHeadAttention with LSHAttention (2 hashes, chunks of 64,
                n_buckets = 2 T / 64 as the paper suggests),
* hf-reformer:  transformers' LSHSelfAttention, same settings (one chunk back, none ahead).
All bidirectional (Hugging Face's Longformer has no causal mode); --causal times our three
kernels causally instead. Every module does the same work: input projections (Longformer: also
the global q/k/v; Reformer: shared qk and v) and attention. Our output projection is replaced by
the identity, since Hugging Face's self-attention modules have none (their output dense layer
lives in another module).

Method. Time: per length, one subprocess builds every implementation, warms each up with one
step, then times --repeats rounds in which the implementations take turns (so drift of a shared
machine spreads over all of them); the median wall time of a forward+backward step is reported.
Memory: per (implementation, length), a fresh subprocess does one warm-up step, then measures
the peak resident memory (VmHWM in /proc/self/status, reset through /proc/self/clear_refs) over
one forward+backward step minus the resident memory just before it: what the step needs beyond
its inputs and parameters. There glibc is told to serve every allocation of 64 KiB or more with
its own mmap (MALLOC_MMAP_THRESHOLD_), returned to the system when freed, so resident memory
follows live tensors rather than a malloc cache (timing runs keep glibc's defaults).

    python benchmarks/long_attention.py                   # the table of BENCHMARKS.md
    python benchmarks/long_attention.py --lengths 1024 4096 --repeats 2
    python benchmarks/long_attention.py --causal --impls dense longformer reformer

The last line is the ratio of the first pair present among (hf-longformer, longformer),
(hf-reformer, reformer), (dense, longformer), (dense, reformer): their step time over ours at the
longest length (`make bench` and tests/test_benchmarks_smoke.py read it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D_MODEL, N_HEAD, WINDOW, CHUNK, N_HASHES = 256, 4, 256, 64, 2
IMPLS = ["dense", "longformer", "hf-longformer", "reformer", "hf-reformer"]


def n_buckets(seq_len: int) -> int:
    return max(2, 2 * seq_len // CHUNK)


# ----------------------------------------------------------------------------- one point


def build(impl: str, seq_len: int, causal: bool):
    """(module, step function) for one implementation at one length."""
    import torch

    if impl.startswith("hf-"):
        return build_hf(impl, seq_len)
    from pretrain.model import LongformerAttention, LSHAttention, MultiHeadAttention
    from pretrain.model.attention import DenseAttention

    kernel = {
        "dense": lambda: DenseAttention(),
        "longformer": lambda: LongformerAttention(WINDOW, 1, [0]),
        "reformer": lambda: LSHAttention(N_HASHES, n_buckets(seq_len), CHUNK),
    }[impl]()
    module = MultiHeadAttention(D_MODEL, N_HEAD, bias=True, kernel=kernel)
    module.o_proj = torch.nn.Identity()  # like Hugging Face's self-attention modules

    def step(x: torch.Tensor) -> None:
        module(x, causal=causal).sum().backward()

    return module, step


def build_hf(impl: str, seq_len: int):
    import torch

    if impl == "hf-longformer":
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        cfg = LongformerConfig(hidden_size=D_MODEL, num_attention_heads=N_HEAD,
                               attention_window=[2 * WINDOW], attention_probs_dropout_prob=0.0)
        module = LongformerSelfAttention(cfg, layer_id=0)
        # LongformerModel's convention: -10000 masked, 0 local, +10000 global.
        mask = torch.zeros(1, seq_len)
        mask[:, 0] = 10000.0
        is_masked, is_global = mask < 0, mask > 0

        def step(x: torch.Tensor) -> None:
            out = module(x, attention_mask=mask, is_index_masked=is_masked,
                         is_index_global_attn=is_global, is_global_attn=True)[0]
            out.sum().backward()

        return module, step

    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    cfg = ReformerConfig(hidden_size=D_MODEL, num_attention_heads=N_HEAD,
                         attention_head_size=D_MODEL // N_HEAD, num_hashes=N_HASHES,
                         num_buckets=n_buckets(seq_len), lsh_attn_chunk_length=CHUNK,
                         lsh_num_chunks_before=1, lsh_num_chunks_after=0, is_decoder=False,
                         lsh_attention_probs_dropout_prob=0.0, hash_seed=None,
                         attn_layers=["lsh"])
    module = LSHSelfAttention(cfg)

    def step(x: torch.Tensor) -> None:
        module(x).hidden_states.sum().backward()

    return module, step


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def memory_worker(impl: str, seq_len: int, causal: bool) -> dict:
    """Peak resident memory of one forward+backward step beyond what was resident before it
    (run with MALLOC_MMAP_THRESHOLD_ set, see the module docstring)."""
    import torch

    torch.manual_seed(0)
    module, step = build(impl, seq_len, causal)
    module.train()
    x = torch.randn(1, seq_len, D_MODEL, requires_grad=True)
    step(x)  # warm-up: lazy initialization, thread pools
    module.zero_grad(set_to_none=True)
    x.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    step(x)
    return {"impl": impl, "seq_len": seq_len, "peak_mib": (_status_kib("VmHWM") - before) / 1024}


def time_worker(impls: list[str], seq_len: int, repeats: int, causal: bool) -> dict:
    """Median wall time of one forward+backward step per implementation, timed in alternating
    rounds in one process (default malloc)."""
    import torch

    x = torch.randn(1, seq_len, D_MODEL, requires_grad=True)
    steps = {}
    for impl in impls:
        torch.manual_seed(0)
        module, step = build(impl, seq_len, causal)
        module.train()
        step(x)  # warm-up
        steps[impl] = (module, step)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl, (module, step) in steps.items():
            module.zero_grad(set_to_none=True)
            x.grad = None
            t0 = time.perf_counter()
            step(x)
            times[impl].append(time.perf_counter() - t0)
    return {impl: 1e3 * statistics.median(t) for impl, t in times.items()}


# ----------------------------------------------------------------------------- the table


def run_worker(args, *worker_args: str, malloc_mmap: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if malloc_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, __file__, *worker_args, "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd + (["--causal"] if args.causal else []), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(worker_args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], impls: list[str], lengths: list[int]) -> str:
    by = {(r["impl"], r["seq_len"]): r for r in results}

    def cell(impl, n, key, fmt):
        r = by.get((impl, n))
        return "error" if r is None or "error" in r else fmt.format(r[key])

    lines = ["| tokens | " + " | ".join(f"{i} ms" for i in impls) + " | "
             + " | ".join(f"{i} MiB" for i in impls) + " |",
             "|---:|" + "---:|" * (2 * len(impls))]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(cell(i, n, "ms", "{:.0f}") for i in impls) + " | "
                     + " | ".join(cell(i, n, "peak_mib", "{:.0f}") for i in impls) + " |")
    ratios = [(ours, hf) for ours, hf in (("longformer", "hf-longformer"),
                                           ("reformer", "hf-reformer"), ("longformer", "dense"),
                                           ("reformer", "dense")) if ours in impls and hf in impls]
    if ratios:
        lines += ["", "| tokens | " + " | ".join(f"{a} vs {b}: speed-up, memory" for a, b in ratios)
                  + " |", "|---:|" + "---:|" * len(ratios)]
        for n in lengths:
            cells = []
            for a, b in ratios:
                ra, rb = by.get((a, n)), by.get((b, n))
                if not ra or not rb or "error" in ra or "error" in rb:
                    cells.append("error")
                else:
                    cells.append(f"{rb['ms'] / ra['ms']:.2f}x, "
                                 f"{ra['peak_mib'] / max(rb['peak_mib'], 1e-9):.2f}x")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per point")
    parser.add_argument("--causal", action="store_true", help="causal (our kernels only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "SEQ_LEN"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", nargs="+", metavar="SEQ_LEN IMPL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        impl, n = args.memory_worker
        print(json.dumps(memory_worker(impl, int(n), args.causal)))
        return
    if args.time_worker:
        n, *impls = args.time_worker
        print(json.dumps(time_worker(impls, int(n), args.repeats, args.causal)))
        return
    if args.causal and any(i.startswith("hf-") for i in args.impls):
        parser.error("--causal: Hugging Face's Longformer has no causal mode; use "
                     "--impls dense longformer reformer")

    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import load_line, machine_line

    print(machine_line(), flush=True)
    print(load_line(), flush=True)
    print(f"# {date.today()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | threads {args.threads or torch.get_num_threads()} | "
          f"{'causal' if args.causal else 'bidirectional'} | d_model {D_MODEL}, {N_HEAD} heads, "
          f"window {WINDOW}, chunk {CHUNK}, {N_HASHES} hashes", flush=True)
    results = []
    for n in args.lengths:
        times = run_worker(args, "--time-worker", str(n), *args.impls)
        for impl in args.impls:
            mem = run_worker(args, "--memory-worker", impl, str(n), malloc_mmap=True)
            results.append({"impl": impl, "seq_len": n, "ms": times[impl],
                            "peak_mib": mem["peak_mib"]})
            print(json.dumps(results[-1]), flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at end", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results, args.impls, args.lengths))
    print(ratio_line(results, args.impls, max(args.lengths)))


def ratio_line(results: list[dict], impls: list[str], seq_len: int) -> str:
    """Their step time / ours at seq_len, for the first pair present (module docstring)."""
    by = {(r["impl"], r["seq_len"]): r["ms"] for r in results}
    for base, ours in (("hf-longformer", "longformer"), ("hf-reformer", "reformer"),
                       ("dense", "longformer"), ("dense", "reformer")):
        if base in impls and ours in impls:
            return (f"ratio {base}/{ours} step time at {seq_len} tokens: "
                    f"{by[base, seq_len] / by[ours, seq_len]:.2f}x")
    return f"ratio {impls[0]}/{impls[0]} step time at {seq_len} tokens: 1.00x"


if __name__ == "__main__":
    main()
