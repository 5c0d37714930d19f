"""mixcls show-mix: a picture of what mixup / cutmix / fmix do to real training images.

One row per pair: the two source images, the mask m, the mixed image m ⊙ x1 + (1 − m) ⊙ x2,
and under it the label weights the loss will see ("dog 0.60 · cat 0.40").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixcls.config import ConfigError
from mixcls.data import DataError, load_train_table, read_image
from mixcls.mix import make_masks, mix_pairs, parse_mix_spec, sample_lam
from mixcls.runs import atomic_save_figure


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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "show-mix", help="picture of mixed training images with their label weights",
        description="Mix a few random pairs of training images with mixup, cutmix or fmix and save "
                    "a grid: both sources, the mask, the mixed image and the label weights.")
    p.add_argument("--data", help="competition folder (train.csv + train_images/) or class-per-folder tree")
    p.add_argument("--csv", help="training table, when it is not DATA/train.csv")
    p.add_argument("--images", help="training images folder, when it is not DATA/train_images")
    p.add_argument("--id-col", default="image_id", help="column of image file names")
    p.add_argument("--label-col", default="label", help="column of labels")
    p.add_argument("--method", default="fmix",
                   help="mixup, cutmix, fmix, or weights like fmix:0.5,cutmix:0.5 (drawn per pair)")
    p.add_argument("--alpha", type=float, default=1.0, help="lambda ~ Beta(alpha, alpha)")
    p.add_argument("--decay-power", type=float, default=3.0, help="fmix spectrum decay 1/f^d")
    p.add_argument("--max-soft", type=float, default=0.0, help="fmix soft edge width (0: binary)")
    p.add_argument("--n", type=int, default=4, help="number of pairs (rows)")
    p.add_argument("--img-size", type=int, default=224, help="side the images are resized to")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs, lambda and masks")
    p.add_argument("--out", required=True, help="picture file (.png, .pdf, .svg, ...)")
    p.set_defaults(func=run_show_mix)


def _check_args(args: argparse.Namespace) -> dict[str, float]:
    """The method weights; every bad flag raises ConfigError before anything is read or written."""
    try:
        weights = parse_mix_spec(args.method)
    except ValueError as exc:
        raise ConfigError(f"--method: {exc}") from None
    if not weights:
        raise ConfigError("--method: 'none' shows nothing; use mixup, cutmix or fmix")
    rules = {"--alpha": (args.alpha, args.alpha > 0, "> 0"), "--n": (args.n, args.n >= 1, ">= 1"),
             "--img-size": (args.img_size, args.img_size >= 8, ">= 8"),
             "--decay-power": (args.decay_power, args.decay_power > 0, "> 0"),
             "--max-soft": (args.max_soft, 0 <= args.max_soft <= 0.5, "in [0, 0.5]")}
    for flag, (value, ok, rule) in rules.items():
        if not ok:
            raise ConfigError(f"{flag}: {value} must be {rule}")
    from matplotlib.figure import Figure
    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(args.out).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ConfigError(f"--out {args.out}: unknown picture format {suffix!r}; use one of "
                          f"{', '.join(sorted(formats))}")
    return weights


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
    from matplotlib.figure import Figure
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


def run_show_mix(args: argparse.Namespace) -> int:
    weights = _check_args(args)
    table = load_train_table(data=args.data, csv=args.csv, images=args.images, id_col=args.id_col,
                             label_col=args.label_col, check_images="header")
    frame = table.frame
    if len(frame) < 2:
        raise DataError(f"{args.csv or args.data or args.images}: show-mix needs at least 2 images, "
                        f"found {len(frame)}")
    n = min(args.n, len(frame) // 2)
    if n < args.n:
        print(f"only {len(frame)} images: showing {n} pairs")
    generator = torch.Generator().manual_seed(args.seed)
    labels = frame["label"].to_numpy()
    pairs = pick_pairs(labels, n, generator)
    paths = frame["path"].tolist()
    first, second = zip(*pairs)
    examples = make_examples(
        load_images([paths[i] for i in first], args.img_size),
        load_images([paths[j] for j in second], args.img_size),
        [table.classes[labels[i]] for i in first], [table.classes[labels[j]] for j in second],
        weights=weights, alpha=args.alpha, decay_power=args.decay_power, max_soft=args.max_soft,
        generator=generator)
    out = atomic_save_figure(plot_examples(examples, alpha=args.alpha), args.out)
    print(f"wrote {out}: {n} pairs, mix {args.method}, alpha {args.alpha:g}")
    for ex in examples:
        print(f"  {ex.method:6s} {ex.label_text()}")
    return 0
