"""Training throughput of our GPT against Hugging Face transformers' GPT2LMHeadModel.

Same dimensions, batch, sequence length, optimizer (AdamW) and precision, in the same process,
on the same machine; the two models are timed in alternating rounds (which one goes first
alternates too) so that drift of the machine affects both, and each model's best round counts
(the least disturbed by other processes). A round is one optimizer step by default: on a
machine shared with other jobs, whose load comes in bursts, a short round is far more likely to
run undisturbed than a long one (6 rounds of 5 steps gave ratios from 0.77x to 1.60x for the
same code within an hour at load 5-12; BENCHMARKS.md section 1). MFU is model FLOPs/s
(PaLM: 6N + 12 L H Q T per token) over a peak measured in the same run: on CPU the fp32 matmul
rate of a large square matmul (there is no datasheet peak to trust), on GPU also the datasheet
peak when the device is known.

    python benchmarks/train_throughput.py               # the default 4-layer, d=256 model
    python benchmarks/train_throughput.py --preset gpt2-small --batch 4 --seq 512
    python benchmarks/train_throughput.py --unfused-loss   # also ours with the logits whole

The last line printed is the ratio: our tokens/s over Hugging Face's.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from benchmarks.common import load_line  # noqa: E402

from pretrain.config import ModelConfig  # noqa: E402
from pretrain.metrics import device_peak_tflops  # noqa: E402
from pretrain.model import build_model  # noqa: E402

PRESETS = {  # (n_layer, n_head, d_model)
    "cpu-small": (4, 4, 256),
    "gpt2-small": (12, 12, 768),
}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048,
                      repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_ours(n_layer, n_head, d, seq, vocab) -> torch.nn.Module:
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d, max_seq_len=seq, dropout=0.0)
    return build_model(cfg, vocab)


def make_hf(n_layer, n_head, d, seq, vocab) -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def step_fn(model, kind: str, opt, ids):
    x, y = ids[:, :-1], ids[:, 1:]
    if kind == "ours":  # the loss from the head's input, block by block (LinearCrossEntropy)
        loss = model(x, y).loss
    elif kind == "ours-unfused":  # asking for the logits takes the head-then-loss path
        loss = model(x, y, return_logits=True).loss
    else:  # the same loss computation on HF's logits (its labels= path shifts internally)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_steps(model, kind, opt, ids, steps, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn(model, kind, opt, ids)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="cpu-small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--unfused-loss", action="store_true",
                    help="also time our model with the whole logits, then the loss (an A/B of "
                         "the fused loss head)")
    args = ap.parse_args()
    device = torch.device(args.device)
    n_layer, n_head, d = PRESETS[args.preset]
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    models = {}
    kinds = [("ours", make_ours), ("hf", make_hf)]
    if args.unfused_loss:
        kinds.insert(1, ("ours-unfused", make_ours))
    for kind, make in kinds:
        torch.manual_seed(0)
        model = make(n_layer, n_head, d, args.seq, args.vocab).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        for _ in range(2):  # warm-up: allocator, kernels, optimizer state
            step_fn(model, kind, opt, ids)
        models[kind] = (model, opt)
    times = {kind: [] for kind in models}
    for r in range(args.rounds):
        for kind in list(models) if r % 2 == 0 else list(models)[::-1]:
            model, opt = models[kind]
            times[kind].append(time_steps(model, kind, opt, ids, args.steps, device))
    peak = matmul_peak_flops(device, torch.float32)
    ours = models["ours"][0]
    flops_tok = ours.flops_per_token(args.seq)
    tokens = args.batch * args.seq
    datasheet = device_peak_tflops(device, None)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    print(load_line())
    print(f"model: {args.preset} (L={n_layer}, H={n_head}, d={d}), batch {args.batch} x seq "
          f"{args.seq}, vocab {args.vocab}, AdamW, fp32; {args.rounds} rounds x {args.steps} steps")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<14}{'step ms (best)':>14}{'tokens/s':>12}{'MFU vs matmul peak':>20}")
    rate = {}
    for kind in ("hf", *(["ours-unfused"] if args.unfused_loss else []), "ours"):
        t = min(times[kind])
        rate[kind] = tokens / t
        mfu = flops_tok * rate[kind] / peak
        extra = f"  ({flops_tok * rate[kind] / (datasheet * 1e12):.1%} of datasheet)" \
            if datasheet else ""
        print(f"{kind:<14}{t * 1e3:>14.1f}{rate[kind]:>12.0f}{mfu:>20.1%}{extra}")
    if args.unfused_loss:
        print(f"ours / ours-unfused tokens/s: {rate['ours'] / rate['ours-unfused']:.2f}x")
    print(f"ratio ours/hf tokens/s: {rate['ours'] / rate['hf']:.2f}x")


if __name__ == "__main__":
    main()
