"""The training loop: build everything from the config, resume, step, evaluate, save.

One Trainer per process. Everything that is saved and restored together lives here: the
DeepSpeed engine (model, optimizer, scheduler), the loader position, the counters and the RNG.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.format import Manifest
from data_pipeline.loader import ShardedLoader, iter_eval
from data_pipeline.objectives import SpecialTokenError, build_objective
from launch.env import DistEnv
from pretrain.bad_steps import BadStep, BadStepTracker, sample_keys
from pretrain.checkpoint import CheckpointFormatError, CheckpointManager, diff_dicts
from pretrain.config import Config, global_batch_size
from pretrain.config_io import resolved_dict, resolved_yaml
from pretrain.faults import Faults, SlowSave
from pretrain.hang import RollCall
from pretrain.metrics import MetricsLogger, PeakMemory, device_peak_tflops, read_metrics
from pretrain.model import build_model
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing
from pretrain.parallel.deepspeed import (
    UpdateGate, build_ds_config, build_optimizer, init_distributed, init_engine,
    resolve_precision,
)
from pretrain.parallel.dims import GridError, ParallelDims
from pretrain.parallel.tensor_parallel import TensorParallelError, apply_tensor_parallel
from pretrain.saved_model import SavedModelError, load_weights_file
from pretrain.schedule import lr_factor_fn
from pretrain.sharded_state import EngineState, StateLoadError, name_parameters
from pretrain.stop import StopRequest, signal_name


# DeepSpeed's ZeRO-2 calls a torch.distributed collective that torch has renamed; the warning
# would repeat on every rank and is not the user's to act on.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                        category=FutureWarning)


class SetupError(RuntimeError):
    """The run cannot start as configured (data, vocabulary, device); the message says why and
    what to change. Raised identically on every rank, before any step."""


class ResumeError(SetupError):
    """The latest checkpoint does not belong to this run's model, data or loader settings."""


def pick_device(cfg: Config, env: DistEnv) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SetupError("train.device=cuda but no CUDA device is visible: use "
                             "train.device=auto or cpu, or run where a GPU is visible")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def resolve_vocab_size(cfg: Config, manifest: Manifest) -> int:
    tok = manifest.tokenizer.vocab_size
    if cfg.model.vocab_size is not None:
        if cfg.model.vocab_size < tok:
            raise SetupError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({tok}) in {cfg.data.dir}; raise it or leave it unset"
            )
        return cfg.model.vocab_size
    m = cfg.model.pad_vocab_multiple
    return (tok + m - 1) // m * m


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings; not biases or norm gains (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _saved_grid(train_state: dict) -> dict:
    return train_state.get("grid", {"tensor_parallel": 1,
                                    "data_parallel": train_state["world_size"],
                                    "zero_stage": train_state["zero_stage"]})


def _shape(grid: dict) -> str:
    return (f"TP{grid['tensor_parallel']}xDP{grid['data_parallel']} "
            f"ZeRO-{grid['zero_stage']}")


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, stop: StopRequest | None = None):
        self.cfg, self.env = cfg, env
        self.stop = stop  # checked at every step boundary (pretrain/stop.py)
        self.faults = Faults.from_env()  # None unless a test injects faults (pretrain/faults.py)
        self.phase = "setup"  # what the run is doing, for the error of a collective timeout
        self.device = pick_device(cfg, env)
        backend = cfg.parallel.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        try:
            self.dims = ParallelDims.from_world(
                cfg.parallel.tensor_parallel, env.rank, env.world_size, env.local_world_size,
                across_nodes=cfg.parallel.tensor_parallel_across_nodes)
        except GridError as e:
            raise SetupError(str(e)) from None
        init_distributed(backend, cfg.parallel.timeout_minutes)
        # before the model: peak - base is what its states and activations take (the planner's)
        self.memory = PeakMemory(self.device)
        self.rollcall = RollCall(env.rank, env.world_size, cfg.parallel.timeout_minutes * 60,
                                 env.restart_count)
        if self.faults is not None and env.is_main:
            print(f"[pretrain] WARNING: {self.faults.describe()}", flush=True)
        self.dims.build_groups(timedelta(minutes=cfg.parallel.timeout_minutes))
        self.dp_size, self.dp_rank = self.dims.dp, self.dims.dp_rank
        self.global_batch = global_batch_size(cfg, env.world_size)
        self.precision = resolve_precision(cfg, self.device)
        if self.precision == "fp16" and cfg.parallel.zero_stage == 0:
            raise SetupError("fp16 training without ZeRO keeps its fp32 master weights where "
                             "checkpoints cannot read them per parameter: use "
                             "train.precision=bf16 or parallel.zero_stage=1")
        self.run_dir = Path(cfg.run.dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        try:
            self.manifest = Manifest.load(cfg.data.dir)
        except (FileNotFoundError, ValueError) as e:
            raise SetupError(str(e)) from None
        if self.manifest.seq_len != cfg.data.seq_len:
            raise SetupError(
                f"{cfg.data.dir} was prepared with seq_len={self.manifest.seq_len} but the config "
                f"has data.seq_len={cfg.data.seq_len}: re-run `pretrain prepare` with this config "
                "or set data.seq_len to match"
            )
        self.vocab_size = resolve_vocab_size(cfg, self.manifest)
        try:  # the family's objective turns samples into model inputs (in the loader workers)
            self.objective = build_objective(cfg, self.manifest.tokenizer, cfg.data.dir)
        except SpecialTokenError as e:
            raise SetupError(str(e)) from None

        torch.manual_seed(cfg.run.seed)  # the same whole model on every rank, at any TP degree
        model = build_model(cfg.model, self.vocab_size)
        if cfg.checkpoint.init_from:  # whole weights, before the split; a resume overwrites them
            try:
                load_weights_file(model, cfg.checkpoint.init_from)
            except SavedModelError as e:
                raise SetupError(str(e)) from None
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())
        try:
            apply_tensor_parallel(model, self.dims,
                                  sequence_parallel=cfg.parallel.sequence_parallel)
        except TensorParallelError as e:
            raise SetupError(str(e)) from None
        name_parameters(model)  # checkpoint names: the whole model's, before any wrapper
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        optimizer = build_optimizer(cfg, param_groups(model, cfg.optim.weight_decay))
        self.update_gate = UpdateGate(optimizer)  # closed for the update of a bad step
        self.ds_config = build_ds_config(cfg, env.world_size, self.precision)
        lr_fn = lr_factor_fn(cfg.optim, cfg.train.max_steps)
        self.engine, self.scheduler = init_engine(
            model, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn),
            self.ds_config, mpu=self.dims,
        )
        # Dropout streams per data-parallel rank: tensor-parallel peers hold the same
        # activations and must draw the same masks (split heads/positions fork their own).
        torch.manual_seed(cfg.run.seed + 1 + self.dp_rank)
        self.state_io = EngineState(self.engine, self.dims)  # what checkpoints save and load
        if self.faults is not None and self.faults.slow_save:
            self.state_io = SlowSave(self.state_io, self.faults)

        self.loader = ShardedLoader(
            cfg.data.dir, "train", micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, seed=cfg.run.seed,
            shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers,
            verify_checksums=cfg.data.verify_checksums,
            # one record per sample: tensor-parallel peers read the same batches
            audit_dir=self.run_dir / "audit" if cfg.data.audit and self.dims.tp_rank == 0
            else None,
            transform=self.objective,
            on_corrupt=cfg.data.on_corrupt, corrupt_dir=self._corrupt_dir(),
        )
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, env.rank,
                                      env.world_size,
                                      timeout=timedelta(minutes=cfg.parallel.timeout_minutes))
        self.metrics = MetricsLogger(self.run_dir, env.is_main, cfg.logging.tensorboard)
        self.peak_tflops = device_peak_tflops(self.device, cfg.logging.peak_tflops)
        self.step = 0
        self.samples_seen = 0
        self.skipped_steps = 0  # steps whose update was skipped (non-finite loss)
        self.bad_steps = BadStepTracker(self.run_dir, env.is_main, cfg.train.max_bad_steps,
                                        cfg.train.max_rollbacks)
        self._grad_norm: float | None = None
        self.resumed_from: int | None = None
        self._resume()
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(resolved_yaml(cfg))
            (self.run_dir / "deepspeed_config.json").write_text(
                json.dumps(self.ds_config, indent=2))

    # ---- state -----------------------------------------------------------------------------
    def train_state(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.samples_seen * self.cfg.data.seq_len,
            "skipped_steps": self.skipped_steps,
            "loader": self.loader.state_dict(),
            "model": resolved_dict(self.cfg)["model"],
            "vocab_size": self.vocab_size,
            "data_digest": self.manifest.digest(),
            "tokenizer_sha256": self.manifest.tokenizer.sha256,
            "objective": resolved_dict(self.cfg)["objective"],
            "world_size": self.env.world_size,
            "zero_stage": self.cfg.parallel.zero_stage,
            "grid": self._grid(),
        }

    def _corrupt_dir(self) -> Path | None:
        """Where skipped samples are listed: by TP rank 0 only (its peers read the same data,
        and the list is one file per data-parallel rank)."""
        return self.run_dir / "corrupt_samples" if self.dims.tp_rank == 0 else None

    def _grid(self) -> dict:
        return {"tensor_parallel": self.dims.tp, "data_parallel": self.dims.dp,
                "zero_stage": self.cfg.parallel.zero_stage}

    def _resume(self) -> None:
        removed = self.ckpt.remove_incomplete()  # saves that never finished (crash, full disk)
        if removed:
            print(f"[pretrain] removed incomplete checkpoint(s) {', '.join(removed)} from "
                  f"{self.ckpt.dir}: saves that did not finish", flush=True)
        latest = self.ckpt.latest_step()
        if latest is None:
            return
        where = self.ckpt.dir / f"step-{latest:08d}"
        if self.cfg.checkpoint.resume == "never":
            raise ResumeError(
                f"{self.run_dir} already holds checkpoints (latest {where}) and "
                "checkpoint.resume=never: choose another run.dir or set checkpoint.resume=auto"
            )
        try:
            state = self.ckpt.read_train_state(latest)
        except CheckpointFormatError as e:
            raise ResumeError(f"cannot resume from {where}: {e}") from None
        problems = diff_dicts(state["model"], resolved_dict(self.cfg)["model"], "model.")
        if "objective" in state:  # checkpoints from before objectives had none
            problems += diff_dicts(state["objective"], resolved_dict(self.cfg)["objective"],
                                   "objective.")
        if state["vocab_size"] != self.vocab_size:
            problems.append(f"vocab_size: checkpoint has {state['vocab_size']}, "
                            f"config and data give {self.vocab_size}")
        if state["data_digest"] != self.manifest.digest():
            problems.append(f"data: checkpoint was trained on data {state['data_digest']}, "
                            f"{self.cfg.data.dir} holds {self.manifest.digest()}")
        if problems:
            raise ResumeError(f"cannot resume from {where}: the run changed:\n  "
                              + "\n  ".join(problems)
                              + "\nUse a new run.dir, or restore the settings above.")
        saved = _saved_grid(state)
        if saved != self._grid() and self.env.is_main:
            print(f"[pretrain] resuming {where} on another shape: saved by "
                  f"{_shape(saved)}, loading into {_shape(self._grid())}", flush=True)
        self._load(latest)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.resumed_from = latest

    def _load(self, step: int) -> dict:
        """Model, optimizer, scheduler, RNG, loader position and counters of the checkpoint of
        `step`. Per-rank RNG streams carry over only to the same grid (and are not in converted
        checkpoints); otherwise they restart from a seed derived from the step."""
        where = self.ckpt.dir / f"step-{step:08d}"
        saved = _saved_grid(self.ckpt.read_train_state(step))
        same_grid = (saved["tensor_parallel"], saved["data_parallel"]) == (
            self.dims.tp, self.dims.dp) and self.ckpt.has_rng(step)
        try:
            state = self.ckpt.load(self.state_io, step, with_rng=same_grid)
        except (StateLoadError, CheckpointFormatError) as e:
            raise ResumeError(f"cannot resume from {where}: {e}") from None
        if not same_grid:  # per-rank streams cannot carry over: restart them from the step
            torch.manual_seed(self.cfg.run.seed + 1 + self.dp_rank + 1_000_003 * state["step"])
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as e:
            raise ResumeError(f"cannot resume from {where}: {e}") from None
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        return state

    def save(self, final: bool = False) -> None:
        """With checkpoint.async_save a periodic save writes in the background; a final one (end
        of training, stop) returns once everything, the save in flight included, is on disk."""
        self.phase = f"the checkpoint save at step {self.step}"
        self.ckpt.save(self.state_io, self.step, self.train_state(), resolved_yaml(self.cfg),
                       background=self.cfg.checkpoint.async_save and not final)
        if final:
            self.ckpt.wait()

    # ---- evaluation ------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The model's keyword arguments of a loader batch, on the device."""
        return {k: v.to(self.device) for k, v in batch["inputs"].items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """The family's loss (val_loss) and metrics (val_<name>) over the validation split (or
        train.eval_batches per rank), weighted by the targets each batch predicts."""
        val = self.manifest.splits.get("val")
        if val is None or val.samples == 0:
            return None
        m = self.cfg.train.micro_batch_size
        n_batches = math.ceil(val.samples / (m * self.dp_size))
        if self.cfg.train.eval_batches is not None:
            n_batches = min(n_batches, self.cfg.train.eval_batches)
        batches = iter_eval(self.cfg.data.dir, "val", micro_batch_size=m, dp_rank=self.dp_rank,
                            dp_size=self.dp_size, max_batches=n_batches,
                            verify_checksums=self.cfg.data.verify_checksums,
                            transform=self.objective, on_corrupt=self.cfg.data.on_corrupt,
                            corrupt_dir=self._corrupt_dir())
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}  # loss and metrics, each summed x targets
        count = torch.zeros((), dtype=torch.float64, device=self.device)  # targets
        for _ in range(n_batches):
            # Every rank runs the same number of forwards (ZeRO-3 gathers parameters
            # collectively); a rank whose slice ran out evaluates a dummy batch with weight 0.
            batch = next(batches, None)
            weight = 1.0 if batch is not None else 0.0
            if batch is None:
                batch = {"input_ids": torch.zeros(1, self.manifest.sample_len, dtype=torch.long),
                         "epochs": torch.zeros(1, dtype=torch.long),
                         "sample_ids": torch.zeros(1, dtype=torch.long)}
                batch["inputs"] = self.objective(batch)
            out = self.engine(**self._inputs(batch))
            n = out.n_targets.double() * weight
            for name, value in {"loss": out.loss, **out.metrics}.items():
                sums[name] = sums.get(name, 0) + value.detach().double() * n
            count += n
        self.engine.train()
        names = sorted(sums)
        total = torch.stack([*(sums[k] for k in names), count]).to(self.device)
        dist.all_reduce(total)
        return {f"val_{k}": v for k, v in zip(names, (total[:-1] / total[-1]).tolist())}

    # ---- training --------------------------------------------------------------------------
    def _mean_over_dp(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(values)
        x = torch.stack([values[k].detach().to(torch.float64) for k in names]).to(self.device)
        dist.all_reduce(x)  # on the device: NCCL reduces CUDA tensors only
        return dict(zip(names, (x / self.env.world_size).tolist()))

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        main = self.env.is_main
        first_val = self._first_val_loss()
        if first_val is None and self.step == 0:
            first_val = self._log_eval(self.evaluate())
        if main:
            print(self._banner(), flush=True)
        pbar = None
        if main and cfg.logging.progress:
            from tqdm import tqdm

            pbar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step",
                        file=sys.stderr, dynamic_ncols=True)
        batches = iter(self.loader)
        tokens_per_step = self.global_batch * cfg.data.seq_len
        window_start, window_steps = time.perf_counter(), 0
        last_val = None
        stopped_by = None
        while self.step < t.max_steps:
            batches = self._skip_rolled_back(batches)
            self.phase = f"step {self.step + 1}"
            first = self.loader.position  # the step's batch: positions [first, first + G)
            sums, bad = self._train_step(batches)
            self.step += 1
            self.samples_seen += self.global_batch
            window_steps += 1
            means = self._mean_over_dp({k: v / t.grad_accum_steps for k, v in sums.items()})
            loss = means.pop("loss")
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss:.4f}")
            if self.step % t.log_interval == 0 or self.step == t.max_steps or bad:
                elapsed = time.perf_counter() - window_start
                self._log_train(loss, tokens_per_step * window_steps / elapsed,
                                elapsed / window_steps, means)
                window_start, window_steps = time.perf_counter(), 0
            if bad is None:
                self.bad_steps.good()
            elif self._bad_step(BadStep(self.step, first, first + self.global_batch, bad[0]),
                                bad[1]):
                batches = self._roll_back(batches)
                window_start, window_steps = time.perf_counter(), 0
                continue
            last_val = None
            if t.eval_interval and self.step % t.eval_interval == 0:
                last_val = self._log_eval(self.evaluate())
            if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0
                    and not self.bad_steps.in_a_row):  # a rollback target precedes the streak
                self.save()
            self.ckpt.poll(self.device)  # a background save's failure stops the run here
            if self.stop is not None:
                stopped_by = self.stop.agreed(self.device)  # same answer on every rank
                if stopped_by:
                    break
        if pbar is not None:
            pbar.close()
        if stopped_by:
            # Asked to stop (Slurm's warning signal, preemption, cancel): save now, skip the
            # final evaluation; the time left before SIGKILL is for the checkpoint.
            if main:
                print(f"[pretrain] {signal_name(stopped_by)} received: stopping after step "
                      f"{self.step} and saving a checkpoint", flush=True)
            self.save(final=True)
        else:
            if last_val is None:
                last_val = self._log_eval(self.evaluate())
            if cfg.checkpoint.save_final:
                self.save(final=True)
        self.ckpt.wait()  # a background save still in flight (checkpoint.save_final=false)
        summary = {"run_dir": str(self.run_dir), "step": self.step, "first_val_loss": first_val,
                   "final_val_loss": last_val,
                   "stopped_by": signal_name(stopped_by) if stopped_by else None}
        if main:
            print(self._summary(summary), flush=True)
        return summary

    def _train_step(self, batches) -> tuple[dict[str, torch.Tensor], tuple[str, list[int]] | None]:
        """Forward, backward and update over grad_accum_steps micro-batches. Returns the summed
        loss and metrics, and (reason, ranks) when the update was skipped as bad."""
        t = self.cfg.train
        if self.faults is not None:
            self.faults.maybe_hang(self.step + 1, self.env.rank, self.stop)
        sums: dict[str, torch.Tensor] = {}  # loss and the family's metrics
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # this rank's losses
        bad = None
        for micro in range(t.grad_accum_steps):
            batch = next(batches)
            out = self.engine(**self._inputs(batch))
            loss = out.loss
            if self.faults is not None:
                loss = self.faults.poison_loss(loss, batch["positions"], self.env.rank,
                                               self.global_batch)
            nonfinite |= ~torch.isfinite(loss.detach())  # no host sync per micro-batch
            self.engine.backward(loss)
            if micro == t.grad_accum_steps - 1:
                if self._engine_skips_grad_norm:
                    self._grad_norm = self._reduced_grad_norm()
                bad = self._agree_bad(nonfinite)
                self.update_gate.closed = bad is not None
            try:
                self.engine.step()
            finally:
                self.update_gate.closed = False
            for name, value in {"loss": loss, **out.metrics}.items():
                sums[name] = sums.get(name, 0) + value.detach().double().cpu()
        if bad is not None and not self.engine.was_step_applied():
            # DeepSpeed saw the non-finite gradients itself and skipped the scheduler too; a
            # skipped step keeps its place in the learning-rate schedule either way.
            self.scheduler.step()
        return sums, bad

    def _agree_bad(self, nonfinite: torch.Tensor) -> tuple[str, list[int]] | None:
        """Collective: (reason, ranks) if any rank's loss (or the gradient norm) is not finite."""
        flags = torch.zeros(self.env.world_size, dtype=torch.int32, device=self.device)
        flags[self.env.rank] = nonfinite.to(torch.int32)
        dist.all_reduce(flags)
        ranks = flags.nonzero().flatten().tolist()
        if ranks:
            return f"non-finite loss on rank(s) {ranks}", ranks
        if self._engine_skips_grad_norm and not math.isfinite(self._grad_norm):
            return "non-finite gradient norm", list(range(self.env.world_size))
        return None

    def _bad_step(self, step: BadStep, ranks: list[int]) -> bool:
        """Count, log and record a skipped update; True when a rollback is due."""
        self.skipped_steps += 1
        keys = sample_keys(self.loader, step.start, step.stop)
        roll = self.bad_steps.bad(step, keys, ranks)
        in_a_row = len(self.bad_steps.in_a_row)
        self.metrics.log({"step": step.step, "bad_step": step.reason, "bad_ranks": ranks,
                          "positions": [step.start, step.stop], "bad_in_a_row": in_a_row,
                          "skipped_steps": self.skipped_steps})
        if self.env.is_main:
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} samples)" if len(keys) > 4 else "")
            print(f"[pretrain] step {step.step}: {step.reason}: update skipped ({in_a_row} in a "
                  f"row, rollback at {self.cfg.train.max_bad_steps}); batch at positions "
                  f"[{step.start}, {step.stop}): {shown}; all in "
                  f"{self.run_dir / 'bad_steps.jsonl'}", flush=True)
        return roll

    def _roll_back(self, batches):
        """Reload the latest checkpoint and take the bad steps since it out of the stream."""
        self.ckpt.wait()  # a background save in flight may become the latest
        latest = self.ckpt.latest_step()
        position = (self.ckpt.read_train_state(latest)["loader"]["position"]
                    if latest is not None else 0)
        streak = len(self.bad_steps.in_a_row)
        dropped = self.bad_steps.roll_back(latest, position, self.loader)  # or raises
        batches.close()  # stops its DataLoader workers
        skipped = self.skipped_steps
        self.phase = f"the rollback to step {latest}"
        self._load(latest)
        self.skipped_steps = skipped  # a count of events, not part of the rolled-back state
        if self.env.is_main:
            print(f"[pretrain] {streak} bad steps in a row: rolled back to the checkpoint of "
                  f"step {latest}; the batches of steps {[s.step for s in dropped]} are "
                  f"skipped from now on (listed in {self.run_dir / 'skipped_batches.jsonl'})",
                  flush=True)
        self.metrics.log({"step": self.step, "rolled_back_to": latest,
                          "skipped_batches": [[s.start, s.stop] for s in dropped],
                          "rollbacks": self.bad_steps.rollbacks})
        return iter(self.loader)

    def _skip_rolled_back(self, batches):
        """`batches`, or a new iterator past the skipped batches the stream has reached."""
        position = self.loader.position
        target = self.bad_steps.skip_to(position)
        if target == position:
            return batches
        batches.close()
        self.loader.load_state_dict({**self.loader.state_dict(), "position": target})
        if self.env.is_main:
            print(f"[pretrain] step {self.step + 1}: skipping the rolled-back samples at "
                  f"positions [{position}, {target})", flush=True)
        return iter(self.loader)

    @property
    def _engine_skips_grad_norm(self) -> bool:
        # DeepSpeed records the global gradient norm in its ZeRO and fp16/bf16 optimizers, not
        # for plain fp32 data parallelism (stage 0): there we take it ourselves.
        return self.cfg.parallel.zero_stage == 0 and self.precision == "fp32"

    @torch.no_grad()
    def _reduced_grad_norm(self) -> float:
        """2-norm of all gradients after backward's all-reduce (identical on every rank):
        split parameters count on every tensor-parallel rank, replicated ones once."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False)
                                       or self.dims.tp_rank == 0):
                sq += p.grad.detach().double().pow(2).sum()
        if self.dims.tp > 1:
            dist.all_reduce(sq, group=self.dims.tp_group)
        return sq.sqrt().item()

    def _log_train(self, loss: float, tokens_per_sec: float, step_time: float,
                   metrics: dict[str, float]) -> None:
        grad_norm = (self._grad_norm if self._engine_skips_grad_norm
                     else self.engine.get_global_grad_norm())
        record = {
            "step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_sec": tokens_per_sec, "step_time": step_time,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.samples_seen * self.cfg.data.seq_len,
            "epoch": self.loader.epoch,
            "restart_count": self.env.restart_count,
            **self.memory.stats(),
            "skipped_steps": self.skipped_steps,
            **metrics,
        }
        if self.cfg.data.on_corrupt == "skip":  # damaged samples skipped since the last record
            n = torch.tensor(float(self.loader.take_skipped()))
            record["skipped_samples"] = round(self._mean_over_dp({"n": n})["n"] * self.dp_size)
        if self.peak_tflops:
            achieved = self.flops_per_token * tokens_per_sec / self.env.world_size
            record["mfu"] = achieved / (self.peak_tflops * 1e12)
        self.metrics.log(record)

    def _log_eval(self, val: dict[str, float] | None) -> float | None:
        """Log an evaluation; returns its val_loss."""
        if val is None:
            return None
        self.metrics.log({"step": self.step, **val,
                          "val_ppl": math.exp(min(val["val_loss"], 50.0))})
        return val["val_loss"]

    def _first_val_loss(self) -> float | None:
        if self.step == 0:
            return None
        for rec in read_metrics(self.run_dir) if self.env.is_main else []:
            if "val_loss" in rec:
                return rec["val_loss"]
        return None

    def _banner(self) -> str:
        how = (f"resumed from step {self.resumed_from}" if self.resumed_from is not None
               else "starting from scratch")
        return (
            f"[pretrain] {self.cfg.model.family} {self.n_params / 1e6:.2f}M params | "
            f"world {self.env.world_size} (tp {self.dims.tp} x dp {self.dp_size}"
            f"{' +sp' if self.cfg.parallel.sequence_parallel and self.dims.tp > 1 else ''}) | "
            f"ZeRO-{self.cfg.parallel.zero_stage}"
            f" | {self.device.type} {self.precision} | global batch {self.global_batch} x "
            f"{self.cfg.data.seq_len} tokens | {how} | run dir {self.run_dir}"
            + (f" | {'Slurm' if self.env.launcher == 'slurm' else 'torchrun'} restart "
               f"{self.env.restart_count}" if self.env.restart_count else "")
        )

    @staticmethod
    def _summary(s: dict) -> str:
        lines = [f"run directory: {s['run_dir']}"]
        if s.get("stopped_by"):
            lines.append(f"stopped by {s['stopped_by']} at step {s['step']} with a checkpoint; "
                         "the same command resumes from it")
        first, final = s["first_val_loss"], s["final_val_loss"]
        if first is not None and final is not None:
            lines.append(f"validation loss: {first:.4f} before -> {final:.4f} after "
                         f"({100 * final / first:.1f}% of the first) at step {s['step']}")
        elif final is not None:
            lines.append(f"validation loss after step {s['step']}: {final:.4f}")
        return "\n".join(lines)

    def close(self, ok: bool = True) -> None:
        """After a failure (`ok` False) without the final barrier: the other ranks may be
        stuck in a collective, or gone, so a save in flight is not waited for either (its
        directory stays without the completion marker and is never resumed)."""
        if ok:
            self.ckpt.close()  # a save in flight finishes before the process group goes away
        self.metrics.close()
        self.loader.close()
        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
