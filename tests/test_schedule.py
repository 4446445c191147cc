"""pretrain/schedule.py: warmup, cosine / linear / constant decay, degenerate lengths, and the
LambdaLR the trainer builds from it (including a resume from the scheduler's state_dict)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.schedule import lr_at, lr_factor_fn


def optim(**kw) -> OptimConfig:
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, schedule="cosine")
    return OptimConfig(**{**base, **kw})


def test_warmup_rises_linearly_from_lr_over_warmup_to_lr():
    o = optim()
    got = [lr_at(s, o, max_steps=500) for s in range(10)]
    assert got == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)], rel=1e-12)
    assert got[0] == pytest.approx(1e-4) and got[-1] == pytest.approx(1e-3)
    assert lr_at(10, o, 500) == pytest.approx(1e-3)  # the first decay step starts at the peak


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, optim(warmup_steps=0), 100) == pytest.approx(1e-3)


def test_cosine_reaches_min_lr_at_decay_end_and_stays():
    o = optim()  # warmup 10, decay to step 110: 100 decay steps
    for s in range(10, 111):
        want = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 10) / 100))
        assert lr_at(s, o, 500) == pytest.approx(want, rel=1e-12), s
    assert lr_at(60, o, 500) == pytest.approx((1e-3 + 1e-4) / 2)  # half way: the mean
    assert lr_at(110, o, 500) == pytest.approx(1e-4)
    assert [lr_at(s, o, 500) for s in (111, 200, 10_000)] == [pytest.approx(1e-4)] * 3
    decay = [lr_at(s, o, 500) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_linear_decay():
    o = optim(schedule="linear")
    assert lr_at(10, o, 500) == pytest.approx(1e-3)
    assert lr_at(35, o, 500) == pytest.approx(1e-3 - 0.25 * 9e-4)
    assert lr_at(60, o, 500) == pytest.approx(5.5e-4)
    assert lr_at(110, o, 500) == pytest.approx(1e-4)
    assert lr_at(300, o, 500) == pytest.approx(1e-4)


def test_constant_keeps_the_peak_after_warmup():
    o = optim(schedule="constant")
    assert lr_at(4, o, 50) == pytest.approx(5e-4)
    assert [lr_at(s, o, 50) for s in (10, 50, 10_000)] == [pytest.approx(1e-3)] * 3


def test_decay_length_defaults_to_max_steps():
    o = optim(decay_steps=None)
    assert lr_at(60, o, max_steps=110) == pytest.approx(lr_at(60, optim(), max_steps=999))
    assert lr_at(110, o, max_steps=110) == pytest.approx(1e-4)
    assert lr_at(60, o, max_steps=210) > lr_at(60, o, max_steps=110)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("decay_steps", [1, 5, 10])
def test_decay_shorter_than_warmup_is_over_when_warmup_ends(schedule, decay_steps):
    # decay_steps <= warmup_steps: no division by zero, warmup unchanged, then min_lr (the decay
    # "ended" at step decay_steps), as with decay_steps = warmup + 1 one step later.
    o = optim(warmup_steps=10, decay_steps=decay_steps, schedule=schedule)
    assert [lr_at(s, o, 100) for s in range(10)] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert [lr_at(s, o, 100) for s in (10, 11, 99)] == [pytest.approx(1e-4)] * 3
    one_more = optim(warmup_steps=10, decay_steps=11, schedule=schedule)
    assert lr_at(10, one_more, 100) == pytest.approx(1e-3)
    assert lr_at(11, one_more, 100) == pytest.approx(1e-4)


def test_max_steps_inside_warmup_never_divides_by_zero():
    o = optim(warmup_steps=50, decay_steps=None)
    assert [lr_at(s, o, 20) for s in range(25)] == pytest.approx([2e-5 * (s + 1) for s in range(25)])
    assert lr_at(50, o, 20) == pytest.approx(1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lambda_lr_gives_lr_at_every_step_and_resumes(schedule):
    o = optim(warmup_steps=3, decay_steps=12, schedule=schedule)
    param = torch.nn.Parameter(torch.zeros(2))

    def make():
        opt = torch.optim.SGD([param], lr=o.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_fn(o, max_steps=20))

    opt, sched = make()
    for step in range(8):  # the update number `step` uses lr_at(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, o, 20), rel=1e-12), step
        opt.step()
        sched.step()
    # resume as DeepSpeed does it: fresh optimizer and scheduler, then both state dicts (the
    # optimizer's param_groups carry the current lr; the scheduler's state only last_epoch)
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for step in range(8, 16):
        assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(step, o, 20), rel=1e-12), step
        opt2.step()
        sched2.step()
