"""mixcls show-mix: a picture of what mixup / cutmix / fmix do to real training images.

One row per pair: the two source images, the mask m, the mixed image m ⊙ x1 + (1 − m) ⊙ x2,
and under it the label weights the loss will see ("dog 0.60 · cat 0.40").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mixcls.config import ConfigError
from mixcls.data import DataError, load_train_table
from mixcls.explain import load_images, make_examples, pick_pairs, plot_examples
from mixcls.mix import parse_mix_spec
from mixcls.runs import atomic_save_figure


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
