"""How far repeated photos lift plain CV above the test score, and what grouped folds read.

Data: a checkout of github.com/alexeygrigorev/clothing-dataset-small (`--data`; nothing is
downloaded), its train, validation and test folders pooled (3,781 photos). A stratified 20 %
(seed 0) is the test split, never trained on; the repository's own test folder is not used as
such, because it is harder than its train folder (a one-epoch trial of an earlier version of
this script read 35 % CV against 21 % on it), which would hide the leak behind a shift. Training rows: the other photos, and for
`--copied` of them (default half, seed 0) a second copy, a re-upload: three quarters of the
size, JPEG quality 50, under another name and the same label.

Two runs of the same recipe (`--model`, default mixcls_cnn_small, at `--img-size` 64, preset
light, 3 folds, `--epochs` 10):
- plain:   stratified folds, as a user without groups would train;
- grouped: folds grouped by the `dup_group` column that `mixcls duplicates` (phash, default
           limit) wrote, so each copy shares its original's fold.
Each run is scored by its CV accuracy (OOF) and by the test accuracy of its fold models'
average (`mixcls predict`). Every step is a `python -m mixcls` call; a step whose output exists
in WORK is not run again.

Ends with `copies=… copies_grouped_pct=… plain_cv=… plain_test=… plain_gap_points=… grouped_cv=…
grouped_test=… grouped_gap_points=…` (accuracies in %; gap = CV - test).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from clothing import list_photos
from duplicates import link_photo
from finetune import run, test_accuracy, work_parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = work_parser(__doc__, data="clothing-dataset-small checkout")
    parser.add_argument("--copied", type=float, default=0.5, help="share of training photos copied")
    parser.add_argument("--model", default="mixcls_cnn_small")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    if not 0 < args.copied <= 1:
        parser.error(f"--copied {args.copied} must be in (0, 1]")
    return args


def reupload(source: Path, target: Path) -> None:
    """`source` at three quarters of its size, JPEG quality 50: a re-uploaded copy."""
    image = Image.open(source).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=50)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())


def write_tables(data: Path, work: Path, copied: float) -> tuple[Path, Path, int]:
    """work/images/ (the photos linked, and the copies), work/train.csv with the copies' rows (a
    `source` column names each copy's original), work/test.csv."""
    from sklearn.model_selection import train_test_split

    photos = list_photos(data)
    train, test = train_test_split(photos, test_size=0.2, stratify=photos["label"], random_state=0)
    train, test = train.sort_values("image_id"), test.sort_values("image_id")
    for image_id in photos["image_id"]:
        link_photo(data / image_id, work / "images" / image_id)
    picked = np.sort(np.random.default_rng(0).choice(len(train), round(copied * len(train)),
                                                     replace=False))
    rows = [dict(image_id=i, label=y, source=i) for i, y in zip(train["image_id"], train["label"])]
    for k in picked:
        image_id, label = train["image_id"].iloc[k], train["label"].iloc[k]
        copy_id = "copies/" + image_id.replace("/", "_")
        if not (work / "images" / copy_id).exists():
            reupload(data / image_id, work / "images" / copy_id)
        rows.append(dict(image_id=copy_id, label=label, source=image_id))
    pd.DataFrame(rows).to_csv(work / "train.csv", index=False)
    test[["image_id", "label"]].to_csv(work / "test.csv", index=False)
    return work / "train.csv", work / "test.csv", len(picked)


def copies_grouped(grouped_csv: Path) -> float:
    """% of the copies whose dup_group is their original's."""
    table = pd.read_csv(grouped_csv)
    group_of = dict(zip(table["image_id"], table["dup_group"]))
    copies = table[table["image_id"] != table["source"]]
    return 100.0 * float(np.mean([group_of[c] == group_of[s]
                                  for c, s in zip(copies["image_id"], copies["source"])]))


def train_and_score(name: str, csv: Path, test_csv: Path, args: argparse.Namespace,
                    extra: list[str]) -> dict[str, float]:
    """One run (skipped when WORK/NAME/metrics.json exists) and its test predictions."""
    work, out = args.work, args.work / name
    common = ["--model", args.model, "--img-size", str(args.img_size), "--preset", "light",
              "--folds", "3", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--workers", str(args.workers), "--device", "cpu", "--cache-images", "yes",
              "--check-images", "header", "--no-progress", "--seed", "0"]
    minutes = 0.0
    if not (out / "metrics.json").is_file():
        minutes += run(["train", "--csv", str(csv), "--images", str(work / "images"), "--out",
                        str(out), *common, *extra], work / f"{name}_train.log", args.threads)
    probs = work / f"{name}_test_probs.csv"
    if not probs.is_file():
        minutes += run(["predict", "--run", str(out), "--images", str(work / "images"), "--ids",
                        str(test_csv), "--with-probs", "--out", str(probs), "--device", "cpu",
                        "--workers", str(args.workers)], work / f"{name}_predict.log", args.threads)
    cv = float(json.loads((out / "metrics.json").read_text())["cv_accuracy"])
    classes = json.loads((out / "classes.json").read_text())
    test = test_accuracy(probs, test_csv, classes)
    return {"run": name, "cv": round(100 * cv, 2), "test": round(100 * test, 2),
            "gap_points": round(100 * (cv - test), 2), "minutes": round(minutes, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv, n_copies = write_tables(args.data, args.work, args.copied)
    grouped_csv = args.work / "dup_groups" / "train.csv"
    if not grouped_csv.is_file():
        run(["duplicates", "--csv", str(train_csv), "--images", str(args.work / "images"),
             "--out", str(grouped_csv), "--no-progress", "--workers", str(args.workers)],
            args.work / "duplicates.log", args.threads)
    found = copies_grouped(grouped_csv)
    n_rows, n_test = len(pd.read_csv(train_csv)), len(pd.read_csv(test_csv))
    print(f"{n_rows} training rows: {n_rows - n_copies} photos of {args.data} and {n_copies} "
          f"re-uploaded copies; {n_test} test photos; mixcls duplicates put {found:.1f} % of the "
          "copies in their original's group")
    print(f"recipe: {args.model} at {args.img_size} px, preset light, 3 folds, {args.epochs} epochs")
    rows = [train_and_score("plain", train_csv, test_csv, args, []),
            train_and_score("grouped", grouped_csv, test_csv, args, ["--group-col", "dup_group"])]
    print(pd.DataFrame(rows).to_string(index=False))
    plain, grouped = rows
    print(f"copies={n_copies} copies_grouped_pct={found:.1f} plain_cv={plain['cv']} "
          f"plain_test={plain['test']} plain_gap_points={plain['gap_points']} "
          f"grouped_cv={grouped['cv']} grouped_test={grouped['test']} "
          f"grouped_gap_points={grouped['gap_points']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
