"""Stochastic weight averaging (`--swa-epochs`) against the best epoch, on Fashion-MNIST.

Data: a `mixcls data fashion-mnist` export (`--data`; nothing is downloaded). `--n-train`
training images (the same number of each class, drawn with seed 0) in 5 folds; the export's
official test images, all of them, held out and never trained on.

Five runs of one recipe (`mixcls_cnn_tiny` at 28 px, preset light, cosine schedule, 5 folds,
`--epochs` 10), all on the first run's folds (`--folds-from`), so their CVs compare row for row:
- plain: the defaults (each fold's model is its best epoch by valid accuracy, chosen on the
  rows that then score it);
- swa1:  `--swa-epochs 1`: the last epoch's weights with their BatchNorm statistics measured
  again on the fold's training rows (what the re-measuring alone does);
- swa3, swa5: the mean of the last 3 or 5 epochs' weights, statistics measured again;
- swa5_lr: as swa5, with the cosine over the first 5 epochs and the last 5 at a constant
  `--swa-lr 1e-3` (the SWA paper's recipe).
Each is scored by its CV (oof.csv) and by the test accuracy and log-loss of its fold models'
average (`mixcls predict --with-probs`). A step whose output exists in WORK is not run again.

Ends with `plain_test_acc=… swa1_test_acc=… swa3_test_acc=… swa5_test_acc=…
swa5_lr_test_acc=… best_swa_gain_points=… plain_test_logloss=… swa3_test_logloss=…
max_cv_test_gap_points=…` (accuracies in %; gain = the best SWA run's test accuracy − plain's;
gap = |CV − test accuracy| over the five runs). `train_min` is each run's training time from
its metrics.json, so a rerun that skips a finished run still shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

from finetune import run, work_parser
from mixcls.runs import read_json
from imbalance import write_tables

FLAGS = ["--model", "mixcls_cnn_tiny", "--img-size", "28", "--preset", "light", "--folds", "5",
         "--batch-size", "128", "--lr", "3e-3", "--scheduler", "cosine", "--workers", "0",
         "--device", "cpu", "--cache-images", "yes", "--check-images", "header", "--no-progress",
         "--seed", "0"]
SWA_LR = 1e-3  # a third of the peak lr, fixed before any run (never tuned on these figures)
RUNS = {"plain": [], "swa1": ["--swa-epochs", "1"], "swa3": ["--swa-epochs", "3"],
        "swa5": ["--swa-epochs", "5"], "swa5_lr": ["--swa-epochs", "5", "--swa-lr", str(SWA_LR)]}
SWA_RUNS = [name for name in RUNS if name != "plain"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = work_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=10000, help="training images (balanced)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    if args.epochs < 5:
        parser.error(f"--epochs {args.epochs}: swa5 averages 5 epochs; use at least 5")
    return args


def write_balanced_tables(args: argparse.Namespace) -> tuple[int, int]:
    """WORK/train.csv (n_train / K of each class), WORK/test.csv (every test image) and links."""
    classes = int(pd.read_csv(args.data / "train.csv")["label"].max()) + 1
    per_class = args.n_train // classes
    n_test = len(pd.read_csv(args.data / "test.csv"))
    # imbalance.write_tables with a ratio of 1 keeps per_class of every class, and of the test
    # images per_class x len(test) / (K x per_class) = all of them when the test set is balanced
    write_tables(args.data, args.work, argparse.Namespace(n_max=per_class, ratio=1.0))
    return per_class * classes, n_test


def train_and_score(name: str, args: argparse.Namespace) -> dict[str, float]:
    """One run (skipped when WORK/NAME/metrics.json exists) and its CV and test scores."""
    shared = [] if name == "plain" else ["--folds-from", str(args.work / "plain")]
    return fit_and_score(name, args, [*FLAGS, "--epochs", str(args.epochs), *RUNS[name], *shared],
                         train_csv=args.work / "train.csv")


def fit_and_score(name: str, args: argparse.Namespace, flags: list[str], *,
                  train_csv: Path) -> dict[str, float]:
    """`mixcls train FLAGS` on TRAIN_CSV into WORK/NAME, then `mixcls predict` on WORK's test
    images (each skipped when its output exists): the run's CV and test accuracy and log-loss
    (the CV against TRAIN_CSV's labels, the test against test.csv's) and training minutes."""
    work, out = args.work, args.work / name
    if not (out / "metrics.json").is_file():
        run(["train", "--csv", str(train_csv), "--images", str(work / "train_images"),
             "--out", str(out), *flags], work / f"{name}_train.log", args.threads)
    probs_csv = work / f"{name}_test.csv"
    if not probs_csv.is_file():
        run(["predict", "--run", str(out), "--images", str(work / "test_images"),
             "--ids", str(work / "test.csv"), "--out", str(probs_csv), "--device", "cpu",
             "--with-probs"], work / f"{name}_predict.log", args.threads)
    oof = pd.read_csv(out / "oof.csv")
    k = sum(c.startswith("prob_") for c in oof.columns)
    columns = [f"prob_{c}" for c in range(k)]
    truth = pd.read_csv(work / "test.csv")["label"].to_numpy()
    test = pd.read_csv(probs_csv)[columns].to_numpy()
    oof_probs = oof[columns].to_numpy()
    # the CSV files round each probability, so a row sums to 1 only within ~1e-7
    test, oof_probs = (p / p.sum(axis=1, keepdims=True) for p in (test, oof_probs))
    return {"run": name, "cv_acc": round(100 * float((oof["pred"] == oof["label"]).mean()), 2),
            "cv_logloss": round(log_loss(oof["label"], oof_probs, labels=list(range(k))), 4),
            "test_acc": round(100 * float((test.argmax(1) == truth).mean()), 2),
            "test_logloss": round(log_loss(truth, test, labels=list(range(k))), 4),
            "train_min": round(float(read_json(out / "metrics.json")["seconds"]) / 60, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    n_train, n_test = write_balanced_tables(args)
    print(f"{n_train} training images (balanced, of {args.data}) in 5 folds; {n_test} test images "
          "held out")
    print(f"recipe: mixcls_cnn_tiny at 28 px, preset light, cosine, 5 folds, {args.epochs} epochs "
          f"(swa5_lr: --swa-lr {SWA_LR:g})")
    table = pd.DataFrame([train_and_score(name, args) for name in RUNS]).set_index("run")
    table["gap_points"] = (table["cv_acc"] - table["test_acc"]).round(2)
    print(table.reset_index().to_string(index=False))
    best = max(SWA_RUNS, key=lambda n: table.loc[n, "test_acc"])
    gain = round(float(table.loc[best, "test_acc"] - table.loc["plain", "test_acc"]), 2)
    print(" ".join(f"{n}_test_acc={table.loc[n, 'test_acc']}" for n in RUNS)
          + f" best_swa_gain_points={gain} plain_test_logloss={table.loc['plain', 'test_logloss']}"
          f" swa3_test_logloss={table.loc['swa3', 'test_logloss']}"
          f" max_cv_test_gap_points={round(float(np.abs(table['gap_points']).max()), 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
