"""Shared fixtures: a small real corpus (part of the running interpreter's standard library),
prepared once per session with the real Ray pipeline, and a helper that runs training the way a
user does (`pretrain train ... --nproc N`) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "gpt-tiny.yaml"
BERT_TINY = ROOT / "configs" / "bert-tiny.yaml"
T5_TINY = ROOT / "configs" / "t5-tiny.yaml"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# About 1 MB of real Python source: enough for a 512-token BPE and a few hundred samples.
TINY_SOURCES = [str(STDLIB / "json"), str(STDLIB / "email"), str(STDLIB / "argparse.py"),
                str(STDLIB / "dataclasses.py")]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data directory (tokenizer, shards, manifest) from a slice of the stdlib."""
    from data_pipeline.prepare import prepare
    from pretrain.config_io import load_config

    out = tmp_path_factory.mktemp("tiny_data")
    sources = "[" + ",".join(TINY_SOURCES) + "]"
    cfg = load_config(TINY_CONFIG, [f"data.dir={out}", f"data.sources={sources}",
                                    "data.num_cpus=2"])
    prepare(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def bert_t5_data(tmp_path_factory) -> Path:
    """tiny_data's corpus prepared for bert-tiny and t5-tiny (one tokenizer with [CLS], [SEP],
    [MASK], [PAD] and 8 sentinels serves both)."""
    from data_pipeline.prepare import prepare
    from pretrain.config_io import load_config

    out = tmp_path_factory.mktemp("bert_t5_data")
    sources = "[" + ",".join(TINY_SOURCES) + "]"
    cfg = load_config(BERT_TINY, [f"data.dir={out}", f"data.sources={sources}",
                                  "data.num_cpus=2"])
    prepare(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """One stdlib module prepared alone: a train split small enough to finish an epoch in tests."""
    from data_pipeline.prepare import prepare
    from pretrain.config_io import load_config

    out = tmp_path_factory.mktemp("small_data")
    cfg = load_config(TINY_CONFIG, [f"data.dir={out}", f"data.sources=[{STDLIB / 'dataclasses.py'}]",
                                    "data.num_cpus=2", "data.val_fraction=0.0"])
    prepare(cfg, progress=False)
    return out


def run_cli(args: list[str], *, timeout: float = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `pretrain ARGS` as a user would, in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def train_records(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a resumed run re-logs replayed steps, and the last record wins."""
    return {r["step"]: r["loss"] for r in train_records(run_dir) if "loss" in r}
