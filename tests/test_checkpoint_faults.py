"""Checkpoint faults (issue 9), injected into real runs: `pretrain train --nproc 2` (torchrun, two
gloo ranks, DeepSpeed ZeRO) as a user starts it.

- SIGKILL of one rank during a save, at three points of a background (async) save: while a
  rank's state file is written, after every rank wrote but before COMPLETE, and between COMPLETE
  and the `latest` pointer. The kills are real: tests/fault_inject/sitecustomize.py makes the
  chosen rank SIGKILL itself when it is about to fsync the named file. Each restart must resume
  from the newest complete checkpoint, remove the partial one, and train the replayed steps to
  the losses they had before.
- A full disk during a save: the checkpoints directory is a small tmpfs (a real filesystem that
  fills up: ENOSPC). The run stops with an error naming the directory and the cause; the older
  checkpoint, `latest` and the run stay intact; with space freed, the same command resumes.
- A checkpoint carrying a pickle payload is refused without running it; every torch.load in the
  project uses weights_only=True; the JSON files are validated.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_CONFIG, run_cli
from pretrain.checkpoint import (
    MARKER, CheckpointFormatError, CheckpointManager, capture_rng, load_rng,
)
from pretrain.sharded_state import StateLoadError, read_engine_state

FAULT_INJECTION = ROOT / "tests" / "fault_inject"


def overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", str(TINY_CONFIG), f"data.dir={data_dir}", f"run.dir={run_dir}",
            "train.log_interval=1", "logging.progress=false", "logging.tensorboard=false",
            "train.micro_batch_size=4", "train.eval_interval=0", "model.dropout=0.1",
            "train.max_steps=8", "checkpoint.interval=2", "checkpoint.keep_last=2", *extra,
            "--nproc", "2"]


def train(args: list[str], *, kill: str = "", check: bool = True) -> subprocess.CompletedProcess:
    """`pretrain train ARGS`; `kill`: PRETRAIN_TEST_KILL_ON_FSYNC (tests/fault_inject)."""
    env = {"PYTHONPATH": os.pathsep.join(
        [str(FAULT_INJECTION), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PRETRAIN_TEST_KILL_ON_FSYNC": kill}
    return run_cli(args, env=env, check=check and not kill, timeout=300)


def loss_records(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) in the order logged, across restarts (a killed run may cut its last line)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            out.append((rec["step"], rec["loss"]))
    return out


def assert_replays_match(run_dir: Path, steps: int) -> None:
    """Every step was trained (some twice, after a resume), and a replayed step has the loss it
    had the first time: the resumed state is the saved one."""
    seen: dict[int, list[float]] = {}
    for step, loss in loss_records(run_dir):
        seen.setdefault(step, []).append(loss)
    assert sorted(seen) == list(range(1, steps + 1))
    replayed = {s: v for s, v in seen.items() if len(v) > 1}
    assert replayed, "no step was replayed: the kills did not interrupt the run"
    for step, losses in replayed.items():
        assert losses == pytest.approx([losses[0]] * len(losses), abs=1e-6, rel=0), step


def dirs(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.iterdir() if p.is_dir())


@pytest.mark.slow
def test_sigkill_during_async_saves_resumes_from_the_previous_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = overrides(tiny_data, run, "checkpoint.async_save=true", "parallel.zero_stage=2")
    mgr = CheckpointManager(run, keep_last=2, rank=0, world_size=1)

    # 1. rank 1 dies while writing its state file of step 4 (in the background thread)
    proc = train(args, kill="1:step-00000004/state/rank-00001")
    assert proc.returncode != 0
    assert mgr.complete_steps() == [2] and (ckpts / "latest").read_text() == "step-00000002"
    assert (ckpts / "step-00000004").is_dir()  # the partial save, without the marker

    # 2. restart: resumes from 2, removes the partial 4; rank 0 dies at 6 just before COMPLETE
    proc = train(args, kill="0:step-00000006/.COMPLETE.tmp")
    assert proc.returncode != 0
    assert "resumed from step 2" in proc.stdout
    assert "removed incomplete checkpoint(s) step-00000004" in proc.stdout
    assert mgr.complete_steps() == [2, 4]
    partial = ckpts / "step-00000006"
    assert (partial / "train_state.json").is_file() and not (partial / MARKER).exists()

    # 3. restart: resumes from 4; rank 0 dies at 8 after COMPLETE, before moving `latest`
    proc = train(args, kill="0:/checkpoints$@2")  # its 2nd commit (step 8, not 6)
    assert proc.returncode != 0
    assert "resumed from step 4" in proc.stdout
    assert "removed incomplete checkpoint(s) step-00000006" in proc.stdout
    assert (ckpts / "latest").read_text() == "step-00000006"  # stale: it names an older step
    assert mgr.complete_steps() == [4, 6, 8]  # killed before pruning step 4 (keep_last=2)

    # 4. restart: the complete step 8 is chosen, not what the stale pointer names: nothing is
    #    replayed or overwritten, the run is over
    proc = train(args)
    assert "resumed from step 8" in proc.stdout and "removed incomplete" not in proc.stdout
    assert dirs(ckpts) == ["step-00000004", "step-00000006", "step-00000008"]
    assert_replays_match(run, 8)


@contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root, or CAP_SYS_ADMIN, as `make test` has on our
    CI machines); yields a function that resizes it."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small filesystem")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(
            ["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_save_is_a_clear_error_and_loses_nothing(tiny_data, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = overrides(tiny_data, run, "parallel.zero_stage=1", "train.max_steps=6")
    # one checkpoint of this model takes ~1.7 MB: the first fits, the second does not
    with small_filesystem(ckpts, "2600k") as resize:
        proc = train(args, check=False)
        assert proc.returncode == 1
        assert f"error: saving checkpoint {ckpts / 'step-00000004'} failed" in proc.stderr
        assert "No space left on device" in proc.stderr
        assert f"The filesystem of {ckpts} is full" in proc.stderr
        assert f"The previous checkpoint {ckpts / 'step-00000002'} is intact" in proc.stderr
        # the older checkpoint, its pointer and the logs are as they were; the partial is gone
        assert dirs(ckpts) == ["step-00000002"]
        assert (ckpts / "step-00000002" / MARKER).is_file()
        assert (ckpts / "latest").read_text() == "step-00000002"
        assert max(s for s, _ in loss_records(run)) == 4
        resize("64m")  # space freed: the same command goes on from step 2
        proc = train(args)
        assert "resumed from step 2" in proc.stdout
        assert dirs(ckpts) == ["step-00000004", "step-00000006"]
        assert (ckpts / "latest").read_text() == "step-00000006"
    assert_replays_match(run, 6)


# ---- unsafe and malformed files ----------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_pickle_payload_in_a_checkpoint_is_refused_unrun(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=1, rank=0, world_size=1)
    step_dir = mgr.dir / "step-00000003"
    step_dir.mkdir(parents=True)
    good = step_dir / "rng-rank00000.pt"
    torch.save(capture_rng(), good)
    assert set(load_rng(good)) == {"torch", "cuda", "numpy", "python"}

    marker = tmp_path / "payload-ran"
    torch.save({**capture_rng(), "torch": Payload(marker)}, good)
    with pytest.raises(CheckpointFormatError,
                       match=r"refusing to load .*rng-rank00000\.pt.*GLOBAL posix.system"):
        load_rng(good)
    assert not marker.exists()
    torch.load(good, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    found = 0
    for top in ("pretrain", "data_pipeline", "launch", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                where = f"{path.relative_to(ROOT)}:{node.lineno}: {name}"
                assert not name.split(".")[-1] in ("loads", "load") or not any(
                    name.startswith(m) for m in ("pickle", "cloudpickle", "dill", "marshal")), \
                    where
                if name == "torch.load":
                    found += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    assert isinstance(kw.get("weights_only"), ast.Constant) \
                        and kw["weights_only"].value is True, where
    assert found >= 1  # the RNG files: the scan does see the project's loads


def test_malformed_state_files_are_refused_by_name(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=1, rank=0, world_size=1)
    step_dir = mgr.dir / "step-00000005"
    step_dir.mkdir(parents=True)
    train_state = step_dir / "train_state.json"
    for text, why in [("{not json", "not valid JSON"), ('{"step": 6}', "not the train state"),
                      ('[5]', "not the train state"),
                      ('{"step": 5, "samples_seen": "many"}', "not the train state")]:
        train_state.write_text(text)
        with pytest.raises(CheckpointFormatError, match=why):
            mgr.read_train_state(5)
    train_state.write_text('{"step": 5, "samples_seen": 40}')
    assert mgr.read_train_state(5)["samples_seen"] == 40

    engine_state = step_dir / "engine_state.json"
    engine_state.write_text('{"optimizer_step": -1, "scheduler": {}, "param_group_lrs": [], '
                            '"counters": {}, "loss_scaler": {}}')
    with pytest.raises(StateLoadError, match=r"engine_state\.json is not a valid .*optimizer_step"):
        read_engine_state(engine_state)
    rng = step_dir / "rng-rank00000.pt"
    torch.save(capture_rng(), rng)
    rng.write_bytes(rng.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointFormatError, match="cannot read .*rng-rank00000.pt"):
        load_rng(step_dir / "rng-rank00000.pt")
