"""Sharded checkpoints that are either complete or ignored, saved in the foreground or the
background.

Layout under <run.dir>/checkpoints/:

    step-00000100/
        state/rank-*.safetensors  model and optimizer, loadable by any process grid, and
        engine_state.json    optimizer step, scheduler (both from sharded_state.EngineState)
        train_state.json     step, counters, loader position, model config, grid (rank 0)
        rng-rank00000.pt     torch/cuda/numpy/python RNG states, one file per rank (tensors and
                             plain values only: loaded with weights_only=True)
        config.yaml          the resolved run config
        COMPLETE             written last, after every rank finished writing
    latest                   tag of the newest complete checkpoint (DeepSpeed's format)

A save: every rank takes its part of the state (the collective part, EngineState.prepare_save)
and writes it; then the ranks agree that every one of them wrote everything (an all-gather of
each rank's error, or none); every file and directory of the step is fsynced by then. Only then
rank 0 writes COMPLETE (fsynced, with its directory), prunes checkpoints beyond keep_last and
moves `latest` (temp file + rename, not fsynced: it only informs); a second agreement tells
every rank the commit happened.
Resume picks the highest step that has COMPLETE, so a crash during a save, or a stale `latest`,
never selects a partial checkpoint. Rank 0 removes directories without the marker when a run
starts (before it resumes), when a save failed (after all ranks agreed it did, which also frees
the space of a save that filled the disk) and before each save.

Asynchronous saves (`save(..., background=True)`, checkpoint.async_save): the caller is blocked
only for the collective part and, from a GPU, the copy of this rank's state into host memory (on
CPU the thread makes that copy, and the next optimizer step waits for it); writing, the
agreements and the commit run in a thread, with a gloo process group of their own, while
training goes on. At most one save is in flight: the next save waits for it (`wait`), and so do
the end of training and a stop. A failure in the background reaches the training loop: `poll`,
called every step, raises it on every rank at the same step, once every rank's thread is done.

A step that already has a complete checkpoint is saved again only as a no-op, when this process
wrote or loaded that checkpoint (the same state: e.g. the final save right after a periodic
one). Otherwise the save is refused instead of overwriting a checkpoint of another trajectory.

The manager drives any object with DeepSpeed's checkpoint interface (save_checkpoint /
load_checkpoint with a tag): the trainer passes sharded_state.EngineState, which writes the
grid-independent files above and can save in the background; a bare DeepSpeed engine would
write DeepSpeed's own shards, in the foreground.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import sys
import threading
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.format import atomic_write_text
from pretrain.state_files import fsync

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


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the directory and why."""


class CheckpointSaveError(CheckpointError):
    """A save failed on at least one rank. Every rank raises it; the partial directory is gone
    and the previous complete checkpoint is untouched."""


class CheckpointExistsError(CheckpointError):
    """A save would overwrite a complete checkpoint that this run did not write."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint file is not what a save writes (malformed, or carrying code to run)."""


class _InFlight:
    """A background save: its thread, and the exception it ended with."""

    def __init__(self, step: int, target) -> None:
        self.step = step
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=False,
                                       name=f"checkpoint-{tag_for(step)}")
        self.thread.start()

    def _run(self, target) -> None:
        try:
            target()
        except BaseException as e:  # handed to the training loop by poll() / wait()
            self.error = e


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int,
                 timeout: timedelta | None = None):
        if keep_last < 1:  # [: -0] below would keep everything
            raise ValueError(f"checkpoint.keep_last must be at least 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._group = None  # gloo group of the agreements, made at the first save
        self._pending: _InFlight | None = None
        self._ours: set[int] = set()  # steps whose checkpoint this process wrote or loaded

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
        """Rank 0 deletes checkpoint directories that a crashed or failed save left without the
        marker. Only while no save of this run is in flight: at start, before a save."""
        removed = []
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if TAG_RE.match(p.name) and not (p / MARKER).is_file():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return sorted(removed)

    # ---- saving ----------------------------------------------------------------------------
    def save(self, engine, step: int, train_state: dict, config_yaml: str, *,
             background: bool = False) -> Path:
        """Collective: every rank calls it at the same step. With `background`, returns once
        the state is copied to host memory and writes it in a thread (engines that offer
        prepare_save only; others save in the foreground)."""
        self.wait()  # at most one save in flight; raises the previous one's failure
        tag = tag_for(step)
        path = self.dir / tag
        if step in self.complete_steps():
            if step in self._ours:
                return path  # already saved (e.g. the final save right after a periodic one)
            raise CheckpointExistsError(
                f"{path} is already a complete checkpoint, but not one this run wrote or resumed "
                "from: refusing to overwrite it. Move it out of the way (or use another "
                "run.dir) to save this step.")
        if self._group is None and self.world_size > 1 and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=self.timeout)
        self.remove_incomplete()
        _barrier()
        t0 = time.time()
        if hasattr(engine, "prepare_save"):
            write = engine.prepare_save(str(self.dir), tag, copy=background)
        else:
            background = False
            write = partial(engine.save_checkpoint, str(self.dir), tag=tag, save_latest=False)
        job = partial(self._write_and_commit, write, step, capture_rng(), train_state,
                      config_yaml, t0)
        if background:
            self._pending = _InFlight(step, job)
        else:
            job()
        return path

    def _write_and_commit(self, write, step: int, rng: dict, train_state: dict,
                          config_yaml: str, t0: float) -> None:
        """Write this rank's files; agree; rank 0 commits; agree. Raises CheckpointSaveError on
        every rank if any rank failed."""
        path = self.dir / tag_for(step)
        error = None
        try:
            write()
            # Ranks that hold no DeepSpeed shard (ZeRO-0, rank > 0) do not create the directory.
            path.mkdir(parents=True, exist_ok=True)
            mine = [path / f"rng-rank{self.rank:05d}.pt"]
            torch.save(rng, mine[0])
            if self.rank == 0:
                (path / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
                (path / "config.yaml").write_text(config_yaml)
                mine += [path / TRAIN_STATE, path / "config.yaml", path / "engine_state.json"]
            # Everything on the disk before COMPLETE can be: the files written without an fsync
            # each (the first fsync below commits them all to the journal), and the directories.
            for p in [*mine, *(p for p in path.rglob("*") if p.is_dir()), path]:
                if p.exists():
                    fsync(p)
        except Exception as e:
            error = e
        failures = self._agree(_describe(self.rank, error))
        if failures:
            if self.rank == 0:
                shutil.rmtree(path, ignore_errors=True)  # never chosen anyway; frees the space
            raise self._save_error(path, failures) from error
        if self.rank == 0:
            try:
                marker = {"step": step, "world_size": self.world_size, "time": time.time(),
                          "save_seconds": time.time() - t0}
                atomic_write_text(path / MARKER, json.dumps(marker))
                fsync(self.dir)  # COMPLETE is on the disk before older checkpoints are pruned
                self._prune()  # step is committed: older ones beyond keep_last may go
                _replace_text(self.dir / "latest", tag_for(step))
            except Exception as e:
                error = e
                if not (path / MARKER).is_file():
                    shutil.rmtree(path, ignore_errors=True)
        failures = self._agree(_describe(0, error) if self.rank == 0 else None)
        if failures:
            raise self._save_error(path, failures) from error
        self._ours.add(step)

    def _agree(self, failure: dict | None) -> list[dict]:
        """Every rank's failure (None for success), on every rank; also a barrier."""
        if self._group is None:
            return [failure] if failure else []
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, failure, group=self._group)
        return [f for f in everyone if f]

    def _save_error(self, path: Path, failures: list[dict]) -> CheckpointSaveError:
        lines = [f"saving checkpoint {path} failed:"]
        lines += [f"  rank {f['rank']}: {f['error']}" for f in failures]
        if any(f["disk_full"] for f in failures):
            lines.append(f"The filesystem of {self.dir} is full or over quota: free space there "
                         "(checkpoint.keep_last keeps fewer checkpoints) or move run.dir.")
        complete = (path / MARKER).is_file()
        if complete:
            lines.append(f"{path} itself is complete (only `latest` could not be updated).")
        else:
            lines.append(f"{path} was removed.")
        previous = [s for s in self.complete_steps() if self.dir / tag_for(s) != path]
        if previous:
            lines.append(f"The previous checkpoint {self.dir / tag_for(previous[-1])} is intact: "
                         "running the same command again resumes from "
                         f"{'this one' if complete else 'it'}.")
        elif not complete:
            lines.append("No complete checkpoint exists yet.")
        return CheckpointSaveError("\n".join(lines))

    def poll(self, device: torch.device | str | None = None) -> None:
        """Every step: when a background save is in flight, ask every rank whether its part is
        done (a one-element all-reduce); once all are, collect it, raising its failure on every
        rank at this same step. No collective when nothing is in flight."""
        if self._pending is None:
            return
        done = torch.tensor([0 if self._pending.thread.is_alive() else 1], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.thread.join()
            if pending.error is not None:
                raise pending.error

    def close(self) -> None:
        """Let a save in flight finish (before the process group goes away). Its failure is
        printed, not raised: close runs on the way out, maybe after another error."""
        try:
            self.wait()
        except Exception as e:
            print(f"[pretrain] rank {self.rank}: {e}", file=sys.stderr, flush=True)

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
        """train_state.json of a checkpoint, checked: a JSON object whose step is the
        directory's."""
        path = self.dir / tag_for(step) / TRAIN_STATE
        try:
            state = json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointFormatError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(state, dict) or state.get("step") != step or not all(
                isinstance(state.get(k, 0), int) for k in ("samples_seen", "tokens_seen")):
            raise CheckpointFormatError(
                f"{path} is not the train state of step {step}: expected a JSON object with "
                f"\"step\": {step} and integer counters")
        return state

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
        state = self.read_train_state(step)
        rng_file = self.dir / tag / f"rng-rank{self.rank:05d}.pt"
        if with_rng and rng_file.is_file():
            restore_rng(load_rng(rng_file))
        self._ours.add(step)
        return state


def _replace_text(path: Path, text: str) -> None:
    """Write-and-rename without fsync, for `latest`: a reader sees the old or the new text; it
    only informs (resume takes the newest COMPLETE), so a crash may leave it one save behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_rng(path: Path) -> dict:
    """A rank's RNG file, unpickled with weights_only=True: tensors and plain values only. A file
    carrying anything else (a pickled object whose loading would run code) is refused unread."""
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        what = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line][:1]
        raise CheckpointFormatError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, "
            "which loading would have to run and a checkpoint we write never holds"
            + (f" ({what[0]})" if what else "") + ". Do not load it unless you trust its "
            "origin; without this file the checkpoint resumes on another grid's RNG seeds."
        ) from None
    except Exception as e:  # truncated or not a torch file
        raise CheckpointFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or set(state) != {"torch", "cuda", "numpy", "python"}:
        raise CheckpointFormatError(f"{path} is not an RNG state file written by a save")
    return state


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_WORDS = ("No space left", "Disk quota exceeded", "File too large", "StorageFull")


def _describe(rank: int, error: BaseException | None) -> dict | None:
    """A failure as plain data, for the all-gather."""
    if error is None:
        return None
    text = f"{type(error).__name__}: {error}"
    disk_full = (getattr(error, "errno", None) in _DISK_FULL
                 or any(w in text for w in _DISK_FULL_WORDS))
    return {"rank": rank, "error": text[:2000], "disk_full": disk_full}


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
