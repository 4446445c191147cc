"""Fault injection for tests/test_checkpoint_faults.py: Python imports this module at start-up
(as `sitecustomize`) in every process whose PYTHONPATH holds this directory, the launcher and
every rank. It does nothing unless PRETRAIN_TEST_KILL_ON_FSYNC is set:

    PRETRAIN_TEST_KILL_ON_FSYNC="<rank>:<path part>[,<rank>:<path part>...]"

The process of that rank (its RANK variable) then sends itself SIGKILL when it is about to fsync a
file whose path contains <path part>: a real kill at a known point of a checkpoint save (that
file's bytes are written, not yet flushed, and nothing after it has happened). Nothing else of
the run is changed.
"""

import os

_RULES = [tuple(item.split(":", 1)) for item in
          os.environ.get("PRETRAIN_TEST_KILL_ON_FSYNC", "").split(",") if ":" in item]

if _RULES:
    import signal

    _fsync = os.fsync

    def _fsync_or_die(fd):
        rank = os.environ.get("RANK")
        if rank is not None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            except OSError:
                path = ""
            if any(r == rank and part in path for r, part in _RULES):
                os.kill(os.getpid(), signal.SIGKILL)
        return _fsync(fd)

    os.fsync = _fsync_or_die
