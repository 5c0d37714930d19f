"""Pictures of the maths under the toolkit: Beta(α, α), the 2-D DFT, FMix masks, step memory,
and mixed training images (`mixcls show-mix`).

Each `plot_*` returns a matplotlib Figure (built without pyplot, so no GUI backend and no
global figure state); the caller saves it with `runs.atomic_save_figure`. The numbers drawn
come from small functions here (`beta_density`, `lowpass_reconstruct`, ...) that the tests
check against scipy and the textbook formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from scipy import integrate, ndimage, special

from mixcls.config import AMP_MODES, ConfigError
from mixcls.data import read_image
from mixcls.memory import MemoryResult
from mixcls.mix import make_masks, mix_pairs, sample_lam

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B in grey


# ------------------------------------------------------------------------------- Beta(α, α)


def beta_density(theta: np.ndarray | float, alpha: float) -> np.ndarray:
    """Density of Beta(α, α) at θ: Γ(2α) / Γ(α)² · θ^(α−1) (1−θ)^(α−1); 0 outside [0, 1].

    Worked in log space: Γ(2α) overflows float64 for α above about 85 and θ^(α−1) underflows,
    while their logs stay small. xlogy makes 0 · log 0 = 0, so α = 1 gives 1 at the ends.
    """
    _check_alpha(alpha)
    theta = np.asarray(theta, dtype=np.float64)
    inside = (theta >= 0) & (theta <= 1)
    t = np.where(inside, theta, 0.5)
    log_norm = math.lgamma(2 * alpha) - 2 * math.lgamma(alpha)
    with np.errstate(divide="ignore"):
        log_p = log_norm + special.xlogy(alpha - 1, t) + special.xlog1py(alpha - 1, -t)
    return np.where(inside, np.exp(log_p), 0.0)


def beta_mass(low: float, high: float, alpha: float) -> float:
    """P(low <= λ <= high) for λ ~ Beta(α, α), by integrating `beta_density`."""
    value, _ = integrate.quad(beta_density, low, high, args=(alpha,), limit=200)
    return float(value)


def describe_alpha(alpha: float) -> str:
    """What λ ~ Beta(α, α) means for a mixed image, in one sentence."""
    if alpha < 1:
        return "λ piles up near 0 and 1: most mixes are\nmainly one image with a trace of the other"
    if alpha == 1:
        return "every λ is equally likely (uniform):\nmild and strong mixes alike"
    return "λ gathers near 0.5: images blended about\nevenly, strong regularisation"


def plot_beta(alphas: Sequence[float], *, n_samples: int = 20000, seed: int = 0) -> Figure:
    """One panel per α: histogram of λ from `mix.sample_lam` under the Gamma-formula density."""
    import torch

    from mixcls.mix import sample_lam

    for alpha in alphas:
        _check_alpha(alpha)
    if n_samples < 100:
        raise ValueError(f"n_samples must be >= 100 for a histogram, got {n_samples}")
    generator = torch.Generator().manual_seed(seed)
    theta = np.linspace(0, 1, 801)[1:-1]
    # One y scale for all panels, so their heights compare; the spikes of α < 1 at 0 and 1
    # go off the top and their height is written beside them.
    top = max([2.5] + [1.2 * float(beta_density(0.5, a)) for a in alphas if a > 1])
    fig = Figure(figsize=(4.2 * len(alphas), 4.6), layout="constrained")
    axes = fig.subplots(1, len(alphas), squeeze=False, sharey=True)[0]
    formula = r"$\frac{\Gamma(2\alpha)}{\Gamma(\alpha)^2}\,\lambda^{\alpha-1}(1-\lambda)^{\alpha-1}$"
    for ax, alpha in zip(axes, alphas):
        lam = sample_lam(alpha, n_samples, generator=generator).double().numpy().ravel()
        heights, _, _ = ax.hist(lam, bins=40, range=(0, 1), density=True, color="#9ecae1",
                                edgecolor="white",
                                label=f"histogram of {n_samples} λ from mix.sample_lam")
        ax.plot(theta, beta_density(theta, alpha), color="#d62728", lw=2,
                label="density " + formula)
        if heights.max() > top:
            ax.text(0.5, 0.97 * top, f"edge bars reach {heights.max():.1f}", ha="center",
                    va="top", fontsize=8, color="#555555")
        edge_formula = 2 * beta_mass(0, 0.1, alpha)
        edge_sampled = float(np.mean(np.minimum(lam, 1 - lam) < 0.1))
        ax.set_title(f"α = {alpha:g}", fontsize=13)
        ax.set_xlabel("λ (share of the first image)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, top)
        ax.text(0.5, -0.2, f"{describe_alpha(alpha)}\none image ≥ 90%: {edge_formula:.0%} by the "
                f"formula, {edge_sampled:.0%} sampled", transform=ax.transAxes, ha="center",
                va="top", fontsize=9.5)
    axes[0].set_ylabel("density")
    # The legend carries the title: constrained layout stacks a suptitle onto an outside legend.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=2,
               fontsize=11, frameon=False, title_fontsize=14,
               title="Mix ratio λ ~ Beta(α, α): the formula over sampled λ")
    return fig


def _check_alpha(alpha: float) -> None:
    try:
        ok = math.isfinite(float(alpha)) and float(alpha) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


# ------------------------------------------------------------------------ 2-D Fourier transform


def make_digits_image(*, grid: int = 4, size: int = 128, seed: int = 0) -> np.ndarray:
    """(size, size) float64 in [0, 1]: a grid × grid mosaic of scikit-learn's 8×8 digits, upscaled.

    The digits ship inside scikit-learn (no download); cubic upscaling keeps strokes smooth, so
    the spectrum shows the strokes rather than the pixel blocks of a nearest-neighbour zoom.
    """
    from sklearn.datasets import load_digits

    images = load_digits().images / 16.0  # (1797, 8, 8) in [0, 1]
    rng = np.random.default_rng(seed)
    # A 1-pixel black margin around each digit keeps neighbours from touching.
    tiles = np.pad(images[rng.choice(len(images), grid * grid, replace=False)], ((0, 0), (1, 1), (1, 1)))
    side = tiles.shape[1]
    mosaic = tiles.reshape(grid, grid, side, side).transpose(0, 2, 1, 3).reshape(grid * side, grid * side)
    zoomed = ndimage.zoom(mosaic, size / mosaic.shape[0], order=3, grid_mode=True, mode="grid-constant")
    return np.clip(zoomed, 0.0, 1.0)


def to_grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB or (H, W) -> (H, W) float64 in [0, 1] (BT.601 luma)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image[..., :3] @ _LUMA
    return image / 255.0 if image.max(initial=0) > 1.0 else image


def centred_spectrum(image: np.ndarray) -> np.ndarray:
    """(H, W) complex F(u, v) = Σ_x Σ_y f(x, y) e^(−j2π(ux/M + vy/N)), zero frequency at
    (H//2, W//2)."""
    return np.fft.fftshift(np.fft.fft2(image))


def inverse_spectrum(spectrum: np.ndarray) -> np.ndarray:
    """(H, W) real image from a centred spectrum: f = 1/(MN) Σ_u Σ_v F(u, v) e^(j2π(ux/M + vy/N))."""
    return np.fft.ifft2(np.fft.ifftshift(spectrum)).real


def lowpass_mask(height: int, width: int, radius: float) -> np.ndarray:
    """(H, W) bool, True at centred frequencies within `radius` (in frequency steps) of zero.

    A disc around the centre pairs every (u, v) with (−u, −v), so the kept spectrum stays
    conjugate-symmetric and its inverse is real.
    """
    v, u = np.ogrid[:height, :width]
    return (v - height // 2) ** 2 + (u - width // 2) ** 2 <= radius**2


def lowpass_reconstruct(image: np.ndarray, radius: float) -> np.ndarray:
    """(H, W): the image rebuilt from its frequencies within `radius` of zero only."""
    spectrum = centred_spectrum(image)
    return inverse_spectrum(spectrum * lowpass_mask(*image.shape, radius))


_DFT_TEXT = "\n".join([
    "DFT of an M×N image:",
    r"$F(u,v)=\sum_{x}\sum_{y} f(x,y)\,e^{-j2\pi(ux/M+vy/N)}$",
    "",
    "and back:",
    r"$f(x,y)=\frac{1}{MN}\sum_{u}\sum_{v} F(u,v)\,e^{j2\pi(ux/M+vy/N)}$",
    "",
    "low-pass of radius r: keep F(u, v)",
    "with u² + v² ≤ r² (inside the circle),",
    "set the rest to 0, and transform back."])


def plot_fft(image: np.ndarray, *, radii: Sequence[float] = (4, 8, 16, 32)) -> Figure:
    """Image, centred log-magnitude spectrum, exact inverse, and low-pass rebuilds at `radii`."""
    image = to_grey(image)
    if image.ndim != 2 or min(image.shape) < 4:
        raise ValueError(f"need an image of at least 4×4 pixels, got shape {image.shape}")
    if not radii or any(not r > 0 for r in radii):
        raise ValueError(f"radii must be > 0, got {list(radii)}")
    spectrum = centred_spectrum(image)
    round_trip = inverse_spectrum(spectrum)
    n_cols = max(3, len(radii))
    fig = Figure(figsize=(3.3 * n_cols, 7.4), layout="constrained")
    axes = fig.subplots(2, n_cols, squeeze=False)
    _show(axes[0, 0], image, f"image f(x, y), {image.shape[0]}×{image.shape[1]}")
    axes[0, 1].imshow(np.log1p(np.abs(spectrum)), cmap="magma")
    axes[0, 1].set_title("log(1 + |F(u, v)|), centred", fontsize=10)
    axes[0, 1].set_axis_off()
    for r in radii:
        axes[0, 1].add_patch(Circle((image.shape[1] // 2, image.shape[0] // 2), r, fill=False,
                                    color="cyan", lw=0.9))
    error = np.abs(round_trip - image).max()
    _show(axes[0, 2], round_trip, f"inverse DFT of all of F\nmax |error| = {error:.1e}")
    for ax in axes[0, 3:]:
        ax.set_axis_off()
    if n_cols > 3:
        axes[0, 3].text(0.0, 0.5, _DFT_TEXT, fontsize=10.5, va="center", ha="left",
                        transform=axes[0, 3].transAxes)
    for ax, r in zip(axes[1], radii):
        kept = lowpass_mask(*image.shape, r)
        rebuilt = lowpass_reconstruct(image, r)
        rms = np.sqrt(np.mean((rebuilt - image) ** 2))
        _show(ax, rebuilt, f"radius {r:g}: {kept.sum()} of {kept.size} freqs\nRMS error {rms:.3f}")
    for ax in axes[1, len(radii):]:
        ax.set_axis_off()
    fig.suptitle("An image is a sum of 2-D waves: the low frequencies (inside the circles) "
                 "give its smooth outline", fontsize=12)
    return fig


def _show(ax, image: np.ndarray, title: str, *, cmap: str = "gray") -> None:
    ax.imshow(np.clip(image, 0, 1), cmap=cmap, vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


# -------------------------------------------------------------------------------------- FMix


def radial_profile(spectrum_magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies 1..R, mean magnitude on each integer ring) of a centred (H, W) magnitude."""
    height, width = spectrum_magnitude.shape
    v, u = np.indices((height, width))
    ring = np.rint(np.hypot(v - height // 2, u - width // 2)).astype(int).ravel()
    sums = np.bincount(ring, weights=spectrum_magnitude.ravel())
    counts = np.bincount(ring)
    top = min(height, width) // 2
    freqs = np.arange(1, top)
    return freqs, sums[1:top] / counts[1:top]


def plot_fmix(lam: float, *, decay_powers: Sequence[float] = (1, 3, 5), size: int = 96,
              n_spectra: int = 64, seed: int = 0) -> Figure:
    """One row per decay power d: spectrum magnitude vs 1/f^d, grey image, mask, mixed images.

    The spectrum panel averages |DFT| of `n_spectra` grey images from `mix.fmix_grey` over
    rings of equal frequency, so it shows the 1/f^d law the implementation really produces.
    """
    import torch

    from mixcls.mix import fmix_grey, fmix_masks

    if not 0 < lam < 1:
        raise ValueError(f"lam must be in (0, 1), got {lam}")
    if not decay_powers or any(not d > 0 for d in decay_powers):
        raise ValueError(f"decay powers must be > 0, got {list(decay_powers)}")
    first = _tint(make_digits_image(size=size, seed=seed), (1.0, 0.55, 0.1))
    second = _tint(make_digits_image(size=size, seed=seed + 1), (0.15, 0.45, 1.0))
    fig = Figure(figsize=(15, 3.4 * len(decay_powers)), layout="constrained")
    axes = fig.subplots(len(decay_powers), 4, squeeze=False)
    for row, decay in zip(axes, decay_powers):
        greys = fmix_grey(n_spectra, size, size, decay,
                          generator=torch.Generator().manual_seed(seed + 1))
        _draw_spectrum_profile(row[0], greys.double().numpy(), decay)
        # From the same generator state fmix_masks thresholds exactly the image fmix_grey gives.
        grey = fmix_grey(1, size, size, decay, generator=torch.Generator().manual_seed(seed))
        mask = fmix_masks(1, size, size, lam, decay_power=decay,
                          generator=torch.Generator().manual_seed(seed))
        grey, mask = grey[0].double().numpy(), mask[0, 0].double().numpy()
        row[1].imshow(grey, cmap="gray")
        row[1].contour(mask, levels=[0.5], colors="#d62728", linewidths=1.2)
        row[1].set_title("grey image (inverse DFT), mask edge in red", fontsize=10)
        row[1].set_axis_off()
        _show(row[2], mask, f"mask: top {lam:g} of grey → 1\nmean {mask.mean():.3f} (λ = {lam:g})")
        mixed = mask[..., None] * first + (1 - mask[..., None]) * second
        row[3].imshow(np.clip(mixed, 0, 1))
        row[3].set_title("mask · A + (1 − mask) · B", fontsize=10)
        row[3].set_axis_off()
    fig.suptitle(f"FMix: random spectrum decaying as 1/f^d → inverse DFT → threshold at λ = {lam:g}\n"
                 "(the flat tails at high f: mix.py makes the field on a coarse grid and "
                 "upsamples it bilinearly)", fontsize=12)
    return fig


def _draw_spectrum_profile(ax, greys: np.ndarray, decay: float) -> None:
    """Log-log: mean |DFT| over rings of equal frequency of greys (N, H, W), and 1/f^decay."""
    magnitude = np.abs(np.fft.fftshift(np.fft.fft2(greys), axes=(-2, -1)))
    freqs, profile = radial_profile(magnitude.mean(axis=0))
    ax.loglog(freqs, profile, "o", ms=3, color="#1f77b4", label="mean |F| of fmix_grey")
    # The reference line's height is fitted on f = 1..4, where every grid holds the law;
    # beyond the coarse grid mix.py samples on, bilinear upsampling leaves a faint floor.
    low = freqs <= 4
    offset = np.median(np.log(profile[low]) + decay * np.log(freqs[low]))
    ax.loglog(freqs, np.exp(offset) * freqs ** -float(decay), color="#d62728",
              label=f"∝ 1/f^{decay:g}")
    ax.set_xlabel("frequency f (cycles per image)")
    ax.set_title(f"decay d = {decay:g}: spectrum magnitude", fontsize=10)
    ax.legend(fontsize=8)


def _tint(grey: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3): white background, strokes in `colour`."""
    colour = np.asarray(colour)
    return 1.0 - grey[..., None] * (1.0 - colour)


# ------------------------------------------------------------------------------------ memory


MEMORY_PARTS = (("params_mb", "parameters", "#4c72b0"), ("grads_mb", "gradients", "#55a868"),
                ("optimizer_mb", "optimizer state (AdamW)", "#c44e52"),
                ("activations_mb", "activations + workspace", "#dd8452"))


def plot_memory(results: Sequence[MemoryResult]) -> Figure:
    """Stacked bars of one training step's peak memory per setting, split into its parts."""
    if not results:
        raise ValueError("no memory results to plot")
    first = results[0]
    fig = Figure(figsize=(max(6.0, 1.1 * len(results) + 3), 5.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(results))
    bottom = np.zeros(len(results))
    for key, name, colour in MEMORY_PARTS:
        # A negative rest (a few MiB freed from the baseline) cannot be drawn as a bar.
        values = np.array([0.0 if r.oom else max(getattr(r, key), 0.0) for r in results])
        ax.bar(x, values, bottom=bottom, color=colour, label=name, width=0.7)
        bottom += values
    for i, r in enumerate(results):
        ax.text(i, bottom[i], "OOM" if r.oom else f"{r.peak_mb:.0f}", ha="center",
                va="bottom", fontsize=9)
    ax.set_xticks(x, [f"{r.label}\n(eff. {r.effective_batch})" for r in results], fontsize=9)
    ax.set_xlabel("micro-batch (x accumulation steps), amp")
    ax.set_ylabel("peak memory of one step (MiB)")
    ax.set_ylim(0, bottom.max() * 1.12 + 1)
    for i in range(1, len(results)):
        if results[i].amp != results[i - 1].amp:
            ax.axvline(i - 0.5, color="#999999", ls="--", lw=0.8)
    where = ("torch.cuda.max_memory_allocated" if first.device.startswith("cuda")
             else "peak RSS of a fresh process per setting")
    ax.set_title(f"{first.model} at {first.img_size} px: forward + backward + AdamW step on "
                 f"{first.device} ({where})\nparameters, gradients, optimizer state from tensor "
                 "sizes; the rest of the peak: activations, input batch, temporaries",
                 fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=9, loc="upper left")
    return fig


# ------------------------------------------------------------------------------- show-mix


@dataclass
class MixExample:
    """One mixed pair: images (3, S, S) float in [0, 1], mask (S, S), `weight` = the mask's mean."""

    method: str
    image1: torch.Tensor
    image2: torch.Tensor
    mask: torch.Tensor
    mixed: torch.Tensor
    label1: str
    label2: str
    weight: float

    def label_text(self) -> str:
        if self.label1 == self.label2:
            return f"{self.label1} 1.00"
        return f"{self.label1} {self.weight:.2f} · {self.label2} {1 - self.weight:.2f}"


def pick_pairs(labels: np.ndarray, n: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """`n` pairs of distinct row indices, each partner of another class where one is left."""
    order = torch.randperm(len(labels), generator=generator).tolist()
    firsts, rest = order[:n], order[n:]
    pairs = []
    for i in firsts:
        j = next((j for j in rest if labels[j] != labels[i]), rest[0])
        rest.remove(j)
        pairs.append((i, j))
    return pairs


def load_images(paths: list[str], img_size: int) -> torch.Tensor:
    """Images (N, 3, S, S) float in [0, 1], resized (antialiased) to img_size × img_size."""
    out = []
    for path in paths:
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None].float() / 255.0
        out.append(F.interpolate(image, size=(img_size, img_size), mode="bilinear",
                                 antialias=True, align_corners=False).clamp(0, 1))
    return torch.cat(out)


def make_examples(images1: torch.Tensor, images2: torch.Tensor, labels1: list[str],
                  labels2: list[str], *, weights: dict[str, float], alpha: float,
                  decay_power: float = 3.0, max_soft: float = 0.0,
                  generator: torch.Generator | None = None) -> list[MixExample]:
    """Mix images1[i] (N, 3, S, S) with images2[i], a method per pair drawn from `weights`."""
    n, _, height, width = images1.shape
    names = list(weights)
    picks = torch.multinomial(torch.tensor([weights[m] for m in names]), n, replacement=True,
                              generator=generator)
    lam = sample_lam(alpha, n, generator)
    examples = []
    for i in range(n):
        method = names[int(picks[i])]
        mask = make_masks(method, lam[i:i + 1], height, width, decay_power=decay_power,
                          max_soft=max_soft, generator=generator)
        mixed, lam_eff = mix_pairs(images1[i:i + 1], images2[i:i + 1], mask)
        examples.append(MixExample(method, images1[i], images2[i],
                                   mask.expand(1, 1, height, width)[0, 0], mixed[0],
                                   labels1[i], labels2[i], float(lam_eff[0])))
    return examples


def plot_examples(examples: list[MixExample], *, alpha: float):
    """A matplotlib Figure: one row per example, columns image 1, image 2, mask, mixed."""
    fig = Figure(figsize=(4 * 2.3, len(examples) * 2.6 + 0.4))
    axes = fig.subplots(len(examples), 4, squeeze=False)
    titles = ["image 1 (x1)", "image 2 (x2)", "mask m", "m·x1 + (1−m)·x2"]
    for row, ex in zip(axes, examples):
        pictures = [ex.image1, ex.image2, ex.mask, ex.mixed]
        captions = [ex.label1, ex.label2, f"{ex.method}, mean {ex.weight:.2f}", ex.label_text()]
        for ax, picture, caption in zip(row, pictures, captions):
            if picture.ndim == 3:
                ax.imshow(picture.permute(1, 2, 0).numpy())
            else:
                ax.imshow(picture.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xlabel(caption, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"λ ~ Beta({alpha:g}, {alpha:g}); the targets are weighted by the mask's mean",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------- memory flags


def parse_numbers(text: str, flag: str, kind: type) -> list:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{flag}: give at least one value")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a comma-separated list of "
                          f"{'integers' if kind is int else 'numbers'}") from None


def _parse_accum(item: str) -> tuple[int, int]:
    micro, sep, steps = item.strip().lower().partition("x")
    try:
        pair = (int(micro), int(steps))
    except ValueError:
        pair = None
    if not sep or pair is None or pair[1] < 1:
        raise ConfigError(f"--accum: {item.strip()!r} is not MICROxSTEPS like 8x8")
    return pair


def parse_memory_settings(*, batch: str, amp: str, accum: str, img_size: int, num_classes: int,
                          model: str, device: str, grad_checkpointing: bool = False
                          ) -> tuple[list[int], list[str], list[tuple[int, int]], str]:
    """(batch sizes, AMP modes, (micro_batch, accum_steps) pairs, device) from the text of the
    memory flags (--batch "8,16", --amp "none,bf16", --accum "8x8", --device "auto"), checked
    before any measuring; ConfigError names the flag, ModelError a model without the gradient
    checkpointing asked for. `mixcls explain memory` and benchmarks/memory.py both use it."""
    from mixcls.config import ModelConfig
    from mixcls.devices import resolve_device
    from mixcls.models import check_model_name, check_model_options  # registers mixcls's CNNs

    batches = parse_numbers(batch, "--batch", int)
    amps = [a.strip() for a in amp.split(",") if a.strip()]
    pairs = [_parse_accum(item) for item in accum.split(",") if item.strip()]
    if any(b < 2 for b in batches + [m for m, _ in pairs]):
        raise ConfigError(f"--batch/--accum: batch sizes must be >= 2 (BatchNorm), got {batch!r}")
    bad = [a for a in amps if a not in AMP_MODES]
    if bad or not amps:
        raise ConfigError(f"--amp: {bad[0] if bad else amp!r} is not one of {', '.join(AMP_MODES)}")
    if img_size < 8 or num_classes < 2:
        raise ConfigError(f"--img-size ({img_size}) must be >= 8 and --num-classes "
                          f"({num_classes}) >= 2")
    check_model_name(model)
    if grad_checkpointing:
        check_model_options(ModelConfig(name=model, grad_checkpointing=True), layer_decay=None,
                            head_lr_mult=1.0)
    resolved = resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):  # what measuring supports
        raise ConfigError(f"--device: {device!r} is not auto, cpu, cuda or cuda:N")
    return batches, amps, pairs, str(resolved)
