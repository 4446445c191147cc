"""Loader throughput: samples/s of the training loader against what a training step consumes.

The data: a synthetic prepared directory (random token ids of the config's seq_len and
vocabulary, `--samples` samples in tar shards of the config's data.shard_bytes, written by the
pipeline's own shard writer, with a manifest) in a temporary directory, removed afterwards.

  * loader: `ShardedLoader` as the trainer builds it (micro-batch, shuffle, sha256 checks and
    on_corrupt from the config, or --verify/--no-verify, --on-corrupt) with 0, 1 and 2
    DataLoader workers, timed from iter() -- worker start included --
    to the last of `--batches` micro-batches; each round starts at another position, so it
    decodes shards it has not seen;
  * training: the samples/s of one optimizer step of the config's model (default: the
    `make pretrain` GPT) in this process, built as the trainer builds it (build_model, AdamW
    with the trainer's parameter groups, gradient clipping), fp32, on batches from the loader,
    with `--threads` torch threads (default 1: `make pretrain` runs 2 ranks under torchrun,
    which gives each rank OMP_NUM_THREADS=1). Each rank has its own loader, so this is the rate
    one loader must sustain.

Loader and training rounds alternate; each keeps its best round.

    python benchmarks/loader_throughput.py                      # configs/gpt-default.yaml
    python benchmarks/loader_throughput.py --config configs/gpt-tiny.yaml --samples 20000

The last line printed is the ratio: the slowest loader setting's samples/s over training's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import torch  # noqa: E402

from benchmarks.common import load_line, machine_line, table, write_synthetic_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_training_step(cfg, manifest):
    """The trainer's model and optimizer, without DeepSpeed (ZeRO-0 fp32 on one process)."""
    from pretrain.model import build_model
    from pretrain.parallel.deepspeed import build_optimizer
    from pretrain.trainer import param_groups, resolve_vocab_size

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, resolve_vocab_size(cfg, manifest)).train()
    opt = build_optimizer(cfg, param_groups(model, cfg.optim.weight_decay))

    def step(ids: torch.Tensor) -> None:
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpt-default.yaml"))
    ap.add_argument("--samples", type=int, default=200_000, help="samples in the synthetic data")
    ap.add_argument("--batches", type=int, default=3000, help="micro-batches per loader round")
    ap.add_argument("--steps", type=int, default=5, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                    help="check shard sha256s (default: the config's data.verify_checksums)")
    ap.add_argument("--on-corrupt", choices=["error", "skip"], default=None,
                    help="the loader's data.on_corrupt (default: the config's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from data_pipeline.loader import ShardedLoader
    from pretrain.config_io import load_config

    cfg = load_config(args.config, [])
    verify = cfg.data.verify_checksums if args.verify is None else args.verify
    on_corrupt = args.on_corrupt or cfg.data.on_corrupt
    m, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    vocab = cfg.data.tokenizer.vocab_size
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        manifest = write_synthetic_data(tmp, samples=args.samples, seq_len=seq,
                                        vocab_size=vocab, shard_bytes=cfg.data.shard_bytes)
        loaders = {w: ShardedLoader(tmp, micro_batch_size=m, seed=cfg.run.seed,
                                    shuffle=cfg.data.shuffle, num_workers=w,
                                    verify_checksums=verify, on_corrupt=on_corrupt)
                   for w in args.workers}
        step = make_training_step(cfg, manifest)
        batches = iter(ShardedLoader(tmp, micro_batch_size=m, seed=cfg.run.seed))
        ids = [next(batches)["input_ids"] for _ in range(args.steps)]
        step(ids[0])  # warm-up: allocator, optimizer state
        times: dict[str, list[float]] = {"training": []}
        start = 0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for x in ids:
                step(x)
            times["training"].append((time.perf_counter() - t0) / (args.steps * m))
            for w, loader in loaders.items():
                state = loader.state_dict()
                loader.load_state_dict({**state, "position": start})
                start += args.batches * m  # the next round reads other samples (and shards)
                t0 = time.perf_counter()
                it = iter(loader)
                for _ in range(args.batches):
                    next(it)
                it.close()
                times.setdefault(f"loader, {w} workers", []).append(
                    (time.perf_counter() - t0) / (args.batches * m))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rate = {name: 1.0 / min(t) for name, t in times.items()}
    train = rate["training"]
    rows = [(name, r, f"{r / train:.1f}x") for name, r in rate.items()]
    shards = manifest.splits["train"].shards
    print(machine_line())
    print(load_line())
    print(f"config: {args.config}: {cfg.model.family} L={cfg.model.n_layer} d={cfg.model.d_model}"
          f", micro-batch {m} x seq {seq}, vocab {manifest.tokenizer.vocab_size}; data: "
          f"{args.samples:,} synthetic samples in {len(shards)} shards of <= "
          f"{cfg.data.shard_bytes / 2**20:g} MiB; sha256 checks {verify}, on_corrupt "
          f"{on_corrupt}; {torch.get_num_threads()} torch threads; "
          f"best of {args.rounds} rounds ({args.steps} steps, {args.batches} batches)")
    print(table(["", "samples/s", "vs training"], rows))
    slowest = min((n for n in rate if n != "training"), key=rate.get)
    print(f"ratio loader ({slowest}) / training samples/s: {rate[slowest] / train:.1f}x")


if __name__ == "__main__":
    main()
