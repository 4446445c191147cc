"""Bad input data through the real Ray pipeline: every case is a clear error naming the file
(and line, row or byte), or a counted skip listed in <data.dir>/skipped.jsonl; nothing else is
lost and nothing crashes inside Ray or pyarrow.

One corpus holds every kind of bad file next to good ones and is prepared once with the skip
policies (data.on_bad_record: skip, data.on_invalid_utf8: skip): what is skipped is listed in
corpus order and counted in the manifest, and every other document decodes back from the shards
exactly, including a 1.5 MB line without a single space (which made BPE training quadratic).
The error policies are then checked case by case (each fails in the scan, before tokenizing), and
once through the `pretrain prepare` command: one line, no traceback. The default error messages
for invalid JSONL lines, missing fields and Parquet columns are in test_pipeline.py.

The module's Ray is started the way the pipeline starts it, so the last test checks that it is
private: every Ray process listens on 127.0.0.1 only, and its servers refuse a caller without
the token.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

import data_pipeline.sources as sources_mod
from data_pipeline.documents import is_val, val_score
from data_pipeline.format import MANIFEST_NAME, SKIPPED_NAME, SPLITS, Manifest
from data_pipeline.prepare import init_ray, prepare
from data_pipeline.shard_reader import read_shard
from data_pipeline.sources import DataError
from data_pipeline.tokenizer import MAX_RUN, split_long_runs
from pretrain.config import DataConfig
from pretrain.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "gpt-tiny.yaml"
WORDS = ["the", "data", "pipeline", "café", "中文", "😀", "x = f(y);", "#", "0.5", "{}"]
SKIP_ALL = ("data.on_bad_record=skip", "data.on_invalid_utf8=skip")


def make_cfg(out: Path, sources: list, *extra: str):
    return load_config(TINY_CONFIG, [
        f"data.dir={out}", f"data.sources={json.dumps([str(s) for s in sources])}",
        "data.exclude=[]", "data.num_cpus=2", "data.shard_bytes=20480", "data.val_fraction=0.3",
        *extra,
    ])


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def letters(n: int, seed: int) -> str:
    """n random lowercase letters: one 'word' of the pre-tokenizer, as long as it gets."""
    return (np.random.default_rng(seed).integers(0, 26, n, dtype=np.uint8) + 97).tobytes().decode()


@pytest.fixture(scope="module", autouse=True)
def ray_once():
    """One local Ray for the module, started as `pretrain prepare` starts it (init_ray)."""
    import ray

    started = not ray.is_initialized()
    if started:
        init_ray(DataConfig(num_cpus=2))
    yield started
    if started:
        ray.shutdown()


def write_parquet(path: Path, column: str, values: list, kind=None, row_group_size: int = 3):
    pq.write_table(pa.table({column: pa.array(values, kind)}), path, row_group_size=row_group_size)


def corrupt_row_group(path: Path, group: int) -> None:
    """Garble the page header of one row group: pyarrow cannot read that group, the others it can."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    raw = bytearray(path.read_bytes())
    for i in range(chunk.data_page_offset, chunk.data_page_offset + 8):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, list[tuple[str, str]], list[dict]]:
    """(corpus dir, expected documents (id, text) in corpus order, expected skip records)."""
    root = tmp_path_factory.mktemp("bad_corpus")
    rng = random.Random(9)
    docs: list[tuple[str, str]] = []
    skips: list[dict] = []

    def skip(name: str, kind: str, **where) -> None:
        skips.append({"file": str(root / name), **where, "kind": kind})

    for i in range(12):
        text = words(rng, rng.randint(40, 160))
        (root / f"a_good_{i:02d}.txt").write_text(text)
        docs.append((f"a_good_{i:02d}.txt", text))
    (root / "b_empty.txt").write_bytes(b"")
    skip("b_empty.txt", "empty file")
    (root / "c_image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    skip("c_image.png", "binary file")
    (root / "d_latin1.txt").write_bytes(b"caf\xe9 au lait, na\xefve")
    skip("d_latin1.txt", "invalid UTF-8")
    huge = letters(1_500_000, 1)  # no space, no newline: one pre-token of 1.5 MB
    assert val_score("e_huge_line.txt") >= 0.3  # in train: the tokenizer is trained on it
    (root / "e_huge_line.txt").write_text(huge)
    docs.append(("e_huge_line.txt", huge))

    good = [words(rng, 30) for _ in range(4)]
    long_line = letters(300_000, 2)
    lines: list[bytes] = [
        json.dumps({"text": good[0]}).encode(),           # 1
        b'{"text": "unterminated}',                        # 2 invalid JSON
        json.dumps({"body": "no text field"}).encode(),    # 3 missing field
        b"[1, 2]",                                         # 4 not an object
        b'{"text": 5}',                                    # 5 not a string
        b'{"text": "caf\xe9"}',                            # 6 invalid UTF-8
        b'{"text": "lone \\ud800 surrogate"}',             # 7 lone surrogate escape
        json.dumps({"text": good[1]}).encode(),           # 8
        json.dumps({"text": long_line}).encode(),         # 9 a 300 KB line
        b"",                                               # 10 blank: not a document
        json.dumps({"text": ""}).encode(),                # 11 empty text: counted
        json.dumps({"text": good[2], "id": 7}).encode(),  # 12
    ]
    (root / "f_records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    docs += [("f_records.jsonl:1", good[0]), ("f_records.jsonl:8", good[1]),
             ("f_records.jsonl:9", long_line), ("f_records.jsonl:12", good[2])]
    for line, kind in [(2, "invalid JSON"), (3, "missing field"), (4, "missing field"),
                       (5, "field not a string"), (6, "invalid UTF-8"), (7, "invalid UTF-8")]:
        skip("f_records.jsonl", kind, line=line)

    rows = [words(rng, 25) for _ in range(6)]
    write_parquet(root / "g_good.parquet", "text", rows)
    docs += [(f"g_good.parquet:{r}", t) for r, t in enumerate(rows)]
    write_parquet(root / "h_wrong_column.parquet", "body", ["a", "b"])
    skip("h_wrong_column.parquet", "missing column")
    write_parquet(root / "i_int_column.parquet", "text", [1, 2, 3])
    skip("i_int_column.parquet", "column not a string")
    (root / "j_not_parquet.parquet").write_text("PAR1 this is not a parquet file")
    skip("j_not_parquet.parquet", "not Parquet")
    values = [words(rng, 20).encode(), b"bad \xff byte", words(rng, 20).encode()]
    write_parquet(root / "k_binary_column.parquet", "text", values, pa.binary())
    docs += [("k_binary_column.parquet:0", values[0].decode()),
             ("k_binary_column.parquet:2", values[2].decode())]
    skip("k_binary_column.parquet", "invalid UTF-8", row=1)
    rows = [words(rng, 20) for _ in range(20)]
    write_parquet(root / "l_bad_row_group.parquet", "text", rows, row_group_size=5)
    corrupt_row_group(root / "l_bad_row_group.parquet", 1)
    docs += [(f"l_bad_row_group.parquet:{r}", t) for r, t in enumerate(rows) if not 5 <= r < 10]
    skip("l_bad_row_group.parquet", "unreadable row group", rows=[5, 10])
    return root, docs, skips


@pytest.fixture(scope="module")
def skipped_build(bad_corpus, tmp_path_factory) -> tuple[Path, Manifest]:
    root = bad_corpus[0]
    out = tmp_path_factory.mktemp("skipped_build") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources_mod, "JSONL_CHUNK", 256)  # f_records.jsonl in several units
        m = prepare(make_cfg(out, [root], *SKIP_ALL), progress=False)
    return out, m


def split_streams(data_dir: Path, m: Manifest) -> dict[str, list[int]]:
    streams = {}
    for split in SPLITS:
        rows = [read_shard(data_dir / sh.name, sh, split, m.sample_len, m.dtype)
                for sh in m.splits[split].shards]
        streams[split] = np.concatenate(rows).reshape(-1).tolist() if rows else []
    return streams


def test_skip_policies_list_every_skip_and_keep_everything_else(bad_corpus, skipped_build):
    root, docs, skips = bad_corpus
    out, m = skipped_build
    listed = [json.loads(line) for line in (out / SKIPPED_NAME).read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "reason"} for r in listed] == skips
    assert all(r["reason"] for r in listed)
    by_line = {(Path(r["file"]).name, r.get("line")): r["reason"] for r in listed}
    assert by_line[("f_records.jsonl", 2)].startswith("not valid JSON (Unterminated string")
    at = (root / "f_records.jsonl").read_bytes().index(b"caf\xe9") + 3
    assert by_line[("f_records.jsonl", 6)] == (
        f"invalid UTF-8 at byte {at} of the file (invalid continuation byte)")
    assert by_line[("d_latin1.txt", None)] == ("invalid UTF-8 at byte 3 of the file (invalid "
                                               "continuation byte)")
    s = m.stats
    assert s["skipped"]["total"] == len(skips) == 14
    kinds: dict[str, int] = {}
    for r in skips:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    assert s["skipped"]["by_kind"] == kinds and s["skipped"]["first"] == listed
    assert s["empty_documents"] == 1 and s["utf8_replacements"]["count"] == 0
    assert s["documents"]["total"] == len(docs) and s["bytes"] == sum(
        len(t.encode()) for _, t in docs)
    assert not (out / MANIFEST_NAME).read_text().count("Traceback")

    # Every document that was not skipped decodes back from its split's shards, in order.
    tok = Tokenizer.from_file(str(out / m.tokenizer.file))
    eos = m.tokenizer.eos_id
    streams = split_streams(out, m)
    forced = m.stats["val_forced_document"]
    for split, stream in streams.items():
        want = [t for i, t in docs if is_val(i, 0.3, forced) == (split == "val")]
        pieces, start = [], 0
        for pos in np.flatnonzero(np.asarray(stream) == eos).tolist():
            pieces.append(stream[start:pos])
            start = pos + 1
        assert 0 < len(pieces) <= len(want) and len(want) - len(pieces) <= 1  # + a cut tail
        for k, got in enumerate(pieces):
            assert tok.decode(got, skip_special_tokens=False) == want[k], f"{split} document {k}"
    assert m.splits["train"].documents > m.splits["val"].documents > 0


def test_huge_lines_are_cut_for_the_tokenizer_only(skipped_build):
    out, m = skipped_build
    text = letters(1_500_000, 1)
    pieces = split_long_runs(text)
    assert "".join(pieces) == text and max(map(len, pieces)) == MAX_RUN
    mixed = "a b\n" * 100 + "x" * 2500 + " \t" + " " * 1030 + "end"
    pieces = split_long_runs(mixed)
    assert "".join(pieces) == mixed
    assert max(len(run) for p in pieces for run in re.findall(r"\S+|\s+", p)) <= MAX_RUN
    assert split_long_runs("normal text " * 500) == ["normal text " * 500]
    # The prepared directory holds the whole line: 1.5 MB of letters in the train split.
    assert m.stats["tokens"]["train"] > 300_000


def _case_binary_error(tmp: Path):
    (tmp / "c").mkdir()
    (tmp / "c" / "a.txt").write_text("some text " * 20)
    (tmp / "c" / "b.png").write_bytes(b"\x89PNG\r\n\x00\x00")
    return [tmp / "c"], ["data.on_binary_file=error"], (
        f"{tmp / 'c' / 'b.png'} is a binary file (NUL byte at offset 6), not text: leave it out "
        "with data.exclude, or set data.on_binary_file: skip")


def _case_utf8_error_text(tmp: Path):
    (tmp / "c").mkdir()
    (tmp / "c" / "a.txt").write_text("some text " * 20)
    (tmp / "c" / "b.txt").write_bytes(b"x" * 10_000 + b"caf\xe9 ok")  # past the first 8 KiB
    return [tmp / "c"], ["data.on_invalid_utf8=error"], (
        f"{tmp / 'c' / 'b.txt'}: invalid UTF-8 at byte 10003 of the file (invalid continuation "
        "byte). Set data.on_invalid_utf8: replace")


def _case_utf8_error_jsonl(tmp: Path):
    lines = [json.dumps({"text": f"line {i}"}).encode() for i in range(40)]
    lines[31] = b'{"text": "\xc3("}'
    (tmp / "a.jsonl").write_bytes(b"\n".join(lines))
    offset = sum(len(x) + 1 for x in lines[:31]) + 10
    return [tmp / "a.jsonl"], ["data.on_invalid_utf8=error"], (
        f"{tmp / 'a.jsonl'}:32: invalid UTF-8 at byte {offset} of the file (invalid continuation "
        "byte)")


def _case_surrogate_error(tmp: Path):
    (tmp / "a.jsonl").write_text('{"text": "ok"}\n{"text": "x \\udc00 y"}\n')
    return [tmp / "a.jsonl"], ["data.on_invalid_utf8=error"], (
        f"{tmp / 'a.jsonl'}:2: field 'text' holds a lone UTF-16 surrogate escape")


def _case_utf8_error_parquet(tmp: Path):
    write_parquet(tmp / "t.parquet", "text", [b"fine", b"fine too", b"\xff"], pa.binary(), 2)
    return [tmp / "t.parquet"], ["data.on_invalid_utf8=error"], (
        f"{tmp / 't.parquet'}: row 2: invalid UTF-8 in column 'text'")


def _case_unreadable_row_group(tmp: Path):
    write_parquet(tmp / "t.parquet", "text", [f"document {i} " * 20 for i in range(20)], None, 5)
    corrupt_row_group(tmp / "t.parquet", 2)
    return [tmp / "t.parquet"], [], (
        f"cannot read row group 2 of {tmp / 't.parquet'}: Couldn't deserialize thrift")  # pyarrow's


def _case_everything_skipped(tmp: Path):
    (tmp / "c").mkdir()
    (tmp / "c" / "a.bin").write_bytes(b"\x00\x01")
    (tmp / "c" / "b.txt").write_bytes(b"")
    (tmp / "c" / "c.jsonl").write_text("not json\n")
    src = str(tmp / "c")
    return [src], ["data.on_bad_record=skip"], (
        f"empty corpus: data.sources {[src]} hold no documents (3 files; skipped: 1 binary file, "
        f"1 empty file, 1 invalid JSON (listed in {tmp / 'out' / SKIPPED_NAME}))")


ERROR_CASES = [_case_binary_error, _case_utf8_error_text, _case_utf8_error_jsonl,
               _case_surrogate_error, _case_utf8_error_parquet, _case_unreadable_row_group,
               _case_everything_skipped]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.__name__[len("_case_"):])
def test_error_policies_name_the_file_and_where(case, tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "JSONL_CHUNK", 64)  # the bad line in a later unit
    sources, overrides, message = case(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="^" + re.escape(message)):
        prepare(make_cfg(out, sources, *overrides), progress=False)
    assert not (out / MANIFEST_NAME).exists()


def test_prepare_command_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "prepare", str(TINY_CONFIG),
         f"data.dir={tmp_path / 'out'}", f"data.sources=[{tmp_path / 'a.jsonl'}]",
         "data.num_cpus=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'a.jsonl'}:2: not valid JSON (Unterminated string starting at")


def test_local_ray_listens_on_localhost_only_and_wants_its_token(ray_once):
    import grpc
    import psutil
    import ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    assert ray_once, "Ray was already running: this module's Ray is not the pipeline's"
    info = ray._private.worker.global_worker.node.address_info
    assert info["gcs_address"].startswith("127.0.0.1:") and not info["webui_url"]
    listening = {(p.name(), c.laddr.ip, c.laddr.port)
                 for p in psutil.Process().children(recursive=True)
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert {name for name, _, _ in listening} >= {"gcs_server", "raylet"}
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip, _ in listening), listening

    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(info["gcs_address"]))
    request = gcs_service_pb2.GetAllNodeInfoRequest()
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetAllNodeInfo(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetAllNodeInfo(request, timeout=30, metadata=[("authorization", "Bearer " + "0" * 64)])
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = os.environ["RAY_AUTH_TOKEN"]
    reply = stub.GetAllNodeInfo(request, timeout=30, metadata=[("authorization", f"Bearer {token}")])
    assert len(reply.node_info_list) == 1
