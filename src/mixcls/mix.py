"""Mixed-sample augmentation on a whole batch: mixup, cutmix and fmix.

Every method mixes image i with a partner `perm[i]` from the same batch (a random permutation):

    mixed = m ⊙ x1 + (1 − m) ⊙ x2        soft_targets = λ_eff · y1 + (1 − λ_eff) · y2

where the mask m is the scalar λ (mixup), 1 outside a pasted box (cutmix) or a thresholded
low-frequency image (fmix), λ ~ Beta(α, α), and λ_eff is the mean of the mask that was really
applied (after box clipping, rounding, casting to the batch's dtype), so the targets always say
how much of each image the model saw. Everything runs on the batch's own device, for the whole
batch at once; all randomness comes from one `torch.Generator`.

Public API: `Mixer` (what the trainer calls), `MixPlan`, `apply_mix`, `mix_pairs`, `make_masks`,
`sample_lam`, `cutmix_boxes`, `cutmix_masks`, `fmix_grey`, `fmix_masks`, `parse_mix_spec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mixcls.losses import to_soft_targets

MIX_METHODS = ("mixup", "cutmix", "fmix")
MIX_MODES = ("batch", "sample")

# fmix thresholds are estimated on a coarse grid of about this side squared (cheap), and a
# mask whose mean then misses λ by more than FMIX_MEAN_TOLERANCE (absolute) is redone exactly.
FMIX_COARSE_SIDE = 64
FMIX_MEAN_TOLERANCE = 0.0025
# Spectrum energy beyond the kept frequencies, relative to the zero-frequency term.
_FMIX_TAIL_ENERGY = 1e-3


def parse_mix_spec(spec: str) -> dict[str, float]:
    """'none' -> {}; 'fmix' -> {'fmix': 1.0}; 'fmix:0.5,cutmix:0.5' -> normalised weights."""
    spec = (spec or "none").strip()
    if spec == "none":
        return {}
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in MIX_METHODS:
            raise ValueError(f"unknown mix {name!r}; use none or one of {', '.join(MIX_METHODS)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"weight {weight!r} of {name!r} is not a number") from None
        if value < 0 or name in weights:
            raise ValueError(f"{part!r}: weights must be >= 0 and each method named once")
        weights[name] = value
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"{spec!r}: the weights add up to 0")
    return {name: value / total for name, value in weights.items()}


# ---------------------------------------------------------------- random draws

def _rng_device(generator: torch.Generator | None) -> torch.device:
    """Where draws from `generator` happen (the default generator is the CPU's)."""
    return generator.device if generator is not None else torch.device("cpu")


def sample_lam(alpha: float, size: int | tuple[int, ...], generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """λ ~ Beta(alpha, alpha): a float32 CPU tensor of shape `size`.

    torch's Beta and Gamma samplers take no generator, so numpy's Beta sampler is seeded from a
    draw of `generator`: one seed, one stream, and no change to the global RNG.
    """
    if not alpha > 0:
        raise ValueError(f"mix alpha must be > 0, got {alpha}")
    seed = torch.randint(2**62, (1,), generator=generator, device=_rng_device(generator))
    values = np.random.default_rng(int(seed.item())).beta(alpha, alpha, size=size)
    return torch.as_tensor(values, dtype=torch.float32)


def _lam_vector(lam: float | torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """λ as a float32 (B,) tensor, checked to lie in [0, 1]."""
    lam = torch.as_tensor(lam, dtype=torch.float32)
    if lam.ndim == 0:
        lam = lam.expand(batch or 1).contiguous()
    if lam.ndim != 1 or (batch is not None and lam.shape[0] != batch):
        raise ValueError(f"lam must be a float or a ({batch or 'B'},) tensor, got shape {tuple(lam.shape)}")
    if bool(((lam < 0) | (lam > 1) | lam.isnan()).any()):
        raise ValueError(f"lam must lie in [0, 1], got {lam.tolist()}")
    return lam


# ---------------------------------------------------------------- cutmix

def cutmix_boxes(lam: float | torch.Tensor, height: int, width: int,
                 generator: torch.Generator | None = None, *,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Boxes (B, 4) long as [y0, y1, x0, x1], ends exclusive, clipped to the image.

    Each box has sides sqrt(1 − λ) of the image's (area ≈ (1 − λ)·H·W before clipping) and a
    centre drawn uniformly over the pixels; the partner image is pasted inside it.
    """
    lam = _lam_vector(lam).cpu().double()              # a few numbers: the CPU is fine
    batch, rng = lam.shape[0], _rng_device(generator)
    side = torch.sqrt(1.0 - lam)
    box_h, box_w = torch.round(side * height).long(), torch.round(side * width).long()
    centre_y = torch.randint(height, (batch,), generator=generator, device=rng).cpu()
    centre_x = torch.randint(width, (batch,), generator=generator, device=rng).cpu()
    y0, x0 = centre_y - box_h // 2, centre_x - box_w // 2
    boxes = torch.stack([y0.clamp(0, height), (y0 + box_h).clamp(0, height),
                         x0.clamp(0, width), (x0 + box_w).clamp(0, width)], dim=1)
    return boxes.to(device or "cpu")


def cutmix_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masks (B, 1, H, W) float32 on the boxes' device: 0 inside each box, 1 outside."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = ((rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])).float()   # (B, H)
    in_cols = ((cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])).float()   # (B, W)
    return (1.0 - in_rows[:, :, None] * in_cols[:, None, :]).unsqueeze(1)


# ---------------------------------------------------------------- fmix

def _fmix_grid_size(height: int, width: int, decay_power: float) -> tuple[int, int]:
    """The grid on which the low-frequency field is computed before bilinear upsampling.

    The amplitude falls as 1/c^d (c in cycles per longest side), so the energy beyond c is
    about 2π c^(2−2d) / (2d − 2) of the zero-frequency term. We keep the c where that is
    _FMIX_TAIL_ENERGY and sample it 4 times per cycle; d <= 1 keeps the full size.
    """
    if decay_power <= 1.0:
        return height, width
    power = 2.0 * decay_power - 2.0
    cutoff = (2.0 * math.pi / (power * _FMIX_TAIL_ENERGY)) ** (1.0 / power)
    longest = max(height, width)

    def side(n: int) -> int:
        return min(n, max(16, math.ceil(4.0 * cutoff * n / longest)))

    return side(height), side(width)


def _fmix_field(batch: int, height: int, width: int, decay_power: float,
                generator: torch.Generator | None, device: torch.device | str | None) -> torch.Tensor:
    """Low-frequency random fields (B, 1, h, w) float32 on `device`; see `_fmix_grid_size`.

    A complex Gaussian spectrum on the rfft2 grid scaled by 1 / max(c, 1)^d, with c the
    frequency magnitude in cycles per longest side (the official FMix scale 1 / max(f, 1/L)^d,
    f in cycles per pixel, up to a constant). norm="forward" makes the inverse transform
    sample one continuous field whatever the grid size.
    """
    if not decay_power > 0:
        raise ValueError(f"fmix decay_power must be > 0, got {decay_power}")
    h, w = _fmix_grid_size(height, width, decay_power)
    rng = _rng_device(generator)
    longest = max(height, width)
    cycles_y = torch.fft.fftfreq(h, d=1.0 / h, device=rng)[:, None] * (longest / height)
    cycles_x = torch.fft.rfftfreq(w, d=1.0 / w, device=rng)[None, :] * (longest / width)
    amplitude = torch.sqrt(cycles_y**2 + cycles_x**2).clamp(min=1.0).pow(-decay_power)
    noise = torch.randn(batch, h, w // 2 + 1, 2, generator=generator, device=rng)
    field = torch.fft.irfft2(torch.view_as_complex(noise) * amplitude, s=(h, w), norm="forward")
    return field.unsqueeze(1).to(device or "cpu")


def _linear_weights(n: int, size: int, field: torch.Tensor) -> torch.Tensor:
    """(size, n) weights of torch's linear interpolation (align_corners=False) from n to size."""
    eye = torch.eye(n, device=field.device, dtype=field.dtype).view(n, 1, n)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False).view(n, size).T


def _resize(field: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bilinear surface through `field` (B, 1, h, w) sampled at the pixel centres of `size`.

    With align_corners=False every output size samples the same continuous surface, so a
    threshold found on a coarse grid applies to the full-size one. Always a new tensor.
    """
    h, w = field.shape[-2:]
    if (h, w) == tuple(size):
        return field.clone()
    if max(h, w) > FMIX_COARSE_SIDE:
        return F.interpolate(field, size=size, mode="bilinear", align_corners=False)
    # From a small grid, two matrix products (rows, then columns) beat F.interpolate by ~3x on
    # CPUs; the weights are F.interpolate's own, so both give the same surface.
    rows = _linear_weights(h, size[0], field)
    cols = _linear_weights(w, size[1], field)
    return torch.matmul(rows, torch.matmul(field, cols.T))


def _kth_largest(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row of `values` (R, n), the k-th largest value, k (R,) long; k = 0 gives a value
    just above the row's maximum (so `values >= result` selects nothing).

    torch.kthvalue takes one rank for all rows; each row is padded with -inf / +inf so that a
    common rank lands on the row's own k (one batched selection, no sort, no per-row loop).
    """
    n = values.shape[1]
    k = k.to(values.device).clamp(0, n)
    rank = n - k.clamp(min=1) + 1                      # k-th largest = rank-th smallest, 1..n
    top = int(rank.max())
    shift = top - rank                                 # -inf entries to put before row i
    padded = values
    if int(shift.max()) > 0:
        slots = torch.arange(int(shift.max()), device=values.device)
        pad = torch.where(slots < shift[:, None], -math.inf, math.inf).to(values.dtype)
        padded = torch.cat([values, pad], dim=1)
    kth = padded.kthvalue(top, dim=1).values
    above_max = torch.nextafter(values.amax(dim=1), torch.tensor(math.inf, dtype=values.dtype,
                                                                 device=values.device))
    return torch.where(k == 0, above_max, kth)


def _estimate_kth_largest(values: torch.Tensor, k: torch.Tensor, *, bins: int = 1024) -> torch.Tensor:
    """Per row of `values` (R, n), a value t with about k (R,) values >= t (within a bin's count).

    A per-row histogram with linear interpolation inside the bin that holds the k-th largest:
    a few passes and one bincount, no sort or selection, so rows with different k cost the
    same as one k (torch.kthvalue takes one k for all rows; padding rows to share one rank is
    3x slower on a CPU). Good enough where the result is itself an estimate (coarse grids).
    """
    rows = values.shape[0]
    k = k.to(values.device, values.dtype)
    low, high = torch.aminmax(values, dim=1)
    width = (high - low).clamp(min=1e-30) / (bins - 0.5)   # the maximum falls in the last bin
    index = ((values - low[:, None]) / width[:, None]).long()
    index += torch.arange(rows, device=values.device)[:, None] * bins
    counts = torch.bincount(index.flatten(), minlength=rows * bins).view(rows, bins).to(values.dtype)
    at_or_above = counts.flip(1).cumsum(1).flip(1)          # values in bins j, j + 1, ...
    j = ((at_or_above >= k[:, None]).sum(1) - 1).clamp(min=0)
    above = torch.cat([at_or_above, at_or_above.new_zeros(rows, 1)], 1).gather(1, (j + 1)[:, None])[:, 0]
    inside = counts.gather(1, j[:, None])[:, 0].clamp(min=1)
    return low + (j + 1 - (k - above) / inside) * width


def _coarse_values(field: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The field's surface on a grid of about FMIX_COARSE_SIDE² square cells, as (B, n) rows."""
    scale = min(1.0, FMIX_COARSE_SIDE / math.sqrt(height * width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return _resize(field, size).flatten(1)


def _binary_fmix(field: torch.Tensor, lam: torch.Tensor, height: int, width: int, *,
                 tolerance: float) -> torch.Tensor:
    """Masks (B, 1, H, W) of 0/1: the top ≈ λ·H·W pixels of each field's full-size surface.

    The threshold is estimated from the coarse grid (a few thousand values instead of H·W per
    row); any mask whose mean misses λ by more than `tolerance` gets the exact full-size
    threshold, so exactly round(λ·H·W) pixels (up to equal values) are 1.
    """
    coarse = _coarse_values(field, height, width)
    k = torch.round(lam * coarse.shape[1]).long()
    if coarse.shape[1] == height * width:              # a small image: its own grid, exactly
        return (coarse >= _kth_largest(coarse, k)[:, None]).float().view(-1, 1, height, width)
    thresholds = _estimate_kth_largest(coarse, k)
    # None or all of the coarse values: none or all of the pixels (the surface between coarse
    # points may reach beyond the coarse extremes).
    thresholds = torch.where(k == 0, math.inf, torch.where(k == coarse.shape[1], -math.inf, thresholds))
    masks = _resize(field, (height, width)).ge_(thresholds.view(-1, 1, 1, 1))
    bad = ((masks.mean(dim=(1, 2, 3)) - lam).abs() > tolerance).nonzero().squeeze(1)
    if bad.numel():
        grey = _resize(field[bad], (height, width)).flatten(1)
        exact = _kth_largest(grey, torch.round(lam[bad] * height * width).long())
        masks[bad] = (grey >= exact[:, None]).float().view(-1, 1, height, width)
    return masks


def _soft_fmix(field: torch.Tensor, lam: torch.Tensor, height: int, width: int, *,
               max_soft: float) -> torch.Tensor:
    """Masks (B, 1, H, W) in [0, 1]: 1 above the top (λ − s) quantile, 0 below the (λ + s) one,
    linear in the field's value between, with s = min(max_soft, λ, 1 − λ) (soft edges)."""
    soft = torch.minimum(lam, 1.0 - lam).clamp(max=max_soft)
    coarse = _coarse_values(field, height, width)
    n = coarse.shape[1]
    k_high, k_low = torch.round((lam - soft) * n).long(), torch.round((lam + soft) * n).long()
    high, low = _estimate_kth_largest(coarse, k_high), _estimate_kth_largest(coarse, k_low)
    grey = _resize(field, (height, width)).sub_(low.view(-1, 1, 1, 1))
    masks = grey.div_((high - low).clamp(min=1e-12).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    steps = (k_high == k_low).nonzero().squeeze(1)     # no band (λ at 0 or 1): a plain threshold
    if steps.numel():
        masks[steps] = _binary_fmix(field[steps], lam[steps], height, width,
                                    tolerance=FMIX_MEAN_TOLERANCE)
    return masks


def fmix_grey(batch: int, height: int, width: int, decay_power: float = 3.0,
              generator: torch.Generator | None = None, *,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Low-frequency grey images (B, H, W) float32 in [0, 1], before thresholding.

    With the same generator state, `fmix_masks` keeps the top pixels of exactly these images.
    """
    grey = _resize(_fmix_field(batch, height, width, decay_power, generator, device),
                   (height, width)).squeeze(1)
    low = grey.amin(dim=(1, 2), keepdim=True)
    span = (grey.amax(dim=(1, 2), keepdim=True) - low).clamp(min=1e-12)
    return (grey - low) / span


def fmix_masks(batch: int, height: int, width: int, lam: float | torch.Tensor,
               decay_power: float = 3.0, max_soft: float = 0.0,
               generator: torch.Generator | None = None, *,
               device: torch.device | str | None = None) -> torch.Tensor:
    """FMix masks (B, 1, H, W) float32: the top ≈ λ·H·W pixels of `fmix_grey` images are 1.

    `lam` is a float or a (B,) tensor. With max_soft = 0 each mask is 0/1 and its mean lies
    within FMIX_MEAN_TOLERANCE (absolute) of λ; with max_soft > 0 a band of about 2·s·H·W
    pixels, s = min(max_soft, λ, 1 − λ), ramps from 1 to 0 (soft edges) and the mean lies
    within about s of λ. Either way the caller's λ_eff is the mask's real mean. The one random
    draw is the spectrum.
    """
    if not 0.0 <= max_soft <= 0.5:
        raise ValueError(f"fmix max_soft must be in [0, 0.5], got {max_soft}")
    lam = _lam_vector(lam, batch)
    field = _fmix_field(batch, height, width, decay_power, generator, device)
    lam = lam.to(field.device)
    if max_soft > 0:
        return _soft_fmix(field, lam, height, width, max_soft=max_soft)
    return _binary_fmix(field, lam, height, width, tolerance=FMIX_MEAN_TOLERANCE)


# ---------------------------------------------------------------- masks of every method

def _mixup_masks(lam: torch.Tensor, height: int, width: int, **_: object) -> torch.Tensor:
    return lam.view(-1, 1, 1, 1)


def _cutmix_masks(lam: torch.Tensor, height: int, width: int, *, generator: torch.Generator | None,
                  **_: object) -> torch.Tensor:
    return cutmix_masks(cutmix_boxes(lam, height, width, generator, device=lam.device), height, width)


def _fmix_masks(lam: torch.Tensor, height: int, width: int, *, generator: torch.Generator | None,
                decay_power: float, max_soft: float, **_: object) -> torch.Tensor:
    return fmix_masks(lam.shape[0], height, width, lam, decay_power, max_soft, generator,
                      device=lam.device)


MASK_MAKERS: dict[str, Callable[..., torch.Tensor]] = {
    "mixup": _mixup_masks, "cutmix": _cutmix_masks, "fmix": _fmix_masks}


def make_masks(method: str, lam: float | torch.Tensor, height: int, width: int, *,
               decay_power: float = 3.0, max_soft: float = 0.0,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Masks of `method` for λ (B,): (B, 1, 1, 1) for mixup, (B, 1, H, W) otherwise, float32."""
    if method not in MASK_MAKERS:
        raise ValueError(f"unknown mix {method!r}; use one of {', '.join(MASK_MAKERS)}")
    lam = _lam_vector(lam).to(device or "cpu")
    return MASK_MAKERS[method](lam, height, width, generator=generator,
                               decay_power=decay_power, max_soft=max_soft)


# ---------------------------------------------------------------- applying a mix

@dataclass
class MixPlan:
    """What one call mixes: `method` ("none": nothing), the partner `perm` (B,) long, the
    sampled `lam` (1 or B,) and `masks` (1 or B, 1, H or 1, W or 1) float32, None when unmixed."""

    method: str
    perm: torch.Tensor
    lam: torch.Tensor | None = None
    masks: torch.Tensor | None = None


def mix_pairs(x1: torch.Tensor, x2: torch.Tensor, masks: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """m ⊙ x1 + (1 − m) ⊙ x2 for images (B, C, H, W), with m cast to the images' dtype.

    Returns (mixed (B, C, H, W), lam_eff (B,) float32: each applied mask's mean).
    """
    masks = masks.to(device=x1.device, dtype=x1.dtype)
    # lerp(x2, x1, m) = x2 + m (x1 − x2), computed so that m = 1 gives x1 and m = 0 gives x2 exactly.
    mixed = torch.lerp(x2, x1, masks)
    lam_eff = masks.float().mean(dim=(1, 2, 3)).expand(x1.shape[0]).contiguous()
    return mixed, lam_eff


def apply_mix(images: torch.Tensor, soft_targets: torch.Tensor, plan: MixPlan
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply `plan` to images (B, C, H, W) and soft targets (B, K).

    Returns (mixed images, soft targets λ_eff·y + (1 − λ_eff)·y[perm], lam_eff (B,) float32);
    an unmixed plan returns the inputs themselves and lam_eff = 1.
    """
    if plan.masks is None:
        return images, soft_targets, torch.ones(images.shape[0], device=images.device)
    perm = plan.perm.to(images.device)
    mixed, lam_eff = mix_pairs(images, images[perm], plan.masks)
    weight = lam_eff[:, None].to(soft_targets.dtype)
    return mixed, torch.lerp(soft_targets[perm], soft_targets, weight), lam_eff


class Mixer:
    """Mix training batches with mixup, cutmix, fmix or a weighted choice of them.

    `method` is a name or a spec accepted by `parse_mix_spec` ("fmix:0.5,cutmix:0.5", "none").
    Call `mixer(images, targets, generator)` with images (B, C, H, W) floating point on any
    device and targets as soft targets (B, K) or class indices (B,) (those need `num_classes`);
    it returns (mixed images, soft targets (B, K), lam_eff (B,) float32, 1.0 when unmixed).
    Index targets become float32 one-hots; soft targets keep their dtype (rows keep summing to
    1, so label smoothing in the loss composes).

    Per batch the mixer draws, in this order from `generator`: whether to mix at all (`prob`),
    the method (when the spec names several), λ ~ Beta(alpha, alpha) (one for the batch with
    mode="batch", one per image with mode="sample"), the partner permutation, then the method's
    own draws (box centres, fmix spectra). mode="batch" shares one box or fmix mask across the
    batch. Set `enabled = False` to switch mixing off (the trainer does for the last
    --mix-off-epochs epochs); validation code never calls a mixer.
    """

    def __init__(self, method: str, alpha: float = 1.0, prob: float = 1.0,
                 decay_power: float = 3.0, max_soft: float = 0.0, mode: str = "batch", *,
                 num_classes: int | None = None) -> None:
        self.weights = parse_mix_spec(method)
        checks = {"alpha": (alpha, alpha > 0, "> 0"), "prob": (prob, 0 <= prob <= 1, "in [0, 1]"),
                  "decay_power": (decay_power, decay_power > 0, "> 0"),
                  "max_soft": (max_soft, 0 <= max_soft <= 0.5, "in [0, 0.5]"),
                  "num_classes": (num_classes, num_classes is None or num_classes >= 1, ">= 1")}
        for name, (value, ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"mix {name} must be {rule}, got {value}")
        if mode not in MIX_MODES:
            raise ValueError(f"mix mode {mode!r} is not one of {', '.join(MIX_MODES)}")
        self.alpha, self.prob, self.mode = alpha, prob, mode
        self.decay_power, self.max_soft, self.num_classes = decay_power, max_soft, num_classes
        self.enabled = True

    def __repr__(self) -> str:
        spec = ",".join(f"{k}:{v:.3g}" for k, v in self.weights.items()) or "none"
        return (f"Mixer({spec!r}, alpha={self.alpha}, prob={self.prob}, decay_power={self.decay_power}, "
                f"max_soft={self.max_soft}, mode={self.mode!r}, enabled={self.enabled})")

    def sample_plan(self, batch: int, height: int, width: int,
                    generator: torch.Generator | None = None, *,
                    device: torch.device | str | None = None) -> MixPlan:
        """Draw what to mix for a batch of `batch` images of height × width (see the class)."""
        device = torch.device(device or "cpu")
        unmixed = MixPlan("none", torch.arange(batch, device=device))
        if not self.enabled or not self.weights:
            return unmixed
        rng = _rng_device(generator)
        if float(torch.rand((), generator=generator, device=rng)) >= self.prob:
            return unmixed
        method = self._choose_method(generator)
        lam = sample_lam(self.alpha, batch if self.mode == "sample" else 1, generator).to(device)
        perm = torch.randperm(batch, generator=generator, device=rng).to(device)
        masks = make_masks(method, lam, height, width, decay_power=self.decay_power,
                           max_soft=self.max_soft, generator=generator, device=device)
        return MixPlan(method, perm, lam, masks)

    def _choose_method(self, generator: torch.Generator | None) -> str:
        names = list(self.weights)
        if len(names) == 1:
            return names[0]
        weights = torch.tensor([self.weights[n] for n in names], device=_rng_device(generator))
        return names[int(torch.multinomial(weights, 1, generator=generator))]

    def soft_targets(self, targets: torch.Tensor, batch: int) -> torch.Tensor:
        """Targets as (B, K): class indices become float32 one-hots (needs num_classes)."""
        if targets.shape[0] != batch:
            raise ValueError(f"{targets.shape[0]} targets for a batch of {batch} images")
        if targets.ndim == 2 and targets.is_floating_point():
            return targets
        if targets.ndim != 1 or targets.is_floating_point():
            raise ValueError(f"targets must be class indices (B,) or soft targets (B, K), got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        if self.num_classes is None:
            raise ValueError("class-index targets need Mixer(..., num_classes=K)")
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"target {int(bad[0])} is outside 0..{self.num_classes - 1}")
        return to_soft_targets(targets, self.num_classes)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a floating-point (B, C, H, W) tensor, got "
                             f"{images.dtype} {tuple(images.shape)}")
        batch, _, height, width = images.shape
        soft_targets = self.soft_targets(targets, batch)
        plan = self.sample_plan(batch, height, width, generator, device=images.device)
        return apply_mix(images, soft_targets, plan)
