"""GPU training throughput: MFU of a ~1B-parameter GPT at sequence length 2048, bf16, one GPU.

Model FLOPs utilization (PaLM: 6 N + 12 L H Q T FLOPs per token, N non-embedding parameters,
recomputation not counted; pretrain/model/flops.py) of full training steps -- forward, loss,
backward, optimizer -- of our GPT, against two peaks:

  * 989 TFLOP/s, the H100 SXM dense bf16 datasheet figure (and this device's datasheet peak if
    pretrain.metrics knows another one);
  * the bf16 matmul peak of this GPU measured in the same run (a large square matmul, best of
    several): the baseline of the last line.

Settings (all printed with the result), as the field trains on one GPU:
  * model: GPT-2 layout, d_model 2048, 18 layers, 16 heads of 128, vocabulary 50304, learned
    positions, tied embeddings, no dropout: ~1.0B parameters (0.91B non-embedding);
  * bf16 autocast over fp32 master weights; the loss in fp32;
  * attention: SDPA pinned to the flash-attention backend (`--sdpa`);
  * selective activation checkpointing (`--ac`; pretrain.parallel.activation_checkpoint): matmul
    and attention outputs kept, element-wise ops recomputed;
  * torch.compile of the whole model with its loss (`--compile`);
  * the loss from the head's input a block of rows at a time (pretrain.model.layers.
    LinearCrossEntropy: at most 256 MiB of fp32 logits, 1,334 rows of the 50,304-word
    vocabulary, both head gradients prepared in forward): the [B, T, V] logits never exist
    whole, in bf16 or fp32;
  * AdamW with fused=True (one kernel for all parameters), weight decay on matrices;
  * micro-batch `--batch` x 2048 tokens of random ids (compute only: the loader is measured by
    loader_throughput.py), no gradient accumulation.

    python benchmarks/gpu_mfu.py                   # on a GPU machine (an H100 for the figure)
    python benchmarks/gpu_mfu.py --batch 16 --steps 30
    python benchmarks/gpu_mfu.py --tiny            # CPU smoke run of the same code path

It refuses to run without a CUDA GPU unless --tiny is given. The last line printed is the ratio:
model FLOP/s over the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import torch  # noqa: E402

from benchmarks.common import load_line, machine_line  # noqa: E402

H100_BF16_TFLOPS = 989.0
"""H100 SXM dense bf16 tensor-core peak (no 2:4 sparsity)."""

# (n_layer, n_head, d_model, vocab, seq_len)
FULL = (18, 16, 2048, 50304, 2048)
TINY = (2, 4, 64, 512, 64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, repeats: int = 20) -> float:
    """Best bf16 FLOP/s of an n x n x n matmul on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best


def pin_sdpa(kind: str) -> None:
    """Make SDPA use one backend (it raises if that backend cannot run the inputs)."""
    if kind == "auto":
        return
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(kind == "flash")
    cuda.enable_mem_efficient_sdp(kind == "efficient")
    cuda.enable_cudnn_sdp(kind == "cudnn")
    cuda.enable_math_sdp(False)


def build(args, device: torch.device):
    from pretrain.config import ModelConfig
    from pretrain.model import build_model
    from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing
    from pretrain.trainer import param_groups

    n_layer, n_head, d, vocab, seq = TINY if args.tiny else FULL
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d, max_seq_len=seq, dropout=0.0,
                      tie_embeddings=True)
    torch.manual_seed(0)
    with device:
        model = build_model(cfg, vocab).train()
    if args.ac != "none":
        apply_activation_checkpointing(model, args.ac)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                            fused=True)
    forward = torch.compile(model) if args.compile == "model" else model
    ids = torch.randint(0, vocab, (args.batch, seq + 1), device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step, cfg, vocab, seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer model on whatever device there is (CPU smoke run); "
                         "without --compile given, no torch.compile")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 8; tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first: compilation, allocator (default 5; tiny 1)")
    ap.add_argument("--ac", choices=["selective", "full", "none"], default="selective",
                    help="activation checkpointing of every block")
    ap.add_argument("--compile", choices=["model", "none"], default=None,
                    help="torch.compile the model with its loss (default: model; tiny: none)")
    ap.add_argument("--sdpa", choices=["flash", "cudnn", "efficient", "auto"], default="flash",
                    help="SDPA backend on the GPU")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("gpu_mfu.py measures a ~1B GPT in bf16 on a CUDA GPU (an H100 for the issue-8 "
                 "figure) and no CUDA device is visible here (torch "
                 f"{torch.__version__}). Run it on a GPU machine, or pass --tiny for a CPU "
                 "smoke run of the same code path.")
    args.batch = args.batch or (2 if args.tiny else 8)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.compile = args.compile or ("none" if args.tiny else "model")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        pin_sdpa(args.sdpa)

    from pretrain.metrics import device_peak_tflops

    peak = matmul_peak(device, 256 if args.tiny else 8192)
    model, step, cfg, vocab, seq = build(args, device)
    t_compile = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]
    sync(device)
    t_compile = time.perf_counter() - t_compile
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t)
    first, last = losses[0].item(), losses[-1].item()

    flops_token = model.flops_per_token(seq)
    tokens = args.batch * seq
    step_s = sorted(times)[len(times) // 2]  # the median step
    achieved = flops_token * tokens / step_s
    datasheet = device_peak_tflops(device, None)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    n_all = sum(p.numel() for p in model.parameters())
    print(machine_line())
    print(load_line())
    print(f"model: GPT L={cfg.n_layer} H={cfg.n_head} d={cfg.d_model} vocab {vocab}, "
          f"{n_all / 1e6:,.1f}M parameters ({model.num_params() / 1e6:,.1f}M non-embedding), "
          f"{flops_token / 1e9:.3g} GFLOP/token (6N + 12LHQT)")
    print(f"settings: micro-batch {args.batch} x seq {seq}, bf16 autocast + fp32 master weights,"
          f" SDPA {args.sdpa if cuda else 'default (CPU)'}, activation checkpointing {args.ac}, "
          f"torch.compile {args.compile}, AdamW fused; {args.warmup} warm-up steps "
          f"({t_compile:.1f} s), {args.steps} timed steps; loss {first:.3f} -> {last:.3f}")
    if cuda:
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
              f" of {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")
    print(f"{'':<34}{'TFLOP/s':>10}{'MFU':>8}")
    print(f"{'model FLOPs achieved (median step)':<34}{achieved / 1e12:>10.1f}")
    print(f"{'H100 SXM datasheet bf16':<34}{H100_BF16_TFLOPS:>10.1f}"
          f"{achieved / (H100_BF16_TFLOPS * 1e12):>8.1%}")
    if datasheet and datasheet != H100_BF16_TFLOPS:
        print(f"{name + ' datasheet':<34}{datasheet:>10.1f}{achieved / (datasheet * 1e12):>8.1%}")
    print(f"{'measured bf16 matmul peak':<34}{peak / 1e12:>10.1f}{achieved / peak:>8.1%}")
    print(f"step {step_s * 1e3:.1f} ms (median; best {min(times) * 1e3:.1f}), "
          f"{tokens / step_s:,.0f} tokens/s on {name}")
    print(f"ratio model FLOP/s / measured bf16 matmul peak (MFU): {achieved / peak:.3f}")


if __name__ == "__main__":
    main()
