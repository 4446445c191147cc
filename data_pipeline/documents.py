"""Reading the documents of one unit (see sources.py), bad input, and the train/val split.

Every reader returns a `UnitDocs`: parallel lists of document ids and texts, counters, and skip
records of what it left out. Bad input follows the `ReadPolicy` (data.on_bad_record,
on_binary_file, on_invalid_utf8): a `DataError` naming the file (and line, row or byte offset)
and the setting that would skip it, or a skip record {"file", "line" | "row" | "rows", "kind",
"reason"} that ends up in <data.dir>/skipped.jsonl and the manifest's counts. Invalid UTF-8 is
by default decoded with U+FFFD replacement characters and counted.

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

from data_pipeline.sources import DataError, ReadPolicy, skip_record

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
    skipped: list[dict] = field(default_factory=list)
    """What was left out, as skip records (sources.skip_record), in file order."""


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


_UTF8_FIX = ("Set data.on_invalid_utf8: replace to keep it with U+FFFD replacement characters, "
             "or skip to leave it out (listed in skipped.jsonl)")
_RECORD_FIX = "; or set data.on_bad_record: skip to leave such lines out (listed in skipped.jsonl)"


def _text_skip(path: str, raw: bytes, policy: ReadPolicy) -> dict | None:
    """The skip record of a text file whose bytes start with `raw` (None: it is a document);
    DataError for a binary file when data.on_binary_file is error."""
    if not raw:
        return skip_record(path, "empty file", "empty file")
    nul = raw.find(b"\0", 0, _BINARY_PROBE)
    if nul < 0:
        return None
    if policy.binary_file == "error":
        raise DataError(
            f"{path} is a binary file (NUL byte at offset {nul}), not text: leave it out with "
            "data.exclude, or set data.on_binary_file: skip to skip such files (listed in "
            "skipped.jsonl)"
        )
    return skip_record(path, "binary file", f"binary file (NUL byte in the first "
                                            f"{_BINARY_PROBE} bytes)")


def _bad_utf8(raw: bytes, offset: int) -> str:
    """Where and why `raw` (read from byte `offset` of its file) is not UTF-8."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 at byte {offset + e.start} of the file ({e.reason})"
    return "invalid UTF-8"


def probe_text_unit(unit: dict, policy: ReadPolicy = ReadPolicy()) -> dict | None:
    """What read_unit decides about a text unit: None if it is one document (id unit["rel"]),
    else its skip record. From the first bytes only, unless data.on_invalid_utf8 asks to check
    the whole file. Raises DataError if it cannot be read or the policy says so."""
    if policy.invalid_utf8 == "replace":
        return _text_skip(unit["path"], _read_bytes(unit["path"], 0, _BINARY_PROBE), policy)
    skipped = _read_text(unit, policy).skipped
    return skipped[0] if skipped else None


def _read_text(unit: dict, policy: ReadPolicy) -> UnitDocs:
    path = unit["path"]
    raw = _read_bytes(path)
    if (skip := _text_skip(path, raw, policy)) is not None:
        return UnitDocs(skipped=[skip])
    text, replaced = decode_utf8(raw)
    if replaced and policy.invalid_utf8 != "replace":
        if policy.invalid_utf8 == "error":
            raise DataError(f"{path}: {_bad_utf8(raw, 0)}. {_UTF8_FIX}")
        return UnitDocs(skipped=[skip_record(path, "invalid UTF-8", _bad_utf8(raw, 0))])
    nbytes = len(raw) if not replaced else len(text.encode("utf-8"))
    return UnitDocs([unit["rel"]], [text], nbytes, replaced)


def _jsonl_lines(raw: bytes, unit: dict, policy: ReadPolicy,
                 out: UnitDocs) -> list[tuple[int, str, str | None]]:
    """(line number, text, None) of the unit's lines, decoded as data.on_invalid_utf8 says;
    (line number, "", why) for a line that is not UTF-8 and is to be skipped."""
    first = unit["first"]
    text, replaced = decode_utf8(raw)
    if not replaced or policy.invalid_utf8 == "replace":
        out.replaced += replaced
        # "\n" is ASCII, so replacement characters never swallow a line end: numbers stay exact.
        return [(n, line, None) for n, line in enumerate(text.split("\n"), start=first)]
    lines: list[tuple[int, str, str | None]] = []
    offset = unit["start"]
    for lineno, line in enumerate(raw.split(b"\n"), start=first):
        try:
            lines.append((lineno, line.decode("utf-8"), None))
        except UnicodeDecodeError:
            reason = _bad_utf8(line, offset)
            if policy.invalid_utf8 == "error":
                raise DataError(f"{unit['path']}:{lineno}: {reason}. {_UTF8_FIX}") from None
            lines.append((lineno, "", reason))
        offset += len(line) + 1
    return lines


def _read_jsonl(unit: dict, text_field: str, policy: ReadPolicy) -> UnitDocs:
    path, rel = unit["path"], unit["rel"]
    raw = _read_bytes(path, unit["start"], unit["end"] - unit["start"])
    out = UnitDocs()

    def bad(lineno: int, kind: str, reason: str, message: str) -> None:
        if policy.bad_record != "skip":
            raise DataError(f"{path}:{lineno}: {message}{_RECORD_FIX}")
        out.skipped.append(skip_record(path, kind, reason, line=lineno))

    for lineno, line, not_utf8 in _jsonl_lines(raw, unit, policy, out):
        if not_utf8:
            out.skipped.append(skip_record(path, "invalid UTF-8", not_utf8, line=lineno))
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            detail = f"{e.msg}, column {e.colno}"
            bad(lineno, "invalid JSON", f"not valid JSON ({detail})",
                f"not valid JSON ({detail}); every non-blank line must be a JSON object with "
                f"the text in field {text_field!r} (data.text_field)")
            continue
        if not isinstance(record, dict) or text_field not in record:
            has = f"fields {sorted(record)[:20]}" if isinstance(record, dict) else \
                f"a JSON {type(record).__name__}, not an object"
            bad(lineno, "missing field", f"no field {text_field!r} (the line has {has})",
                f"no field {text_field!r} (data.text_field is {text_field!r}; the line has "
                f"{has}). Set data.text_field to the field that holds the text")
            continue
        value = record[text_field]
        if value is None or value == "":
            out.empty += 1
            continue
        if not isinstance(value, str):
            kind = type(value).__name__
            bad(lineno, "field not a string", f"field {text_field!r} is a JSON {kind}",
                f"field {text_field!r} (data.text_field) is a JSON {kind}, expected a string")
            continue
        value, nbytes, fixed = _clean(value)
        if fixed and policy.invalid_utf8 != "replace":
            reason = f"field {text_field!r} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
            if policy.invalid_utf8 == "error":
                raise DataError(f"{path}:{lineno}: {reason}, which is not valid Unicode. "
                                f"{_UTF8_FIX}")
            out.skipped.append(skip_record(path, "invalid UTF-8", reason, line=lineno))
            continue
        out.ids.append(f"{rel}:{lineno}")
        out.texts.append(value)
        out.bytes += nbytes
        out.replaced += fixed
    return out


def _read_parquet(unit: dict, text_field: str, policy: ReadPolicy) -> UnitDocs:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path, rel, first = unit["path"], unit["rel"], unit["first"]
    try:
        column = pq.ParquetFile(path).read_row_group(unit["start"], columns=[text_field])
        column = column.column(0)
    except (OSError, pa.ArrowException) as e:
        if policy.bad_record != "skip":
            raise DataError(f"cannot read row group {unit['start']} of {path}: {e}. Repair or "
                            "remove the file, or set data.on_bad_record: skip to leave unreadable "
                            "row groups out (listed in skipped.jsonl)") from None
        rows = [first, first + unit.get("rows", 0)]
        return UnitDocs(skipped=[skip_record(path, "unreadable row group",
                                             f"cannot read row group {unit['start']}: {e}",
                                             rows=rows)])
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
            if fixed and policy.invalid_utf8 != "replace":
                reason = f"invalid UTF-8 in column {text_field!r}"
                if policy.invalid_utf8 == "error":
                    raise DataError(f"{path}: row {row}: {reason}. {_UTF8_FIX}")
                out.skipped.append(skip_record(path, "invalid UTF-8", reason, row=row))
                continue
            out.replaced += fixed
            out.bytes += len(value.encode("utf-8"))
        if not value:
            out.empty += 1
            continue
        out.ids.append(f"{rel}:{row}")
        out.texts.append(value)
    return out


def read_unit(unit: dict, text_field: str, policy: ReadPolicy = ReadPolicy()) -> UnitDocs:
    """Documents of one unit (a dict made by sources.plan_units), in file order."""
    if unit["fmt"] == "jsonl":
        return _read_jsonl(unit, text_field, policy)
    if unit["fmt"] == "parquet":
        return _read_parquet(unit, text_field, policy)
    return _read_text(unit, policy)
