"""`mixcls explain beta|fft|fmix|memory`: pictures of the maths under the toolkit.

Each sub-command checks its flags, draws one figure with `mixcls.explain` and writes it
atomically; nothing is written when a flag is bad.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mixcls import explain, runs
from mixcls.config import AMP_MODES, ConfigError
from mixcls.data import DataError, read_image


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain", help="draw the maths: Beta(α, α), the 2-D DFT, FMix masks, step memory",
        description="Draw one picture of the maths behind mixing and training into --out.")
    sub = p.add_subparsers(dest="picture", metavar="PICTURE", required=True)

    q = sub.add_parser("beta", help="Beta(α, α) density over sampled λ",
                       description="The Gamma-function density of Beta(α, α) for each α, drawn "
                       "over a histogram of λ sampled by mixcls.mix.sample_lam.")
    q.add_argument("--alpha", default="0.2,1,4", help="comma-separated α values > 0")
    q.add_argument("--samples", type=int, default=20000, help="λ samples per α")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="picture file (.png, .svg, .pdf)")
    q.set_defaults(func=run_beta)

    q = sub.add_parser("fft", help="an image, its 2-D DFT and low-pass rebuilds",
                       description="An image, its centred log-magnitude DFT, the exact inverse, "
                       "and rebuilds from the frequencies within each radius.")
    q.add_argument("--image", help="image file (default: a mosaic of scikit-learn digits)")
    q.add_argument("--radii", default="4,8,16,32", help="comma-separated low-pass radii > 0")
    q.add_argument("--max-side", type=int, default=256,
                   help="shrink --image so its longest side is at most this many pixels")
    q.add_argument("--out", required=True, help="picture file (.png, .svg, .pdf)")
    q.set_defaults(func=run_fft)

    q = sub.add_parser("fmix", help="FMix masks step by step for a few decay powers",
                       description="For one λ and each decay power d: the 1/f^d spectrum, the "
                       "low-frequency grey image, the thresholded mask and a mixed pair.")
    q.add_argument("--lam", type=float, default=0.4, help="mix ratio λ in (0, 1)")
    q.add_argument("--decay", default="1,3,5", help="comma-separated decay powers > 0")
    q.add_argument("--size", type=int, default=96, help="mask side in pixels")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="picture file (.png, .svg, .pdf)")
    q.set_defaults(func=run_fmix)

    q = sub.add_parser("memory", help="measured memory of one training step per batch size",
                       description="Measure forward + backward + AdamW step of a timm model at "
                       "each setting in a fresh process; print a table and draw stacked bars.")
    q.add_argument("--model", default="resnet18", help="timm model name")
    q.add_argument("--img-size", type=int, default=224)
    q.add_argument("--num-classes", type=int, default=5)
    q.add_argument("--batch", default="8,16,32,64", help="comma-separated batch sizes")
    q.add_argument("--amp", default="none", help=f"comma-separated of {', '.join(AMP_MODES)}")
    q.add_argument("--accum", default="",
                   help="comma-separated MICROxSTEPS, e.g. 8x8 (micro-batch 8, 8 accumulation steps)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    q.add_argument("--grad-checkpointing", action="store_true",
                   help="measure with the model's gradient checkpointing on (train --grad-checkpointing)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="picture file (.png, .svg, .pdf)")
    q.set_defaults(func=run_memory)


def run_beta(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    alphas = explain.parse_numbers(args.alpha, "--alpha", float)
    bad = [a for a in alphas if not (a > 0 and math.isfinite(a))]
    if bad:
        raise ConfigError(f"--alpha: {bad[0]:g} must be a finite number > 0 (Beta(α, α) needs α > 0)")
    if args.samples < 100:
        raise ConfigError(f"--samples: {args.samples} must be >= 100")
    runs.atomic_save_figure(explain.plot_beta(alphas, n_samples=args.samples, seed=args.seed), out)
    print(f"wrote {out}: Beta(α, α) for α = {', '.join(f'{a:g}' for a in alphas)}")
    return 0


def run_fft(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    radii = explain.parse_numbers(args.radii, "--radii", float)
    if any(not r > 0 for r in radii):
        raise ConfigError(f"--radii: every radius must be > 0, got {args.radii!r}")
    if args.max_side < 8:
        raise ConfigError(f"--max-side: {args.max_side} must be >= 8")
    if args.image is None:
        image, source = explain.make_digits_image(), "a mosaic of scikit-learn digits"
    else:
        image, source = _read_grey(Path(args.image), args.max_side), args.image
    runs.atomic_save_figure(explain.plot_fft(image, radii=radii), out)
    print(f"wrote {out}: DFT of {source} ({image.shape[0]}x{image.shape[1]}), "
          f"low-pass radii {', '.join(f'{r:g}' for r in radii)}")
    return 0


def run_fmix(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    decays = explain.parse_numbers(args.decay, "--decay", float)
    if any(not d > 0 for d in decays):
        raise ConfigError(f"--decay: every decay power must be > 0, got {args.decay!r}")
    if not 0 < args.lam < 1:
        raise ConfigError(f"--lam: {args.lam} must be in (0, 1)")
    if args.size < 16:
        raise ConfigError(f"--size: {args.size} must be >= 16")
    fig = explain.plot_fmix(args.lam, decay_powers=decays, size=args.size, seed=args.seed)
    runs.atomic_save_figure(fig, out)
    print(f"wrote {out}: FMix at λ = {args.lam:g}, decay powers {', '.join(f'{d:g}' for d in decays)}")
    return 0


def run_memory(args: argparse.Namespace) -> int:
    from mixcls.memory import format_memory_table, measure_memory

    out = _check_out(args.out)
    batches, amps, accum, device = explain.parse_memory_settings(
        batch=args.batch, amp=args.amp, accum=args.accum, img_size=args.img_size,
        num_classes=args.num_classes, model=args.model, device=args.device,
        grad_checkpointing=args.grad_checkpointing)
    results = measure_memory(args.model, args.img_size, num_classes=args.num_classes,
                             batch_sizes=batches, amp_modes=amps, accum=accum, device=device,
                             seed=args.seed, grad_checkpointing=args.grad_checkpointing,
                             log=lambda line: print(line, flush=True))
    checkpointing = ", gradient checkpointing" if args.grad_checkpointing else ""
    print(f"{args.model} at {args.img_size} px on {device}{checkpointing}, one training step, MiB:")
    print(format_memory_table(results))
    runs.atomic_save_figure(explain.plot_memory(results), out)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------- flag helpers


def _check_out(text: str) -> Path:
    out = Path(text)
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"--out {text}: the suffix must be one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def _read_grey(path: Path, max_side: int) -> np.ndarray:
    """The image at `path` as (H, W) grey floats, its longest side shrunk to max_side."""
    from PIL import Image

    if not path.is_file():
        raise DataError(f"--image {path}: no such file")
    try:
        rgb = read_image(path)
    except OSError as exc:
        raise DataError(f"--image {path}: cannot be read as an image ({exc})") from None
    scale = max_side / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS))
    return explain.to_grey(rgb)
