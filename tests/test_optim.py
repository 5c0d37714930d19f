"""Learning-rate schedules read back from the optimizer, step by step, against their formulas
written out here (math / numpy), for seeded random settings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import copy

import torch.nn.functional as F

from mixcls.config import OPTIMIZERS, OptimConfig, SchedConfig
from mixcls.optim import build_optimizer, build_scheduler

SEEDS = [0, 1, 2, 3]


def lrs_over(name: str, *, steps_per_epoch: int, epochs: int, lr: float, **sched) -> np.ndarray:
    """The lr of every parameter group before each of the `steps_per_epoch * epochs` steps:
    (steps, groups)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=lr, weight_decay=0.01))
    scheduler = build_scheduler(optimizer, SchedConfig(name=name, **sched),
                                steps_per_epoch=steps_per_epoch, epochs=epochs)
    seen = []
    for _ in range(steps_per_epoch * epochs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.asarray(seen)


def cosine_reference(step: int, *, base: float, floor_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps reaching `base` at the last of them, then half a cosine
    from `base` down to `floor_lr` at step `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor_lr + (base - floor_lr) * (1 + math.cos(math.pi * min(t, 1.0))) / 2


@pytest.mark.parametrize("seed", SEEDS)
def test_cosine_with_warmup_and_floor(seed):
    rng = np.random.default_rng(seed)
    steps_per_epoch, epochs = int(rng.integers(3, 12)), int(rng.integers(2, 6))
    lr = float(10 ** rng.uniform(-4, -1))
    min_lr = lr * float(rng.uniform(0.01, 0.3))
    warmup_epochs = float(rng.choice([0.0, 0.5, 1.0, 1.5]))
    seen = lrs_over("cosine", steps_per_epoch=steps_per_epoch, epochs=epochs, lr=lr,
                    warmup_epochs=warmup_epochs, min_lr=min_lr)
    total, warmup = steps_per_epoch * epochs, round(warmup_epochs * steps_per_epoch)
    expected = [cosine_reference(s, base=lr, floor_lr=min_lr, warmup=warmup, total=total)
                for s in range(total)]
    assert seen.shape[1] == 2  # decay and no-decay groups follow the same schedule
    for group in range(2):
        np.testing.assert_allclose(seen[:, group], expected, rtol=1e-9)
    assert seen[warmup:].min() >= min_lr * (1 - 1e-12) and seen.max() <= lr * (1 + 1e-12)  # floor after warm-up
    if warmup:
        assert seen[warmup - 1, 0] == pytest.approx(lr) and np.all(np.diff(seen[:warmup, 0]) > 0)
    assert np.all(np.diff(seen[warmup:, 0]) <= 1e-15)  # non-increasing after the warm-up


def test_floor_above_the_peak_is_capped_at_the_peak():
    seen = lrs_over("cosine", steps_per_epoch=4, epochs=3, lr=1e-3, min_lr=5e-3)
    np.testing.assert_allclose(seen, 1e-3)  # a floor above the peak: a constant peak, never more


def onecycle_reference(step: int, *, max_lr: float, total: int, pct_start: float) -> float:
    """torch's documented OneCycleLR (cos annealing, two phases): from max_lr / 25 up to max_lr
    at step pct_start * total - 1, then down to max_lr / 25 / 1e4 at the last step."""
    initial, final = max_lr / 25.0, max_lr / 25.0 / 1e4
    peak = float(pct_start * total) - 1

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    if step <= peak:
        return anneal(initial, max_lr, step / peak)
    return anneal(max_lr, final, (step - peak) / (total - 1 - peak))


@pytest.mark.parametrize("seed", SEEDS)
def test_onecycle_peaks_at_the_warmup_end(seed):
    rng = np.random.default_rng(100 + seed)
    steps_per_epoch, epochs = int(rng.integers(4, 12)), int(rng.integers(2, 6))
    lr = float(10 ** rng.uniform(-4, -1))
    warmup_epochs = float(rng.choice([0.0, 1.0, 1.5]))
    seen = lrs_over("onecycle", steps_per_epoch=steps_per_epoch, epochs=epochs, lr=lr,
                    warmup_epochs=warmup_epochs)
    total, warmup = steps_per_epoch * epochs, round(warmup_epochs * steps_per_epoch)
    pct = warmup / total if warmup else 0.3  # without a warm-up: torch's default 30 % ramp
    expected = [onecycle_reference(s, max_lr=lr, total=total, pct_start=pct) for s in range(total)]
    np.testing.assert_allclose(seen[:, 0], expected, rtol=1e-9)
    np.testing.assert_allclose(seen[:, 1], seen[:, 0])
    assert seen[:, 0].max() <= lr * (1 + 1e-12)


def restarts_reference(step: int, *, base: float, floor_lr: float, first_cycle: int, t_mult: int) -> float:
    """SGDR by walking the cycles: within a cycle of length T at position t,
    floor + (base - floor) (1 + cos(pi t / T)) / 2; each next cycle is t_mult times longer."""
    length, start = first_cycle, 0
    while step >= start + length:
        start, length = start + length, length * t_mult
    return floor_lr + (base - floor_lr) * (1 + math.cos(math.pi * (step - start) / length)) / 2


@pytest.mark.parametrize("seed", SEEDS)
def test_cosine_restarts(seed):
    rng = np.random.default_rng(200 + seed)
    steps_per_epoch, t0, t_mult = int(rng.integers(2, 6)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
    epochs = t0 * (1 + t_mult + t_mult**2) + 1  # through at least two restarts
    lr = float(10 ** rng.uniform(-4, -1))
    min_lr = lr * float(rng.uniform(0.0, 0.2))
    seen = lrs_over("cosine_restarts", steps_per_epoch=steps_per_epoch, epochs=epochs, lr=lr,
                    t0=t0, t_mult=t_mult, min_lr=min_lr)
    expected = [restarts_reference(s, base=lr, floor_lr=min_lr, first_cycle=t0 * steps_per_epoch,
                                   t_mult=t_mult) for s in range(len(seen))]
    np.testing.assert_allclose(seen[:, 0], expected, rtol=1e-9, atol=1e-15)
    restarts = np.flatnonzero(np.diff(seen[:, 0]) > 0) + 1
    assert restarts[:2].tolist() == [t0 * steps_per_epoch, t0 * steps_per_epoch * (1 + t_mult)]
    assert np.all(seen[restarts, 0] == pytest.approx(lr))


def test_constant_and_unknown_names():
    np.testing.assert_allclose(lrs_over("constant", steps_per_epoch=3, epochs=2, lr=0.02), 0.02)
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, OptimConfig(name="lbfgs"))
    optimizer = build_optimizer(model, OptimConfig())
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_scheduler(optimizer, SchedConfig(name="step"), steps_per_epoch=2, epochs=2)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_exempt_biases_and_norms_from_weight_decay(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))  # materialise the lazy layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build_optimizer(model, OptimConfig(name=name, lr=0.01, weight_decay=0.05))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for pname, param in model.named_parameters():
        assert (id(param) in decay) == (param.ndim > 1), pname  # weights decay; biases, norms do not
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}


def _steps(model, optimizer, scheduler, n, data):
    x, y = data
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_and_resumes_bit_for_bit_from_its_state_dict(name):
    """What --resume relies on: the weights, optimizer and schedule saved after 3 steps and
    loaded into freshly built ones take the same next 3 steps as the run that went on."""
    torch.manual_seed(0)
    data = torch.randn(16, 4), torch.randint(0, 3, (16,))
    cfg, sched_cfg = OptimConfig(name=name, lr=0.01, weight_decay=0.05), SchedConfig(name="cosine")

    def build(model):
        optimizer = build_optimizer(model, cfg)
        return optimizer, build_scheduler(optimizer, sched_cfg, steps_per_epoch=4, epochs=2)

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    optimizer, scheduler = build(model)
    _steps(model, optimizer, scheduler, 3, data)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    _steps(model, optimizer, scheduler, 3, data)

    torch.manual_seed(1)  # other initial weights: everything must come from the saved state
    resumed = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    resumed.load_state_dict(saved[0])
    optimizer2, scheduler2 = build(resumed)
    optimizer2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    _steps(resumed, optimizer2, scheduler2, 3, data)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
        assert not torch.equal(saved[0][key], value), key  # the steps moved every tensor
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
