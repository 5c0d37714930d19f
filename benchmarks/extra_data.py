"""Extra training data from another distribution: validated with the rest, or train-only.

Data: a `mixcls data fashion-mnist --limit 10000` export (`--data`; nothing is downloaded). Its
10,000 training images split in two halves, stratified with seed 0:
- the competition's rows: 5,000 images as they are;
- the extra rows, standing in for an earlier competition's data (as Cassava 2019 was for 2020):
  the other 5,000, from another "camera" (each image halved to 14 px and enlarged back, so
  blurred) and labelled less carefully (`--extra-noise`, default 20 %, of their labels moved
  to another class, seed 0).
The official 10,000 test images are the held-out test set, never trained on.

Three runs of one recipe (`mixcls_cnn_tiny` at 28 px, preset light, 5 folds, `--epochs` 8):
- alone:      the competition's rows only;
- validated:  both halves as ordinary rows, folded together: what a user who concatenates the
              tables gets. Its CV pools the OOF rows of both halves; the table also gives its
              CV on the competition's rows alone;
- train_only: both halves, the extra rows flagged with `--train-only-col extra`: every fold
              trains on all of them and none validates them.
`alone` uses `--folds-from train_only`, so the two validate the competition's rows on the same
folds and their CVs compare row for row. Each run is scored by CV accuracy and by the test
accuracy of its fold models' average (`mixcls predict`). A step whose output exists in WORK is
not run again.

Ends with `alone_cv=… alone_test=… validated_cv=… validated_competition_cv=… validated_test=…
train_only_cv=… train_only_test=… extra_gain_points=… validated_gap_points=…
train_only_gap_points=…` (accuracies in %; gain = train_only test - alone test; gap = CV - test).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from duplicates import link_photo
from finetune import run, work_parser

FLAGS = ["--model", "mixcls_cnn_tiny", "--img-size", "28", "--preset", "light", "--folds", "5",
         "--batch-size", "128", "--lr", "3e-3", "--workers", "0", "--device", "cpu",
         "--cache-images", "yes", "--check-images", "header", "--no-progress", "--seed", "0"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = work_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--extra-noise", type=float, default=0.2,
                        help="share of the extra rows' labels moved to another class")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    if not 0 <= args.extra_noise < 1:
        parser.error(f"--extra-noise {args.extra_noise} must be in [0, 1)")
    return args


def blurred(source: Path, target: Path) -> None:
    """`source` halved and enlarged back (bilinear): the same garment from a worse camera."""
    if target.exists():
        return
    image = Image.open(source)
    small = image.resize((image.width // 2, image.height // 2), Image.BILINEAR)
    target.parent.mkdir(parents=True, exist_ok=True)
    small.resize(image.size, Image.BILINEAR).save(target)


def noisy_labels(labels: np.ndarray, share: float, num_classes: int, seed: int = 0) -> np.ndarray:
    """`labels` with round(share * N) of them, chosen at random, moved to another class."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    moved = rng.choice(len(labels), round(share * len(labels)), replace=False)
    out[moved] = (labels[moved] + rng.integers(1, num_classes, len(moved))) % num_classes
    return out


def write_tables(data: Path, work: Path, extra_noise: float) -> dict[str, Path]:
    """work/images (links and blurred copies) and the three training tables."""
    from sklearn.model_selection import train_test_split

    train = pd.read_csv(data / "train.csv", dtype={"image_id": str})
    comp, extra = train_test_split(train, test_size=0.5, stratify=train["label"], random_state=0)
    for image_id in comp["image_id"]:
        link_photo(data / "train_images" / image_id, work / "images" / image_id)
    extra = extra.assign(image_id=["extra/" + i for i in extra["image_id"]])
    for image_id in extra["image_id"]:
        blurred(data / "train_images" / image_id.removeprefix("extra/"), work / "images" / image_id)
    num_classes = int(train["label"].max()) + 1
    extra = extra.assign(label=noisy_labels(extra["label"].to_numpy(), extra_noise, num_classes))
    tables = {"alone": comp.assign(extra=0), "validated": pd.concat([comp, extra]),
              "train_only": pd.concat([comp.assign(extra=0), extra.assign(extra=1)])}
    paths = {}
    for name, table in tables.items():
        paths[name] = work / f"{name}.csv"
        table.to_csv(paths[name], index=False)
    if (data / "classes.json").is_file():  # the class names, beside each table
        (work / "classes.json").write_text((data / "classes.json").read_text())
    return paths


def train_and_score(name: str, csv: Path, data: Path, args: argparse.Namespace,
                    extra_flags: list[str]) -> dict[str, float]:
    """One run (skipped when WORK/NAME/metrics.json exists) and its test accuracy."""
    work, out = args.work, args.work / name
    minutes = 0.0
    if not (out / "metrics.json").is_file():
        minutes += run(["train", "--csv", str(csv), "--images", str(work / "images"), "--out",
                        str(out), *FLAGS, "--epochs", str(args.epochs), *extra_flags],
                       work / f"{name}_train.log", args.threads)
    probs = work / f"{name}_test_probs.csv"
    if not probs.is_file():
        minutes += run(["predict", "--run", str(out), "--images", str(data / "test_images"),
                        "--ids", str(data / "test.csv"), "--with-probs", "--out", str(probs),
                        "--device", "cpu"], work / f"{name}_predict.log", args.threads)
    oof = pd.read_csv(out / "oof.csv", dtype={"image_id": str})
    correct = oof["pred"] == oof["label"]
    competition = ~oof["image_id"].str.startswith("extra/")
    truth = pd.read_csv(data / "test.csv")["label"].to_numpy()
    predicted = pd.read_csv(probs)["label"].to_numpy()
    return {"run": name, "oof_rows": len(oof), "cv": round(100 * correct.mean(), 2),
            "competition_cv": round(100 * correct[competition].mean(), 2),
            "test": round(100 * float((predicted == truth).mean()), 2),
            "minutes": round(minutes, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    tables = write_tables(args.data, args.work, args.extra_noise)
    print(f"competition rows 5000 of {args.data}; extra rows 5000 (blurred, "
          f"{args.extra_noise:.0%} of labels moved); test images {len(pd.read_csv(args.data / 'test.csv'))}")
    print(f"recipe: mixcls_cnn_tiny at 28 px, preset light, 5 folds, {args.epochs} epochs")
    rows = [train_and_score("train_only", tables["train_only"], args.data, args,
                            ["--train-only-col", "extra"]),
            train_and_score("alone", tables["alone"], args.data, args,
                            ["--folds-from", str(args.work / "train_only")]),
            train_and_score("validated", tables["validated"], args.data, args, [])]
    table = pd.DataFrame(rows).set_index("run").loc[["alone", "validated", "train_only"]]
    table["gap_points"] = (table["cv"] - table["test"]).round(2)
    print(table.reset_index().to_string(index=False))
    a, v, t = (table.loc[n] for n in ("alone", "validated", "train_only"))
    print(f"alone_cv={a.cv} alone_test={a.test} validated_cv={v.cv} "
          f"validated_competition_cv={v.competition_cv} validated_test={v.test} "
          f"train_only_cv={t.cv} train_only_test={t.test} "
          f"extra_gain_points={round(t.test - a.test, 2)} validated_gap_points={v.gap_points} "
          f"train_only_gap_points={t.gap_points}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
