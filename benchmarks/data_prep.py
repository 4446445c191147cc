"""Data preparation throughput: our Ray pipeline against raw Hugging Face `tokenizers`.

Both sides tokenize the same documents (the corpus of `--sources` copied `--repeat` times under
distinct paths, both splits) with the same trained byte-level BPE on the same number of cores
(`--cpus`, default all):

  * pipeline, end to end: `prepare()` -- what `pretrain prepare` runs -- with the tokenizer given
    (data.tokenizer.path), wall time from the call to its return: Ray start, file listing, scan,
    tokenize, pack, shard writing with sha256 and fsync, manifest, Ray shutdown;
  * pipeline, tokenize stage: the part of that run from creating the Ray Data job to the last
    shard closed (the manifest's stage_seconds.tokenize): actor start, reading, encoding,
    packing, writing;
  * raw: `Tokenizer.encode_batch_fast` (and `encode_batch`, which also computes offsets) on the
    document texts already in memory, `--raw-batch` documents per call (64; the results of a
    call are counted and dropped), on a Rayon pool of `--cpus` threads. The ratio uses the
    faster of the two.

Tokens are counted the same way on both sides (every document's ids plus its EOS), so a rate
ratio is a time ratio over identical work. The pipeline's fixed costs (Ray start and shutdown,
actor start: seconds) weigh on a small corpus, hence the default of 8 copies of the stdlib
(~97 MB). The first pipeline run trains the tokenizer (its own row); then pipeline and raw runs
alternate for `--rounds` rounds and each keeps its best round.

    python benchmarks/data_prep.py                          # 8 x the stdlib corpus, all cores
    python benchmarks/data_prep.py --repeat 1 --rounds 5    # the stdlib once (~12 MB)
    python benchmarks/data_prep.py --sources /corpus/shard-000.jsonl --repeat 1

The last line printed is the ratio: the tokenize stage's tokens/s per core over raw tokenizers'.
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

# The Rayon pool of `tokenizers` is sized when first used: fix it before anything imports it.
def _cpus_arg(argv: list[str]) -> int | None:
    for i, a in enumerate(argv):
        if a.startswith("--cpus="):
            return int(a.split("=", 1)[1])
        if a == "--cpus" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


os.environ["RAYON_NUM_THREADS"] = str(_cpus_arg(sys.argv) or os.cpu_count() or 1)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from benchmarks.common import best_of, load_line, machine_line, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gpt-default.yaml"


def load_cfg(out: Path, sources: list[str], cpus: int, tokenizer: Path | None,
             vocab: int | None):
    from pretrain.config_io import load_config

    overrides = [f"data.dir={out}", "data.sources=[" + ",".join(sources) + "]", "data.exclude=[]",
                 f"data.num_cpus={cpus}"]
    if tokenizer is not None:
        overrides.append(f"data.tokenizer.path={tokenizer}")
    if vocab is not None:
        overrides.append(f"data.tokenizer.vocab_size={vocab}")
    return load_config(CONFIG, overrides)


def copy_corpus(sources: list[str], repeat: int, dest: Path) -> list[str]:
    """`repeat` copies of the files of `sources` under dest/copy-K/<relative path>."""
    from data_pipeline.sources import list_files
    from pretrain.config import DataConfig

    files = list_files(DataConfig(sources=sources, dir=str(dest / "unused")))
    for k in range(repeat):
        for f in files:
            target = dest / f"copy-{k}" / f.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.path, target)
    return [str(dest)]


def corpus_texts(cfg) -> list[str]:
    """Every document the pipeline tokenizes (train and val), in corpus order."""
    from data_pipeline.documents import read_unit
    from data_pipeline.sources import list_files, plan_units

    units, _ = plan_units(list_files(cfg.data), cfg.data.text_field)
    texts: list[str] = []
    for unit in units:
        texts += read_unit(unit, cfg.data.text_field).texts
    return texts


def run_pipeline(cfg) -> dict:
    from data_pipeline.prepare import prepare

    t0 = time.perf_counter()
    m = prepare(cfg, force=True, progress=False)
    wall = time.perf_counter() - t0
    return {"wall": wall, "tokenize": m.stats["stage_seconds"]["tokenize"],
            "stages": m.stats["stage_seconds"], "tokens": m.stats["tokens"]["total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", nargs="+", default=["stdlib"],
                    help="corpus (data.sources): files, directories, globs or `stdlib`")
    ap.add_argument("--cpus", type=int, default=None,
                    help="cores for both sides (default: all)")
    ap.add_argument("--repeat", type=int, default=8,
                    help="copies of the corpus to prepare (amortizes the fixed costs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--raw-batch", type=int, default=64,
                    help="documents per raw batch-encode call (default 64)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="tokenizer vocabulary (default: the gpt-default config's)")
    ap.add_argument("--no-cold", action="store_true",
                    help="train the tokenizer directly instead of in a first, timed pipeline run")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write the prepared data here and keep it (default: a temp dir)")
    args = ap.parse_args()
    cpus = args.cpus or os.cpu_count() or 1

    from tokenizers import Tokenizer

    from data_pipeline.tokenizer import for_encoding

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    out = args.keep or tmp / "data"
    try:
        sources = args.sources if args.repeat == 1 else \
            copy_corpus(args.sources, args.repeat, tmp / "corpus")
        # Cold run: trains the tokenizer, which every later run (and the raw side) loads.
        tok_path = tmp / "tokenizer.json"
        cold = None
        cfg = load_cfg(out, sources, cpus, None, args.vocab)
        texts = corpus_texts(cfg)
        if args.no_cold:
            from data_pipeline.tokenizer import batched, train_tokenizer

            tcfg = cfg.data.tokenizer
            train_tokenizer(batched(texts, tcfg.train_max_bytes), tcfg).save(str(tok_path))
        else:
            cold = run_pipeline(cfg)
            shutil.copy(out / "tokenizer.json", tok_path)
        cfg = load_cfg(out, sources, cpus, tok_path, args.vocab)
        tok = for_encoding(Tokenizer.from_file(str(tok_path)))
        eos = len(texts)  # the pipeline appends one EOS per document; count it on both sides
        raw_tokens: list[int] = []

        def raw(method: str):
            encode = getattr(tok, method)

            def go() -> float:
                # Batches of --raw-batch documents, each result dropped once counted: one call
                # over every text at once holds all encodings in memory and slows down with the
                # corpus (3x per token at 16 copies), which would flatter the pipeline.
                n = eos
                t0 = time.perf_counter()
                for i in range(0, len(texts), args.raw_batch):
                    n += sum(len(e.ids) for e in encode(texts[i:i + args.raw_batch],
                                                        add_special_tokens=False))
                dt = time.perf_counter() - t0
                raw_tokens.append(n)
                return dt
            return go

        runs: list[dict] = []

        def pipeline() -> float:
            runs.append(run_pipeline(cfg))
            return runs[-1]["wall"]

        raw("encode_batch_fast")()  # warm-up: page cache, Rayon pool
        times = best_of(args.rounds, {"pipeline": pipeline,
                                      "encode_batch_fast": raw("encode_batch_fast"),
                                      "encode_batch": raw("encode_batch")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tokens = runs[0]["tokens"]
    if any(n != tokens for n in raw_tokens):
        raise SystemExit(f"token counts differ: pipeline {tokens}, raw {sorted(set(raw_tokens))}")
    best = {
        "pipeline end to end": min(r["wall"] for r in runs),
        "pipeline tokenize stage": min(r["tokenize"] for r in runs),
        "raw encode_batch_fast": min(times["encode_batch_fast"]),
        "raw encode_batch": min(times["encode_batch"]),
    }
    raw_best = min(best["raw encode_batch_fast"], best["raw encode_batch"])
    rows = []
    if cold is not None:
        rows.append(("pipeline cold (trains tokenizer)", cold["wall"], tokens / cold["wall"],
                     tokens / cold["wall"] / cpus, f"{raw_best / cold['wall']:.0%}"))
    for name, t in best.items():
        rows.append((name, t, tokens / t, tokens / t / cpus, f"{raw_best / t:.0%}"))
    stages = min(runs, key=lambda r: r["wall"])["stages"]
    print(machine_line())
    print(load_line())
    print(f"corpus: {args.sources} x {args.repeat}, {len(texts):,} documents, "
          f"{sum(len(t) for t in texts) / 1e6:.1f} M characters, {tokens:,} tokens; {cpus} cores "
          f"(Ray num_cpus and Rayon threads); best of {args.rounds} alternating rounds")
    print("pipeline stages of its best run (s): " + json.dumps(stages))
    print(table(["", "seconds", "tokens/s", "tokens/s/core", "of raw"], rows))
    ratio = raw_best / best["pipeline tokenize stage"]
    print(f"ratio pipeline tokenize stage / raw tokenizers, tokens/s per core: {ratio:.2f}x")


if __name__ == "__main__":
    main()
