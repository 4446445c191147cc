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
    safetensors file, fsynced. Returns the bytes written. Makes no copy of CPU tensors."""
    from safetensors.torch import save_file

    tensors = {k: t for k, (t, _) in boxes.items()}
    offsets = {k: {SAVED_OFFSETS_KEY: list(o)} for k, (_, o) in boxes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={
        CUSTOM_METADATA_KEY: json.dumps(offsets), DCP_VERSION_KEY: str(HF_DCP_VERSION),
        FORMAT_KEY: FORMAT_VALUE})
    fsync(path)
    return path.stat().st_size


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


def read_boxes(state_dir: Path, boxes: dict[str, tuple[Tensor, tuple[int, ...]]]) -> None:
    """Fill {key: (tensor shaped as its box, box offsets in the whole tensor)} from a state
    directory, in this process alone (no collectives): each rank reads only what it asks for."""
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended
        warnings.filterwarnings("ignore", message=r".*torch.distributed is disabled, unavailable",
                                category=UserWarning)
        dcp.load({k: t for k, (t, _) in boxes.items()},
                 storage_reader=HuggingFaceStorageReader(str(state_dir)),
                 planner=BoxLoadPlanner({k: o for k, (_, o) in boxes.items()}), no_dist=True)
