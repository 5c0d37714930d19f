"""Losses against slow float64 references written from the papers' formulas."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from mixcls.config import LOSSES as CONFIG_LOSSES
from mixcls.config import LossConfig
from mixcls.losses import LOSSES, build_loss, tempered_log_softmax

# (name, params): every loss, with and without smoothing, and the bi-tempered corners.
CASES = [
    ("ce", {}),
    ("ce", {"smoothing": 0.2}),
    ("label_smoothing", {}),
    ("label_smoothing", {"smoothing": 0.3}),
    ("bi_tempered", {"t1": 0.8, "t2": 1.4, "smoothing": 0.06}),
    ("bi_tempered", {"t1": 0.5, "t2": 2.0}),
    ("bi_tempered", {"t1": 1.0, "t2": 1.0}),
    ("bi_tempered", {"t1": 1.0, "t2": 1.4}),
    ("bi_tempered", {"t1": 0.7, "t2": 1.0}),
    ("symmetric_ce", {}),
    ("symmetric_ce", {"sce_alpha": 0.5, "sce_beta": 2.0, "smoothing": 0.1}),
    ("taylor_ce", {"taylor_order": 1}),
    ("taylor_ce", {"taylor_order": 6, "smoothing": 0.1}),
    ("focal", {"focal_gamma": 0.0}),
    ("focal", {"focal_gamma": 2.0, "smoothing": 0.1}),
    ("focal", {"focal_gamma": 0.5}),
    ("bce", {}),
    ("bce", {"smoothing": 0.1}),
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items()) or 'default'}" for name, params in CASES]


# ----- slow references: plain python loops in float64, one formula per paper -----

def _softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _log_t(x: float, t: float) -> float:
    if t == 1.0:
        return math.log(x) if x > 0 else -math.inf
    return (x ** (1.0 - t) - 1.0) / (1.0 - t)


def _exp_t(u: float, t: float) -> float:
    if t == 1.0:
        return math.exp(u)
    return max(1.0 + (1.0 - t) * u, 0.0) ** (1.0 / (1.0 - t))


def _tempered_softmax_row(row: list[float], t: float) -> list[float]:
    """exp_t(a - lambda) with lambda found by a bracketing root finder (not a fixed point)."""
    if t == 1.0:
        return _softmax_row(row)
    top = max(row)
    # sum_k exp_t(a_k - lam) is >= 1 at lam = max(a) and <= 1 once exp_t(max - lam) <= 1/K.
    upper = top - _log_t(1.0 / len(row), t)
    lam = brentq(lambda lam: sum(_exp_t(a - lam, t) for a in row) - 1.0, top, upper,
                 xtol=1e-15, rtol=4 * np.finfo(float).eps)
    return [_exp_t(a - lam, t) for a in row]


def _bi_tempered_row(y: list[float], row: list[float], t1: float, t2: float) -> float:
    p = _tempered_softmax_row(row, t2)
    total = 0.0
    for yk, pk in zip(y, p):
        y_log = 0.0 if yk == 0 else yk * _log_t(yk, t1)
        total += y_log - yk * _log_t(pk, t1) - (yk ** (2 - t1) - pk ** (2 - t1)) / (2 - t1)
    return total


def _row_loss(name: str, params: dict, y: list[float], row: list[float]) -> float:
    p = _softmax_row(row)
    if name in ("ce", "label_smoothing"):
        return -sum(yk * math.log(pk) for yk, pk in zip(y, p))
    if name == "focal":
        gamma = params.get("focal_gamma", 2.0)
        return -sum(yk * (1 - pk) ** gamma * math.log(pk) for yk, pk in zip(y, p))
    if name == "taylor_ce":
        n = params.get("taylor_order", 2)
        return sum(yk * sum((1 - pk) ** i / i for i in range(1, n + 1)) for yk, pk in zip(y, p))
    if name == "symmetric_ce":
        alpha, beta = params.get("sce_alpha", 0.1), params.get("sce_beta", 1.0)
        ce = -sum(yk * math.log(pk) for yk, pk in zip(y, p))
        rce = -sum(pk * (max(math.log(yk), -4.0) if yk > 0 else -4.0) for yk, pk in zip(y, p))
        return alpha * ce + beta * rce
    if name == "bi_tempered":
        return _bi_tempered_row(y, row, params.get("t1", 0.8), params.get("t2", 1.4))
    if name == "bce":  # one sigmoid per class, not the softmax: the mean of K binary losses
        sig = [1 / (1 + math.exp(-z)) for z in row]
        return -sum(yk * math.log(s) + (1 - yk) * math.log(1 - s) for yk, s in zip(y, sig)) / len(row)
    raise AssertionError(name)


def reference_loss(name: str, params: dict, logits: np.ndarray, targets: np.ndarray) -> float:
    """Batch mean of the loss, targets (B,) indices or (B, K) soft, smoothing as the paper's."""
    batch, k = logits.shape
    eps = params.get("smoothing", 0.0)
    if name == "label_smoothing" and eps == 0:
        eps = 0.1
    total = 0.0
    for b in range(batch):
        if targets.ndim == 1:
            y = [1.0 if c == targets[b] else 0.0 for c in range(k)]
        else:
            y = [float(v) for v in targets[b]]
        y = [(1 - eps) * v + eps / k for v in y]
        total += _row_loss(name, params, y, [float(v) for v in logits[b]])
    return total / batch


# ----- tests -----

def _random_batch(seed: int, *, batch: int = 6, k: int = 5, scale: float = 3.0, soft: bool = True):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, size=(batch, k))
    if soft:
        targets = rng.dirichlet(np.full(k, 0.7), size=batch)
        targets[0] = np.eye(k)[rng.integers(k)]  # a hard row inside a soft batch (zeros in y)
    else:
        targets = rng.integers(0, k, size=batch)
    return logits, targets


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
@pytest.mark.parametrize("soft", [True, False], ids=["soft", "index"])
def test_loss_matches_float64_reference(case: int, soft: bool) -> None:
    name, params = CASES[case]
    logits, targets = _random_batch(1000 + 17 * case + soft, soft=soft)
    expected = reference_loss(name, params, logits, targets)
    loss_fn = build_loss(name, **params)
    got64 = loss_fn(torch.tensor(logits), torch.tensor(targets)).item()
    assert got64 == pytest.approx(expected, rel=1e-9, abs=1e-12)
    got32 = loss_fn(torch.tensor(logits, dtype=torch.float32),
                    torch.tensor(targets, dtype=torch.float32 if soft else torch.int64))
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_weighted_loss_is_the_weighted_mean_of_the_reference_rows(case: int) -> None:
    name, params = CASES[case]
    logits, targets = _random_batch(3000 + case, batch=7)
    weights = np.random.default_rng(case).uniform(0, 3, size=7)
    weights[2] = 0.0  # a row that must not count at all
    rows = np.array([reference_loss(name, params, logits[i:i + 1], targets[i:i + 1]) for i in range(7)])
    loss_fn = build_loss(name, **params)
    got = loss_fn(torch.tensor(logits), torch.tensor(targets), torch.tensor(weights)).item()
    assert got == pytest.approx(float((weights * rows).sum() / weights.sum()), rel=1e-9, abs=1e-12)
    ones = loss_fn(torch.tensor(logits), torch.tensor(targets), torch.ones(7, dtype=torch.float64))
    assert ones.item() == pytest.approx(loss_fn(torch.tensor(logits), torch.tensor(targets)).item(),
                                        rel=1e-12)
    with pytest.raises(ValueError, match=r"weights \(6,\)"):
        loss_fn(torch.tensor(logits), torch.tensor(targets), torch.ones(6))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_bi_tempered_at_unit_temperatures_is_ce_minus_target_entropy(seed: int) -> None:
    logits, soft = _random_batch(seed, batch=9, k=4)
    logits, soft = torch.tensor(logits), torch.tensor(soft)
    bi = build_loss("bi_tempered", t1=1.0, t2=1.0)
    ce = build_loss("ce")
    entropy = -torch.xlogy(soft, soft).sum(dim=1).mean()
    assert bi(logits, soft).item() == pytest.approx((ce(logits, soft) - entropy).item(), rel=1e-12)
    labels = torch.tensor(np.random.default_rng(seed).integers(0, 4, size=9))
    assert bi(logits, labels).item() == pytest.approx(ce(logits, labels).item(), rel=1e-12)


@pytest.mark.parametrize("t", [1.1, 1.4, 2.0, 3.0])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_tempered_softmax_matches_root_finder(t: float, scale: float) -> None:
    rng = np.random.default_rng(int(t * 100 + scale))
    logits = rng.normal(0, scale, size=(8, 5))
    expected = np.array([_tempered_softmax_row(list(row), t) for row in logits])
    got = tempered_log_softmax(torch.tensor(logits), t).exp().numpy()
    # 30 fixed-point steps leave lambda within ~1e-8 of the root at t = 3 (1e-14 at t <= 2).
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-8)
    # float32: compare with the exact result for the float32-rounded logits (at 1e4 their
    # rounding alone moves the probabilities by ~1e-4).
    logits32 = torch.tensor(logits, dtype=torch.float32)
    expected32 = np.array([_tempered_softmax_row(list(row), t) for row in logits32.double().numpy()])
    got32 = tempered_log_softmax(logits32, t).exp().numpy()
    np.testing.assert_allclose(got32, expected32, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t1,t2", [(0.8, 1.4), (0.5, 2.0), (1.0, 1.2)])
def test_bi_tempered_gradient_matches_finite_differences(t1: float, t2: float) -> None:
    # The normaliser has a hand-written backward (implicit differentiation); gradcheck compares
    # it with central differences of the forward.
    logits, soft = _random_batch(int(t1 * 10 + t2 * 100), batch=4, k=5)
    loss_fn = build_loss("bi_tempered", t1=t1, t2=t2, smoothing=0.05)
    x = torch.tensor(logits, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, torch.tensor(soft)), (x,), eps=1e-6, atol=1e-7)


def _extreme_logits(seed: int, batch: int = 8, k: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    logits = rng.choice([-1e4, 1e4], size=(batch, k)) * rng.uniform(0.5, 1.0, size=(batch, k))
    logits[0] = 1e4  # a tie at the top
    logits[1] = -1e4
    return torch.tensor(logits, dtype=torch.float32)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_gradients_finite_for_extreme_logits_fp32(case: int) -> None:
    name, params = CASES[case]
    loss_fn = build_loss(name, **params)
    logits = _extreme_logits(case).requires_grad_(True)
    rng = np.random.default_rng(case)
    for targets in (torch.tensor(rng.dirichlet(np.ones(5), size=8), dtype=torch.float32),
                    torch.tensor(rng.integers(0, 5, size=8))):
        logits.grad = None
        loss = loss_fn(logits, targets)
        loss.backward()
        assert torch.isfinite(loss), (name, loss)
        assert torch.isfinite(logits.grad).all(), (name, logits.grad)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_gradients_finite_under_bf16_autocast(case: int) -> None:
    name, params = CASES[case]
    loss_fn = build_loss(name, **params)
    torch.manual_seed(case)
    layer = torch.nn.Linear(16, 5)
    with torch.no_grad():
        layer.weight.mul_(3e3)  # logits of order 1e4 in bfloat16
    x = torch.randn(8, 16)
    targets = torch.softmax(torch.randn(8, 5), dim=1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, targets)
    assert loss.dtype == torch.float32
    assert logits.abs().max() > 1e3
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.bias.grad).all()


def test_loss_names_agree_with_config() -> None:
    assert set(LOSSES) == set(CONFIG_LOSSES)


def test_build_loss_accepts_every_config_key() -> None:
    # The trainer passes all loss keys of the config whatever the loss; each must be accepted.
    cfg = LossConfig()
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"}
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for name in LOSSES:
        assert torch.isfinite(build_loss(name, **keys)(logits, labels))


def test_build_loss_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'cross_entropy'.*bi_tempered.*focal"):
        build_loss("cross_entropy")


@pytest.mark.parametrize("name,params,pattern", [
    ("bi_tempered", {"t1": 1.2}, "t1"),
    ("bi_tempered", {"t2": 0.8}, "t2"),
    ("focal", {"focal_gamma": -1.0}, "focal_gamma"),
    ("taylor_ce", {"taylor_order": 0}, "taylor_order"),
    ("symmetric_ce", {"sce_beta": -1.0}, "sce_beta"),
    ("ce", {"smoothing": 1.5}, "smoothing"),
])
def test_build_loss_rejects_bad_parameters(name: str, params: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_loss(name, **params)


def test_targets_of_the_wrong_shape_are_rejected() -> None:
    loss_fn = build_loss("ce")
    with pytest.raises(ValueError, match=r"\(4, 6\).*5 classes"):
        loss_fn(torch.randn(4, 5), torch.rand(4, 6))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bce_is_timms_binary_cross_entropy(smoothing):
    from timm.loss import BinaryCrossEntropy

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5, generator=generator) * 3
    targets = torch.randint(0, 5, (16,), generator=generator)
    ours = build_loss("bce", smoothing=smoothing)(logits, targets)
    torch.testing.assert_close(ours, BinaryCrossEntropy(smoothing=smoothing)(logits, targets))
