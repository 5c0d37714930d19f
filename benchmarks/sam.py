"""Sharpness-aware minimization (`--sam sam|asam`) against plain steps, on Fashion-MNIST with
clean and with noisy training labels.

Data: a `mixcls data fashion-mnist` export (`--data`; nothing is downloaded). `--n-train`
training images (the same number of each class, drawn with seed 0) in 5 folds; the export's
official test images, all of them, held out, never trained on, their labels never changed.

The noisy table gives `--noise` of the training rows (drawn with seed 0) a wrong label, each
drawn uniformly from the other classes (symmetric noise). Its CV is scored against those
labels, as a competitor's CV is; the test set says how well the truth was learnt.

Five runs of one recipe (`mixcls_cnn_tiny` at 28 px, preset light, AdamW at 3e-3, cosine,
5 folds, `--epochs` 10), all on the first run's folds (`--folds-from`; `--runs` picks some of
them, in its order, the first making the folds):
- clean_plain, clean_sam: the clean labels, plain steps and `--sam sam` (rho 0.05);
- noisy_plain, noisy_sam, noisy_asam: the noisy labels, plain steps, `--sam sam` (rho 0.05)
  and `--sam asam` (rho 2.0), the radii the methods' authors use, fixed before any run.
Each is scored by its CV (oof.csv) and by the test accuracy and log-loss of its fold models'
average (`mixcls predict --with-probs`). A step whose output exists in WORK is not run again.

Ends with `clean_plain_test_acc=… clean_sam_test_acc=… noisy_plain_test_acc=…
noisy_sam_test_acc=… noisy_asam_test_acc=… clean_gain_points=… noisy_gain_points=…
sam_time_ratio=…` (accuracies in %; the gains are the SAM run's test accuracy − the plain
run's on the same labels, the noisy one the better of sam and asam; the time ratio is
noisy_sam's training minutes over noisy_plain's, from metrics.json; with `--runs`, the figures
whose runs were run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from finetune import work_parser
from mixcls.runs import read_json
from swa import FLAGS, fit_and_score, write_balanced_tables

RUNS = {"clean_plain": ("train.csv", []), "clean_sam": ("train.csv", ["--sam", "sam"]),
        "noisy_plain": ("train_noisy.csv", []), "noisy_sam": ("train_noisy.csv", ["--sam", "sam"]),
        "noisy_asam": ("train_noisy.csv", ["--sam", "asam"])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = work_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=10000, help="training images (balanced)")
    parser.add_argument("--noise", type=float, default=0.2, help="share of training labels made wrong")
    parser.add_argument("--runs", type=lambda v: v.split(","), default=list(RUNS),
                        help="comma-separated, of " + ", ".join(RUNS) + " (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    if not 0 < args.noise < 1:
        parser.error(f"--noise {args.noise}: a share in (0, 1)")
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown or len(set(args.runs)) != len(args.runs):
        parser.error(f"--runs {','.join(args.runs)}: each once, of {', '.join(RUNS)}")
    return args


def write_noisy_table(work: Path, noise: float) -> int:
    """WORK/train_noisy.csv: train.csv with round(noise x n) labels changed; how many."""
    table = pd.read_csv(work / "train.csv", dtype={"image_id": str})
    k = int(table["label"].max()) + 1
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(table), size=round(noise * len(table)), replace=False)
    labels = table["label"].to_numpy().copy()
    labels[flipped] = (labels[flipped] + rng.integers(1, k, size=len(flipped))) % k  # never itself
    table["label"] = labels
    table.to_csv(work / "train_noisy.csv", index=False)
    return len(flipped)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    n_train, n_test = write_balanced_tables(args)
    flipped = write_noisy_table(args.work, args.noise)
    print(f"{n_train} training images (balanced, of {args.data}) in 5 folds; {n_test} test images "
          f"held out; the noisy table changes {flipped} labels ({100 * flipped / n_train:.1f} %)")
    print(f"recipe: mixcls_cnn_tiny at 28 px, preset light, AdamW 3e-3, cosine, 5 folds, "
          f"{args.epochs} epochs")
    rows, names = [], args.runs
    for name in names:
        table, extra = RUNS[name]
        shared = [] if name == names[0] else ["--folds-from", str(args.work / names[0])]
        row = fit_and_score(name, args, [*FLAGS, "--epochs", str(args.epochs), *extra, *shared],
                            train_csv=args.work / table)
        rows.append({"run": name, "labels": table.removesuffix(".csv").removeprefix("train_")
                     .replace("train", "clean"), **{k: v for k, v in row.items() if k != "run"}})
    table = pd.DataFrame(rows).set_index("run")
    print(table.reset_index().to_string(index=False))
    print(final_line(table["test_acc"], args.work, names))
    return 0


def final_line(acc: pd.Series, work: Path, names: list[str]) -> str:
    """The test accuracies, then each figure whose runs were among `names`."""
    figures = [f"{n}_test_acc={acc[n]}" for n in names]
    if {"clean_plain", "clean_sam"} <= set(names):
        figures.append(f"clean_gain_points={round(float(acc['clean_sam'] - acc['clean_plain']), 2)}")
    noisy_sam = [n for n in ("noisy_sam", "noisy_asam") if n in names]
    if "noisy_plain" in names and noisy_sam:
        best = max(acc[n] for n in noisy_sam)
        figures.append(f"noisy_gain_points={round(float(best - acc['noisy_plain']), 2)}")
    if {"noisy_plain", "noisy_sam"} <= set(names):
        seconds = {n: float(read_json(work / n / "metrics.json")["seconds"]) for n in ("noisy_plain", "noisy_sam")}
        figures.append(f"sam_time_ratio={seconds['noisy_sam'] / seconds['noisy_plain']:.2f}")
    return " ".join(figures)


if __name__ == "__main__":
    sys.exit(main())
