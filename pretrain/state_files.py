"""The files of a checkpoint's state/ directory: boxes of whole tensors, written and read per rank.

A box is a block [offsets, offsets + shape) of a whole tensor (the tensor of the unsplit model),
stored row-major. Every rank writes the boxes it holds into one safetensors file of its own,
`rank-<global rank>.safetensors`, with the box offsets in the header the way PyTorch distributed
checkpointing's (DCP) sharded Hugging Face layout records them (`DCP_SHARDING_INFO`), so that
DCP's HuggingFaceStorageReader reads any mix of boxes back, whatever grid wrote them.

Writing goes straight from the tensors' memory to the file (safetensors' save_file makes no copy),
then fsync; no process group is involved, so a background thread can do it. Reading asks DCP
for the boxes this rank needs (`read_boxes`): DCP finds the stored boxes that overlap each one
and copies the overlap, which is what resharding is. Nothing here unpickles anything: safetensors
headers are JSON and the data is raw numbers.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

# What DCP's Hugging Face storage writes in the header and its reader looks for
# (torch/distributed/checkpoint/_hf_utils.py); read_boxes below checks the round trip.
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY, DCP_VERSION_KEY, FORMAT_KEY, FORMAT_VALUE, HF_DCP_VERSION,
    SAVED_OFFSETS_KEY,
)

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def box_of_range(shape: tuple[int, ...], start: int, stop: int) -> Box | None:
    """The box of a tensor of `shape` whose row-major elements are exactly [start, stop), or
    None if that range is not a box (it starts or ends inside a row of a larger block).

    E.g. shape (4, 6): [6, 18) is rows 1-2, ((1, 0), (2, 6)); [8, 11) is ((1, 2), (1, 3));
    [4, 8) crosses a row end and is not a box."""
    if not shape:
        return ((), ()) if (start, stop) == (0, 1) else None
    for k in range(len(shape)):  # the outermost dim the range can be a slab of
        inner = math.prod(shape[k + 1:])
        if start % inner or (stop - start) % inner:
            continue
        first, count = start // inner, (stop - start) // inner
        if first % shape[k] + count > shape[k]:
            continue
        outer = first // shape[k]
        head = []
        for n in reversed(shape[:k]):  # unravel the index over the dims before k
            head.append(outer % n)
            outer //= n
        offsets = (*reversed(head), first % shape[k], *[0] * (len(shape) - k - 1))
        return offsets, (*[1] * k, count, *shape[k + 1:])
    return None


def rows_around(shape: tuple[int, ...], start: int, stop: int) -> tuple[Box, int]:
    """The smallest box of whole rows (along dim 0) holding [start, stop), and where `start`
    falls inside it (row-major)."""
    inner = math.prod(shape[1:])
    first, last = start // inner, -(-stop // inner)
    return ((first, *[0] * (len(shape) - 1)), (last - first, *shape[1:])), start - first * inner


def shifted(box: Box, dim: int | None, by: int) -> Box:
    """The box moved by `by` along `dim` (a tensor-parallel chunk's place in the whole)."""
    if dim is None or by == 0:
        return box
    offsets = list(box[0])
    offsets[dim] += by
    return tuple(offsets), box[1]


def write_boxes(path: Path, boxes: dict[str, tuple[Tensor, tuple[int, ...]]]) -> int:
    """Write {key: (tensor shaped as its box, box offsets in the whole tensor)} as one
    safetensors file, fsynced; returns its size. fp32 only.

    The file is written here rather than by safetensors' save_file: the format is a length, a
    JSON header and the raw data, and one sequential write of each tensor's memory is 1.5x
    faster than save_file on our benchmark machine (BENCHMARKS.md). safetensors and DCP read it
    back (tests/test_state_files.py)."""
    entries, metadata, end = {}, {}, 0
    for key, (t, offsets) in boxes.items():
        if t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"{key}: write_boxes takes contiguous fp32 host tensors")
        entries[key] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [end, end + 4 * t.numel()]}
        metadata[key] = {SAVED_OFFSETS_KEY: list(offsets)}
        end += 4 * t.numel()
    entries["__metadata__"] = {CUSTOM_METADATA_KEY: json.dumps(metadata),
                               DCP_VERSION_KEY: str(HF_DCP_VERSION), FORMAT_KEY: FORMAT_VALUE}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors does
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb", buffering=0) as f:
        _write_all(f, len(header).to_bytes(8, "little") + header)
        for t, _ in boxes.values():
            _write_all(f, memoryview(t.detach().numpy()).cast("B"))
        os.fsync(f.fileno())
    return 8 + len(header) + end


def _write_all(f, data: memoryview | bytes) -> None:
    data = memoryview(data)
    while data:
        data = data[f.write(data):]


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BoxLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, asked for one box of each whole tensor instead of all of it."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, t in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise KeyError(f"{key} is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=t.shape)
            items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]  # the box itself: read items are relative to it


def read_boxes(state_dir: Path, boxes: dict[str, tuple[Tensor, tuple[int, ...]]],
               index: dict[str, list[StoredBox]] | None = None) -> None:
    """Fill {key: (tensor shaped as its box, box offsets in the whole tensor)} from a state
    directory, in this process alone (no collectives): each rank reads only what it asks for.

    Where the stored boxes overlap a wanted box in runs of bytes that are contiguous both in the
    file and in the wanted box (the same box when the grid did not change; whole rows; part of a
    row), each run is read from the file straight into the tensor's memory. DCP assembles the
    other boxes (e.g. a tensor-parallel split along another dimension) through safetensors'
    memory map and a copy. `index`: read_index(state_dir), if the caller has it."""
    index = read_index(state_dir) if index is None else index
    direct: dict[Path, list[tuple[int, memoryview]]] = {}
    rest = {}
    for key, (t, offsets) in boxes.items():
        runs = _runs(index.get(key, ()), offsets, tuple(t.shape))
        if runs is None or t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu:
            rest[key] = (t, offsets)
            continue
        memory = memoryview(t.detach().numpy()).cast("B")
        for path, start, at, n in runs:
            direct.setdefault(path, []).append((start, memory[4 * at: 4 * (at + n)]))
    for path, reads in direct.items():
        with open(path, "rb", buffering=0) as f:
            for start, memory in sorted(reads, key=lambda r: r[0]):
                f.seek(start)
                if f.readinto(memory) != len(memory):
                    raise OSError(f"{path} ends before the bytes of a tensor its header lists")
    if rest:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r".*torch.distributed is disabled, unavailable")
            dcp.load({k: t for k, (t, _) in rest.items()},
                     storage_reader=HuggingFaceStorageReader(str(state_dir)),
                     planner=BoxLoadPlanner({k: o for k, (_, o) in rest.items()}),
                     no_dist=True)


class StoredBox(NamedTuple):
    """Where one box of a tensor is in a state directory: file, byte offset of its data."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    start: int
    dtype: str


MAX_HEADER_BYTES = 100 << 20


def read_index(state_dir: Path) -> dict[str, list[StoredBox]]:
    """The stored boxes of every tensor of a state directory, from the safetensors headers:
    {key: [StoredBox, ...]}. A header that is not what write_boxes writes is refused by name."""
    index: dict[str, list[StoredBox]] = {}
    for path in sorted(Path(state_dir).glob("*.safetensors")):
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
        meta = json.loads(header.pop("__metadata__", {}).get(CUSTOM_METADATA_KEY, "{}"))
        for key, entry in header.items():
            shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
            width = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2}.get(entry["dtype"], 0)
            if end - begin != math.prod(shape) * width or not 8 + n + end <= size:
                raise ValueError(f"{path}: the header's entry for {key} does not fit the file")
            offsets = tuple(meta.get(key, {}).get(SAVED_OFFSETS_KEY, [0] * len(shape)))
            index.setdefault(key, []).append(
                StoredBox(offsets, shape, path, 8 + n + begin, entry["dtype"]))
    return index


def whole_shapes(index: dict[str, list[StoredBox]]) -> dict[str, tuple[int, ...]]:
    """The shape of every whole tensor: the far corner of its stored boxes."""
    return {key: tuple(max(o + z for o, z in dims) for dims in
                       zip(*[zip(b.offsets, b.sizes) for b in stored]))
            for key, stored in index.items()}


def _runs(stored, offsets: tuple[int, ...], sizes: tuple[int, ...]):
    """How to read the box [offsets, offsets + sizes) as runs of bytes: [(file, byte offset,
    element offset in the box, elements)], or None if some part of it is not one run in both
    the stored box it comes from and the wanted box (or not stored as fp32)."""
    for box in stored:  # the common case (same grid): the wanted box is a stored one
        if box.offsets == offsets and box.sizes == sizes and box.dtype == "F32":
            return [(box.path, box.start, 0, math.prod(sizes))]
    runs, covered = [], 0
    for box in stored:
        if len(box.sizes) != len(sizes):
            return None
        lo = [max(o, b) for o, b in zip(offsets, box.offsets)]
        hi = [min(o + z, b + bz) for o, z, b, bz in zip(offsets, sizes, box.offsets, box.sizes)]
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        part = tuple(h - low for low, h in zip(lo, hi))
        n = math.prod(part)
        in_file = tuple(low - b for low, b in zip(lo, box.offsets))
        in_box = tuple(low - o for low, o in zip(lo, offsets))
        at_file, at_box = _ravel(in_file, box.sizes), _ravel(in_box, sizes)
        if box.dtype != "F32" or box_of_range(box.sizes, at_file, at_file + n) != (
                in_file, part) or box_of_range(sizes, at_box, at_box + n) != (in_box, part):
            return None
        runs.append((box.path, box.start + 4 * at_file, at_box, n))
        covered += n
    return runs if covered == math.prod(sizes) else None


def _ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    return sum(i * math.prod(shape[k + 1:]) for k, i in enumerate(index))
