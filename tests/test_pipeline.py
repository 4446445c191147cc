"""Tests of the data pipeline (`data_pipeline.prepare.prepare`) on small corpora made at test time.

What is checked, on the real Ray pipeline (one local Ray for the whole module):
  * decoding the shards gives back the source documents exactly (text, JSONL, Parquet; non-ASCII,
    CRLF, literal special tokens, invalid UTF-8 replaced and counted), in pipeline order, with
    the packing layout of packing.py: each split is one stream of documents each followed by EOS,
    cut into samples of seq_len + 1 tokens without overlap; the tail that does not fill a sample
    is not written;
  * manifest checksums, sizes and counts match the shard files; the manifest is written last;
  * bad input raises DataError naming the file (and line / column);
  * re-running skips, force / a changed config rebuild, an interrupted build leaves no manifest
    and the next run recovers;
  * preparing twice (once with another task grouping) gives byte-identical shards; results are
    packed in document order even when a later Ray task finishes first; the train/val split is
    by document, with the lowest-scoring document moved to val when none hashes there.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, pre_tokenizers

import data_pipeline.prepare as prepare_mod
import data_pipeline.sources as sources_mod
import data_pipeline.stages as stages_mod
from data_pipeline.documents import is_val, val_score
from data_pipeline.format import (
    MANIFEST_NAME, SKIPPED_NAME, SPLITS, TOKENIZER_NAME, Manifest, sha256_file,
)
from data_pipeline.loader import ShardedLoader
from data_pipeline.packing import SplitWriter
from data_pipeline.prepare import init_ray, prepare
from data_pipeline.shard_reader import read_shard
from data_pipeline.sources import DataError
from data_pipeline.stages import Tokenize
from pretrain.config import DataConfig
from pretrain.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "gpt-tiny.yaml"
# 19 samples of 33 uint16 tokens per shard (1 KiB tar member each): several shards per split.
SHARD_BYTES = 20480
VOLATILE_STATS = ("seconds", "stage_seconds", "tokens_per_sec", "tokenize_tokens_per_sec")
WORDS = ["the", "data", "pipeline", "packs", "tokens", "café", "naïve", "Straße", "中文",
         "日本語", "한국어", "😀", "🚀", "Ωμέγα", "ñandú", "→", "x = f(y);", "#", "0.5", "{}"]
SEPARATORS = [" ", " ", " ", "\n", "\r\n", "\t", "  "]


# ---------------------------------------------------------------------------------------------
# helpers

def make_cfg(out: Path, sources: list, *extra: str):
    """gpt-tiny with a private data dir and corpus; later overrides in `extra` win."""
    return load_config(TINY_CONFIG, [
        f"data.dir={out}", f"data.sources={json.dumps([str(s) for s in sources])}",
        "data.exclude=[]", "data.num_cpus=2", f"data.shard_bytes={SHARD_BYTES}",
        "data.val_fraction=0.3", *extra,
    ])


def one_unit_per_task(units: list[dict], workers: int) -> list[list[dict]]:
    """Replacement for group_units: every unit its own Ray task (many tasks, both actors busy)."""
    return [[u] for u in units]


def gen_text(rng: random.Random, n_words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n_words))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> visible character table, the alphabet of the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def ids_bytes(tok: Tokenizer, ids: list[int]) -> bytes:
    """The raw bytes that byte-level token ids stand for (independent of the tokenizer's decoder)."""
    return bytes(BYTE_OF[c] for i in ids for c in tok.id_to_token(i))


def mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def shard_names(m: Manifest) -> list[str]:
    return [sh.name for s in SPLITS for sh in m.splits[s].shards]


def stable(m: Manifest) -> dict:
    """The manifest without what legitimately differs between two runs: timings and data.dir."""
    d = m.model_dump()
    for k in VOLATILE_STATS:
        d["stats"].pop(k)
    d["config"].pop("dir")
    return d


def read_split(data_dir: Path, m: Manifest, split: str) -> np.ndarray:
    """[samples, sample_len] of one split, shards in manifest order (checksums verified)."""
    rows, first = [], 0
    for sh in m.splits[split].shards:
        assert sh.first_sample == first, f"{sh.name} does not continue the split's samples"
        got = read_shard(data_dir / sh.name, sh, split, m.sample_len, m.dtype)
        assert got.shape == (sh.samples, m.sample_len)
        rows.append(got)
        first += sh.samples
    return np.concatenate(rows) if rows else np.zeros((0, m.sample_len), dtype=m.dtype)


def split_docs(docs: list[tuple[str, str]], m: Manifest) -> dict[str, list[tuple[str, str]]]:
    """(id, text) documents of each split, in pipeline order, as the manifest's config splits."""
    vf, forced = m.config["val_fraction"], m.stats["val_forced_document"]
    val = [is_val(i, vf, forced) for i, _ in docs]
    return {"train": [d for d, v in zip(docs, val) if not v],
            "val": [d for d, v in zip(docs, val) if v]}


def assert_round_trip(data_dir: Path, m: Manifest, docs: list[tuple[str, str]]) -> None:
    """Decoding the shards of each split gives back its documents exactly (see module docstring)."""
    tok = Tokenizer.from_file(str(data_dir / m.tokenizer.file))
    eos = tok.token_to_id(m.tokenizer.eos_token)
    assert eos == m.tokenizer.eos_id
    by_split = split_docs(docs, m)
    ids = {s: {i for i, _ in d} for s, d in by_split.items()}
    assert ids["train"] and ids["val"], "corpus too small for a meaningful test"
    assert not ids["train"] & ids["val"]
    special = set(m.tokenizer.special_tokens.values())
    assert eos in special and len(special) == 2  # <|endoftext|>, <|pad|>
    tok.encode_special_tokens = True  # literal "<|endoftext|>" in a document is plain text
    for split, pairs in by_split.items():
        texts = [t for _, t in pairs]
        info = m.splits[split]
        assert info.documents == len(texts) == m.stats["documents"][split]
        rows = read_split(data_dir, m, split)
        assert rows.shape == (info.samples, m.sample_len)
        assert info.samples > 0, f"no {split} samples: the test would check nothing"
        assert info.tokens == rows.size == sum(sh.tokens for sh in info.shards)
        stream = rows.reshape(-1).tolist()
        # Split the stream on EOS: every piece is one whole document, the rest a cut one.
        pieces, start = [], 0
        for pos, t in enumerate(stream):
            if t == eos:
                pieces.append(stream[start:pos])
                start = pos + 1
        tail = stream[start:]
        assert len(pieces) < len(texts) or (len(pieces) == len(texts) and not tail), \
            f"{split}: {len(pieces)} EOS-terminated pieces for {len(texts)} documents"
        for k, (got, want) in enumerate(zip(pieces, texts)):
            assert not special & set(got), f"{split} document {k} holds a special token"
            assert ids_bytes(tok, got) == want.encode("utf-8"), f"{split} document {k}"
            assert tok.decode(got, skip_special_tokens=False) == want, f"{split} document {k}"
        if tail:
            assert not special & set(tail)
            assert texts[len(pieces)].encode("utf-8").startswith(ids_bytes(tok, tail))
        # The whole split stream: documents + EOS; only its last partial sample is missing.
        full = [i for t in texts for i in [*tok.encode(t, add_special_tokens=False).ids, eos]]
        assert stream == full[:len(stream)]
        assert m.stats["tokens"][split] == len(full)
        assert m.stats["tail_tokens"][split] == len(full) - len(stream) < m.sample_len
    assert m.stats["documents"]["total"] == len(docs)
    assert m.stats["bytes"] == sum(len(t.encode("utf-8")) for _, t in docs)


def assert_manifest_matches_files(data_dir: Path, m: Manifest) -> None:
    """Checksums, sizes and counts of the manifest match the files; nothing else is there."""
    for split in SPLITS:
        info = m.splits[split]
        first = 0
        for sh in info.shards:
            path = data_dir / sh.name
            assert re.fullmatch(rf"{split}-\d{{6}}\.tar", sh.name)
            assert sha256_file(path) == sh.sha256
            assert path.stat().st_size == sh.bytes <= SHARD_BYTES
            rows = read_shard(path, sh, split, m.sample_len, m.dtype, verify_checksum=False)
            assert rows.shape == (sh.samples, m.sample_len) and sh.tokens == rows.size
            assert sh.first_sample == first
            first += sh.samples
        assert info.samples == first
        assert info.tokens == first * m.sample_len
        assert all(sh.samples == info.shards[0].samples for sh in info.shards[:-1])
    assert sha256_file(data_dir / TOKENIZER_NAME) == m.tokenizer.sha256
    assert sorted(os.listdir(data_dir)) == sorted([MANIFEST_NAME, TOKENIZER_NAME, SKIPPED_NAME,
                                                   *shard_names(m)])
    assert Manifest.load(data_dir) == m


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module", autouse=True)
def ray_once():
    """One local Ray for the module: prepare() reuses a running instance instead of starting one."""
    import ray

    started = not ray.is_initialized()
    if started:
        init_ray(DataConfig(num_cpus=2))
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """A directory of text files and its expected documents as (id, text) in pipeline order."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1234)
    files: dict[str, bytes] = {}
    for i in range(22):
        files[f"doc{i:02d}.txt"] = gen_text(rng, rng.randint(5, 250)).encode()
    for i in range(4):
        files[f"sub/dir/nested{i}.md"] = gen_text(rng, rng.randint(20, 120)).encode()
    files["données é.txt"] = "Ünïcödé file name — ok\n".encode()
    files["special.txt"] = b"before <|endoftext|> middle <|pad|> after\r\n"
    files["spaces.txt"] = b"   \n\t \r\n"  # whitespace only: still a document
    # 4 invalid sequences (\xe9, \xff, \xfe, the cut \xc3); the literal U+FFFD is not one.
    files["latin1.txt"] = b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd x \xc3"
    files["empty.txt"] = b""  # skipped: empty file
    files["blob.bin"] = b"\x00\x01\x02binary"  # skipped: binary
    files[".hidden.txt"] = b"hidden files are not read"
    files["sub/.cache/ignored.txt"] = b"hidden directories are not read"
    for rel, raw in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(raw)
    docs = [(rel, raw.decode("utf-8", "replace")) for rel, raw in sorted(files.items())
            if raw and b"\0" not in raw and not any(p.startswith(".") for p in rel.split("/"))]
    return root, docs


@dataclass
class Built:
    dir: Path
    manifest: Manifest
    at_save: dict[str, str]
    """Files in the data dir when the manifest was saved: name -> sha256."""


@pytest.fixture(scope="module")
def built(text_corpus, tmp_path_factory) -> Built:
    """The text corpus prepared (default grouping), noting the files when the manifest is saved."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    at_save: dict[str, str] = {}
    real_save = Manifest.save

    def watching_save(self: Manifest, data_dir) -> None:
        at_save.update({p.name: sha256_file(p) for p in Path(data_dir).iterdir()})
        real_save(self, data_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Manifest, "save", watching_save)
        m = prepare(make_cfg(out, [text_corpus[0]]), progress=False)
    return Built(out, m, at_save)


# ---------------------------------------------------------------------------------------------
# 1. round trip of text files

def test_byte_level_table_is_the_tokenizer_alphabet():
    assert sorted(BYTE_OF) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_text_files_round_trip(built, text_corpus):
    root, docs = text_corpus
    m = built.manifest
    assert (m.seq_len, m.sample_len, m.dtype) == (32, 33, "uint16")
    assert len(m.splits["train"].shards) >= 3 and len(m.splits["val"].shards) >= 2
    assert_round_trip(built.dir, m, docs)
    s = m.stats
    assert s["files"] == 32  # hidden files are not listed; empty and binary ones are, skipped
    assert s["skipped"]["total"] == 2
    assert s["skipped"]["by_kind"] == {"binary file": 1, "empty file": 1}
    listed = [json.loads(line) for line in (built.dir / "skipped.jsonl").read_text().splitlines()]
    assert listed == s["skipped"]["first"] == [  # corpus order
        {"file": str(root / "blob.bin"), "kind": "binary file",
         "reason": "binary file (NUL byte in the first 8192 bytes)"},
        {"file": str(root / "empty.txt"), "kind": "empty file", "reason": "empty file"}]
    assert s["utf8_replacements"] == {"count": 4, "files_total": 1,
                                      "files": {str(root / "latin1.txt"): 4}}
    assert s["empty_documents"] == 0


# ---------------------------------------------------------------------------------------------
# 2. manifest vs files

def test_manifest_matches_shards_and_is_written_last(built):
    m = built.manifest
    assert_manifest_matches_files(built.dir, m)
    # When the manifest was saved, every shard and the tokenizer were final; no temp files.
    final = [TOKENIZER_NAME, SKIPPED_NAME, *shard_names(m)]
    assert built.at_save == {n: sha256_file(built.dir / n) for n in final}
    mt = mtimes(built.dir)
    assert mt[MANIFEST_NAME] >= max(mt.values())
    assert m.digest() == Manifest.load(built.dir).digest()


# ---------------------------------------------------------------------------------------------
# 3. JSONL and Parquet inputs, glob sources

def test_jsonl_and_parquet_round_trip_with_globs(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "JSONL_CHUNK", 300)  # several units per JSONL file
    monkeypatch.setattr(prepare_mod, "group_units", one_unit_per_task)
    rng = random.Random(7)
    mixed = tmp_path / "mixed"
    (mixed / "parts").mkdir(parents=True)
    docs: list[tuple[str, str]] = []

    def write_jsonl(name: str, lines: list[tuple[bytes, str | None]]) -> None:
        """lines: (raw line, expected text or None when the line is no document)."""
        (mixed / name).write_bytes(b"\n".join(raw for raw, _ in lines))
        docs.extend((f"{name}:{n}", t) for n, (_, t) in enumerate(lines, 1) if t is not None)

    def rec(text: str, **kw) -> tuple[bytes, str]:
        return json.dumps({"id": rng.randint(0, 99), "content": text, **kw},
                          ensure_ascii=rng.random() < 0.5).encode(), text

    a = [rec(gen_text(rng, rng.randint(5, 60))) for _ in range(12)]
    a[3:3] = [(b"", None), (b"   ", None), (json.dumps({"content": ""}).encode(), None),
              (json.dumps({"content": None, "other": 1}).encode(), None)]
    a += [(b'{"content": "lone \\ud800 surrogate"}', "lone \ufffd surrogate"),
          (b'{"content": "raw \xff byte"}', "raw \ufffd byte"),
          (b'{"content": "crlf line <|endoftext|>"}\r', "crlf line <|endoftext|>"),
          rec(gen_text(rng, 30), meta={"nested": [1, 2]})]
    write_jsonl("a.jsonl", a)
    write_jsonl("b.jsonl", [rec(gen_text(rng, rng.randint(5, 60))) for _ in range(10)]
                + [(b"", None)])  # ends with a newline
    (mixed / "notes.txt").write_text("not matched by the globs")

    p1 = [gen_text(rng, rng.randint(5, 60)) for _ in range(14)]
    p1[2], p1[9] = None, ""
    pq.write_table(pa.table({"n": list(range(len(p1))), "content": p1}),
                   mixed / "parts" / "p1.parquet", row_group_size=4)
    assert pq.ParquetFile(mixed / "parts" / "p1.parquet").num_row_groups == 4
    docs += [(f"parts/p1.parquet:{r}", t) for r, t in enumerate(p1) if t]
    p2 = [b"bin \xff bytes", "binary é column".encode(), gen_text(rng, 40).encode()]
    pq.write_table(pa.table({"content": pa.array(p2, pa.binary())}),
                   mixed / "parts" / "p2.parquet", row_group_size=2)
    docs += [(f"parts/p2.parquet:{r}", b.decode("utf-8", "replace")) for r, b in enumerate(p2)]

    out = tmp_path / "data"
    cfg = make_cfg(out, [f"{mixed}/*.jsonl", f"{mixed}/**/*.parquet"], "data.text_field=content",
                   "data.seq_len=16")
    units, _ = sources_mod.plan_units(sources_mod.list_files(cfg.data), "content")
    assert sum(u["path"].endswith("a.jsonl") for u in units) >= 3  # line numbers across units
    m = prepare(cfg, progress=False)
    assert_round_trip(out, m, docs)
    assert_manifest_matches_files(out, m)
    s = m.stats
    assert s["files"] == 4 and s["skipped"]["total"] == 0
    assert (out / "skipped.jsonl").read_text() == ""
    assert s["empty_documents"] == 4
    assert s["utf8_replacements"] == {
        "count": 3, "files_total": 2,
        "files": {str(mixed / "a.jsonl"): 2, str(mixed / "parts" / "p2.parquet"): 1}}


# ---------------------------------------------------------------------------------------------
# 4. bad input

def _case_missing(tmp: Path):
    src = tmp / "nowhere" / "corpus.txt"
    return [src], f"data.sources: '{src}' does not exist (looked for {src})"


def _case_broken_link(tmp: Path):
    (tmp / "c").mkdir()
    (tmp / "c" / "a.txt").write_text("a readable document")
    (tmp / "c" / "b.txt").write_text("another readable document")
    (tmp / "c" / "gone.txt").symlink_to(tmp / "c" / "deleted.txt")
    return [tmp / "c"], f"cannot read {tmp / 'c' / 'gone.txt'}: No such file or directory"


def _case_empty_files(tmp: Path):
    (tmp / "c").mkdir()
    (tmp / "c" / "a.txt").write_bytes(b"")
    (tmp / "c" / "b.txt").write_bytes(b"")
    src = str(tmp / "c")
    return [src], (f"empty corpus: data.sources {[src]} hold no documents (2 files; skipped: "
                   f"2 empty file (listed in {tmp / 'out' / 'skipped.jsonl'}))")


def _case_empty_texts(tmp: Path):
    (tmp / "d.jsonl").write_text('{"text": ""}\n{"text": null}\n\n')
    src = str(tmp / "d.jsonl")
    return [src], f"empty corpus: data.sources {[src]} hold no documents (1 files)"


def _case_empty_dir(tmp: Path):
    (tmp / "c" / ".hidden").mkdir(parents=True)
    (tmp / "c" / ".hidden" / "x.txt").write_text("hidden")
    return [tmp / "c"], (f"data.sources: '{tmp / 'c'}' matches no files (or only files already "
                         "listed by an earlier source)")


def _jsonl_lines(n: int) -> list[str]:
    return [json.dumps({"text": f"document number {i} with some words"}) for i in range(n)]


def _case_bad_json(tmp: Path):
    # The first bad line in corpus order is reported, though it is in a later unit and task.
    lines = _jsonl_lines(6) + ['{"text": "unterminated}'] + _jsonl_lines(3)
    (tmp / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "b.jsonl").write_text("not json at all\n")
    return [tmp / "a.jsonl", tmp / "b.jsonl"], (
        f"{tmp / 'a.jsonl'}:7: not valid JSON (Unterminated string starting at, column 10); "
        "every non-blank line must be a JSON object with the text in field 'text' "
        "(data.text_field)")


def _case_bad_json_before_unreadable_text(tmp: Path):
    # Text files are probed in the driver, JSONL parsed on Ray: still the earliest error wins.
    (tmp / "a.jsonl").write_text("\n".join(_jsonl_lines(2) + ["not json"]) + "\n")
    (tmp / "c").mkdir()
    (tmp / "c" / "gone.txt").symlink_to(tmp / "c" / "deleted.txt")
    return [tmp / "a.jsonl", tmp / "c"], (
        f"{tmp / 'a.jsonl'}:3: not valid JSON (Expecting value, column 1); every non-blank "
        "line must be a JSON object with the text in field 'text' (data.text_field)")


def _case_missing_field(tmp: Path):
    lines = _jsonl_lines(2) + [json.dumps({"body": "x", "id": 3})] + _jsonl_lines(2)
    (tmp / "a.jsonl").write_text("\n".join(lines))
    return [tmp / "a.jsonl"], (
        f"{tmp / 'a.jsonl'}:3: no field 'text' (data.text_field is 'text'; the line has fields "
        "['body', 'id']). Set data.text_field to the field that holds the text; or set "
        "data.on_bad_record: skip to leave such lines out (listed in skipped.jsonl)")


def _case_not_object(tmp: Path):
    (tmp / "a.jsonl").write_text("\n".join(_jsonl_lines(1) + ["[1, 2]"]))
    return [tmp / "a.jsonl"], (f"{tmp / 'a.jsonl'}:2: no field 'text' (data.text_field is 'text'; "
                               "the line has a JSON list, not an object)")


def _case_field_not_string(tmp: Path):
    (tmp / "a.jsonl").write_text("\n".join(_jsonl_lines(4) + ['{"text": 5}']))
    return [tmp / "a.jsonl"], (f"{tmp / 'a.jsonl'}:5: field 'text' (data.text_field) is a JSON "
                               "int, expected a string")


def _case_parquet_column(tmp: Path):
    pq.write_table(pa.table({"body": ["x", "y"], "n": [1, 2]}), tmp / "t.parquet")
    return [tmp / "t.parquet"], (
        f"{tmp / 't.parquet'}: no column 'text' (data.text_field); its columns are ['body', 'n']. "
        "Set data.text_field to the column that holds the text; or set data.on_bad_record: skip "
        "to leave such files out (listed in skipped.jsonl)")


def _case_parquet_type(tmp: Path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp / "t.parquet")
    return [tmp / "t.parquet"], (f"{tmp / 't.parquet'}: column 'text' (data.text_field) has type "
                                 "int64, expected a string (or binary UTF-8) column")


def _case_not_parquet(tmp: Path):
    (tmp / "t.parquet").write_text("this is not a parquet file")
    return [tmp / "t.parquet"], f"cannot read {tmp / 't.parquet'} as Parquet: "


def _case_single_document(tmp: Path):
    (tmp / "doc.txt").write_text("the only document")
    assert val_score("doc.txt") >= 0.3  # hashed to train: val would be empty
    src = str(tmp / "doc.txt")
    return [src], (f"data.sources {[src]} hold a single document: it cannot be split into train "
                   "and val. Add documents or set data.val_fraction: 0.")


def _case_single_document_in_val(tmp: Path):
    (tmp / "only.txt").write_text("the only document")
    assert val_score("only.txt") < 0.3  # hashed to val: train is empty
    src = str(tmp / "only.txt")
    return [src], (f"data.sources {[src]} are too small: the train split has 0 tokens, fewer "
                   "than one sample of seq_len + 1 = 33. Add data or lower data.seq_len.")


def _case_too_small(tmp: Path):
    (tmp / "c").mkdir()
    for i in range(3):
        (tmp / "c" / f"{i}.txt").write_text(f"tiny {i}")
    src = str(tmp / "c")
    return [src], re.compile(
        re.escape(f"data.sources {[src]} are too small: the train split has ") + r"[1-9]\d* tokens"
        + re.escape(", fewer than one sample of seq_len + 1 = 33. Add data or lower data.seq_len."))


BAD_INPUTS = [_case_missing, _case_broken_link, _case_empty_files, _case_empty_texts,
              _case_empty_dir, _case_bad_json, _case_bad_json_before_unreadable_text,
              _case_missing_field, _case_not_object,
              _case_field_not_string, _case_parquet_column, _case_parquet_type, _case_not_parquet,
              _case_single_document, _case_single_document_in_val, _case_too_small]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.__name__[len("_case_"):])
def test_bad_input_raises_data_error_naming_the_file(case, tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "JSONL_CHUNK", 64)  # a bad line deep in a file: own unit
    monkeypatch.setattr(prepare_mod, "group_units", one_unit_per_task)
    srcs, message = case(tmp_path)
    out = tmp_path / "out"
    pattern = message.pattern if isinstance(message, re.Pattern) else re.escape(message)
    with pytest.raises(DataError, match=f"^{pattern}"):
        prepare(make_cfg(out, srcs), progress=False)
    assert not (out / MANIFEST_NAME).exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode (see the broken-link case)")
def test_unreadable_file_raises_data_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("a readable document")
    locked = tmp_path / "c" / "b.txt"
    locked.write_text("a locked document")
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match=re.escape(f"cannot read {locked}: Permission denied")):
            prepare(make_cfg(tmp_path / "out", [tmp_path / "c"]), progress=False)
    finally:
        locked.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# 5. skipping, rebuilding, interrupted builds

def test_rerun_skips_and_force_or_changed_config_rebuilds(built, text_corpus, tmp_path,
                                                           monkeypatch):
    root, docs = text_corpus
    out = tmp_path / "data"
    shutil.copytree(built.dir, out)  # copy2: mtimes kept; data.dir is not part of the config hash
    cfg = make_cfg(out, [root])
    before = mtimes(out)

    def no_build(*args, **kwargs):
        raise AssertionError("a prepared directory was rebuilt")

    with monkeypatch.context() as mp:
        mp.setattr(prepare_mod, "_build", no_build)
        t = time.perf_counter()
        again = prepare(cfg, progress=False)
        assert time.perf_counter() - t < 10.0
    assert again == built.manifest
    assert mtimes(out) == before

    forced = prepare(cfg, force=True, progress=False)
    after = mtimes(out)
    assert after.keys() == before.keys()
    assert all(after[n] > before[n] for n in before), "force must rewrite every file"
    assert stable(forced) == stable(built.manifest)

    m64 = prepare(make_cfg(out, [root], "data.seq_len=64"), progress=False)
    assert (m64.seq_len, m64.sample_len) == (64, 65)
    assert m64.config_hash != built.manifest.config_hash
    # Fewer, longer samples: fewer shards, and the stale ones of the old config are gone.
    assert len(shard_names(m64)) < len(shard_names(built.manifest))
    assert_manifest_matches_files(out, m64)
    assert_round_trip(out, m64, docs)
    with monkeypatch.context() as mp:
        mp.setattr(prepare_mod, "_build", no_build)
        assert prepare(make_cfg(out, [root], "data.seq_len=64"), progress=False) == m64


def test_interrupted_build_leaves_no_manifest_and_next_run_recovers(built, text_corpus, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "data"
    cfg = make_cfg(out, [text_corpus[0]])
    opened: list[Path] = []
    real_open = SplitWriter._open

    def crash_on_third_shard(self: SplitWriter) -> None:
        real_open(self)
        opened.append(self._tmp)
        if len(opened) == 3:
            raise RuntimeError("simulated crash while writing a shard")

    with monkeypatch.context() as mp:
        mp.setattr(SplitWriter, "_open", crash_on_third_shard)
        with pytest.raises(RuntimeError, match="simulated crash"):
            prepare(cfg, progress=False)
    assert opened[2].name.startswith(".train-000002.tar.tmp-") and not opened[2].exists()
    assert sorted(os.listdir(out)) == [SKIPPED_NAME, TOKENIZER_NAME, "train-000000.tar",
                                       "train-000001.tar"]
    with pytest.raises(FileNotFoundError, match="did not finish"):
        Manifest.load(out)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no {MANIFEST_NAME} in {out}")):
        ShardedLoader(out, micro_batch_size=1)

    # What a killed process could leave, an older run's extra shard, and a file that is not ours.
    (out / ".train-000002.tar.tmp-99999").write_bytes(b"half a shard")
    (out / ".manifest.json.tmp-99999").write_text("{")
    (out / "val-000099.tar").write_bytes(b"stale")
    (out / "notes.txt").write_text("not the pipeline's: kept")
    m = prepare(cfg, progress=False)
    (out / "notes.txt").unlink()
    assert_manifest_matches_files(out, m)
    assert stable(m) == stable(built.manifest)


# ---------------------------------------------------------------------------------------------
# 6. determinism

def test_same_corpus_twice_gives_identical_shards(built, text_corpus, tmp_path, monkeypatch):
    # Another task grouping (one Ray task per file, both actors busy) must not change the output.
    monkeypatch.setattr(prepare_mod, "group_units", one_unit_per_task)
    out = tmp_path / "data"
    m = prepare(make_cfg(out, [text_corpus[0]]), progress=False)
    assert stable(m) == stable(built.manifest)
    for name in [TOKENIZER_NAME, *shard_names(m)]:
        assert (out / name).read_bytes() == (built.dir / name).read_bytes(), name
    assert m.digest() == built.manifest.digest()




@pytest.mark.parametrize("dtype,sample_len", [("uint16", 33), ("uint32", 129)])
def test_shards_are_byte_identical_to_webdataset_tarwriter(tmp_path, dtype, sample_len):
    # SplitWriter lays members out with numpy; the reference is webdataset's own TarWriter
    # (mtime 0) writing the same samples one by one. Uneven feeds cross shard boundaries.
    import io

    import webdataset as wds

    from data_pipeline.format import TOKENS_FIELD, sample_key
    from data_pipeline.packing import Packer

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2**16 - 1, sample_len * 45 + 7).astype(dtype)
    writer = SplitWriter(tmp_path, "val", sample_len, dtype, SHARD_BYTES)
    packer = Packer(writer)
    for chunk in np.array_split(tokens, 6):
        packer.feed(chunk)
    shards = writer.close()
    assert len(shards) > 1 and packer.tail == 7
    rows = tokens[: 45 * sample_len].reshape(45, sample_len)
    for shard in shards:
        buf = io.BytesIO()
        ref = wds.TarWriter(buf, mtime=0)
        for i in range(shard.first_sample, shard.first_sample + shard.samples):
            ref.write({"__key__": sample_key("val", i), TOKENS_FIELD: rows[i]})
        ref.close()
        assert (tmp_path / shard.name).read_bytes() == buf.getvalue(), shard.name
        assert shard.bytes == len(buf.getvalue()) <= SHARD_BYTES


def test_shard_reader_fast_path_equals_general_path_and_declines_other_layouts(tmp_path,
                                                                              monkeypatch):
    # read_shard decodes SplitWriter's exact layout with numpy; any other byte layout must go
    # to the general path: members out of key order decode by key, a damaged header is an error.
    import data_pipeline.shard_reader as reader
    from data_pipeline.packing import MemberLayout
    from data_pipeline.shard_reader import ShardError

    rng = np.random.default_rng(1)
    rows = rng.integers(0, 2**16, (40, 33)).astype("uint16")
    writer = SplitWriter(tmp_path, "train", 33, "uint16", SHARD_BYTES)
    writer.write(rows)
    shard = writer.close()[1]  # samples 19.., so keys do not start at 0
    path = tmp_path / shard.name
    fast = read_shard(path, shard, "train", 33, "uint16")
    assert np.array_equal(fast, rows[shard.first_sample : shard.first_sample + shard.samples])
    with monkeypatch.context() as mp:
        mp.setattr(reader, "_read_uniform", lambda *a: None)
        assert np.array_equal(read_shard(path, shard, "train", 33, "uint16"), fast)

    size = MemberLayout("train", 33, np.dtype("uint16")).size
    data = bytearray(path.read_bytes())
    swapped = data[:size * 2]
    swapped[:size], swapped[size:] = data[size : size * 2], data[:size]  # a valid tar still
    path.write_bytes(bytes(swapped) + data[size * 2 :])
    assert reader._read_uniform(path.read_bytes(), shard, "train", 33, np.dtype("uint16")) is None
    assert np.array_equal(read_shard(path, shard, "train", 33, "uint16", verify_checksum=False),
                          fast)
    data[size * 3 + len("train") + 9] ^= 1  # a digit of the 4th key, its checksum left as is
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {re.escape(str(path))}"):
        read_shard(path, shard, "train", 33, "uint16", verify_checksum=False)


def test_val_fallback_moves_the_lowest_scoring_document(tmp_path):
    # No id hashes below val_fraction = 0.3: the lowest-scoring document (g.txt) goes to val.
    names = ["a.txt", "b.txt", "c.txt", "e.txt", "g.txt"]
    assert min(names, key=val_score) == "g.txt" and val_score("g.txt") >= 0.3
    rng = random.Random(5)
    (tmp_path / "c").mkdir()
    docs = [(n, gen_text(rng, 60)) for n in names]
    for name, text in docs:
        (tmp_path / "c" / name).write_bytes(text.encode())
    m = prepare(make_cfg(tmp_path / "data", [tmp_path / "c"], "data.seq_len=16"), progress=False)
    assert m.stats["val_forced_document"] == "g.txt"
    assert (m.splits["train"].documents, m.splits["val"].documents) == (4, 1)
    assert_round_trip(tmp_path / "data", m, docs)

class SlowFirstFile(Tokenize):
    """Tokenize whose task holding the corpus's first file ("0-slow.txt") takes a second longer."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = [u for task in batch.column("units").to_pylist() for u in json.loads(task)]
        if any(u["path"].endswith("0-slow.txt") for u in units):
            time.sleep(1.0)
        return super().__call__(batch)


def test_results_are_packed_in_document_order_whatever_finishes_first(tmp_path, monkeypatch):
    # A task per file, the first one slow: the later tasks finish first, and results packed in
    # completion order instead of task order would put documents out of order.
    import ray.cloudpickle

    monkeypatch.setattr(prepare_mod, "group_units", one_unit_per_task)
    monkeypatch.setattr(stages_mod, "Tokenize", SlowFirstFile)
    rng = random.Random(99)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = {f"{i}-{'slow' if i == 0 else 'fast'}.txt": gen_text(rng, rng.randint(5, 80))
             for i in range(16)}
    for name, text in files.items():
        (corpus / name).write_bytes(text.encode())
    out = tmp_path / "data"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    try:
        t = time.perf_counter()
        m = prepare(make_cfg(out, [corpus], "data.seq_len=16"), progress=False)
        assert time.perf_counter() - t > 1.0, "the slow task did not run"
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert_round_trip(out, m, sorted(files.items()))
