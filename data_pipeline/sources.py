"""Finding the input files of a corpus and planning them into units of work.

`list_files` turns `data.sources` (paths, directories, globs, the word `stdlib`) minus
`data.exclude` into a deterministic list of files. `plan_units` cuts those files into *units*,
the pieces that Ray workers read (`data_pipeline.documents.read_unit`); empty files are skipped:

    text      one unit per file; the file is one document
    jsonl     byte ranges of ~`JSONL_CHUNK` bytes cut at line ends, each knowing the number of its
              first line, so that a worker can name documents `path:line` without the rest of the file
    parquet   one unit per row group, knowing the index of its first row

Units are plain dicts (they travel to Ray workers as JSON). Document ids are built from a file's
path relative to its source root (the directory, the glob's fixed prefix, the file's parent, or
the stdlib directory), so the train/val split does not change when the corpus moves.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import DataConfig

JSONL_CHUNK = 8 * 2**20
"""Target bytes of one JSONL unit (cut at the next line end)."""
_READ_BLOCK = 8 * 2**20
TASKS_PER_WORKER = 16
"""Ray tasks planned per worker (group_units); fewer, larger tasks leave workers idle at the end."""
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
"""Directories of the stdlib that `stdlib` leaves out: installed packages and test suites."""


class DataError(ValueError):
    """Bad input data: the message names the source, file (and line) and what to change."""


@dataclass(frozen=True)
class ReadPolicy:
    """What readers do with bad input: data.on_bad_record, on_binary_file, on_invalid_utf8
    (pretrain/config.py). Travels to the Ray workers with the units."""

    bad_record: str = "error"
    """error | skip: invalid JSONL lines, a missing or non-string text field or column."""
    binary_file: str = "skip"
    """skip | error: text-format files with a NUL byte near the start."""
    invalid_utf8: str = "replace"
    """replace | skip | error: bytes that are not UTF-8."""

    @classmethod
    def of(cls, data: DataConfig) -> "ReadPolicy":
        return cls(data.on_bad_record, data.on_binary_file, data.on_invalid_utf8)


def skip_record(path: str, kind: str, reason: str, **where: int | list[int]) -> dict:
    """One entry of skipped.jsonl: the file, where in it (line, row, rows) and why.
    `kind` is the category counted in the manifest; `reason` the detail."""
    return {"file": path, **where, "kind": kind, "reason": reason}


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Absolute path."""
    rel: str
    """Path relative to the source root (posix): the prefix of document ids."""
    fmt: str
    """text, jsonl or parquet."""
    size: int
    mtime_ns: int


def _format_of(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def _walk(root: str, skip_dirs: frozenset[str] = frozenset()) -> list[str]:
    """All files under `root`, recursively, hidden files and directories and directories named
    in `skip_dirs` left out (never entered)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return found


def _expand(source: str) -> tuple[str, list[str]]:
    """(root, matching paths) of one entry of data.sources; raises DataError if none exist."""
    if source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        return root, [p for p in _walk(root, _STDLIB_SKIP) if p.endswith(".py")]
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        return path, _walk(path)
    if os.path.lexists(path):  # a file, or a broken link that reading will report
        return os.path.dirname(path), [path]
    if glob.has_magic(source):
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        files: list[str] = []
        for m in matches:
            files += _walk(m) if os.path.isdir(m) else [m]
        fixed = Path(os.path.expanduser(source)).parts
        prefix = []
        for part in fixed:
            if glob.has_magic(part):
                break
            prefix.append(part)
        root = os.path.abspath(os.path.join(*prefix)) if prefix else os.getcwd()
        return root, [os.path.abspath(f) for f in files]
    raise DataError(
        f"data.sources: {source!r} does not exist (looked for {path}); give existing files, "
        "directories or glob patterns, or `stdlib`"
    )


def _excluded(path: str, patterns: list[str]) -> bool:
    posix = Path(path).as_posix()
    return any(fnmatch.fnmatchcase(posix, p) for p in patterns)


def list_files(data: DataConfig) -> list[SourceFile]:
    """Files of the corpus: sources in config order, each sorted by relative path, no repeats."""
    seen: set[str] = set()
    files: list[SourceFile] = []
    # Never read our own output back as input (data.dir inside a source directory).
    out_dir = os.path.join(os.path.abspath(data.dir), "")
    for source in data.sources:
        root, paths = _expand(source)
        picked = []
        for p in paths:
            if p in seen or p.startswith(out_dir) or _excluded(p, data.exclude):
                continue
            seen.add(p)
            picked.append((Path(os.path.relpath(p, root)).as_posix(), p))
        if not picked:
            raise DataError(
                f"data.sources: {source!r} matches no files"
                + (f" once data.exclude {data.exclude} is applied" if paths else "")
                + " (or only files already listed by an earlier source)"
            )
        for rel, p in sorted(picked):
            try:
                st = os.stat(p)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # e.g. a broken link: reading its unit reports it, naming the path
                size, mtime = -1, 0
            fmt = "text" if source == "stdlib" else _format_of(p, data.format)
            files.append(SourceFile(p, rel, fmt, size, mtime))
    return files


def fingerprint(files: list[SourceFile]) -> str:
    """Changes when a file is added, removed, resized or touched."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.fmt}\0{f.size}\0{f.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _jsonl_units(f: SourceFile) -> list[dict]:
    """Byte ranges of ~JSONL_CHUNK bytes ending at a newline, with the number of their first line.

    Reads the file once at disk speed (counting newlines is done by bytes.count, not per line).
    """
    units: list[dict] = []
    start, first_line, lines, pos = 0, 1, 0, 0

    def cut(end: int) -> None:
        units.append({"path": f.path, "rel": f.rel, "fmt": "jsonl", "start": start, "end": end,
                      "first": first_line, "size": end - start})

    try:
        with open(f.path, "rb") as fh:
            while block := fh.read(_READ_BLOCK):
                off = 0
                while (target := max(start + JSONL_CHUNK - pos, off)) < len(block):
                    nl = block.find(b"\n", target)
                    if nl < 0:
                        break
                    lines += block.count(b"\n", off, nl + 1)
                    cut(pos + nl + 1)
                    start, first_line, lines, off = pos + nl + 1, first_line + lines, 0, nl + 1
                lines += block.count(b"\n", off)
                pos += len(block)
    except OSError as e:
        raise DataError(f"cannot read {f.path}: {e.strerror or e}") from None
    if pos > start:
        cut(pos)
    return units


_SKIP_PARQUET = ("; or set data.on_bad_record: skip to leave such files out (listed in "
                 "skipped.jsonl)")


def _parquet_units(f: SourceFile, text_field: str, policy: ReadPolicy,
                   skipped: list[dict]) -> list[dict]:
    """Row groups of a Parquet file; a file that is not Parquet or lacks a string column
    `text_field` raises DataError, or with data.on_bad_record: skip is appended to `skipped`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def bad(kind: str, reason: str, message: str) -> list[dict]:
        if policy.bad_record != "skip":
            raise DataError(message + _SKIP_PARQUET)
        skipped.append(skip_record(f.path, kind, reason))
        return []

    try:
        meta = pq.ParquetFile(f.path).metadata
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        return bad("not Parquet", f"cannot read as Parquet: {e}",
                   f"cannot read {f.path} as Parquet: {e}. Leave it out (data.exclude) or set "
                   "data.format")
    if text_field not in schema.names:
        return bad("missing column", f"no column {text_field!r}; its columns are {schema.names}",
                   f"{f.path}: no column {text_field!r} (data.text_field); its columns are "
                   f"{schema.names}. Set data.text_field to the column that holds the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        return bad("column not a string", f"column {text_field!r} has type {kind}",
                   f"{f.path}: column {text_field!r} (data.text_field) has type {kind}, "
                   "expected a string (or binary UTF-8) column")
    units, row = [], 0
    for g in range(meta.num_row_groups if meta.num_rows else 0):
        rg = meta.row_group(g)
        units.append({"path": f.path, "rel": f.rel, "fmt": "parquet", "start": g, "end": g + 1,
                      "first": row, "rows": rg.num_rows, "size": max(rg.total_byte_size, 1)})
        row += rg.num_rows
    if not units:
        skipped.append(skip_record(f.path, "empty file", "no rows"))
    return units


def plan_units(files: list[SourceFile], text_field: str,
               policy: ReadPolicy = ReadPolicy()) -> tuple[list[dict], list[dict]]:
    """(units of all files in file order, files left out whole as skip records: empty files,
    and Parquet files without the text column when data.on_bad_record is skip)."""
    units: list[dict] = []
    skipped: list[dict] = []
    for f in files:
        if f.size == 0:
            skipped.append(skip_record(f.path, "empty file", "empty file"))
        elif f.fmt == "jsonl":
            units += _jsonl_units(f)
        elif f.fmt == "parquet":
            units += _parquet_units(f, text_field, policy, skipped)
        else:
            units.append({"path": f.path, "rel": f.rel, "fmt": "text", "start": 0,
                          "end": max(f.size, 0), "first": 0, "size": max(f.size, 1)})
    return units, skipped


def group_units(units: list[dict], workers: int) -> list[list[dict]]:
    """Consecutive units grouped into Ray tasks of similar byte size (~16 tasks per worker).

    Grouping only changes parallelism, never the output: results are consumed in unit order.
    Many tasks per worker keep every worker busy to the end (with 4, the last tasks left one of
    two workers idle: the tokenize stage took 1.3-1.5x as long, see BENCHMARKS.md).
    """
    total = sum(u["size"] for u in units)
    target = min(max(total // (TASKS_PER_WORKER * max(workers, 1)), 256 * 2**10), 64 * 2**20)
    tasks: list[list[dict]] = [[]]
    size = 0
    for u in units:
        if tasks[-1] and size + u["size"] > target:
            tasks.append([])
            size = 0
        tasks[-1].append(u)
        size += u["size"]
    return [t for t in tasks if t]
