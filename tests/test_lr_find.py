"""lr-find: exact restore, an exponential schedule, the smoothing formula, a suggestion below a
known divergence point, and the command end to end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import mixcls.lr_find as lr_find
from mixcls.cli import main
from mixcls.config import ConfigError, load_config
from mixcls.lr_find import (LRFindResult, lr_schedule, range_test, smooth_losses, suggest_lr)
from mixcls.mix import Mixer
from mixcls.runs import RunError

CPU = torch.device("cpu")


def _ce(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    return -(soft_targets * logits.float().log_softmax(1)).sum(1).mean()


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # batch norm and dropout: buffers and mode must come back too
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 3))


def _batches(seed: int, n: int = 3, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=gen), torch.randint(0, 3, (batch,), generator=gen))
            for _ in range(n)]


def _clone_tree(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tree(v) for v in value)
    return value


def _assert_bit_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bit_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bit_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=3e-3)


@pytest.mark.parametrize("optimizer_name, warm_steps", [("adamw", 3), ("adamw", 0), ("sgd", 2)])
def test_range_test_restores_model_and_optimizer_bit_for_bit(optimizer_name: str, warm_steps: int) -> None:
    model = _net(0)
    optimizer = _make_optimizer(optimizer_name, model)
    for images, labels in _batches(1, n=warm_steps):  # real moments (Adam's exp_avg, exp_avg_sq, step)
        optimizer.zero_grad()
        _ce(model(images), nn.functional.one_hot(labels, 3).float()).backward()
        optimizer.step()
    _ce(model(_batches(2, n=1)[0][0]), torch.full((8, 3), 1 / 3)).backward()  # leave gradients in place
    model.eval()
    model_before = _clone_tree(model.state_dict())
    optimizer_before = _clone_tree(optimizer.state_dict())
    grads_before = [p.grad.clone() for p in model.parameters()]
    rng_before = torch.get_rng_state()
    first_weight = model[0].weight.detach().clone()
    weights_seen = []

    def loss_fn(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        weights_seen.append(model[0].weight.detach().clone())
        return _ce(logits, soft_targets)

    result = range_test(model, _batches(3), optimizer, loss_fn=loss_fn, device=CPU, num_classes=3,
                        min_lr=1e-4, max_lr=1.0, steps=12, accum_steps=2, mixer=Mixer("mixup"),
                        generator=torch.Generator().manual_seed(0))
    assert len(result.lrs) >= 2 and not torch.equal(weights_seen[-1], first_weight)  # it did train
    _assert_bit_equal(model.state_dict(), model_before, "model")
    _assert_bit_equal(optimizer.state_dict(), optimizer_before, "optimizer")
    assert optimizer.state_dict()["param_groups"][0]["lr"] == optimizer_before["param_groups"][0]["lr"]
    assert len(optimizer.state) == len(optimizer_before["state"])  # no moments left by the test
    for p, grad in zip(model.parameters(), grads_before):
        assert torch.equal(p.grad, grad)
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_range_test_restores_after_an_exception() -> None:
    model = _net(4)
    optimizer = _make_optimizer("adamw", model)
    model_before, optimizer_before = _clone_tree(model.state_dict()), _clone_tree(optimizer.state_dict())
    calls = []

    def loss_fn(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return _ce(logits, soft_targets)

    with pytest.raises(KeyboardInterrupt):
        range_test(model, _batches(5), optimizer, loss_fn=loss_fn, device=CPU, num_classes=3,
                   min_lr=1e-3, max_lr=1.0, steps=20)
    _assert_bit_equal(model.state_dict(), model_before, "model")
    _assert_bit_equal(optimizer.state_dict(), optimizer_before, "optimizer")


class _RecordingSGD(torch.optim.SGD):
    """SGD that records every param group's lr at each step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_lrs: list[list[float]] = []

    def step(self, closure=None):
        self.seen_lrs.append([group["lr"] for group in self.param_groups])
        return super().step(closure)


class _CountingLoader:
    """Four batches per pass; counts the passes (the range test must cycle it)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("min_lr, max_lr, steps, accum_steps", [(1e-7, 10.0, 100, 1), (3e-6, 2e-3, 25, 3)])
def test_lr_schedule_is_exactly_exponential(min_lr: float, max_lr: float, steps: int, accum_steps: int) -> None:
    expected = np.geomspace(min_lr, max_lr, steps)
    np.testing.assert_allclose(lr_schedule(min_lr, max_lr, steps), expected, rtol=1e-12, atol=0)
    model = _net(1)
    optimizer = _RecordingSGD(_make_optimizer("sgd", model).param_groups, lr=0.1)
    loader = _CountingLoader(_batches(6, n=4))
    # A loss that cannot diverge (a constant plus 0 x the logits) lets every planned step run.
    result = range_test(model, loader, optimizer, loss_fn=lambda z, t: 0 * z.sum() + 1.0, device=CPU,
                        num_classes=3, min_lr=min_lr, max_lr=max_lr, steps=steps,
                        accum_steps=accum_steps)
    assert not result.stopped_early
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-12, atol=0)
    seen = np.array(optimizer.seen_lrs)
    assert seen.shape == (steps, 2)  # one optimizer step per accumulation group, both groups
    np.testing.assert_allclose(seen, np.stack([expected, expected], axis=1), rtol=1e-12, atol=0)
    assert loader.passes == -(-steps * accum_steps // 4)  # cycled, never more than needed


@pytest.mark.parametrize("beta", [0.98, 0.9, 0.5, 0.0])
def test_smoothing_equals_the_bias_corrected_ema(beta: float) -> None:
    losses = np.random.default_rng(7).lognormal(size=200)
    smoothed = smooth_losses(losses, beta=beta)
    # pandas' adjusted EWM weights loss_j by (1 - alpha)^(i - j) over their sum: the same thing.
    expected = pd.Series(losses).ewm(alpha=1 - beta, adjust=True).mean().to_numpy()
    np.testing.assert_allclose(smoothed, expected, rtol=1e-10)
    i = np.arange(len(losses))[:, None]
    j = np.arange(len(losses))[None, :]
    weights = np.where(j <= i, (1 - beta) * beta ** np.maximum(i - j, 0), 0.0)
    closed_form = weights @ losses / (1 - beta ** (np.arange(len(losses)) + 1))
    np.testing.assert_allclose(smoothed, closed_form, rtol=1e-10)


def test_range_test_smooths_what_it_records() -> None:
    model = _net(2)
    result = range_test(model, _batches(8), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                        device=CPU, num_classes=3, min_lr=1e-4, max_lr=1e-1, steps=15, beta=0.9)
    expected = pd.Series(result.losses).ewm(alpha=0.1, adjust=True).mean().to_numpy()
    np.testing.assert_allclose(result.smoothed, expected, rtol=1e-10)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_range_test_under_sam_takes_the_trainers_sam_steps(accum_steps: int) -> None:
    from mixcls.engine import train_one_epoch
    from mixcls.sam import Sharpness

    steps = 10
    sharpness, batches = Sharpness(0.5, adaptive=True), _batches(5, n=steps * accum_steps)
    model = _net(6)
    model.eval()  # the range test puts it in train mode and back, its BatchNorm statistics too
    result = range_test(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                        device=CPU, num_classes=3, min_lr=1e-3, max_lr=1e-1, steps=steps,
                        accum_steps=accum_steps, sharpness=sharpness)
    # The trainer, one group at a time at the range test's lrs: the loss of each step is the
    # first pass's at the weights the steps before it left. Dropout draws from the global RNG,
    # which the range test forks from the same state.
    reference = _net(6)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    expected = []
    with torch.random.fork_rng(devices=[]):
        for k, lr in enumerate(lr_schedule(1e-3, 1e-1, steps)):
            optimizer.param_groups[0]["lr"] = float(lr)
            group = batches[k * accum_steps:(k + 1) * accum_steps]
            stats = train_one_epoch(reference, group, optimizer, loss_fn=_ce, device=CPU,
                                    num_classes=3, accum_steps=accum_steps, sharpness=sharpness,
                                    progress=False)
            expected.append(stats.loss)
    assert len(result.losses) == steps and not result.stopped_early
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)
    plain = range_test(_net(6), batches, torch.optim.SGD(_net(6).parameters(), lr=0.1), loss_fn=_ce,
                       device=CPU, num_classes=3, min_lr=1e-3, max_lr=1e-1, steps=steps,
                       accum_steps=accum_steps)
    assert plain.losses[0] == pytest.approx(result.losses[0])  # the same first pass at w
    assert not np.allclose(plain.losses[1:], result.losses[1:], rtol=1e-5)


def _least_squares(seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Isotropic linear regression; plain gradient descent on the MSE diverges for lr > 2 / L."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 8))
    y = x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(256, 1))
    hessian = 2 * x.T @ x / len(x)  # of mean((x w - y)^2)
    return x, y, 2 / float(np.linalg.eigvalsh(hessian).max())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_suggestion_is_below_the_known_divergence_point(seed: int) -> None:
    x, y, critical_lr = _least_squares(seed)
    model = nn.Linear(8, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    steps = 100
    result = range_test(model, [(torch.tensor(x), torch.tensor(y))], torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_fn=lambda out, t: ((out - t) ** 2).mean(), device=CPU, num_classes=1,
                        min_lr=1e-7, max_lr=10.0, steps=steps)
    steepest, min10 = suggest_lr(result), suggest_lr(result, rule="min10")
    assert critical_lr / 10 < steepest < critical_lr
    assert critical_lr / 10 < min10 < critical_lr
    # It stopped by the divergence rule, at the first step that broke it, some steps past 2 / L.
    assert result.stopped_early and len(result.lrs) < steps
    assert result.smoothed[-1] > 4 * result.smoothed.min()
    assert all(result.smoothed[i] <= 4 * result.smoothed[:i + 1].min() for i in range(len(result.lrs) - 1))
    assert critical_lr < result.lrs[-1] < 20 * critical_lr


def test_suggest_lr_reads_the_steepest_descent_before_the_minimum() -> None:
    log_lrs = np.linspace(np.log(1e-6), np.log(1.0), 301)
    centre, lowest = np.log(1e-3), np.log(3e-2)
    # A tanh descent steepest at `centre`, a minimum at `lowest`, then a rise with a steeper fall
    # after the minimum (a later crash the rule must not pick).
    curve = 2 - np.tanh((log_lrs - centre) / 0.8)
    curve = np.where(log_lrs > lowest, curve + 0.5 * (log_lrs - lowest) ** 2, curve)
    crash = np.clip(log_lrs - np.log(0.3), 0, np.log(0.33 / 0.3))
    curve = curve - 10 * crash  # 8x steeper than the tanh, still above the minimum
    result = LRFindResult(lrs=np.exp(log_lrs), losses=curve, smoothed=curve, stopped_early=True)
    spacing = log_lrs[1] - log_lrs[0]
    assert abs(np.log(suggest_lr(result)) - centre) <= spacing + 1e-9
    at_min = np.exp(log_lrs[np.argmin(curve)])
    assert suggest_lr(result, rule="min10") == pytest.approx(at_min / 10)
    rising = LRFindResult(lrs=np.exp(log_lrs), losses=log_lrs, smoothed=log_lrs, stopped_early=False)
    with pytest.raises(RunError, match="never fell"):
        suggest_lr(rising)
    with pytest.raises(ConfigError, match="suggest: 'valley'"):
        suggest_lr(result, rule="valley")


def _tiny_flags(data: Path) -> list[str]:
    return ["--data", str(data), "--model", "mixcls_cnn_tiny", "--img-size", "24", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--check-images", "header"]


@pytest.mark.slow
def test_lr_find_cli_end_to_end(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    import mixcls.runs
    from mixcls.run_setup import fold_rows, prepare_table

    saved, datasets = [], []
    real_save, real_dataset = mixcls.runs.atomic_save_figure, lr_find.ImageDataset
    monkeypatch.setattr(mixcls.runs, "atomic_save_figure",
                        lambda fig, path, **kw: saved.append(Path(path)) or real_save(fig, path, **kw))
    monkeypatch.setattr(lr_find, "ImageDataset",
                        lambda paths, *a, **kw: datasets.append(list(paths)) or real_dataset(paths, *a, **kw))
    out = tmp_path / "pictures" / "lr.png"
    code = main(["lr-find", *_tiny_flags(tiny_data), "--accum-steps", "2", "--mix", "cutmix",
                 "--steps", "12", "--min-lr", "1e-5", "--max-lr", "1", "--out", str(out)])
    assert code == 0
    assert saved == [out]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    assert sorted(p.name for p in out.parent.iterdir()) == ["lr.png"]  # no temporary left behind
    printed = capsys.readouterr().out
    value = float(re.search(r"suggested lr \(steepest\): (\S+)", printed).group(1))
    assert 1e-5 <= value <= 1.0
    # Batches came from fold 0's training rows only, never a validation row.
    table, folds = prepare_table(load_config(None, {"data": str(tiny_data), "check_images": "header"}))
    paths = table.frame["path"].to_numpy()
    train_rows, valid_rows = fold_rows(table, folds, 0)
    assert datasets == [list(paths[train_rows])] and not set(datasets[0]) & set(paths[valid_rows])


@pytest.mark.slow
def test_lr_find_with_loader_workers_sees_the_same_batches(tiny_data: Path) -> None:
    # deterministic transforms (preset none), so only the loader differs: its workers stack the
    # batches into reused shared buffers (mixcls.batch_ring)
    losses = []
    for workers in (0, 2):
        cfg = load_config(None, {"data": str(tiny_data), "model": "mixcls_cnn_tiny", "img_size": 24,
                                 "batch_size": 8, "workers": workers, "device": "cpu",
                                 "preset": "none", "check_images": "header"})
        result, _ = lr_find.find_lr_for_config(cfg, steps=12, min_lr=1e-5, max_lr=1.0,
                                               log=lambda message: None)
        losses.append(result.losses)
    assert len(losses[0]) >= 10
    np.testing.assert_array_equal(losses[1], losses[0])


@pytest.mark.parametrize("flags, message", [
    (["--min-lr", "0.1", "--max-lr", "0.1"], "max_lr: 0.1 must be a finite number > min_lr"),
    (["--min-lr", "1", "--max-lr", "0.5"], "max_lr: 0.5 must be a finite number > min_lr"),
    (["--min-lr", "0"], "min_lr: 0.0 must be a finite number > 0"),
    (["--steps", "9"], "steps: 9 must be >= 10"),
    (["--diverge-factor", "1"], "diverge_factor: 1.0 must be > 1"),
    (["--suggest", "valley"], "suggest: 'valley' is not one of steepest, min10"),
    (["--lr", "-1"], "lr: -1.0"),
])
def test_bad_flags_stop_before_any_work(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture, flags: list[str], message: str) -> None:
    import mixcls.run_setup

    def refuse(cfg):
        raise AssertionError("the table was read before the flags were checked")

    monkeypatch.setattr(mixcls.run_setup, "prepare_table", refuse)
    out = tmp_path / "lr.png"
    code = main(["lr-find", *_tiny_flags(tiny_data), *flags, "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_range_options_raise_config_error_in_the_library() -> None:
    model = _net(0)
    with pytest.raises(ConfigError, match="steps: 3"):
        range_test(model, _batches(0), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                   device=CPU, num_classes=3, min_lr=1e-5, max_lr=1.0, steps=3)
