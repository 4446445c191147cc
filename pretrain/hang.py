"""A collective that times out names the ranks that never arrived.

torch.distributed gives every collective the process group's timeout (parallel.timeout_minutes);
with gloo a rank waiting on a peer that stopped (SIGSTOP, a deadlock, a hung file system, a
sleeping debugger) raises `RuntimeError: ... Timed out waiting 600000ms for recv operation`,
which says nothing about who is missing. So each rank registers its host and pid in the
rendezvous store at start, and a rank whose collective timed out does a roll call there:
it writes "here at step N" and waits a short grace period (a quarter of the timeout, 3 to 30 s)
for the others, which time out at about the same moment. The ranks that never answer are the
ones that hung; the error names them with their host and pid and says what to do.

The store is torchrun's agent under `pretrain train --nproc` (alive whatever the ranks do) or
rank 0's process under srun: if the store itself does not answer, rank 0 is the one that hung,
and the error says so.

NCCL's own watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING) aborts a process whose collective timed
out before Python sees an exception; there torch's message and flight recorder are what remains.
"""

from __future__ import annotations

import os
import socket
import time

import torch.distributed as dist

_PREFIX = "pretrain/rollcall"


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within parallel.timeout_minutes; the message names the
    ranks that did not arrive (`missing`)."""

    def __init__(self, message: str, missing: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []


def is_collective_timeout(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Timed out" in text or "timed out" in text
                                              or "Timeout" in text)


def _store():
    return dist.distributed_c10d._get_default_store()


class RollCall:
    def __init__(self, rank: int, world_size: int, timeout_s: float, attempt: int) -> None:
        """Collective-free: each rank writes its own key. `attempt` (the launcher's restart
        count) keeps the keys of a restarted run apart from those of the previous attempt."""
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.prefix = f"{_PREFIX}/{attempt}"
        self.grace_s = min(30.0, max(3.0, timeout_s / 4))
        try:
            _store().set(f"{self.prefix}/host/{rank}", f"{socket.gethostname()} pid {os.getpid()}")
        except Exception:  # a store-less process group: the roll call then names nobody
            pass

    def error(self, exc: BaseException, where: str) -> CollectiveTimeout:
        """After `exc` (a collective timeout) at `where` (e.g. "step 7"): find the ranks that
        do not answer within the grace period and describe them."""
        head = (f"rank {self.rank}: a collective at {where} did not complete within "
                f"{self.timeout_s:g} s (parallel.timeout_minutes)")
        try:
            missing = self._missing(where)
        except Exception as e:  # the store is gone too: it lives in rank 0 under srun
            return CollectiveTimeout(
                f"{head}, and the rendezvous store does not answer either ({e}): rank 0, which "
                "hosts it, has most likely hung or died. Look at rank 0's log and stack "
                f"(py-spy dump --pid PID). Collective error: {exc}")
        if not missing:
            return CollectiveTimeout(
                f"{head}, yet every rank answered the roll call: a rank was slower than the "
                "timeout (a long save or evaluation?). Raise parallel.timeout_minutes if steps "
                f"legitimately take that long. Collective error: {exc}")
        names = ", ".join(f"rank {r} ({self._host(r)})" for r in missing)
        return CollectiveTimeout(
            f"{head}: {names} did not arrive (no answer {self.grace_s:g} s after the others "
            "timed out). That rank is hung (stopped, deadlocked, stuck in I/O) or unreachable: "
            "look at its log and stack (py-spy dump --pid PID) and its node; the run resumes "
            "from its latest checkpoint when started again. Raise parallel.timeout_minutes "
            "only if that rank is merely slow.", missing)

    def _missing(self, where: str) -> list[int]:
        store = _store()
        store.set(f"{self.prefix}/here/{self.rank}", where)
        keys = {r: f"{self.prefix}/here/{r}" for r in range(self.world_size)}
        deadline = time.monotonic() + self.grace_s
        while True:
            missing = [r for r, k in keys.items() if not store.check([k])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)

    def _host(self, rank: int) -> str:
        try:
            key = f"{self.prefix}/host/{rank}"
            if _store().check([key]):
                return _store().get(key).decode()
        except Exception:
            pass
        return "host unknown"
