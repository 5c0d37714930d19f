"""Training losses on soft targets: cross entropy and the label-noise-robust family.

Every loss is called as `loss(logits, targets)` with logits (B, K) and targets either class
indices (B,) or soft targets (B, K) whose rows sum to 1 (what mixup / cutmix / fmix produce),
and returns the batch mean as a float32 (or float64) scalar; `loss(logits, targets, weights)`
with row weights (B,) >= 0 returns the weighted mean sum_i w_i l_i / sum_i w_i (a row of
weight 2 counts as that row twice; `--pseudo-weight`). Label smoothing is applied to the
targets first by every loss: targets <- (1 - smoothing) * targets + smoothing / K.

Hand-written because torch and timm offer cross entropy (timm's SoftTargetCrossEntropy) but
none of the robust losses; cross entropy is written here too so that every loss shares one
smoothing and precision path. The bi-tempered loss follows Amid et al. 2019 directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Symmetric CE (Wang et al. 2019): log 0 in the reverse term is clamped to A = -4.
RCE_LOG_ZERO = -4.0
# Fixed-point steps of the tempered-softmax normaliser. The 5 of the reference code leave
# errors up to 6e-3 in lambda at t2 = 2; 30 bring it below 1e-8 for t2 <= 3 and logit
# gaps up to 1e4 (measured against a root finder, checked in tests/test_losses.py).
NORMALISER_ITERS = 30
# `label_smoothing` without an explicit --smoothing.
DEFAULT_SMOOTHING = 0.1


def to_soft_targets(targets: torch.Tensor, num_classes: int, *,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class indices (B,) -> one-hot (B, K); soft targets (B, K) pass through; both as `dtype`.

    The one index -> one-hot rule of mixcls (losses, the training loop and the mixer use it).
    """
    if targets.ndim == 1:
        return F.one_hot(targets.long(), num_classes).to(dtype)
    return targets.to(dtype)


def smooth_targets(targets: torch.Tensor, num_classes: int, smoothing: float, *,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) class indices or (B, K) soft targets -> (B, K) soft targets of `dtype`, smoothed."""
    if targets.dim() == 1 or (targets.dim() == 2 and targets.shape[1] == num_classes):
        soft = to_soft_targets(targets, num_classes, dtype=dtype)
    else:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not fit {num_classes} classes; "
                         f"use class indices (B,) or soft targets (B, {num_classes})")
    if smoothing > 0:
        soft = (1.0 - smoothing) * soft + smoothing / num_classes
    return soft


class _SoftTargetLoss(nn.Module):
    """Shared call: float logits, smoothed (B, K) targets, per-sample loss, batch mean."""

    def __init__(self, *, smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing {smoothing} must be in [0, 1]")
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        if logits.dim() != 2 or targets.shape[0] != logits.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
                             "expected logits (B, K) and targets (B,) or (B, K)")
        if weights is not None and tuple(weights.shape) != (logits.shape[0],):
            raise ValueError(f"weights {tuple(weights.shape)} do not fit logits {tuple(logits.shape)}: "
                             "expected one weight per row (B,)")
        # Half-precision logits overflow (fp16) or lose digits (bf16) in exp/pow, so the loss
        # runs in float32 even when the model ran under autocast (float64 stays float64).
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            soft = smooth_targets(targets, logits.shape[1], self.smoothing, dtype=logits.dtype)
            losses = self.per_sample(logits, soft)
            if weights is None:
                return losses.mean()
            weights = weights.to(losses.dtype)
            return (weights * losses).sum() / weights.sum()

    def per_sample(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        """(B,) losses from float logits (B, K) and soft targets (B, K)."""
        raise NotImplementedError


class CrossEntropy(_SoftTargetLoss):
    """-sum_k t_k log softmax(z)_k."""

    def per_sample(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        return -(soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1)


class BinaryCE(_SoftTargetLoss):
    """One-vs-rest binary cross entropy on the (smoothed, maybe mixed) targets, averaged over the
    K classes: timm's BinaryCrossEntropy (the "ResNet strikes back" recipes' loss) per sample,
    so the batch mean is timm's figure. torch's binary_cross_entropy_with_logits does the sums."""

    def per_sample(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none").mean(dim=1)


class Focal(_SoftTargetLoss):
    """Focal loss (Lin et al. 2017) on soft targets: -sum_k t_k (1 - p_k)^gamma log p_k."""

    def __init__(self, *, gamma: float = 2.0, smoothing: float = 0.0) -> None:
        super().__init__(smoothing=smoothing)
        if gamma < 0:
            raise ValueError(f"focal_gamma {gamma} must be >= 0")
        self.gamma = gamma

    def per_sample(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)
        # -expm1 keeps 1 - p exact for p near 1; the floor keeps the gradient of x^gamma finite
        # at x = 0 when gamma < 1 (its value there is negligible: the factor is <= 1e-30^gamma).
        one_minus_p = (-torch.expm1(log_probs)).clamp(min=1e-30)
        return -(soft_targets * one_minus_p.pow(self.gamma) * log_probs).sum(dim=1)


class TaylorCE(_SoftTargetLoss):
    """Taylor cross entropy (Feng et al. 2020): sum_k t_k sum_{i=1..n} (1 - p_k)^i / i."""

    def __init__(self, *, order: int = 2, smoothing: float = 0.0) -> None:
        super().__init__(smoothing=smoothing)
        if int(order) != order or order < 1:
            raise ValueError(f"taylor_order {order} must be an integer >= 1")
        self.order = int(order)

    def per_sample(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        one_minus_p = 1.0 - F.softmax(logits, dim=1)
        series = sum(one_minus_p.pow(i) / i for i in range(1, self.order + 1))
        return (soft_targets * series).sum(dim=1)


class SymmetricCE(_SoftTargetLoss):
    """Symmetric CE (Wang et al. 2019): alpha * CE(t, p) + beta * RCE, RCE = -sum_k p_k log t_k.

    log t_k is clamped below at A = -4, so a one-hot target gives RCE = -A (1 - p_y).
    """

    def __init__(self, *, alpha: float = 0.1, beta: float = 1.0, smoothing: float = 0.0) -> None:
        super().__init__(smoothing=smoothing)
        if alpha < 0 or beta < 0:
            raise ValueError(f"sce_alpha {alpha} and sce_beta {beta} must be >= 0")
        self.alpha, self.beta = alpha, beta

    def per_sample(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)
        ce = -(soft_targets * log_probs).sum(dim=1)
        log_targets = torch.log(soft_targets.clamp(min=math.exp(RCE_LOG_ZERO)))
        rce = -(log_probs.exp() * log_targets).sum(dim=1)
        return self.alpha * ce + self.beta * rce


def log_t(x: torch.Tensor, t: float) -> torch.Tensor:
    """Tempered logarithm (x^(1-t) - 1) / (1 - t); the natural log at t = 1."""
    if t == 1.0:
        return torch.log(x)
    return (x.pow(1.0 - t) - 1.0) / (1.0 - t)


def exp_t(u: torch.Tensor, t: float) -> torch.Tensor:
    """Tempered exponential [1 + (1 - t) u]_+^(1 / (1 - t)), the inverse of log_t."""
    if t == 1.0:
        return torch.exp(u)
    return torch.relu(1.0 + (1.0 - t) * u).pow(1.0 / (1.0 - t))


def _fixed_point_normaliser(shifted: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """(B, 1) lambda with sum_k exp_t(shifted_k - lambda) = 1, for t > 1 and row maxima 0
    (Amid et al. 2019, Algorithm 1)."""
    scaled = shifted
    for _ in range(num_iters):
        partition = exp_t(scaled, t).sum(dim=1, keepdim=True)
        scaled = shifted * partition.pow(1.0 - t)
    partition = exp_t(scaled, t).sum(dim=1, keepdim=True)
    return -log_t(1.0 / partition, t)


class _TemperedNormaliser(torch.autograd.Function):
    """lambda(logits) of the tempered softmax; its gradient comes from the defining equation,
    not from back-propagating through the fixed-point loop (30 steps of graph per batch)."""

    @staticmethod
    def forward(ctx, shifted: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
        lam = _fixed_point_normaliser(shifted, t, num_iters)
        ctx.save_for_backward(shifted, lam)
        ctx.t = t
        return lam

    @staticmethod
    def backward(ctx, grad_lam: torch.Tensor):
        shifted, lam = ctx.saved_tensors
        # Differentiating sum_k exp_t(a_k - lambda) = 1, with exp_t' = exp_t^t, gives
        # d lambda / d a_j = p_j^t / sum_k p_k^t.
        weights = exp_t(shifted - lam, ctx.t).pow(ctx.t)
        return grad_lam * weights / weights.sum(dim=1, keepdim=True), None, None


def tempered_log_softmax(logits: torch.Tensor, t: float, *,
                         num_iters: int = NORMALISER_ITERS) -> torch.Tensor:
    """(B, K) log of the tempered softmax exp_t(logits - lambda(logits)), for t >= 1.

    Working in logs keeps p^s = exp(s log p) differentiable where p underflows to 0.
    """
    if t == 1.0:
        return F.log_softmax(logits, dim=1)
    if t < 1.0:
        raise ValueError(f"t2 {t} < 1 (finite-support tempered softmax) is not supported; use t2 >= 1")
    # The tempered softmax is shift-invariant (lambda(a + c) = lambda(a) + c). Working relative
    # to the row maximum keeps the top class's a - lambda free of cancellation at large logits.
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    lam = _TemperedNormaliser.apply(shifted, t, num_iters)
    base = (1.0 + (1.0 - t) * (shifted - lam)).clamp(min=torch.finfo(logits.dtype).tiny)
    return torch.log(base) / (1.0 - t)


class BiTempered(_SoftTargetLoss):
    """Bi-tempered logistic loss (Amid et al. 2019), the Bregman divergence of log_t1 between
    the targets y and p = tempered_softmax(logits, t2):

        sum_k y_k (log_t1 y_k - log_t1 p_k) - (y_k^(2-t1) - p_k^(2-t1)) / (2 - t1).

    t1 < 1 bounds the loss (outliers pull less), t2 > 1 gives p heavy tails; at t1 = t2 = 1 it is
    cross entropy minus the entropy of y.
    """

    def __init__(self, *, t1: float = 0.8, t2: float = 1.4, smoothing: float = 0.0,
                 num_iters: int = NORMALISER_ITERS) -> None:
        super().__init__(smoothing=smoothing)
        if not (0.0 <= t1 <= 1.0 <= t2):
            raise ValueError(f"bi-tempered needs 0 <= t1 <= 1 <= t2, got t1={t1}, t2={t2}")
        self.t1, self.t2, self.num_iters = t1, t2, num_iters

    def per_sample(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        log_probs = tempered_log_softmax(logits, self.t2, num_iters=self.num_iters)
        y, t1 = soft_targets, self.t1
        if t1 == 1.0:
            terms = torch.xlogy(y, y) - y * log_probs - y + log_probs.exp()
        else:
            log_t1_probs = torch.expm1((1.0 - t1) * log_probs) / (1.0 - t1)
            terms = (y * (log_t(y, t1) - log_t1_probs)
                     - (y.pow(2.0 - t1) - torch.exp((2.0 - t1) * log_probs)) / (2.0 - t1))
        return terms.sum(dim=1)


def _build_label_smoothing(p: dict) -> nn.Module:
    return CrossEntropy(smoothing=p["smoothing"] if p["smoothing"] > 0 else DEFAULT_SMOOTHING)


_FACTORIES = {
    "ce": lambda p: CrossEntropy(smoothing=p["smoothing"]),
    "label_smoothing": _build_label_smoothing,
    "bi_tempered": lambda p: BiTempered(t1=p["t1"], t2=p["t2"], smoothing=p["smoothing"]),
    "symmetric_ce": lambda p: SymmetricCE(alpha=p["sce_alpha"], beta=p["sce_beta"],
                                          smoothing=p["smoothing"]),
    "taylor_ce": lambda p: TaylorCE(order=p["taylor_order"], smoothing=p["smoothing"]),
    "focal": lambda p: Focal(gamma=p["focal_gamma"], smoothing=p["smoothing"]),
    "bce": lambda p: BinaryCE(smoothing=p["smoothing"]),
}
LOSSES = tuple(_FACTORIES)


def build_loss(name: str, *, smoothing: float = 0.0, t1: float = 0.8, t2: float = 1.4,
               focal_gamma: float = 2.0, sce_alpha: float = 0.1, sce_beta: float = 1.0,
               taylor_order: int = 2) -> nn.Module:
    """The loss `name` (one of LOSSES) from the config's loss keys; keys it does not use are ignored.

    `label_smoothing` is cross entropy with smoothing 0.1 unless `smoothing` is set.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
    return _FACTORIES[name](dict(smoothing=smoothing, t1=t1, t2=t2, focal_gamma=focal_gamma,
                                 sce_alpha=sce_alpha, sce_beta=sce_beta, taylor_order=taylor_order))
