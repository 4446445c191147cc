"""Reading the documents of one unit (see sources.py), repairing UTF-8, and the train/val split.

Every reader returns a `UnitDocs`: parallel lists of document ids and texts plus counters. Bad
input raises `DataError` naming the file (and line or column); invalid UTF-8 is decoded with
U+FFFD replacement characters and counted, never an error.

The split is a pure function of the document id: a document goes to val iff a 64-bit hash of its
id, read as a number in [0, 1), is below `val_fraction`. It therefore does not depend on how the
corpus is cut into blocks or how many workers read it. Ids are `rel` for text files, `rel:line`
(1-based) for JSONL, `rel:row` (0-based) for Parquet.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from data_pipeline.sources import DataError

_SURROGATES = re.compile("[\ud800-\udfff]")
_BINARY_PROBE = 8192


@dataclass
class UnitDocs:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    bytes: int = 0
    """UTF-8 bytes of `texts`."""
    replaced: int = 0
    """Invalid UTF-8 sequences (or lone surrogates) replaced by U+FFFD."""
    empty: int = 0
    """Documents left out because their text is empty (or null)."""
    skip: str | None = None
    """Why the whole file was left out (binary, empty), if it was."""


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """(text, number of replaced invalid sequences). Fast path: strict decoding succeeds."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        # U+FFFD already present in the input is encoded as EF BF BD and is not a replacement.
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def _clean(text: str) -> tuple[str, int, int]:
    """(text, UTF-8 bytes, replaced): lone surrogates (from JSON \\ud800 escapes) become U+FFFD."""
    try:
        return text, len(text.encode("utf-8")), 0
    except UnicodeEncodeError:
        text, n = _SURROGATES.subn("\ufffd", text)
        return text, len(text.encode("utf-8")), n


def val_score(doc_id: str) -> float:
    """Position of a document in [0, 1), uniform and stable: the split compares it to val_fraction."""
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_val(doc_id: str, val_fraction: float, forced_val: str | None = None) -> bool:
    return doc_id == forced_val or val_score(doc_id) < val_fraction


def _read_bytes(path: str, start: int = 0, length: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            return f.read(length)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _text_skip(raw: bytes) -> str | None:
    """Why a text file whose bytes start with `raw` is not a document (None: it is one)."""
    if not raw:
        return "empty file"
    if b"\0" in raw[:_BINARY_PROBE]:
        return f"binary file (NUL byte in the first {_BINARY_PROBE} bytes)"
    return None


def probe_text_unit(unit: dict) -> str | None:
    """What read_unit decides about a text unit, from its first bytes only: None if it is one
    document (id unit["rel"]), else why it is skipped. Raises DataError if it cannot be read."""
    return _text_skip(_read_bytes(unit["path"], 0, _BINARY_PROBE))


def _read_text(unit: dict) -> UnitDocs:
    raw = _read_bytes(unit["path"])
    if (skip := _text_skip(raw)) is not None:
        return UnitDocs(skip=skip)
    text, replaced = decode_utf8(raw)
    nbytes = len(raw) if not replaced else len(text.encode("utf-8"))
    return UnitDocs([unit["rel"]], [text], nbytes, replaced)


def _read_jsonl(unit: dict, text_field: str) -> UnitDocs:
    path, rel = unit["path"], unit["rel"]
    raw = _read_bytes(path, unit["start"], unit["end"] - unit["start"])
    text, replaced = decode_utf8(raw)
    out = UnitDocs(replaced=replaced)
    # "\n" is ASCII, so replacement characters never swallow a line end: line numbers stay exact.
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        lineno = unit["first"] + i
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); every non-blank "
                f"line must be a JSON object with the text in field {text_field!r} (data.text_field)"
            ) from None
        if not isinstance(record, dict) or text_field not in record:
            has = f"fields {sorted(record)[:20]}" if isinstance(record, dict) else \
                f"a JSON {type(record).__name__}, not an object"
            raise DataError(
                f"{path}:{lineno}: no field {text_field!r} (data.text_field is {text_field!r}; "
                f"the line has {has}). Set data.text_field to the field that holds the text."
            )
        value = record[text_field]
        if value is None or value == "":
            out.empty += 1
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{lineno}: field {text_field!r} (data.text_field) is a JSON "
                f"{type(value).__name__}, expected a string"
            )
        value, nbytes, fixed = _clean(value)
        out.ids.append(f"{rel}:{lineno}")
        out.texts.append(value)
        out.bytes += nbytes
        out.replaced += fixed
    return out


def _read_parquet(unit: dict, text_field: str) -> UnitDocs:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path, rel, first = unit["path"], unit["rel"], unit["first"]
    try:
        column = pq.ParquetFile(path).read_row_group(unit["start"], columns=[text_field])
        column = column.column(0)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read row group {unit['start']} of {path}: {e}") from None
    out = UnitDocs()
    values: list[str | bytes | None]
    try:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise TypeError("binary column")
        values = column.to_pylist()
        out.bytes = pc.sum(pc.binary_length(column)).as_py() or 0
    except (TypeError, UnicodeDecodeError, pa.ArrowException):
        # Binary column, or string data that is not valid UTF-8: decode each value ourselves.
        values = column.cast(pa.large_binary()).to_pylist()
    for row, value in enumerate(values, start=first):
        if isinstance(value, bytes):
            value, fixed = decode_utf8(value)
            out.replaced += fixed
            out.bytes += len(value.encode("utf-8"))
        if not value:
            out.empty += 1
            continue
        out.ids.append(f"{rel}:{row}")
        out.texts.append(value)
    return out


def read_unit(unit: dict, text_field: str) -> UnitDocs:
    """Documents of one unit (a dict made by sources.plan_units), in file order."""
    if unit["fmt"] == "jsonl":
        return _read_jsonl(unit, text_field)
    if unit["fmt"] == "parquet":
        return _read_parquet(unit, text_field)
    return _read_text(unit)
