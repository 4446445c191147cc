"""Slurm's compressed host lists and task counts, expanded without calling Slurm.

    expand_hostlist("gpu-[01-03,7],cpu1")   -> ["gpu-01", "gpu-02", "gpu-03", "gpu-7", "cpu1"]
    expand_hostlist("r[1-2]-n[1-2]")        -> ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]
    expand_tasks_per_node("2(x3),1")        -> [2, 2, 2, 1]

The same expansion as `scontrol show hostnames` (zero padding kept, bracket groups in a name
multiply out left to right), for the places where the job's environment is all we have.
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_COUNT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


class HostlistError(ValueError):
    pass


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested brackets in host list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, whole: str) -> list[str]:
    """`01-03,7` -> ["01", "02", "03", "7"] (the width of the lower bound is kept)."""
    out = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise HostlistError(f"bad range {item!r} in host list {whole!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostlistError(f"descending range {item!r} in host list {whole!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_name(name: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    return [head + v + rest for v in _expand_ranges(m.group(1), whole)
            for rest in _expand_name(tail, whole)]


def expand_hostlist(text: str) -> list[str]:
    """Host names of a Slurm host list such as `SLURM_JOB_NODELIST`, in order."""
    hosts = []
    for part in _split_top_level(text.strip()):
        part = part.strip()
        if not part:
            raise HostlistError(f"empty name in host list {text!r}")
        hosts += _expand_name(part, text)
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """Tasks on each node from `SLURM_TASKS_PER_NODE` (`2(x3),1`): one count per node."""
    counts = []
    for part in text.strip().split(","):
        m = _COUNT.match(part.strip())
        if not m:
            raise HostlistError(f"bad tasks-per-node entry {part!r} in {text!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts
