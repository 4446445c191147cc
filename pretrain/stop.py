"""Stop requests: a signal asks the run to stop; the ranks agree on the step and save there.

Slurm sends SIGUSR1 ahead of the time limit (`--signal=USR1@<seconds>`) and on
`scancel --signal=USR1`, and SIGTERM when a job is cancelled, preempted or out of time (then
SIGKILL after KillWait). The handler only records the signal: saving from inside a handler can
deadlock (the interrupted code may hold the locks the save needs, or sit in a collective), so the
trainer asks `agreed()` at every step boundary. That reduces the flag over all ranks (MAX of the
signal numbers): ranks that were signalled a step apart, or not at all, still stop after the same
step, and every rank then joins the collective checkpoint save.

The cost is one 8-byte all-reduce per step. Slurm signals every process of a job step, the
DataLoader workers too: they ignore these signals (data_pipeline/loader.py) and leave the stop to
their rank.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> "StopRequest":
        """Record the first of `signals` from now on (main thread only)."""
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def ignore_from_now(self) -> None:
        """The run is over (saved, status written): a late stop signal must not kill the exiting
        process. SIG_IGN rather than our handler, because Python's shutdown resets signals that
        have a Python handler to SIG_DFL, and a USR1 arriving then would end the process by
        signal (seen on the test cluster: srun then reports the rank as failed)."""
        for sig in list(self._previous) or STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handler(self, signum: int, frame) -> None:
        # Nothing else here: no I/O, no locks, no collectives.
        if self.signum is None:
            self.signum = signum

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Ask for a stop from code (what the handler does)."""
        self._handler(signum, None)

    def agreed(self, device: torch.device) -> int | None:
        """Collective: the signal number if any rank was asked to stop, else None."""
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        return value or None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
