"""Sharded checkpoints that are either complete or ignored.

Layout under <run.dir>/checkpoints/:

    step-00000100/
        state/*.safetensors  model and optimizer, loadable by any process grid, and
        engine_state.json    optimizer step, scheduler (both from sharded_state.EngineState)
        train_state.json     step, counters, loader position, model config, grid (rank 0)
        rng-rank00000.pt     torch/cuda/numpy/python RNG states, one file per rank
        config.yaml          the resolved run config
        COMPLETE             written last, after every rank finished writing
    latest                   tag of the newest complete checkpoint (DeepSpeed's format)

A save writes everything, waits at a barrier for every rank, then rank 0 writes COMPLETE and only
then moves `latest` (temp file + rename). Resume picks the highest step that has COMPLETE, so a
crash during a save, or a stale `latest`, never selects a partial checkpoint; directories without
the marker are removed before the next save.

The manager drives any object with DeepSpeed's checkpoint interface (save_checkpoint /
load_checkpoint with a tag): the trainer passes sharded_state.EngineState, which writes the
grid-independent files above; a bare DeepSpeed engine would write DeepSpeed's own shards.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.format import atomic_write_text

MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        if keep_last < 1:  # [: -0] below would keep everything
            raise ValueError(f"checkpoint.keep_last must be at least 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ---- finding ---------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints that carry the completion marker, ascending."""
        if not self.dir.is_dir():
            return []
        steps = []
        for p in self.dir.iterdir():
            m = TAG_RE.match(p.name)
            if m and (p / MARKER).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def remove_incomplete(self) -> list[str]:
        """Rank 0 deletes checkpoint directories a crashed save left without the marker."""
        removed = []
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if TAG_RE.match(p.name) and not (p / MARKER).is_file():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return removed

    # ---- saving ----------------------------------------------------------------------------
    def save(self, engine, step: int, train_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it at the same step."""
        tag = tag_for(step)
        path = self.dir / tag
        if step in self.complete_steps():
            return path  # already saved (e.g. the final save right after a periodic one)
        self.remove_incomplete()
        _barrier()
        t0 = time.time()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        # Ranks that hold no DeepSpeed shard (ZeRO-0, rank > 0) do not create the directory.
        path.mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng(), path / f"rng-rank{self.rank:05d}.pt")
        if self.rank == 0:
            atomic_write_text(path / TRAIN_STATE, json.dumps(train_state, indent=2))
            atomic_write_text(path / "config.yaml", config_yaml)
        _barrier()  # every rank's shards are on disk before the marker exists
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "time": time.time(),
                      "save_seconds": time.time() - t0}
            atomic_write_text(path / MARKER, json.dumps(marker))
            atomic_write_text(self.dir / "latest", tag)
            self._prune()
        _barrier()
        return path

    def _prune(self) -> None:
        for step in self.complete_steps()[: -self.keep_last]:
            old = self.dir / tag_for(step)
            (old / MARKER).unlink(missing_ok=True)  # an interrupted delete leaves no "complete" husk
            shutil.rmtree(old, ignore_errors=True)

    # ---- loading ---------------------------------------------------------------------------
    def has_rng(self, step: int) -> bool:
        """Whether this rank's RNG file exists (not in converted checkpoints)."""
        return (self.dir / tag_for(step) / f"rng-rank{self.rank:05d}.pt").is_file()

    def read_train_state(self, step: int) -> dict:
        return json.loads((self.dir / tag_for(step) / TRAIN_STATE).read_text())

    def load(self, engine, step: int, *, with_rng: bool = True) -> dict:
        """Restore model, optimizer, scheduler (DeepSpeed) and, `with_rng` (the same
        process grid as the saving run), this rank's RNG; returns the train state (counters and
        loader state) for the caller to apply."""
        tag = tag_for(step)
        load_path, _ = engine.load_checkpoint(
            str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        rng_file = self.dir / tag / f"rng-rank{self.rank:05d}.pt"
        if with_rng and rng_file.is_file():
            restore_rng(torch.load(rng_file, weights_only=True))
        return self.read_train_state(step)


def diff_dicts(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_dicts(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: checkpoint has {a!r}, config has {b!r}")
    return out
