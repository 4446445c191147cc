"""DeepSpeed: the config generated from ours, and the engine around the model.

The DeepSpeed JSON is never hand-written: `build_ds_config` derives it from the run config and
the world size, and the trainer saves it in the run directory. This module and the checkpoint
module are the only places that import deepspeed.
"""

from __future__ import annotations

import os
import types
from datetime import timedelta

import torch
import torch.distributed as dist

from pretrain.config import Config, ModelConfig, global_batch_size


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """`auto` is bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU."""
    p = cfg.train.precision
    if p != "auto":
        return p
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def reduce_bucket_size(cfg: Config) -> int:
    """parallel.reduce_bucket_size, or its default: d_model^2, at least 2^20 elements."""
    if cfg.parallel.reduce_bucket_size is not None:
        return cfg.parallel.reduce_bucket_size
    return max(cfg.model.d_model ** 2, 2**20)


def persistence_threshold(model: ModelConfig) -> int:
    """ZeRO-3 keeps parameters with fewer elements whole on every rank (norms, biases)."""
    return 10 * model.d_model


def build_ds_config(cfg: Config, world_size: int, precision: str) -> dict:
    t, par = cfg.train, cfg.parallel
    zero: dict = {"stage": par.zero_stage}
    if par.zero_stage > 0:
        zero["contiguous_gradients"] = True
        zero["overlap_comm"] = False  # no gain without CUDA streams; keeps CPU runs deterministic
        # A buffer of this many gradient elements lives on every rank (ZeRO-3 fills it with
        # whole gradients): sized to the model, not DeepSpeed's 5e8 (parallel.reduce_bucket_size)
        zero["reduce_bucket_size"] = reduce_bucket_size(cfg)
        if par.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * zero["reduce_bucket_size"])
            # parameters below this size stay whole on every rank (no gather for norms and
            # biases); DeepSpeed's default, 1e5, would keep the matrices of models up to
            # d_model ~300 whole, i.e. not ZeRO-3 at all (Hugging Face's `auto` is 10 x d_model)
            zero["stage3_param_persistence_threshold"] = persistence_threshold(cfg.model)
        if par.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if par.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": global_batch_size(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our AdamW is a client optimizer; with offload it is DeepSpeedCPUAdam (see build_optimizer).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def init_distributed(backend: str, timeout_minutes: float) -> None:
    import deepspeed

    timeout = timedelta(minutes=timeout_minutes)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not dist.is_initialized():
        # Under torchrun the process group meets in the agent's store, which outlives a restart
        # (`pretrain train --max-restarts`). torch's env:// rendezvous adds no per-attempt
        # prefix there, so a restarted rank can read the gloo address a dead rank of the
        # previous attempt left and fail with "connectFullMesh ... Connection refused" (seen
        # on 1 restart in 3 here). A prefix per attempt keeps the attempts apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        world = int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"pretrain/attempt-{attempt}",
                                                                store),
                                rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)
    # DeepSpeed keeps a process group that exists and sets up its communication around it.
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)


def build_optimizer(cfg: Config, param_groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


class UpdateGate:
    """Vetoes optimizer updates: while `closed`, the client optimizer's step() does nothing.

    This is how the trainer skips the update of a step with a non-finite loss in every
    precision and ZeRO stage (in fp32 and bf16 no loss scaler does it): DeepSpeed runs its
    step as usual, reducing, clipping and then clearing the accumulated gradients, but the
    AdamW (or DeepSpeedCPUAdam) under it leaves the fp32 master weights and both moments as they
    were, and DeepSpeed copies those unchanged weights back into the model. The instance's
    `step` is wrapped, not its class: DeepSpeed tells optimizers apart by exact type.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.closed = False
        inner = optimizer.step

        def step(_optimizer, *args, **kwargs):
            return None if self.closed else inner(*args, **kwargs)

        # a bound method, as torch's LR schedulers expect to find (and wrap) there
        optimizer.step = types.MethodType(step, optimizer)


def init_engine(model, optimizer, lr_scheduler_fn, ds_config: dict, mpu=None):
    """Wrap model and optimizer; `lr_scheduler_fn(optimizer)` builds the scheduler on the
    optimizer DeepSpeed actually steps (ZeRO wraps ours). `mpu` (a ParallelDims) tells DeepSpeed
    the data-parallel group to partition and reduce over and the tensor-parallel group to sum
    gradient norms over."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler_fn, config=ds_config,
        mpu=mpu,
    )
    return engine, scheduler
