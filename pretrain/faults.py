"""Fault injection for the reliability tests (tests/test_faults.py, tests/test_slurm.py).

Off unless the environment variable PRETRAIN_FAULTS is set; this module is the only place that
reads it, and a run that has it prints a warning naming every injected fault on rank 0. The
value is a `;`-separated list of `name:key=value,key=value` items:

    nan_loss:steps=4-6[,rank=1][,value=inf]   (repeatable) the loss of every micro-batch that
        holds a sample of steps 4..6 of an uninterrupted run (global positions (4-1)*G to 6*G,
        G the global batch) becomes NaN (or inf) on `rank` (default: every rank). Bound to the
        data, like a real bad batch: after a rollback skips those samples they are not fed
        again.
    hang:rank=1,step=3[,seconds=3600]          `rank` sleeps before the forward of step 3 (the
        others block in the next collective until parallel.timeout_minutes).
    slow_save:seconds=3[,step=200]             the checkpoint save (at `step`, default every one)
        sleeps after its files are written, before the COMPLETE marker: a window in which to
        interrupt a save.

Faults never change the numerics of the steps they do not touch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

ENV_VAR = "PRETRAIN_FAULTS"
_KEYS = {"nan_loss": {"steps", "rank", "value"}, "hang": {"rank", "step", "seconds"},
         "slow_save": {"seconds", "step"}}


class FaultSpecError(ValueError):
    """PRETRAIN_FAULTS does not parse: a typo must not silently inject nothing."""


@dataclass
class Faults:
    nan_loss: list[tuple[int, int, int | None, float]] = field(default_factory=list)
    """(first step, last step, rank or None for all, value) of each nan_loss item."""
    hang: dict[str, float] = field(default_factory=dict)  # rank, step, seconds
    slow_save: dict[str, float] = field(default_factory=dict)  # seconds, step
    spec: str = ""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Faults | None":
        spec = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
        return cls.parse(spec) if spec else None

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        faults = cls(spec=spec)
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            name, _, args = item.partition(":")
            if name not in _KEYS:
                raise FaultSpecError(f"{ENV_VAR}: unknown fault {name!r} in {item!r} "
                                     f"(known: {', '.join(sorted(_KEYS))})")
            kv = {}
            for pair in filter(None, args.split(",")):
                key, eq, value = pair.partition("=")
                if not eq or key not in _KEYS[name]:
                    raise FaultSpecError(f"{ENV_VAR}: {name} takes {sorted(_KEYS[name])}, "
                                         f"got {pair!r}")
                kv[key] = value
            try:
                if name == "nan_loss":
                    first, _, last = kv["steps"].partition("-")
                    faults.nan_loss.append((int(first), int(last or first),
                                            int(kv["rank"]) if "rank" in kv else None,
                                            float(kv.get("value", "nan"))))
                elif name == "hang":
                    faults.hang = {"rank": int(kv["rank"]), "step": int(kv["step"]),
                                   "seconds": float(kv.get("seconds", 3600))}
                else:
                    faults.slow_save = {"seconds": float(kv["seconds"]),
                                        "step": int(kv.get("step", -1))}
            except (KeyError, ValueError) as e:
                raise FaultSpecError(f"{ENV_VAR}: bad {item!r}: {e}") from None
        return faults

    def describe(self) -> str:
        return f"FAULT INJECTION ACTIVE ({ENV_VAR}={self.spec!r}): for tests only"

    def poison_loss(self, loss: torch.Tensor, positions: torch.Tensor, rank: int,
                    global_batch: int) -> torch.Tensor:
        """`loss`, or loss * NaN (inf) when the micro-batch holds a poisoned position."""
        for first, last, only_rank, value in self.nan_loss:
            if only_rank is not None and rank != only_rank:
                continue
            lo, hi = (first - 1) * global_batch, last * global_batch
            if bool(((positions >= lo) & (positions < hi)).any()):
                return loss * value  # inf * loss is inf; the gradients are non-finite too
        return loss

    def maybe_hang(self, step: int, rank: int, stop=None) -> None:
        """Sleep as configured; a stop signal meanwhile (`stop`, a StopRequest: the launcher
        tearing the run down) ends the process at once, as it would a process blocked in a
        wait without a handler."""
        if not (self.hang and self.hang["rank"] == rank and self.hang["step"] == step):
            return
        print(f"[pretrain] fault injection: rank {rank} hangs at step {step} for "
              f"{self.hang['seconds']:.0f} s", flush=True)
        end = time.monotonic() + self.hang["seconds"]
        while time.monotonic() < end:
            if stop is not None and stop.signum:
                os._exit(128 + stop.signum)
            time.sleep(0.1)

    def save_delay(self, step: int) -> float:
        if self.slow_save and self.slow_save["step"] in (-1, step):
            return self.slow_save["seconds"]
        return 0.0


class SlowSave:
    """Wraps the trainer's checkpoint state (sharded_state.EngineState): sleeps after its
    files are written, so the step directory exists without COMPLETE for that long."""

    def __init__(self, state_io, faults: Faults) -> None:
        self.inner, self.faults = state_io, faults

    def save_checkpoint(self, save_dir, tag, *args, **kwargs):
        out = self.inner.save_checkpoint(save_dir, tag, *args, **kwargs)
        self._pause(tag)
        return out

    def prepare_save(self, save_dir, tag, **kwargs):
        """The path CheckpointManager takes (foreground and asynchronous saves): the pause
        follows the write, before the manager's COMPLETE."""
        write = self.inner.prepare_save(save_dir, tag, **kwargs)

        def write_then_pause() -> None:
            write()
            self._pause(tag)
        return write_then_pause

    def _pause(self, tag) -> None:
        delay = self.faults.save_delay(int(str(tag).rsplit("-", 1)[-1]))
        if delay:
            print(f"[pretrain] fault injection: save of {tag} pauses {delay:.1f} s before "
                  "COMPLETE", flush=True)
            time.sleep(delay)

    def __getattr__(self, name):
        return getattr(self.inner, name)
