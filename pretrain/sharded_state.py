"""Model and optimizer state in a checkpoint that any process grid can load.

What is saved is the state of the WHOLE model, named as in the unsplit model and independent of
how the run was laid out: per parameter its fp32 master weight and Adam's two moments, plus the
optimizer step, the learning-rate scheduler and DeepSpeed's counters. So a checkpoint written by
TP2 x DP2 under ZeRO-1 loads into TP1 x DP1 under ZeRO-3, or any other grid.

Storage is PyTorch distributed checkpointing (DCP) with its safetensors storage:

    step-N/state/shard-00001-model-00001-of-00001.safetensors   one file per writing rank
    step-N/engine_state.json                                    step, scheduler, counters

Each tensor is written once, by one rank, as chunks of the whole tensor with their offsets in the
safetensors header: a tensor-parallel weight as one chunk per TP rank (a DTensor sharded along
its `partition_dim`), a replicated one whole. Loading asks DCP for the chunks this rank's layout
needs; DCP reads the overlapping pieces of whatever was written (that is the resharding).
safetensors holds no pickled code, and every JSON file is plain data.

Getting the whole-over-data-parallel tensors out of DeepSpeed, and back in, goes through
DeepSpeed's public accessors (deepspeed.utils.safe_get_full_fp32_param and friends), which work
for ZeRO 1-3 and bf16; without ZeRO in fp32 the module's parameters and torch's AdamW states are
the tensors themselves. Each parameter is written by one data-parallel rank,
so saving needs, per rank, about 3 x (parameters / (TP x DP)) fp32 of host memory at once
(parameters are balanced over data-parallel ranks by size);
loading goes in batches of at most LOAD_BATCH_BYTES.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from data_pipeline.format import atomic_write_text

STATE_DIR = "state"
ENGINE_STATE = "engine_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
LOAD_BATCH_BYTES = 1 << 30


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


class EngineState:
    """DeepSpeed's checkpoint interface (save_checkpoint / load_checkpoint) over a
    grid-independent checkpoint. `CheckpointManager` drives it like a DeepSpeed engine."""

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
        self._mesh = None

    # ---- reading and writing DeepSpeed's tensors -------------------------------------------
    def _get(self, p: nn.Parameter, key: str | None) -> Tensor:
        """fp32 master weight (key None) or Adam moment of p: this rank's TP chunk, whole over
        data parallelism. Collective over the data-parallel group under ZeRO."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            t = (safe_get_full_fp32_param(p) if key is None
                 else safe_get_full_optimizer_state(p, key))
        elif key is None:
            t = p.detach()
        else:
            t = self._plain_state(p)[key]
        return t.detach().float().reshape(_local_shape(p)).cpu()

    def _set(self, p: nn.Parameter, key: str | None, value: Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(device=p.device)
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            if key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
        elif key is None:
            p.data.copy_(value)
        else:
            self._plain_state(p)[key].copy_(value.view_as(p))

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
        linked. DeepSpeed (0.19) links them after the first step, and only for the parameter
        groups stepped by then: with two groups (decay / no decay) the second is never linked,
        so it is done here, with DeepSpeed's own linking function."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        opt = self.optimizer
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            pairs = zip(opt.single_partition_of_fp32_groups, opt.bit16_groups)
        elif hasattr(opt, "fp32_groups_flat_partition"):  # bf16 without ZeRO
            pairs = zip(opt.fp32_groups_flat_partition, opt.bf16_groups)
        elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 reads states by offset
            for flat in opt.fp32_partitioned_groups_flat:
                self._plain_state(flat)
            return
        else:  # torch's optimizer on the parameters themselves
            for p in self.params:
                self._plain_state(p)
            return
        for flat, lp_params in pairs:
            self._plain_state(flat)
            lazy_init_hp_params_optimizer_state(lp_params, flat, self.torch_optimizer.state)
        opt._hp_optimizer_states_linked = True

    def _push_master_weights(self) -> None:
        """After the fp32 masters were set, copy them into the weights forward uses."""
        opt = self.optimizer
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for i, fp32_flat in enumerate(opt.fp32_partitioned_groups_flat):
                lp_flat = opt.fp16_partitioned_groups_flat[i]
                if lp_flat is None or fp32_flat.numel() == 0:
                    continue
                lp_flat.data.copy_(fp32_flat.data)
                parts = opt.fp16_partitioned_groups[i]
                for part, q in zip(parts, opt.unflatten(lp_flat, parts)):
                    part.data = q.data
        elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16
            opt.update_lp_params()

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

    # ---- DCP ---------------------------------------------------------------------------------
    def _tp_mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            device = "cuda" if dist.get_backend(self.dims.tp_group) == "nccl" else "cpu"
            self._mesh = DeviceMesh.from_group(self.dims.tp_group, device_type=device)
        return self._mesh

    def _as_saved(self, t: Tensor, like: Tensor, local_shape: torch.Size):
        """Wrap this rank's chunk for DCP: a DTensor when it is a TP split, else itself."""
        if self.dims.tp == 1 or not getattr(like, "tensor_model_parallel", False):
            return t
        from torch.distributed.tensor import DTensor, Shard

        shape = whole_shape(like, local_shape, self.dims.tp)
        mesh = self._tp_mesh()
        if mesh.device_type == "cuda":
            t = t.cuda()
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, mesh, [Shard(like.partition_dim)], run_check=False,
                                  shape=shape, stride=stride)

    def _entries(self):
        """(checkpoint key, parameter or buffer, optimizer key) in a fixed order."""
        for p in self.params:
            yield f"model.{p.ckpt_name}", p, None
            for m in MOMENTS:
                yield f"optim.{m}.{p.ckpt_name}", p, m
        for b in self.buffers:
            yield f"model.{b.ckpt_name}", b, "buffer"

    # ---- DeepSpeed's checkpoint interface ----------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        path = Path(save_dir) / tag
        d = self.dims
        self._prepare_states()
        state: dict[str, object] = {}
        owners = _writers(self.params, d.dp)
        for key, t, okey in self._entries():
            owner = owners.get(id(t), 0)
            if okey == "buffer":
                value, owner = t.detach().float().cpu(), 0
            else:
                value = self._get(t, okey)  # collective: every rank takes part
            split = getattr(t, "tensor_model_parallel", False) and d.tp > 1
            if d.dp_rank == owner and (split or d.tp_rank == 0):
                state[key] = self._as_saved(value, t, _local_shape(t))
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(path / STATE_DIR),
                                                                save_distributed=True))
        if dist.get_rank() == 0:
            engine_state = {
                "optimizer_step": self._optimizer_step(),
                "scheduler": _jsonable(self.engine.lr_scheduler.state_dict()),
                "param_group_lrs": [g["lr"] for g in self.optimizer.param_groups],
                "counters": {k: int(getattr(self.engine, k)) for k in
                             ("global_steps", "global_samples", "skipped_steps")},
                "loss_scaler": _scalars(getattr(self.optimizer, "loss_scaler", None)),
                "grid": {"tensor_parallel": d.tp, "data_parallel": d.dp},
            }
            atomic_write_text(path / ENGINE_STATE, json.dumps(engine_state, indent=2))

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True,
                        load_lr_scheduler_states=True):
        path = Path(load_dir) / tag
        if not (path / ENGINE_STATE).is_file():
            if list(path.glob("mp_rank_*_model_states.pt")):
                raise StateLoadError(
                    f"{path} holds DeepSpeed's own checkpoint files, written before checkpoints "
                    "became shape-independent; resume it with the version that wrote it")
            return None, None
        engine_state = json.loads((path / ENGINE_STATE).read_text())
        self._check_shapes(path / STATE_DIR)
        self._prepare_states()
        entries = list(self._entries())
        for batch in _batches(entries, self.dims.tp):
            self._load_batch(path / STATE_DIR, batch)
        self._push_master_weights()
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

    def _load_batch(self, state_dir: Path, batch: list) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        state = {}
        for key, t, okey in batch:
            local = torch.zeros(_local_shape(t), dtype=torch.float32)
            state[key] = self._as_saved(local, t, _local_shape(t))
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(state_dir)))
        for key, t, okey in batch:
            value = state[key]
            value = value.to_local() if hasattr(value, "to_local") else value
            if okey == "buffer":
                t.data.copy_(value.to(t.dtype))
            else:
                self._set(t, okey, value)

    def _check_shapes(self, state_dir: Path) -> None:
        saved = read_saved_shapes(state_dir)
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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch.distributed is disabled, unavailable",
                                category=UserWarning)
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(state_dir)), no_dist=True)


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


def _batches(entries: list, tp: int):
    """Consecutive groups of entries of at most LOAD_BATCH_BYTES of whole-tensor size (the
    same split on every rank: it depends only on whole shapes)."""
    batch, size = [], 0
    for entry in entries:
        n = math.prod(whole_shape(entry[1], _local_shape(entry[1]), tp)) * 4
        if batch and size + n > LOAD_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += n
    if batch:
        yield batch


def _scalars(obj) -> dict:
    if obj is None:
        return {}
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float))}


def _jsonable(state: dict) -> dict:
    return json.loads(json.dumps(state, default=lambda o: None))
