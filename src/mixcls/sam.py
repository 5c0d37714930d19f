"""Sharpness-aware minimization (--sam sam: Foret et al., 2021) and its adaptive form
(--sam asam: Kwon et al., 2021): each optimizer step takes the gradient at the worst nearby
weights w + e(w) instead of at w, which seeks minima whose whole neighbourhood has a low loss.
SAM's authors report it is also robust to noisy labels, the usual state of competition data.

    e(w) = rho x T^2 g / ||T g||,   g the gradient at w;  T = 1 (sam), T = |w| (asam)

(the element-wise |w| of ASAM as in davda54/sam and pytorch_optimizer, whose step the tests
match). A step costs two forward and backward passes; the loss the trainer reports is the
first one's, at w.

Why by hand: the SAM classes of those libraries wrap the optimizer and own its step(), and
mixcls's step is GradScaler's unscale and overflow skip, --grad-clip and a timm optimizer that
the schedule and the checkpoints hold. The ascent itself is the few lines below; the trainer
(engine.sharpness_pass) runs the second pass inside its own accumulation, AMP and DDP rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mixcls.config import DEFAULT_SAM_RHO

_EPS = 1e-12  # keeps a zero gradient's step zero instead of 0 / 0


@dataclass(frozen=True)
class Sharpness:
    """The settings of the ascent: the neighbourhood's radius and whether it scales with |w|."""
    rho: float
    adaptive: bool

    @property
    def label(self) -> str:
        return sam_label("asam" if self.adaptive else "sam", self.rho)


def sam_label(mode: str, rho: float | None) -> str:
    """How logs, the report and the runs table name the setting: "asam rho=2"."""
    return f"{mode} rho={DEFAULT_SAM_RHO[mode] if rho is None else rho:g}"


def sharpness_settings(mode: str, rho: float | None) -> Sharpness | None:
    """--sam and --sam-rho as the trainer uses them; None when --sam is none."""
    if mode == "none":
        return None
    return Sharpness(rho=DEFAULT_SAM_RHO[mode] if rho is None else float(rho), adaptive=mode == "asam")


@torch.no_grad()
def climb(params: Sequence[nn.Parameter], sharpness: Sharpness) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Move every parameter that has a gradient to w + e(w); return (parameter, w) pairs.

    The gradient may still carry GradScaler's loss scale: e(w) divides g by a norm of g, so
    the scale cancels. A gradient with a NaN or infinity (an fp16 overflow) gives e = 0: the
    second pass is then taken at w, and the step's skip rule judges that pass's gradients.
    The check stays on the device (torch.where), so a step waits for no host read.
    """
    with_grad = [p for p in params if p.grad is not None]
    # One parameter's temporaries at a time (no list of T g): the climb then needs no more
    # memory than the copies of w it returns.
    norm = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(p.grad * p.abs() if sharpness.adaptive else p.grad, dtype=torch.float32)
        for p in with_grad]))
    factor = torch.where(torch.isfinite(norm), sharpness.rho / (norm + _EPS), torch.zeros_like(norm))
    moved = []
    for p in with_grad:
        moved.append((p, p.detach().clone()))
        step = (p.grad * p.square() if sharpness.adaptive else p.grad) * factor.to(p.dtype)
        p.add_(torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0))
    return moved


@torch.no_grad()
def come_back(moved: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Put back the weights climb() moved (copies, so w is restored bit for bit)."""
    for p, w in moved:
        p.copy_(w)
