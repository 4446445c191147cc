"""`prepare(cfg)`: raw text -> tokenizer -> packed WebDataset shards + manifest.json, with Ray Data.

Steps, all writing into cfg.data.dir:

  1. list the source files (sources.py) and decide whether the directory is already done: a
     manifest with the same config hash and source fingerprint whose shards all exist -> skip;
  2. remove the old outputs (manifest first, so nothing half-removed looks finished);
  3. plan the files into units and Ray tasks; scan them (validation, document counts, the val
     fallback: if the hash puts no document in val, the lowest-scoring one goes there): text
     files in the driver from their first bytes, JSONL and Parquet on Ray; write skipped.jsonl,
     the list of what bad input the data.on_* settings skip (binary files, invalid lines...);
  4. train the byte-level BPE on the training documents (or load data.tokenizer.path) and save
     tokenizer.json;
  5. tokenize on a Ray actor pool (tokenizer shipped once per actor) and, in the driver, pack the
     results in document order into samples of seq_len + 1 tokens and write the shards;
  6. write manifest.json last, atomically, and print a summary.

Ray: a local instance (data.num_cpus CPUs) is started if none is running in this process and
shut down afterwards, or data.ray_address joins an existing cluster. Callers that run several
preparations (tests) can start one with `init_ray` and it is reused. The local instance is
private: every Ray server listens on 127.0.0.1 only, there is no dashboard, and token
authentication is on with a token made for this process (see `init_ray`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data_pipeline.documents import is_val, read_unit
from data_pipeline.format import (
    FORMAT_VERSION, MANIFEST_NAME, SKIPPED_NAME, SPLITS, TOKENIZER_NAME, Manifest, SplitInfo,
    atomic_write_text, sha256_file,
)
from data_pipeline.packing import Packer, SplitWriter
from data_pipeline.sources import (
    DataError, ReadPolicy, fingerprint, group_units, list_files, plan_units,
)
from data_pipeline.tokenizer import (
    batched, load_tokenizer, round_trips, token_dtype, tokenizer_info, train_tokenizer,
)
from pretrain.config import Config, DataConfig

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2
"""Bump when the pipeline's output for the same config changes, so old directories rebuild."""
_OURS = re.compile(r"^(train|val)-\d{6}\.tar$")
_TEMP = re.compile(r"^\.(.+)\.tmp-\d+$")
_LISTED = 100  # stats list at most this many files per category (totals are always exact)


def config_hash(data: DataConfig) -> str:
    """Hash of the data settings that change the prepared output (not dir, Ray or loader knobs)."""
    tok = data.tokenizer
    if tok.path:
        tok_part: dict = {"file_sha256": sha256_file(Path(tok.path).expanduser()),
                          "eos_token": tok.eos_token}
    else:
        tok_part = tok.model_dump(exclude={"path"})
    payload = {
        "format_version": FORMAT_VERSION, "pipeline_version": PIPELINE_VERSION,
        **data.model_dump(include={"sources", "exclude", "format", "text_field", "seq_len",
                                   "val_fraction", "shard_bytes", "on_bad_record",
                                   "on_binary_file", "on_invalid_utf8"}),
        "tokenizer": tok_part,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_CLUSTER_SUPPORT: dict[str, bool] = {}  # Ray's own setting, before init_ray changed it


def init_ray(data: DataConfig) -> None:
    """Start a quiet, private local Ray (or join data.ray_address).

    Anyone who reaches a Ray server's port can run code in it, so the local instance is shut
    off twice. (1) Ray binds its servers to the node's address, which it takes to be the host's
    outward IP unless it runs "without cluster support": with that (Ray's switch for Windows and
    macOS, ray_constants.ENABLE_RAY_CLUSTER) the node address is 127.0.0.1 and every server,
    worker and agent listens there only. (2) Token authentication (Ray >= 2.52): RAY_AUTH_MODE
    =token with a random token in RAY_AUTH_TOKEN, known to this process and the Ray processes it
    starts (not written to ~/.ray), keeps out other users of the same host. An explicit
    RAY_AUTH_MODE in the environment is respected. tests/test_injection.py checks both.
    """
    import ray

    from ray._private import ray_constants

    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "ignore_reinit_error": True}
    _CLUSTER_SUPPORT.setdefault("saved", ray_constants.ENABLE_RAY_CLUSTER)
    if data.ray_address:  # this node's outward address again (after a local run here)
        ray_constants.ENABLE_RAY_CLUSTER = _CLUSTER_SUPPORT["saved"]
        ray.init(address=data.ray_address, **quiet)
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray picks the node address
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        try:  # this process read Ray's settings when it imported ray: read them again
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        except ImportError:  # Ray < 2.52 has no token authentication
            pass
    # address="local" ignores a RAY_ADDRESS in the environment: always a private instance.
    ray.init(address="local", num_cpus=data.num_cpus, include_dashboard=False,
             dashboard_host="127.0.0.1", **quiet)


@contextmanager
def _ray(data: DataConfig) -> Iterator[int]:
    """Ray for the job (started here only if not running); yields the number of CPUs to use."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        init_ray(data)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars,
             ctx.enable_auto_log_stats, logging.getLogger("ray.data").level)
    # Results must come back in task order: packing is sequential over documents.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # ours (tqdm over bytes and tokens) replaces Ray's
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield max(int(ray.cluster_resources().get("CPU", 1)), 1)
    finally:
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars,
         ctx.enable_auto_log_stats) = saved[:3]
        logging.getLogger("ray.data").setLevel(saved[3])
        if started:
            ray.shutdown()


def _finished(data_dir: Path, chash: str, fp: str) -> tuple[Manifest | None, str]:
    """(manifest, "") if data_dir holds a complete preparation of this config, else (None, why)."""
    try:
        m = Manifest.load(data_dir)
    except FileNotFoundError:
        return None, "no manifest"
    except ValueError:
        return None, "unreadable manifest"
    if m.config_hash != chash:
        return None, f"config changed (hash {m.config_hash} -> {chash})"
    if m.stats.get("sources_fingerprint") != fp:
        return None, "source files changed"
    if not (data_dir / m.tokenizer.file).is_file():
        return None, f"{m.tokenizer.file} is missing"
    for info in m.splits.values():
        for shard in info.shards:
            path = data_dir / shard.name
            if not path.is_file() or path.stat().st_size != shard.bytes:
                return None, f"shard {shard.name} is missing or has the wrong size"
    return m, ""


def _clear(data_dir: Path) -> None:
    """Remove our outputs: the manifest first, so that an interruption never leaves a 'done' dir."""
    (data_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for p in data_dir.iterdir():
        name = (m.group(1) if (m := _TEMP.match(p.name)) else p.name)
        if p.is_file() and (_OURS.match(name) or name in (MANIFEST_NAME, TOKENIZER_NAME,
                                                          SKIPPED_NAME)):
            p.unlink()


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)
    else:
        log.info(msg)


def _printable(path: str) -> str:
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@contextmanager
def _closing(batches) -> Iterator:
    """Iterate Ray Data batches and stop the iterator on leaving (an error or an early break),
    while Ray is still up: left to the garbage collector after ray.shutdown, Ray Data logs a
    traceback ("Ray is not initialized") after our clean error message."""
    iterator = iter(batches)
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _tasks_dataset(tasks: list[list[dict]]):
    import ray.data

    items = [{"units": json.dumps(t)} for t in tasks]
    return ray.data.from_items(items, override_num_blocks=len(tasks))


def _scan(tasks: list[list[dict]], data: DataConfig
          ) -> tuple[int, int, str | None, list[tuple[int, dict]]]:
    """(documents, documents hashed to val, id of the lowest-scoring document, skip records as
    (unit index, record) in corpus order); raises the DataError of the earliest bad unit.

    A text file is one document whose id is its path: its first bytes tell whether it is skipped
    (empty, binary), so the driver probes text files itself. JSONL and Parquet units must be
    parsed to know their documents: Ray tasks scan them (no Ray job when there are none).
    """
    from data_pipeline.documents import probe_text_unit, val_score
    from data_pipeline.stages import scan_batch

    policy = ReadPolicy.of(data)
    units = [u for t in tasks for u in t]
    docs = val = 0
    lowest: tuple[float, str] | None = None
    errors: list[tuple[int, str]] = []  # (unit index in corpus order, message)
    skipped: list[tuple[int, dict]] = []

    def count(doc_id: str, score: float) -> None:
        nonlocal docs, val, lowest
        docs, val = docs + 1, val + (score < data.val_fraction)
        if lowest is None or (score, doc_id) < lowest:
            lowest = (score, doc_id)

    for i, unit in enumerate(units):
        if unit["fmt"] != "text":
            continue
        try:
            record = probe_text_unit(unit, policy)
        except DataError as e:
            errors.append((i, str(e)))
            break
        if record is None:
            count(unit["rel"], val_score(unit["rel"]))
        else:
            skipped.append((i, record))
    # Parsed formats: the tasks without their text units, each unit knowing its corpus index.
    index = {id(u): i for i, u in enumerate(units)}
    parsed = [[u for u in t if u["fmt"] != "text"] for t in tasks]
    parsed = [t for t in parsed if t]
    if parsed:
        ds = _tasks_dataset(parsed).map_batches(
            scan_batch, batch_size=1, batch_format="pyarrow", num_cpus=1,
            fn_kwargs={"text_field": data.text_field, "val_fraction": data.val_fraction,
                       "policy": policy},
        )
        with _closing(ds.iter_batches(batch_size=None, batch_format="pyarrow")) as batches:
            results = (json.loads(r) for table in batches
                       for r in table.column("scan").to_pylist())
            for task, res in zip(parsed, results):
                skipped += [(index[id(task[k])], r) for k, records in res["skipped"]
                            for r in records]
                if res["error"]:
                    errors.append((index[id(task[res["error_unit"]])], res["error"]))
                    break  # later tasks hold later units
                docs, val = docs + res["docs"], val + res["val"]
                if res["min"] and (lowest is None or tuple(res["min"]) < lowest):
                    lowest = tuple(res["min"])
    if errors:
        raise DataError(min(errors)[1])
    skipped.sort(key=lambda item: item[0])  # stable: records of a unit keep their file order
    return docs, val, lowest[1] if lowest else None, skipped


def _write_skipped(data_dir: Path, records: list[dict]) -> dict:
    """Write skipped.jsonl (atomically) and return the manifest's summary of it."""
    records = [{**r, "file": _printable(r["file"])} for r in records]
    atomic_write_text(data_dir / SKIPPED_NAME,
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"total": len(records), "by_kind": dict(sorted(kinds.items())), "list": SKIPPED_NAME,
            "first": records[:_LISTED]}


def _skipped_phrase(summary: dict, data_dir: Path) -> str:
    """'2 binary file, 1 invalid JSON (listed in DIR/skipped.jsonl)' or ''."""
    if not summary["total"]:
        return ""
    kinds = ", ".join(f"{n} {kind}" for kind, n in summary["by_kind"].items())
    return f"{kinds} (listed in {data_dir / SKIPPED_NAME})"


def _train_texts(units: list[dict], data: DataConfig, forced_val: str | None) -> Iterator[str]:
    policy = ReadPolicy.of(data)
    for unit in units:
        docs = read_unit(unit, data.text_field, policy)
        for doc_id, text in zip(docs.ids, docs.texts):
            if not is_val(doc_id, data.val_fraction, forced_val):
                yield text


def _summary(data_dir: Path, m: Manifest) -> str:
    s, d, t = m.stats, m.stats["documents"], m.stats["tokens"]
    n_shards = sum(len(i.shards) for i in m.splits.values())
    lines = [
        f"prepared {data_dir} in {s['seconds']:.1f} s on {s['num_cpus']} CPUs: "
        f"{d['total']:,} documents (train {d['train']:,}, val {d['val']:,}) from "
        f"{s['files']:,} files, {s['bytes'] / 1e6:.1f} MB",
        f"  {t['total']:,} tokens -> {m.splits['train'].samples:,} train + "
        f"{m.splits['val'].samples:,} val samples of {m.sample_len} tokens in {n_shards} shards; "
        f"tail not written: train {s['tail_tokens']['train']:,}, val {s['tail_tokens']['val']:,}"
        " tokens",
        f"  {s['tokens_per_sec']:,.0f} tokens/s overall, {s['tokenize_tokens_per_sec']:,.0f} "
        f"tokens/s in the tokenize stage ({s['tokenize_tokens_per_sec'] / s['num_cpus']:,.0f} "
        "per CPU)",
    ]
    rep = s["utf8_replacements"]
    if rep["count"]:
        lines.append(f"  invalid UTF-8: {rep['count']:,} sequences replaced by U+FFFD in "
                     f"{rep['files_total']:,} files, e.g. {next(iter(rep['files']))}")
    if s["skipped"]["total"]:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in s["skipped"]["by_kind"].items())
        lines.append(f"  skipped {kinds}: listed in {data_dir / SKIPPED_NAME}")
    if s["empty_documents"]:
        lines.append(f"  left out {s['empty_documents']:,} empty documents")
    if m.splits["val"].samples == 0 and m.config.get("val_fraction", 0) > 0:
        lines.append("  warning: the val split is shorter than one sample; evaluation will have "
                     "no data (raise data.val_fraction or lower data.seq_len)")
    return "\n".join(lines)


def _tokenize_and_write(tasks: list[list[dict]], data: DataConfig, workers: int, tok_json: str,
                        eos_id: int, dtype: str, forced_val: str | None, data_dir: Path,
                        progress: bool) -> tuple[dict, dict[str, Packer], dict]:
    """Run the Tokenize actors and pack their output into shards, in task order."""
    import ray
    import ray.data
    from tqdm import tqdm

    from data_pipeline.stages import Tokenize

    sample_len = data.seq_len + 1
    writers = {s: SplitWriter(data_dir, s, sample_len, dtype, data.shard_bytes) for s in SPLITS}
    packers = {s: Packer(w) for s, w in writers.items()}
    totals: dict = {"docs": [0, 0], "bytes": 0, "replaced": {}, "skipped": 0, "empty": 0}
    ds = _tasks_dataset(tasks).map_batches(
        Tokenize, batch_size=1, batch_format="pyarrow", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(tasks))),
        fn_constructor_args=(tok_json, eos_id, dtype, data.text_field, data.val_fraction,
                             forced_val, ReadPolicy.of(data)),
        # The tokenizer JSON is large enough that Ray keeps it in the object store, from where
        # a restarted actor could not be rebuilt; a failed actor fails the job (re-run resumes
        # nothing half-written: shards are renamed only when complete).
        max_restarts=0,
    )
    sizes = iter([sum(u["size"] for u in t) for t in tasks])
    bar = tqdm(total=sum(u["size"] for t in tasks for u in t), unit="B", unit_scale=True,
               desc="tokenize", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        with _closing(ds.iter_batches(batch_size=None, batch_format="pyarrow")) as batches:
            for table in batches:
                for row in table.to_pylist():
                    st = json.loads(row["stats"])
                    if st["error"]:
                        raise DataError(st["error"])
                    for i, split in enumerate(SPLITS):
                        packers[split].feed(np.frombuffer(row[split], dtype=dtype))
                        totals["docs"][i] += st["docs"][i]
                    totals["bytes"] += st["bytes"]
                    totals["empty"] += st["empty"]
                    totals["skipped"] += st["skipped"]
                    for path, n in st["replaced"].items():
                        totals["replaced"][path] = totals["replaced"].get(path, 0) + n
                    bar.update(next(sizes))
                    bar.set_postfix(tokens=f"{sum(p.tokens for p in packers.values()):,}",
                                    refresh=False)
        shards = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    return totals, packers, shards


def _build(data: DataConfig, data_dir: Path, files: list, chash: str, fp: str, workers: int,
           progress: bool, t0: float) -> Manifest:
    timings: dict[str, float] = {}
    units, planned_skips = plan_units(files, data.text_field, ReadPolicy.of(data))
    tasks = group_units(units, workers)
    t = time.perf_counter()
    docs, n_val, lowest, unit_skips = _scan(tasks, data) if tasks else (0, 0, None, [])
    timings["scan"] = time.perf_counter() - t
    # skipped.jsonl in corpus order: files left out whole when planning, then what the units
    # left out, by file (a file's units are consecutive).
    order = {f.path: i for i, f in enumerate(files)}
    keyed = [(order[r["file"]], -1, r) for r in planned_skips]
    keyed += [(order[r["file"]], i, r) for i, r in unit_skips]
    skipped = _write_skipped(data_dir, [r for _, _, r in sorted(keyed, key=lambda k: k[:2])])
    if docs == 0:
        why = _skipped_phrase(skipped, data_dir)
        raise DataError(f"empty corpus: data.sources {data.sources} hold no documents "
                        f"({len(files)} files" + (f"; skipped: {why}" if why else "") + ")")
    forced_val = None
    if data.val_fraction > 0 and n_val == 0:
        if docs == 1:
            raise DataError(
                f"data.sources {data.sources} hold a single document: it cannot be split into "
                "train and val. Add documents or set data.val_fraction: 0."
            )
        forced_val = lowest  # deterministic: the document whose hash is lowest
        log.info("no document hashed into val; moving %s there", forced_val)

    t = time.perf_counter()
    tcfg = data.tokenizer
    if tcfg.path:
        tok = load_tokenizer(tcfg)
        if not round_trips(tok):
            log.warning("%s does not decode back to the exact input text (normalizer?); the "
                        "prepared tokens will not round-trip", tcfg.path)
    else:
        _say(progress, f"training a {tcfg.vocab_size}-token byte-level BPE on up to "
                       f"{tcfg.train_max_bytes / 1e6:g} MB of training documents")
        tok = train_tokenizer(batched(_train_texts(units, data, forced_val),
                                      tcfg.train_max_bytes), tcfg, progress=False)
        assert round_trips(tok), "byte-level BPE must round-trip"
    tok_json = tok.to_str(pretty=True)
    atomic_write_text(data_dir / TOKENIZER_NAME, tok_json)
    info = tokenizer_info(tok, tcfg, sha256_file(data_dir / TOKENIZER_NAME))
    dtype = token_dtype(tok)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    totals, packers, shards = _tokenize_and_write(
        tasks, data, workers, tok_json, info.eos_id, dtype, forced_val, data_dir, progress)
    timings["tokenize"] = time.perf_counter() - t
    tokens = {s: packers[s].tokens for s in SPLITS}
    if totals["skipped"] != len(unit_skips):
        raise DataError(
            f"data.sources {data.sources} changed while being prepared (the scan skipped "
            f"{len(unit_skips)} items, tokenizing {totals['skipped']}): run it again"
        )
    if packers["train"].writer.samples == 0:
        raise DataError(
            f"data.sources {data.sources} are too small: the train split has "
            f"{tokens['train']:,} tokens, fewer than one sample of seq_len + 1 = "
            f"{data.seq_len + 1}. Add data or lower data.seq_len."
        )

    seconds = time.perf_counter() - t0
    replaced = sorted(totals["replaced"].items())
    total_tokens = sum(tokens.values())
    stats = {
        "files": len(files),
        "documents": {"train": totals["docs"][0], "val": totals["docs"][1],
                      "total": sum(totals["docs"])},
        "empty_documents": totals["empty"],
        "bytes": totals["bytes"],
        "tokens": {**tokens, "total": total_tokens},
        "tail_tokens": {s: packers[s].tail for s in SPLITS},
        "utf8_replacements": {
            "count": sum(n for _, n in replaced), "files_total": len(replaced),
            "files": {_printable(p): n for p, n in replaced[:_LISTED]},
        },
        "skipped": skipped,
        "val_forced_document": _printable(forced_val) if forced_val else None,
        "sources_fingerprint": fp,
        "num_cpus": workers,
        "seconds": round(seconds, 3),
        "stage_seconds": {k: round(v, 3) for k, v in timings.items()},
        "tokens_per_sec": round(total_tokens / seconds, 1),
        "tokenize_tokens_per_sec": round(total_tokens / timings["tokenize"], 1),
    }
    manifest = Manifest(
        seq_len=data.seq_len, sample_len=data.seq_len + 1, dtype=dtype, tokenizer=info,
        splits={s: SplitInfo(documents=stats["documents"][s], samples=packers[s].writer.samples,
                             tokens=packers[s].writer.samples * (data.seq_len + 1),
                             shards=shards[s]) for s in SPLITS},
        stats=stats, config_hash=chash, config=data.model_dump(mode="json"),
    )
    manifest.save(data_dir)  # last: its presence means the directory is complete
    return manifest


def prepare(cfg: Config, force: bool = False, progress: bool = True) -> Manifest:
    """Prepare cfg.data into cfg.data.dir (or find it already prepared) and return its manifest.

    Raises DataError for bad input (missing sources, unreadable files, bad JSONL/Parquet, an
    empty or too small corpus), naming the file and the setting to change.
    """
    data = cfg.data
    t0 = time.perf_counter()
    data_dir = Path(data.dir).expanduser()
    files = list_files(data)
    chash, fp = config_hash(data), fingerprint(files)
    done, why = _finished(data_dir, chash, fp)
    if done is not None and not force:
        _say(progress, f"{data_dir} is already prepared (config {chash}); skipping. "
                       "Use --force to rebuild.")
        return done
    if data_dir.is_dir():
        if why != "no manifest" or force:
            _say(progress, f"rebuilding {data_dir}: {'--force' if force else why}")
        _clear(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _ray(data) as workers:
        manifest = _build(data, data_dir, files, chash, fp, workers, progress, t0)
    _say(progress, _summary(data_dir, manifest))
    return manifest

