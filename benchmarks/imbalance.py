"""Class weights and the selection metric on a long-tailed training set, scored by macro F1.

Data: a `mixcls data fashion-mnist` export (`--data`; nothing is downloaded) holding at least
`--n-max` training images of each class. The classes, in an order shuffled with seed 0, keep
n_max x ratio^(r / (K - 1)) images each (r the rank): with the defaults 2,000 down to 200, a
10:1 long tail. The official test images are subsampled with the same proportions (1,000 down
to 100), so the held-out set shares the training set's class mix, as a competition's test set
does; it is never trained on.

Three runs of one recipe (`mixcls_cnn_tiny` at 28 px, preset light, 5 folds, `--epochs` 8),
all on the first run's folds (`--folds-from`), so their CVs compare row for row:
- plain:     the defaults (each fold's best epoch by valid accuracy);
- f1_select: `--select-metric macro_f1` (the epoch by the competition's metric);
- balanced:  `--class-weights balanced --select-metric macro_f1` (and the loss balanced);
and two rows after training, plain_bias: `mixcls blend plain --method mean --class-bias
macro_f1` (the plain run's probabilities with one bias per class fitted to macro F1; its CV
nested: each fold's rows biased by biases fitted without them), and balanced_bias, the same on
the balanced run (both at once).
Each is scored by CV accuracy and macro F1 (oof.csv) and by the test accuracy and macro F1 of
its fold models' average (`mixcls predict`). A step whose output exists in WORK is not run again.

Ends with `plain_test_f1=… f1_select_test_f1=… balanced_test_f1=… f1_gain_points=…
plain_test_acc=… balanced_test_acc=… rare_recall_plain=… rare_recall_balanced=…
plain_bias_test_f1=… plain_bias_test_acc=… bias_gain_points=… rare_recall_plain_bias=…
balanced_bias_test_f1=… max_cv_test_f1_gap_points=…` (in %; f1 gain = balanced − plain test macro F1, bias gain =
plain_bias − plain; the rare class is the one with the fewest training rows; gap = |CV − test|
of macro F1 over the five rows).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, recall_score

from duplicates import link_photo
from finetune import run, work_parser

FLAGS = ["--model", "mixcls_cnn_tiny", "--img-size", "28", "--preset", "light", "--folds", "5",
         "--batch-size", "128", "--lr", "3e-3", "--workers", "0", "--device", "cpu",
         "--cache-images", "yes", "--check-images", "header", "--no-progress", "--seed", "0"]
RUNS = {"plain": [], "f1_select": ["--select-metric", "macro_f1"],
        "balanced": ["--class-weights", "balanced", "--select-metric", "macro_f1"]}
# Rows made by `mixcls blend` of a trained run instead of training: name -> (run, blend flags).
BLENDS = {"plain_bias": ("plain", ["--method", "mean", "--class-bias", "macro_f1"]),
          "balanced_bias": ("balanced", ["--method", "mean", "--class-bias", "macro_f1"])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = work_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-max", type=int, default=2000, help="training images of the commonest class")
    parser.add_argument("--ratio", type=float, default=0.1, help="rarest / commonest class size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    if not 0 < args.ratio <= 1 or args.n_max < 10:
        parser.error(f"--ratio {args.ratio} must be in (0, 1] and --n-max {args.n_max} >= 10")
    return args


def class_sizes(num_classes: int, n_max: int, ratio: float, seed: int = 0) -> np.ndarray:
    """(K,) images kept per class: n_max x ratio^(r / (K - 1)) by each class's shuffled rank r."""
    ranks = np.random.default_rng(seed).permutation(num_classes)
    return np.round(n_max * ratio ** (ranks / max(num_classes - 1, 1))).astype(int)


def long_tail(table: pd.DataFrame, sizes: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """Each class c's first sizes[c] rows in a shuffled order; SystemExit when a class is short."""
    parts = []
    for c, n in enumerate(sizes):
        rows = table[table["label"] == c]
        if len(rows) < n:
            raise SystemExit(f"class {c} has {len(rows)} images, {n} are needed; export more "
                             "(mixcls data fashion-mnist without --limit) or lower --n-max")
        parts.append(rows.sample(n=int(n), random_state=seed + c))
    return pd.concat(parts).sort_index()


def write_tables(data: Path, work: Path, args: argparse.Namespace) -> tuple[Path, Path, np.ndarray]:
    """work/train.csv, work/test.csv and the image links; the training class sizes."""
    train = pd.read_csv(data / "train.csv", dtype={"image_id": str})
    test = pd.read_csv(data / "test.csv", dtype={"image_id": str})
    num_classes = int(train["label"].max()) + 1
    sizes = class_sizes(num_classes, args.n_max, args.ratio)
    train = long_tail(train, sizes)
    test_sizes = np.maximum(1, np.round(sizes * len(test) / num_classes / args.n_max)).astype(int)
    test = long_tail(test, test_sizes)
    for image_id in train["image_id"]:
        link_photo(data / "train_images" / image_id, work / "train_images" / image_id)
    for image_id in test["image_id"]:
        link_photo(data / "test_images" / image_id, work / "test_images" / image_id)
    train.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    if (data / "classes.json").is_file():
        (work / "classes.json").write_text((data / "classes.json").read_text())
    return work / "train.csv", work / "test.csv", sizes


def train_and_score(name: str, args: argparse.Namespace, rare: int) -> dict[str, float]:
    """One run (skipped when WORK/NAME/metrics.json exists) and its CV and test scores."""
    work, out = args.work, args.work / name
    minutes = 0.0
    shared = [] if name == "plain" else ["--folds-from", str(work / "plain")]
    if name in BLENDS and not (out / "blend.json").is_file():
        member, flags = BLENDS[name]
        minutes += run(["blend", str(work / member), "--out", str(out), *flags],
                       work / f"{name}_blend.log", args.threads)
    elif name not in BLENDS and not (out / "metrics.json").is_file():
        minutes += run(["train", "--csv", str(work / "train.csv"), "--images", str(work / "train_images"),
                        "--out", str(out), *FLAGS, "--epochs", str(args.epochs), *RUNS[name], *shared],
                       work / f"{name}_train.log", args.threads)
    probs = work / f"{name}_test.csv"
    if not probs.is_file():
        minutes += run(["predict", "--run", str(out), "--images", str(work / "test_images"),
                        "--ids", str(work / "test.csv"), "--out", str(probs), "--device", "cpu"],
                       work / f"{name}_predict.log", args.threads)
    oof = pd.read_csv(out / "oof.csv")
    truth = pd.read_csv(work / "test.csv")["label"].to_numpy()
    predicted = pd.read_csv(probs)["label"].to_numpy()
    k = int(max(truth.max(), oof["label"].max())) + 1

    def f1(y, p):
        return round(100 * f1_score(y, p, average="macro", labels=list(range(k)), zero_division=0), 2)

    return {"run": name, "cv_acc": round(100 * float((oof["pred"] == oof["label"]).mean()), 2),
            "cv_f1": f1(oof["label"], oof["pred"]),
            "test_acc": round(100 * float((predicted == truth).mean()), 2),
            "test_f1": f1(truth, predicted),
            "rare_recall": round(100 * recall_score(truth, predicted, labels=[rare], average="macro",
                                                    zero_division=0), 2),
            "minutes": round(minutes, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    _, test_csv, sizes = write_tables(args.data, args.work, args)
    rare = int(np.argmin(sizes))
    print(f"training rows per class {sizes.tolist()} ({int(sizes.sum())} in all, of {args.data}); "
          f"test rows {len(pd.read_csv(test_csv))} in the same proportions; rarest class {rare}")
    print(f"recipe: mixcls_cnn_tiny at 28 px, preset light, 5 folds, {args.epochs} epochs")
    rows = [train_and_score(name, args, rare) for name in [*RUNS, *BLENDS]]
    table = pd.DataFrame(rows).set_index("run")
    table["f1_gap_points"] = (table["cv_f1"] - table["test_f1"]).round(2)
    print(table.reset_index().to_string(index=False))
    p, s, b, pb, bb = (table.loc[n] for n in [*RUNS, *BLENDS])
    print(f"plain_test_f1={p.test_f1} f1_select_test_f1={s.test_f1} balanced_test_f1={b.test_f1} "
          f"f1_gain_points={round(b.test_f1 - p.test_f1, 2)} plain_test_acc={p.test_acc} "
          f"balanced_test_acc={b.test_acc} rare_recall_plain={p.rare_recall} "
          f"rare_recall_balanced={b.rare_recall} plain_bias_test_f1={pb.test_f1} "
          f"plain_bias_test_acc={pb.test_acc} bias_gain_points={round(pb.test_f1 - p.test_f1, 2)} "
          f"rare_recall_plain_bias={pb.rare_recall} balanced_bias_test_f1={bb.test_f1} "
          f"max_cv_test_f1_gap_points={round(float(table['f1_gap_points'].abs().max()), 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
