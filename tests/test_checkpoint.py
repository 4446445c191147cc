"""pretrain/checkpoint.py: checkpoints are complete or ignored.

Most tests drive CheckpointManager with world size 1, no process group (its barriers are no-ops
then) and a small engine that writes real files the way DeepSpeed does, so faults can be
injected. One test runs the real DeepSpeed engine (ZeRO-2, gloo, one rank) in a subprocess and
checks that save -> fresh engine -> load continues with exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.env import free_port
from pretrain.checkpoint import (
    MARKER, CheckpointExistsError, CheckpointManager, CheckpointSaveError, capture_rng, diff_dicts,
    restore_rng, tag_for,
)

ROOT = Path(__file__).resolve().parents[1]
SHARD = "mp_rank_00_model_states.pt"
OPTIM_SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    """DeepSpeed's checkpoint interface: shards under <dir>/<tag>/, `load_checkpoint` returns
    (path, client_state), or (None, None) when there is nothing to load."""

    def __init__(self, weight: float = 0.0):
        self.weight = weight
        self.fail_after_first_shard = False
        self.saves: list[str] = []

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        assert save_latest is False  # the manager moves `latest` itself, after the marker
        self.saves.append(tag)
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": torch.tensor(self.weight)}, d / SHARD)
        if self.fail_after_first_shard:
            raise OSError(28, "No space left on device")
        torch.save({"exp_avg": torch.tensor(self.weight / 2)}, d / OPTIM_SHARD)

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True,
                        load_lr_scheduler_states=True):
        d = Path(load_dir) / tag
        if not (d / SHARD).is_file():
            return None, None
        self.weight = float(torch.load(d / SHARD, weights_only=True)["weight"])
        return str(d), {}


def manager(tmp_path, keep_last=3, rank=0, world_size=1) -> CheckpointManager:
    return CheckpointManager(tmp_path / "run", keep_last=keep_last, rank=rank,
                             world_size=world_size)


def save(mgr: CheckpointManager, engine: FakeEngine, step: int) -> Path:
    return mgr.save(engine, step, {"step": step, "samples_seen": 8 * step}, f"step: {step}\n")


def latest_file(mgr: CheckpointManager) -> str:
    return (mgr.dir / "latest").read_text().strip()


def dirs(mgr: CheckpointManager) -> list[str]:
    return sorted(p.name for p in mgr.dir.iterdir() if p.is_dir())


# ---- saving and loading ------------------------------------------------------------------------
def test_save_writes_a_complete_checkpoint_and_load_restores_it(tmp_path):
    mgr, engine = manager(tmp_path), FakeEngine(weight=1.5)
    assert mgr.latest_step() is None and mgr.complete_steps() == []
    path = save(mgr, engine, 100)
    assert path == mgr.dir / "step-00000100" and tag_for(100) == "step-00000100"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [SHARD, OPTIM_SHARD, MARKER, "train_state.json", "config.yaml", "rng-rank00000.pt"])
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 100 and marker["world_size"] == 1 and marker["save_seconds"] >= 0
    assert latest_file(mgr) == "step-00000100"
    assert (path / "config.yaml").read_text() == "step: 100\n"
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]  # atomic writes left no temp
    assert mgr.latest_step() == 100 and mgr.read_train_state(100)["samples_seen"] == 800

    fresh = FakeEngine(weight=-7.0)
    state = manager(tmp_path).load(fresh, 100)
    assert fresh.weight == 1.5
    assert state == {"step": 100, "samples_seen": 800}


def test_load_of_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(RuntimeError, match="could not load checkpoint .*step-00000042"):
        manager(tmp_path).load(FakeEngine(), 42)


def test_rank_above_zero_writes_only_its_own_files(tmp_path):
    # a rank > 0 that holds no DeepSpeed shard still gets its RNG file (the directory is made
    # for it); train state, marker and `latest` are rank 0's
    class NoShardEngine(FakeEngine):
        def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
            self.saves.append(tag)

    mgr = manager(tmp_path, rank=1, world_size=2)
    (mgr.dir / "step-00000005").mkdir(parents=True)  # partial: only rank 0 may clean it up
    assert mgr.remove_incomplete() == []
    path = save(mgr, NoShardEngine(), 10)
    assert sorted(p.name for p in path.iterdir()) == ["rng-rank00001.pt"]
    assert not (mgr.dir / "latest").exists() and mgr.latest_step() is None
    assert (mgr.dir / "step-00000005").is_dir()


# ---- crashes and stale pointers ----------------------------------------------------------------
def test_a_save_that_fails_midway_is_never_selected_and_is_cleaned_up(tmp_path):
    mgr, engine = manager(tmp_path), FakeEngine(weight=1.0)
    save(mgr, engine, 100)
    engine.weight, engine.fail_after_first_shard = 2.0, True
    with pytest.raises(CheckpointSaveError, match="(?s)step-00000200 failed:.*No space left.*"
                       "step-00000100 is intact") as info:
        save(mgr, engine, 200)
    assert isinstance(info.value.__cause__, OSError)
    # the partial directory is removed at once (it frees the space a full disk needs)
    assert not (mgr.dir / "step-00000200").exists()
    (mgr.dir / "step-00000200").mkdir()  # as a killed save leaves it: shards, no marker
    torch.save({}, mgr.dir / "step-00000200" / SHARD)
    # a restart sees the previous checkpoint only
    restarted = manager(tmp_path)
    assert restarted.latest_step() == 100 and restarted.complete_steps() == [100]
    assert latest_file(restarted) == "step-00000100"
    fresh = FakeEngine()
    restarted.load(fresh, restarted.latest_step())
    assert fresh.weight == 1.0
    # the next save removes the partial directory before writing its own
    engine.fail_after_first_shard = False
    save(restarted, engine, 300)
    assert dirs(restarted) == ["step-00000100", "step-00000300"]
    assert restarted.latest_step() == 300 and latest_file(restarted) == "step-00000300"


def test_a_failed_step_can_be_saved_again(tmp_path):
    mgr, engine = manager(tmp_path), FakeEngine(weight=3.0)
    engine.fail_after_first_shard = True
    with pytest.raises(CheckpointSaveError):
        save(mgr, engine, 50)
    assert mgr.latest_step() is None and not (mgr.dir / "latest").exists()
    engine.fail_after_first_shard = False
    save(mgr, engine, 50)  # not mistaken for "already saved": the partial one is replaced
    assert engine.saves == ["step-00000050", "step-00000050"]
    assert mgr.latest_step() == 50 and (mgr.dir / "step-00000050" / OPTIM_SHARD).is_file()


@pytest.mark.parametrize("pointer", ["step-00000900", "step-00000150", "garbage\n", ""])
def test_a_stale_latest_pointer_never_changes_the_resume_step(tmp_path, pointer):
    mgr, engine = manager(tmp_path), FakeEngine()
    for step in (50, 100):
        save(mgr, engine, step)
    (mgr.dir / "step-00000150").mkdir()  # incomplete: shards, no marker
    torch.save({}, mgr.dir / "step-00000150" / SHARD)
    (mgr.dir / "latest").write_text(pointer)
    assert mgr.latest_step() == 100 and mgr.complete_steps() == [50, 100]


def test_only_well_named_directories_with_the_marker_count(tmp_path):
    mgr = manager(tmp_path)
    for name in ("step-100", "global_step300", "step-00000300.old", "step-0000030x"):
        (mgr.dir / name).mkdir(parents=True)
        (mgr.dir / name / MARKER).write_text("{}")
    (mgr.dir / "step-00000400").mkdir()  # the right name without the marker
    (mgr.dir / "latest").write_text("step-00000400")
    assert mgr.latest_step() is None
    (mgr.dir / "step-00000020").mkdir()
    (mgr.dir / "step-00000020" / MARKER).write_text("{}")
    assert mgr.latest_step() == 20
    assert mgr.remove_incomplete() == ["step-00000400"]  # other names are not ours to delete
    assert sorted(p.name for p in mgr.dir.iterdir()) == sorted(
        ["step-100", "global_step300", "step-00000300.old", "step-0000030x", "step-00000020",
         "latest"])


def test_a_complete_step_of_another_trajectory_is_never_overwritten(tmp_path):
    save(manager(tmp_path), FakeEngine(weight=1.0), 10)
    marker = (manager(tmp_path).dir / "step-00000010" / MARKER).read_text()
    # another process (a restart that did not resume from it) reaches step 10 with other weights
    mgr = manager(tmp_path)
    with pytest.raises(CheckpointExistsError, match="step-00000010 is already a complete"):
        save(mgr, FakeEngine(weight=2.0), 10)
    assert (mgr.dir / "step-00000010" / MARKER).read_text() == marker
    fresh = FakeEngine()
    mgr.load(fresh, 10)
    assert fresh.weight == 1.0
    save(mgr, FakeEngine(weight=1.0), 10)  # once resumed from it, saving it again is a no-op


# ---- background saves --------------------------------------------------------------------------
class BackgroundEngine(FakeEngine):
    """prepare_save as EngineState offers it: the write waits for `release` (or fails)."""

    def __init__(self, weight: float = 0.0):
        super().__init__(weight)
        self.release = threading.Event()
        self.events: list[str] = []
        self.fail = False
        self.copies: list[bool] = []

    def prepare_save(self, save_dir, tag, *, copy=True):
        self.copies.append(copy)  # a background save must not write from live training memory
        weight = self.weight  # the snapshot

        def write():
            self.events.append(f"start {tag}")
            assert self.release.wait(30)
            if self.fail:
                raise OSError(28, "No space left on device")
            d = Path(save_dir) / tag
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"weight": torch.tensor(weight)}, d / SHARD)
            self.events.append(f"end {tag}")

        return write


def test_a_background_save_commits_only_after_its_write(tmp_path):
    mgr, engine = manager(tmp_path), BackgroundEngine(weight=1.0)
    engine.release.set()
    save(mgr, engine, 1)  # in the foreground, writing from the engine's memory
    engine.release.clear()
    path = mgr.save(engine, 2, {"step": 2, "samples_seen": 16}, "x: 2\n", background=True)
    engine.weight = 5.0  # training goes on: the checkpoint keeps the snapshot
    mgr.poll()
    assert mgr.latest_step() == 1 and not (path / MARKER).exists()
    assert latest_file(mgr) == "step-00000001"
    engine.release.set()
    mgr.wait()
    assert mgr.latest_step() == 2 and latest_file(mgr) == "step-00000002"
    assert engine.copies == [False, True]
    fresh = FakeEngine()
    assert manager(tmp_path).load(fresh, 2)["samples_seen"] == 16
    assert fresh.weight == 1.0


def test_at_most_one_background_save_is_in_flight(tmp_path):
    mgr, engine = manager(tmp_path), BackgroundEngine()
    threading.Timer(0.3, engine.release.set).start()
    mgr.save(engine, 1, {"step": 1}, "", background=True)
    mgr.save(engine, 2, {"step": 2}, "", background=True)  # waits for the first
    assert engine.events[:2] == ["start step-00000001", "end step-00000001"]
    mgr.wait()
    assert engine.events == ["start step-00000001", "end step-00000001",
                             "start step-00000002", "end step-00000002"]
    assert mgr.complete_steps() == [1, 2]


def test_a_background_failure_reaches_the_training_loop(tmp_path):
    mgr, engine = manager(tmp_path), BackgroundEngine()
    engine.release.set()
    mgr.save(engine, 1, {"step": 1}, "", background=True)
    mgr.wait()
    engine.fail = True
    mgr.save(engine, 2, {"step": 2}, "", background=True)
    deadline = time.monotonic() + 30
    with pytest.raises(CheckpointSaveError, match="(?s)step-00000002 failed.*No space left.*"
                       "step-00000001 is intact"):
        while time.monotonic() < deadline:  # the loop polls at every step
            mgr.poll()
            time.sleep(0.01)
    assert mgr.complete_steps() == [1] and latest_file(mgr) == "step-00000001"
    assert not (mgr.dir / "step-00000002").exists()
    mgr.wait()  # raised once: nothing is in flight any more


# ---- retention ---------------------------------------------------------------------------------
def test_keep_last_keeps_the_newest_complete_checkpoints(tmp_path):
    mgr, engine = manager(tmp_path, keep_last=2), FakeEngine()
    for step in (10, 20, 30, 40):
        save(mgr, engine, step)
        assert latest_file(mgr) == tag_for(step)
    assert dirs(mgr) == ["step-00000030", "step-00000040"]
    assert mgr.complete_steps() == [30, 40]


def test_keep_last_one(tmp_path):
    mgr, engine = manager(tmp_path, keep_last=1), FakeEngine()
    for step in (1, 2, 3):
        save(mgr, engine, step)
    assert dirs(mgr) == ["step-00000003"] and mgr.latest_step() == 3


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be at least 1, got 0"):
        manager(tmp_path, keep_last=0)


def test_saving_an_already_complete_step_is_a_no_op(tmp_path):
    mgr, engine = manager(tmp_path), FakeEngine(weight=1.0)
    path = save(mgr, engine, 60)
    marker = (path / MARKER).read_text()
    engine.weight = 99.0  # e.g. the final save right after the periodic one
    assert mgr.save(engine, 60, {"step": -1}, "other") == path
    assert engine.saves == ["step-00000060"]
    assert (path / MARKER).read_text() == marker
    assert mgr.read_train_state(60)["step"] == 60
    fresh = FakeEngine()
    mgr.load(fresh, 60)
    assert fresh.weight == 1.0


# ---- RNG ---------------------------------------------------------------------------------------
def draw() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            np.random.randn(), torch.randint(0, 1000, (2,)).tolist())


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state: it must round-trip too
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = draw()
    draw()  # move every generator on
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


def test_load_restores_this_ranks_rng(tmp_path):
    mgr, engine = manager(tmp_path), FakeEngine()
    torch.manual_seed(10), np.random.seed(11), random.seed(12)
    save(mgr, engine, 7)
    expected = draw()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    mgr.load(engine, 7)
    assert draw() == expected
    rng = torch.load(mgr.dir / "step-00000007" / "rng-rank00000.pt", weights_only=True)
    assert set(rng) == {"torch", "cuda", "numpy", "python"}


# ---- config comparison -------------------------------------------------------------------------
def test_diff_dicts_lists_nested_differences_with_both_values():
    saved = {"n_layer": 2, "attn": {"heads": 4, "rope": {"theta": 10000.0}}, "dropout": 0.0,
             "old": 1}
    current = {"n_layer": 3, "attn": {"heads": 4, "rope": {"theta": 500.0}}, "dropout": 0.0,
               "new": "x"}
    assert diff_dicts(saved, current, "model.") == [
        "model.attn.rope.theta: checkpoint has 10000.0, config has 500.0",
        "model.n_layer: checkpoint has 2, config has 3",
        "model.new: checkpoint has '<missing>', config has 'x'",
        "model.old: checkpoint has 1, config has '<missing>'",
    ]
    assert diff_dicts(saved, json.loads(json.dumps(saved))) == []
    # a dict replaced by a scalar is one difference, not a crash
    assert diff_dicts({"a": {"b": 1}}, {"a": 2}) == ["a: checkpoint has {'b': 1}, config has 2"]


# ---- the real DeepSpeed engine -----------------------------------------------------------------
DEEPSPEED_RESUME = textwrap.dedent("""
    import json, sys
    import deepspeed, torch
    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import OptimConfig
    from pretrain.schedule import lr_factor_fn

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    optim = OptimConfig(lr=0.05, min_lr=0.005, warmup_steps=2, decay_steps=6)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "train_batch_size": 4, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen))
               for _ in range(4)]

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(16, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=0.1)
        engine, _, _, sched = deepspeed.initialize(
            model=model, optimizer=opt, config=ds_config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_factor_fn(optim, 6)))
        return engine, sched

    def step(engine, sched, i):
        x, y = batches[i]
        lr = sched.get_last_lr()[0]
        loss = torch.nn.functional.mse_loss(engine(x), y)  # dropout: the RNG matters
        engine.backward(loss)
        engine.step()
        return [loss.item(), lr]

    mgr = CheckpointManager(sys.argv[1], keep_last=2, rank=0, world_size=1)
    engine, sched = build(seed=1)
    first = [step(engine, sched, i) for i in range(2)]
    mgr.save(engine, 2, {"step": 2, "samples_seen": 8}, "x: 1\\n")
    whole = [step(engine, sched, i) for i in (2, 3)]

    engine, sched = build(seed=2)  # other initial weights: only the load can make them equal
    before = step(engine, sched, 2)
    engine, sched = build(seed=2)
    state = mgr.load(engine, mgr.latest_step())
    resumed = [step(engine, sched, i) for i in (2, 3)]
    print("RESULT " + json.dumps({"first": first, "whole": whole, "resumed": resumed,
                                  "before": before, "state": state}))
""")


@pytest.mark.slow
def test_real_deepspeed_resume_continues_with_identical_losses(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    # lr_at: warmup 0.025, 0.05, then cosine from 0.05 over steps 2..6
    assert [lr for _, lr in r["first"]] == pytest.approx([0.025, 0.05])
    assert r["whole"][0][1] == pytest.approx(0.05) and r["whole"][1][1] < 0.05
    assert r["resumed"] == r["whole"]  # losses and lrs bit for bit
    assert r["before"][0] != r["whole"][0][0]  # without the load the loss differs
    assert r["state"] == {"step": 2, "samples_seen": 8}
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (ckpt / MARKER).is_file() and list(ckpt.glob("*optim_states.pt"))


def test_weights_file_round_trip_and_refusal_of_another_model(tmp_path):
    """The weights file `consolidate` and `import` write: the whole model, a tied matrix once,
    the model config in the header; a model of another config is refused, naming the keys."""
    from pretrain.config import ModelConfig
    from pretrain.model import build_model
    from pretrain.saved_model import (
        SavedModelError, load_weights_file, model_from_weights_file, save_weights_file,
        unique_state,
    )

    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16)
    torch.manual_seed(0)
    model = build_model(cfg, 64)
    path = save_weights_file(unique_state(model), tmp_path / "w.safetensors", model=cfg,
                             vocab_size=64)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "wte.weight" in f.keys() and "lm_head.weight" not in f.keys()  # tied: once
    back = model_from_weights_file(path)
    assert back.lm_head.weight is back.wte.weight
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name

    deeper = build_model(cfg.model_copy(update={"n_layer": 3}), 64)
    with pytest.raises(SavedModelError, match=r"do not fit the model config") as e:
        load_weights_file(deeper, path)
    assert "h.2.attn.q_proj.weight" in str(e.value)  # the missing keys are listed
