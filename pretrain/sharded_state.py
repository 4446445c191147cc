"""Model and optimizer state in a checkpoint that any process grid can load.

What is saved is the state of the WHOLE model, named as in the unsplit model and independent of
how the run was laid out: per parameter its fp32 master weight and Adam's two moments, plus the
optimizer step, the learning-rate scheduler and DeepSpeed's counters. So a checkpoint written by
TP2 x DP2 under ZeRO-1 loads into TP1 x DP1 under ZeRO-3, or any other grid.

Storage is safetensors files in the layout of PyTorch distributed checkpointing's (DCP) sharded
Hugging Face storage (pretrain/state_files.py):

    step-N/state/rank-00000.safetensors   one file per rank that holds part of the state
    step-N/engine_state.json              step, scheduler, counters

Each element of each tensor is written once, by one rank, inside a box of the whole tensor whose
offsets are in the safetensors header. Loading asks DCP for the boxes this rank's layout needs;
DCP reads the overlapping parts of whatever was written (that is the resharding). safetensors
holds no pickled code, and every JSON file is plain data.

Saving: each rank writes the part of the fp32 masters and Adam moments that DeepSpeed keeps on it,
straight from DeepSpeed's own buffers, with no communication: under ZeRO 1-3 a rank holds a
contiguous run of each parameter's elements (row-major), and when that run is a box of the
tensor (whole rows, or part of one row: nearly always, see state_files.box_of_range) the rank
writes it as that box. A parameter whose run on some rank is not a box (a ZeRO-1/2 partition
boundary inside a row), or that every rank holds whole (no ZeRO), is written whole by one
data-parallel rank, gathered with DeepSpeed's public accessors (deepspeed.utils.
safe_get_full_fp32_param and friends) when it is partitioned. Loading: each rank asks DCP for the
box of the whole tensor its own run covers and reads it straight into DeepSpeed's buffers (the
rows around the run, then a copy, when the run is not a box).

`prepare_save` splits a save in two for asynchronous checkpoints: the collective part (agreeing
on who writes what, once per run; the rare gathers) and a snapshot of this rank's boxes into a
reusable host buffer, then a `write()` without collectives that a background thread may run.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from data_pipeline.format import atomic_write_text
from pretrain.state_files import (
    box_of_range, read_boxes, read_index, rows_around, shifted, whole_shapes, write_boxes,
)

STATE_DIR = "state"
ENGINE_STATE = "engine_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


class StateLoadError(RuntimeError):
    """The checkpoint's tensors do not fit this model (names or whole shapes differ)."""


def name_parameters(model: nn.Module) -> None:
    """Record each parameter's (and persistent buffer's) name in the unsplit, unwrapped model,
    the name checkpoints use. Call after tensor parallelism (which keeps module names) and
    before wrappers such as activation checkpointing (which add path segments)."""
    for name, p in model.named_parameters():
        p.ckpt_name = name
    for mod_name, module in model.named_modules():
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                b.ckpt_name = f"{mod_name}.{name}" if mod_name else name


def whole_shape(t: Tensor, local_shape: torch.Size, tp: int) -> torch.Size:
    """Shape of the unsplit tensor of which `t` (with `local_shape`) is this rank's chunk."""
    shape = list(local_shape)
    dim = getattr(t, "partition_dim", None)
    if getattr(t, "tensor_model_parallel", False) and dim is not None:
        shape[dim] *= tp
    return torch.Size(shape)


def _local_shape(p: Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 empties p itself


@dataclass
class Piece:
    """This rank's part of one parameter's fp32 state: the row-major elements [start, stop) of
    its tensor-parallel-local tensor, as 1-D views into DeepSpeed's own buffers (no copies):
    views[None] is the fp32 master weight, views["exp_avg"] and views["exp_avg_sq"] Adam's.
    `write_back` (ZeRO-3 when DeepSpeed hands out copies, e.g. offloaded states on a GPU run)
    stores edited views back."""

    start: int
    stop: int
    views: dict
    write_back: Callable[[], None] | None = None


class EngineState:
    """DeepSpeed's checkpoint interface (save_checkpoint / load_checkpoint) over a
    grid-independent checkpoint, plus `prepare_save` for asynchronous saves.
    `CheckpointManager` drives it like a DeepSpeed engine."""

    def __init__(self, engine, dims) -> None:
        self.engine, self.dims = engine, dims
        self.optimizer = engine.optimizer
        # the torch optimizer that holds the Adam moments (ZeRO and bf16 wrap one)
        self.torch_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        seen, params = set(), []
        for p in engine.module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        missing = [p for p in params if not hasattr(p, "ckpt_name")]
        if missing:
            raise RuntimeError("call name_parameters(model) before building the engine")
        self.params = sorted(params, key=lambda p: p.ckpt_name)
        mapped = [hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in self.params]
        if self.torch_optimizer is not self.optimizer and not all(mapped):
            raise RuntimeError(
                f"{type(self.optimizer).__name__} keeps master weights that checkpoints cannot "
                "read per parameter (fp16 without ZeRO): use train.precision=bf16 or "
                "parallel.zero_stage >= 1")
        self.buffers = sorted((b for b in engine.module.buffers() if hasattr(b, "ckpt_name")),
                              key=lambda b: b.ckpt_name)
        self._linked = False
        self._cached_pieces: dict[int, Piece] | None = None
        self._writers: dict[int, tuple[int | None, bool]] | None = None
        self._staging: Tensor | None = None  # host memory of asynchronous snapshots, reused
        self._hold = None  # the optimizer step pre-hook of the snapshot in progress
        self.held_seconds = 0.0  # optimizer steps spent waiting for snapshot copies

    # ---- DeepSpeed's buffers ---------------------------------------------------------------
    def _pieces(self) -> dict[int, Piece]:
        """This rank's Piece of every parameter, by id. Views of DeepSpeed's buffers stay
        valid (it keeps them for the whole run), so they are found once."""
        if self._cached_pieces is not None:
            return self._cached_pieces
        pieces = self._find_pieces()
        if all(piece.write_back is None for piece in pieces.values()):  # not copies
            self._cached_pieces = pieces
        return pieces

    def _find_pieces(self) -> dict[int, Piece]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        self._prepare_states()  # the views of Adam's states exist only once linked
        out = {}
        for p in self.params:
            n = math.prod(_local_shape(p))
            if hasattr(p, "ds_id"):  # ZeRO-3: rank r holds elements [r P, (r + 1) P), padded
                size = p.ds_tensor.ds_numel
                start = min(self.dims.dp_rank * size, n)
                stop = min(start + size, n)
                full = {None: safe_get_local_fp32_param(p)}
                full |= {k: safe_get_local_optimizer_state(p, k) for k in MOMENTS}
                views = {k: v.view(-1)[: stop - start] for k, v in full.items()}
                write_back = None
                if any(v._base is None for v in full.values()):  # copies, not DeepSpeed's own
                    write_back = _zero3_write_back(p, full)
                out[id(p)] = Piece(start, stop, views, write_back)
            elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16: a run of the flat fp32 partition
                m = p._hp_mapping
                if m is None:  # this rank's partition holds nothing of p
                    out[id(p)] = Piece(0, 0, {})
                    continue
                start = m.lp_fragment_address.start
                views = {None: m.get_hp_fragment()}
                views |= {k: m.get_hp_fragment(k) for k in MOMENTS}
                out[id(p)] = Piece(start, start + m.lp_fragment_address.numel, views)
            else:  # no ZeRO, fp32: the parameter and torch's AdamW states, whole on every rank
                state = self._plain_state(p)
                views = {None: p.detach().view(-1)} | {k: state[k].view(-1) for k in MOMENTS}
                out[id(p)] = Piece(0, n, views)
        return out

    def _get(self, p: nn.Parameter, key: str | None) -> Tensor:
        """fp32 master weight (key None) or Adam moment of p, whole over data parallelism, on
        the host. Collective over the data-parallel group under ZeRO."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            t = (safe_get_full_fp32_param(p) if key is None
                 else safe_get_full_optimizer_state(p, key))
        elif key is None:
            t = p.detach()
        else:
            t = self._plain_state(p)[key]
        return t.detach().float().reshape(_local_shape(p)).cpu()

    def _plain_state(self, p: Tensor) -> dict:
        """The optimizer state of (flat or plain) parameter p, created if missing: torch's
        AdamW creates it at the first step, and a resume comes before that."""
        state = self.torch_optimizer.state[p]
        if not state:
            torch_native = type(self.torch_optimizer).__module__.startswith("torch.")
            state["step"] = torch.tensor(0.0) if torch_native else 0
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _prepare_states(self) -> None:
        """Make sure every Adam state exists and DeepSpeed's per-parameter views of it are
        linked (once: linking copies the states into new buffers). DeepSpeed (0.19) links them
        after the first step, and only for the parameter groups stepped by then: with two groups
        (decay / no decay) the second is never linked, so it is done here, with DeepSpeed's own
        linking function."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        if self._linked:
            return
        opt = self.optimizer
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            pairs = zip(opt.single_partition_of_fp32_groups, opt.bit16_groups)
        elif hasattr(opt, "fp32_groups_flat_partition"):  # bf16 without ZeRO
            pairs = zip(opt.fp32_groups_flat_partition, opt.bf16_groups)
        elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 reads states by offset
            for flat in opt.fp32_partitioned_groups_flat:
                self._plain_state(flat)
            pairs = ()
        else:  # torch's optimizer on the parameters themselves
            for p in self.params:
                self._plain_state(p)
            pairs = ()
        for flat, lp_params in pairs:
            self._plain_state(flat)
            lazy_init_hp_params_optimizer_state(lp_params, flat, self.torch_optimizer.state)
            opt._hp_optimizer_states_linked = True
        self._linked = True

    def _push_master_weights(self, state_dir: Path, index: dict, pieces: dict) -> None:
        """After the fp32 masters were loaded, set the weights forward uses. ZeRO-1/2 (and
        DeepSpeed's bf16 optimizer) keep those whole on every rank: a rank casts the masters it
        holds whole and reads the other parameters from the checkpoint, much cheaper than
        DeepSpeed's update_lp_params (which all-gathers every weight over the data-parallel
        group) and equal to it: the file holds the masters those weights are cast from. ZeRO-3
        casts its partition."""
        opt = self.optimizer
        if hasattr(opt, "update_lp_params") and not hasattr(opt, "fp32_partitioned_groups_flat"):
            boxes, casts = {}, []
            for p in self.params:
                shape, piece = tuple(p.shape), pieces[id(p)]
                if (piece.start, piece.stop) == (0, math.prod(shape)):
                    p.data.view(-1).copy_(piece.views[None])
                    continue
                box = shifted(((0,) * len(shape), shape), *self._tp_place(p))[0]
                if p.dtype == torch.float32 and p.is_cpu:
                    boxes[f"model.{p.ckpt_name}"] = (p.data, box)
                else:
                    boxes[f"model.{p.ckpt_name}"] = (torch.empty(shape), box)
                    casts.append(p)
            read_boxes(state_dir, boxes, index)
            for p in casts:
                p.data.copy_(boxes[f"model.{p.ckpt_name}"][0])
            return
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for i, fp32_flat in enumerate(opt.fp32_partitioned_groups_flat):
                lp_flat = opt.fp16_partitioned_groups_flat[i]
                if lp_flat is None or fp32_flat.numel() == 0:
                    continue
                lp_flat.data.copy_(fp32_flat.data)
                parts = opt.fp16_partitioned_groups[i]
                for part, q in zip(parts, opt.unflatten(lp_flat, parts)):
                    part.data = q.data

    def _optimizer_step(self) -> int:
        steps = {int(st["step"]) for st in self.torch_optimizer.state.values() if "step" in st}
        if len(steps) > 1:
            raise RuntimeError(f"optimizer states disagree on the step count: {sorted(steps)}")
        return steps.pop() if steps else 0

    def _set_optimizer_step(self, step: int) -> None:
        for st in self.torch_optimizer.state.values():
            if "step" in st:
                st["step"] = (torch.full_like(st["step"], step) if torch.is_tensor(st["step"])
                              else step)

    # ---- who writes what -----------------------------------------------------------------------
    def _entries(self):
        """(checkpoint key, parameter or buffer, optimizer key) in a fixed order."""
        for p in self.params:
            yield f"model.{p.ckpt_name}", p, None
            for m in MOMENTS:
                yield f"optim.{m}.{p.ckpt_name}", p, m
        for b in self.buffers:
            yield f"model.{b.ckpt_name}", b, "buffer"

    def _tp_place(self, t: Tensor) -> tuple[int | None, int]:
        """(dim, offset) of this rank's tensor-parallel chunk of t in the whole tensor."""
        if self.dims.tp > 1 and getattr(t, "tensor_model_parallel", False):
            dim = t.partition_dim
            return dim, self.dims.tp_rank * _local_shape(t)[dim]
        return None, 0

    def _writer_plan(self, pieces: dict[int, Piece]) -> dict[int, tuple[int | None, bool]]:
        """Per parameter (by id): (None, False) when every data-parallel rank writes its own
        piece (each is a box); (r, gather) when data-parallel rank r writes it whole, gathered
        first if it is partitioned. Collective over the data-parallel group, once: partitions
        do not change during a run. The same answer on every rank of the group."""
        if self._writers is None:
            d = self.dims
            runs = [(pieces[id(p)].start, pieces[id(p)].stop) for p in self.params]
            everyone: list = [None] * d.dp
            dist.all_gather_object(everyone, runs, group=d.dp_group)
            balanced = _writers(self.params, d.dp)
            plan = {}
            for i, p in enumerate(self.params):
                shape, n = tuple(_local_shape(p)), math.prod(_local_shape(p))
                rs = [everyone[r][i] for r in range(d.dp)]
                if all(r == (0, n) for r in rs):  # whole on every rank
                    plan[id(p)] = (balanced[id(p)], False)
                elif all(a == b or box_of_range(shape, a, b) for a, b in rs):
                    plan[id(p)] = (None, False)
                else:
                    plan[id(p)] = (max(range(d.dp), key=lambda r: rs[r][1] - rs[r][0]), True)
            self._writers = plan
        return self._writers

    def _boxes_to_save(self, copy: bool) -> dict[str, tuple[Tensor, tuple[int, ...]]]:
        """{checkpoint key: (tensor shaped as its box, box offsets in the whole tensor)} that
        this rank writes; views of DeepSpeed's buffers where possible (module buffers, which a
        forward may change, are copied when `copy`). Collective (DP group)."""
        d = self.dims
        self._prepare_states()
        pieces = self._pieces()
        plan = self._writer_plan(pieces)
        boxes = {}
        for key, t, okey in self._entries():
            shape = tuple(_local_shape(t))
            dim, off = self._tp_place(t)
            if dim is None and d.tp_rank != 0:
                continue  # the same on every tensor-parallel rank: rank 0 of them writes it
            whole_box = shifted(((0,) * len(shape), shape), dim, off)[0]
            if okey == "buffer":
                if d.dp_rank == 0:
                    boxes[key] = (t.detach().float().clone() if copy else t.detach().float(),
                                  whole_box)
                continue
            owner, gather = plan[id(t)]
            piece = pieces[id(t)]
            if gather:
                value = self._get(t, okey)  # collective: every data-parallel rank takes part
                if d.dp_rank == owner:
                    boxes[key] = (value, whole_box)
            elif owner is not None:
                if d.dp_rank == owner:
                    boxes[key] = (piece.views[okey].view(shape), whole_box)
            elif piece.stop > piece.start:
                offsets, sizes = box_of_range(shape, piece.start, piece.stop)
                boxes[key] = (piece.views[okey].view(sizes), shifted((offsets, sizes), dim, off)[0])
        return boxes

    def _to_host(self, boxes: dict) -> dict:
        """The boxes copied into one reusable host buffer (pinned on a GPU machine)."""
        total = sum(t.numel() for t, _ in boxes.values())
        if self._staging is None or self._staging.numel() < total:
            self._staging = None  # free the old one first
            self._staging = torch.empty(total, dtype=torch.float32,
                                        pin_memory=torch.cuda.is_available())
        out, at = {}, 0
        for key, (t, offsets) in boxes.items():
            host = self._staging[at: at + t.numel()].view(t.shape)
            host.copy_(t, non_blocking=True)
            out[key] = (host, offsets)
            at += t.numel()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    # ---- DeepSpeed's checkpoint interface ----------------------------------------------------
    def prepare_save(self, save_dir, tag: str, *, copy: bool = True) -> Callable[[], None]:
        """The collective part of a save, on every rank at the same step: agree on the writers,
        gather the few parameters that need it, take the engine's counters. Returns write(),
        which writes this rank's boxes without any collective.

        copy=False: write() writes straight from DeepSpeed's buffers; call it before the next
        optimizer step. copy=True (a background save): write() first copies the boxes into a
        host buffer, then writes, and may run in a thread. The weights and Adam states change
        only in the optimizer's step, so on the host the copy overlaps the next forward and
        backward: a hook holds the next optimizer step until the copy is done (held_seconds
        adds up that wait). From a GPU the copy to host memory is made here, before returning."""
        path = Path(save_dir) / tag
        boxes = self._boxes_to_save(copy)
        rank = dist.get_rank()
        engine_state = self._engine_state() if rank == 0 else None
        staged = threading.Event()
        on_host = all(t.device.type == "cpu" for t, _ in boxes.values())
        if not on_host:  # from a GPU: into host memory now
            boxes = self._to_host(boxes)
        if copy and on_host:
            self._hold_optimizer_until(staged)
        else:
            staged.set()

        def write() -> None:
            nonlocal boxes
            try:
                if not staged.is_set():
                    boxes = self._to_host(boxes)
            finally:
                staged.set()  # never leave the optimizer waiting
            if boxes:
                write_boxes(path / STATE_DIR / f"rank-{rank:05d}.safetensors", boxes)
            if engine_state is not None:  # CheckpointManager fsyncs it with the other files
                (path / ENGINE_STATE).write_text(json.dumps(engine_state, indent=2))

        return write

    def _hold_optimizer_until(self, staged: threading.Event) -> None:
        """Make the next optimizer step wait for `staged` (the snapshot copy)."""
        if self._hold is not None:
            self._hold.remove()

        def wait_for_the_snapshot(optimizer, args, kwargs):
            if not staged.is_set():
                t0 = time.perf_counter()
                staged.wait()
                self.held_seconds += time.perf_counter() - t0

        self._hold = self.torch_optimizer.register_step_pre_hook(wait_for_the_snapshot)

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=False) -> None:
        self.prepare_save(save_dir, tag, copy=False)()

    def _engine_state(self) -> dict:
        return {
            "optimizer_step": self._optimizer_step(),
            "scheduler": _jsonable(self.engine.lr_scheduler.state_dict()),
            "param_group_lrs": [g["lr"] for g in self.optimizer.param_groups],
            "counters": {k: int(getattr(self.engine, k)) for k in
                         ("global_steps", "global_samples", "skipped_steps")},
            "loss_scaler": _scalars(getattr(self.optimizer, "loss_scaler", None)),
            "grid": {"tensor_parallel": self.dims.tp, "data_parallel": self.dims.dp},
        }

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True,
                        load_lr_scheduler_states=True):
        path = Path(load_dir) / tag
        if not (path / ENGINE_STATE).is_file():
            if list(path.glob("mp_rank_*_model_states.pt")):
                raise StateLoadError(
                    f"{path} holds DeepSpeed's own checkpoint files, written before checkpoints "
                    "became shape-independent; resume it with the version that wrote it")
            return None, None
        engine_state = read_engine_state(path / ENGINE_STATE)
        index = read_index(path / STATE_DIR)
        self._check_shapes(path / STATE_DIR, whole_shapes(index))
        self._prepare_states()
        pieces = self._pieces()
        self._read_state(path / STATE_DIR, index, pieces)
        self._push_master_weights(path / STATE_DIR, index, pieces)
        self._set_optimizer_step(engine_state["optimizer_step"])
        if load_lr_scheduler_states:
            self.engine.lr_scheduler.load_state_dict(engine_state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, engine_state["param_group_lrs"]):
            group["lr"] = lr
        for k, v in engine_state["counters"].items():
            setattr(self.engine, k, v)
        scaler = getattr(self.optimizer, "loss_scaler", None)
        for k, v in engine_state["loss_scaler"].items():
            if scaler is not None and hasattr(scaler, k):
                setattr(scaler, k, v)
        return str(path), engine_state

    def _read_state(self, state_dir: Path, index: dict, pieces: dict) -> None:
        """Read this rank's piece of every tensor, into DeepSpeed's buffers where it is a box
        of host memory, else through a temporary box of whole rows around it."""
        boxes, copies = {}, []
        for key, t, okey in self._entries():
            shape = tuple(_local_shape(t))
            dim, off = self._tp_place(t)
            if okey == "buffer":
                tmp = torch.empty(shape, dtype=torch.float32)
                boxes[key] = (tmp, shifted(((0,) * len(shape), shape), dim, off)[0])
                copies.append((t.data.view(-1), tmp, 0))
                continue
            piece = pieces[id(t)]
            if piece.stop == piece.start:
                continue
            view = piece.views[okey]
            box = box_of_range(shape, piece.start, piece.stop)
            if box is not None and view.device.type == "cpu":
                boxes[key] = (view.view(box[1]), shifted(box, dim, off)[0])
                continue
            box, at = (box, 0) if box is not None else rows_around(shape, piece.start,
                                                                   piece.stop)
            tmp = torch.empty(box[1], dtype=torch.float32)
            boxes[key] = (tmp, shifted(box, dim, off)[0])
            copies.append((view, tmp, at))
        read_boxes(state_dir, boxes, index)
        for dest, tmp, at in copies:
            dest.detach().copy_(tmp.view(-1)[at: at + dest.numel()])
        for piece in pieces.values():
            if piece.write_back is not None:
                piece.write_back()

    def _check_shapes(self, state_dir: Path, saved: dict[str, tuple[int, ...]]) -> None:
        problems = []
        for key, t, _ in self._entries():
            want = tuple(whole_shape(t, _local_shape(t), self.dims.tp))
            have = saved.get(key)
            if have is None:
                problems.append(f"{key}: missing from the checkpoint")
            elif tuple(have) != want:
                problems.append(f"{key}: checkpoint has shape {list(have)}, model has {list(want)}")
        if problems:
            raise StateLoadError(f"{state_dir} does not fit this model:\n  "
                                 + "\n  ".join(problems[:20]))


def _zero3_write_back(p: Tensor, full: dict) -> Callable[[], None]:
    def write_back() -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        safe_set_local_fp32_param(p, full[None])
        for k in MOMENTS:
            safe_set_local_optimizer_state(p, full[k], k)

    return write_back


def read_saved_shapes(state_dir: Path) -> dict[str, tuple[int, ...]]:
    """Whole shape of every tensor in a DCP safetensors directory (from the file headers)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    meta = HuggingFaceStorageReader(str(state_dir)).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items()}


def read_whole(state_dir: Path, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor of a checkpoint's state directory whose key starts with `prefix`, whole and
    fp32, in this process alone (no process group: DCP's no_dist mode), whatever grid wrote it.
    Keys are the checkpoint's: "model.<name in the unsplit model>", "optim.exp_avg.<name>", ..."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shapes = read_saved_shapes(state_dir)
    state = {k: torch.zeros(s, dtype=torch.float32) for k, s in sorted(shapes.items())
             if k.startswith(prefix)}
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended
        warnings.filterwarnings("ignore", message=r".*torch.distributed is disabled, unavailable",
                                category=UserWarning)
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(state_dir)), no_dist=True)
    return state


def write_whole(state: dict[str, Tensor], state_dir: Path) -> None:
    """Write whole tensors as a state directory (one process, no process group)."""
    boxes = {k: (t.contiguous(), (0,) * t.dim()) for k, t in state.items()}
    write_boxes(Path(state_dir) / "rank-00000.safetensors", boxes)


class _EngineStateFile(BaseModel):
    """engine_state.json: what load_checkpoint reads from it, with types."""

    model_config = ConfigDict(extra="allow")
    optimizer_step: int = Field(ge=0)
    scheduler: dict
    param_group_lrs: list[float]
    counters: dict[Literal["global_steps", "global_samples", "skipped_steps"], int]
    loss_scaler: dict[str, bool | int | float]


def read_engine_state(path: Path) -> dict:
    """engine_state.json, checked: a file that is not what save wrote is refused by name."""
    try:
        data = json.loads(path.read_text())
        _EngineStateFile.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors())
        raise StateLoadError(f"{path} is not a valid engine state file: {problems}") from None
    except ValueError as e:  # not JSON
        raise StateLoadError(f"{path} is not a valid engine state file: {e}") from None
    return data


def _writers(params: list[Tensor], dp: int) -> dict[int, int]:
    """Which data-parallel rank writes each parameter: the one with the fewest bytes so far,
    largest parameters first (the same answer on every rank)."""
    load = [0] * dp
    owner = {}
    for p in sorted(params, key=lambda p: (-math.prod(_local_shape(p)), p.ckpt_name)):
        d = load.index(min(load))
        owner[id(p)] = d
        load[d] += math.prod(_local_shape(p))
    return owner


def _scalars(obj) -> dict:
    if obj is None:
        return {}
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float))}


def _jsonable(state: dict) -> dict:
    return json.loads(json.dumps(state, default=lambda o: None))
