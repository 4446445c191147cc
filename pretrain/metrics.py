"""Run metrics: metrics.jsonl (one JSON object per line), TensorBoard events, MFU.

Only rank 0 writes. Training lines carry step, loss, lr, grad_norm, tokens_per_sec,
samples_seen, tokens_seen (and mfu where the device peak is known); evaluation lines carry step,
val_loss and val_ppl; a step whose update was skipped has a line with bad_step (the reason),
bad_ranks and positions (pretrain/bad_steps.py), a rollback one with rolled_back_to. Lines of a
resumed run are appended to the same file (a line a killed run left unfinished is cut first).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

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


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
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
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in record:
            kind = "eval" if "val_loss" in record else "train"
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
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
