"""Run metrics: metrics.jsonl (one JSON object per line), TensorBoard events, MFU, memory.

Only rank 0 writes. Training lines carry step, loss, lr, grad_norm, tokens_per_sec,
samples_seen, tokens_seen (and mfu where the device peak is known), peak_mem_bytes and
base_mem_bytes (PeakMemory); evaluation lines carry step, val_loss and val_ppl; a step whose
update was skipped has a line with bad_step (the reason), bad_ranks and positions
(pretrain/bad_steps.py), a rollback one with rolled_back_to. Every line carries `time` (Unix
seconds) and `elapsed` (seconds since the writing process started), from which reports take a
run's wall time across restarts. Lines of a resumed run are appended to the same file (a line a
killed run left unfinished is cut first).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name, for MFU.
KNOWN_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0,
}


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None


LOCK_PAGES_ENV = "PRETRAIN_MEMORY_LOCK_PAGES"
"""Set to 1 (tests/test_planner.py, benchmarks/planner_memory.py), a CPU rank locks the pages
mapped when its memory base is taken (`_lock_mapped_pages`)."""


def _lock_mapped_pages() -> None:
    """mlockall(MCL_CURRENT): every page mapped now becomes resident and stays so. Library code
    then is neither faulted in during the run nor taken away: some machines page out cold
    file-backed pages of running processes (this VM runs DAMON with a pageout scheme), which
    moves the resident set by tens of MB between two readings. About 0.2 s and 400 MB of
    resident code per rank; without the privilege (CAP_IPC_LOCK or a large RLIMIT_MEMLOCK) it
    warns and measures as usual."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(1) != 0:  # MCL_CURRENT
        warnings.warn(f"{LOCK_PAGES_ENV}=1 but mlockall failed "
                      f"({os.strerror(ctypes.get_errno())}): memory measured unlocked")


def _anonymous(resident: int) -> int:
    """`resident` less the file-backed and shared pages resident now (Linux; elsewhere psutil
    does not split the resident set and `resident` is returned)."""
    return resident - getattr(psutil.Process().memory_info(), "shared", 0)


class PeakMemory:
    """Peak memory of this process, for metrics and for checking `pretrain plan`.

    GPU: torch.cuda.max_memory_allocated (tensors only; the CUDA context and the caching
    allocator's reserve are not counted). CPU: the anonymous part of the peak resident set (the
    kernel's high-water mark, getrusage's ru_maxrss, less the file-backed and shared pages
    resident when it is read; DataLoader workers excluded). Library code is mapped from files
    and faulted in page by page as new kernels first run, by amounts that depend on the kernel
    and on how the files sit in the page cache (22 MB with one venv, 45 MB with a fresh venv on
    the same machine, for the same two steps): it is not memory the run holds, and it is not
    what `pretrain plan` predicts. Subtracting the file pages resident at the reading is exact
    while they only grow (what is faulted in between the peak and the reading, a logging step's
    code, counts as freed). A machine that pages out cold code of running processes (DAMON's
    pageout, as on the VM of BENCHMARKS.md) breaks that; PRETRAIN_MEMORY_LOCK_PAGES=1 locks the
    pages mapped at the base so that they stay (`_lock_mapped_pages`).
    `base` is the same measure taken when the meter is created (the trainer does so once the
    process group is up, before the model exists): on CPU the interpreter, torch, DeepSpeed
    and gloo; on GPU usually 0. What the run's model, optimizer and activations took is
    peak - base, which is what `pretrain plan` predicts.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            # Code, not data: the modules DeepSpeed and torch.optim import on first use (about
            # 100 MB of Python objects, torch._dynamo and sympy among them) are in the base.
            import deepspeed  # noqa: F401
            import torch._dynamo  # noqa: F401

            # DeepSpeed's ZeRO optimizers, and at times a ZeRO-0 run too, import torch._inductor
            # (and networkx with it) once training starts: about 45 MB more code (1.4 s).
            import torch._inductor.compile_fx  # noqa: F401

            if os.environ.get(LOCK_PAGES_ENV) == "1":
                _lock_mapped_pages()
            self.base = _anonymous(psutil.Process().memory_info().rss)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return _anonymous(peak if sys.platform == "darwin" else peak * 1024)  # Linux: KiB

    def stats(self) -> dict[str, int]:
        """Peak and base of the rank whose peak - base is largest (a collective when
        torch.distributed is initialized: every rank calls it at the same step)."""
        peak, base = self.peak(), self.base
        if dist.is_available() and dist.is_initialized():
            device = self.device if self.device.type == "cuda" else torch.device("cpu")
            t = torch.zeros(dist.get_world_size(), 2, dtype=torch.int64, device=device)
            t[dist.get_rank()] = torch.tensor([peak, base])
            dist.all_reduce(t)  # every rank's row
            peak, base = t[int(torch.argmax(t[:, 0] - t[:, 1]))].tolist()
        return {"peak_mem_bytes": peak, "base_mem_bytes": base}


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._process_start = psutil.Process().create_time()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        now = time.time()
        record = {**record, "time": round(now, 3),
                  "elapsed": round(now - self._process_start, 3)}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in record:
            kind = "eval" if "val_loss" in record else "train"
            for k, v in record.items():
                if k in ("step", "time", "elapsed") or isinstance(v, bool):
                    continue
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by a killed run, so that appended lines parse."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
