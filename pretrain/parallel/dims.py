"""The process grid: tensor-parallel x data-parallel ranks, validated against the world size.

    rank = dp_rank * tp + tp_rank          world_size = tp * dp

Tensor-parallel peers are consecutive ranks. Launchers (torchrun, deepspeed, Slurm) fill each
node with consecutive ranks, so when `tp` divides the ranks per node every tensor-parallel group
lives inside one node: its all-reduces, two per transformer block in forward and two in backward,
use the fast links inside the node, and only the data-parallel gradient reduction (once per step)
crosses the network. A grid that would put a tensor-parallel group across nodes is refused unless
`parallel.tensor_parallel_across_nodes` allows it.

`ParallelDims` is also the `mpu` ("model parallel unit") DeepSpeed takes: ZeRO partitions and
reduces over `get_data_parallel_group()` only, and the gradient-norm for clipping sums over
`get_model_parallel_group()`, counting replicated parameters (norms, biases of row-parallel
layers) on tensor-parallel rank 0 only and parameters marked `tensor_model_parallel` on every
rank.
"""

from __future__ import annotations

from datetime import timedelta

from dataclasses import dataclass, field

import torch.distributed as dist


class GridError(ValueError):
    """The parallel degrees do not fit the world; the message lists every problem."""


@dataclass
class ParallelDims:
    tp: int
    """Tensor-parallel degree: ranks that split every layer's weights."""
    dp: int
    """Data-parallel degree: replicas of the (tensor-parallel) model, each on its own batch."""
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    """Ranks per node (the launcher's LOCAL_WORLD_SIZE)."""
    _tp_group: object = field(default=None, repr=False)
    _dp_group: object = field(default=None, repr=False)

    # ---- construction ----------------------------------------------------------------------
    @staticmethod
    def problems(tp: int, world_size: int, local_world_size: int,
                 across_nodes: bool = False) -> list[str]:
        """Everything wrong with tensor-parallel degree `tp` on this world, as messages."""
        out = []
        if tp < 1:
            out.append(f"parallel.tensor_parallel must be at least 1, got {tp}")
            return out
        if world_size % tp:
            out.append(f"parallel.tensor_parallel={tp} does not divide the world size "
                       f"{world_size}: use a divisor of {world_size} or launch a multiple of "
                       f"{tp} ranks")
        multi_node = world_size > local_world_size
        if multi_node and not across_nodes and local_world_size % tp:
            out.append(
                f"parallel.tensor_parallel={tp} does not divide the {local_world_size} ranks per "
                "node, so tensor-parallel groups would span nodes (slow: they all-reduce in every "
                "layer): use a divisor of the ranks per node, or set "
                "parallel.tensor_parallel_across_nodes=true to allow it")
        return out

    @classmethod
    def from_world(cls, tp: int, rank: int, world_size: int, local_world_size: int | None = None,
                   *, across_nodes: bool = False) -> "ParallelDims":
        local = world_size if local_world_size is None else local_world_size
        problems = cls.problems(tp, world_size, local, across_nodes)
        if problems:
            raise GridError("invalid process grid: " + "; ".join(problems))
        return cls(tp=tp, dp=world_size // tp, rank=rank, world_size=world_size,
                   local_world_size=local)

    def build_groups(self, timeout: timedelta | None = None) -> "ParallelDims":
        """Create the tensor- and data-parallel process groups (collective: every rank calls it,
        and creates every group, in the same order). `timeout`: of their collectives; pass the
        run's (parallel.timeout_minutes), since torch gives new groups its global default (10
        or 30 minutes), not the default group's."""
        if self.world_size == 1 or not dist.is_initialized():
            return self
        for d in range(self.dp):
            group = dist.new_group(self.tp_ranks(d), timeout=timeout)
            if d == self.dp_rank:
                self._tp_group = group
        for t in range(self.tp):
            group = dist.new_group(self.dp_ranks(t), timeout=timeout)
            if t == self.tp_rank:
                self._dp_group = group
        return self

    # ---- coordinates -----------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    def tp_ranks(self, dp_rank: int | None = None) -> list[int]:
        """Global ranks of the tensor-parallel group of data-parallel rank `dp_rank` (default:
        this rank's)."""
        d = self.dp_rank if dp_rank is None else dp_rank
        return list(range(d * self.tp, (d + 1) * self.tp))

    def dp_ranks(self, tp_rank: int | None = None) -> list[int]:
        t = self.tp_rank if tp_rank is None else tp_rank
        return list(range(t, self.world_size, self.tp))

    def describe(self) -> str:
        return f"TP{self.tp}xDP{self.dp}"

    # ---- groups ----------------------------------------------------------------------------
    @property
    def tp_group(self):
        """The tensor-parallel process group (None in a world of one: nothing to communicate)."""
        return self._tp_group

    @property
    def dp_group(self):
        return self._dp_group

    # ---- DeepSpeed's mpu interface ---------------------------------------------------------
    # Megatron's names; DeepSpeed calls them (deepspeed/utils/bwc.py, runtime/engine.py).
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self._tp_group if self._tp_group is not None else dist.group.WORLD

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks()[0]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self._dp_group if self._dp_group is not None else dist.group.WORLD

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_ranks()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipe_parallel_world_size(self) -> int:
        return 1
