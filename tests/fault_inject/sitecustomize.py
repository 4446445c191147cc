"""Fault injection for tests/test_checkpoint_faults.py: Python imports this module at start-up
(as `sitecustomize`) in every process whose PYTHONPATH holds this directory, the launcher and
every rank. It does nothing unless PRETRAIN_TEST_KILL_ON_FSYNC is set:

    PRETRAIN_TEST_KILL_ON_FSYNC="<rank>:<path part>[$][@<n>]"

The process of that rank (its RANK variable) then sends itself SIGKILL when it is about to fsync a
file or directory whose path contains <path part> (ends with it, with `$`), the n-th time (default
the first): a real kill at a known point of a checkpoint save (what came before is written, not
yet flushed, and nothing after it has happened). Nothing else of the run is changed.
"""

import os

_SPEC = os.environ.get("PRETRAIN_TEST_KILL_ON_FSYNC", "")

if ":" in _SPEC:
    import signal

    _RANK, _PART = _SPEC.split(":", 1)
    _PART, _, _NTH = _PART.partition("@")
    _END = _PART.endswith("$")
    _PART = _PART.rstrip("$")
    _seen = [0]
    _fsync = os.fsync

    def _fsync_or_die(fd):
        if os.environ.get("RANK") == _RANK:
            try:
                path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            except OSError:
                path = ""
            if path.endswith(_PART) if _END else _PART in path:
                _seen[0] += 1
                if _seen[0] == int(_NTH or 1):
                    os.kill(os.getpid(), signal.SIGKILL)
        return _fsync(fd)

    os.fsync = _fsync_or_die
