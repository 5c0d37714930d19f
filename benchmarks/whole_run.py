"""The whole `mixcls train` process against timm's `train.py` on the same work: start-up, epochs, tail.

Both train resnet18 from scratch on scikit-learn's 1,797 digits upscaled to 64 px (PNGs written
once by this script), on the same rows: mixcls's fold 0 of 5 (1,437 training / 360 validation
images; timm gets the same rows as ImageFolder train/ and validation/ folders of symlinks),
2 epochs, batch 64, AdamW lr 1e-3 with weight decay 0.01, cosine schedule without warm-up,
2 loader workers, fp32, on the CPU. Each process's wall time is measured from its start to its
exit (imports, checks, every epoch with its validation and checkpoint, the tail), in turn
A B A B …, so a drift of the machine's speed hits both alike. mixcls's image cache and check
index live in a folder of this script's: its first run starts cold, the later ones find the
checked images in the index (a rerun, as a competitor's second experiment would be).

    python benchmarks/whole_run.py --timm-train PATH [--repeats 2] [--work runs/bench_whole_run]

PATH is `train.py` from a checkout of huggingface/pytorch-image-models (it runs with the
installed timm). Nothing is downloaded. Ends with `whole_run_ratio_vs_timm=…` (mean mixcls
wall time over mean timm wall time; below 1 is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

EPOCHS, BATCH, LR, WEIGHT_DECAY, WORKERS, IMG_SIZE = 2, 64, 1e-3, 0.01, 2, 64


def write_digits(out: Path) -> Path:
    """out/train_images/*.png (64 px) and out/train.csv for all 1,797 digits, once."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (out / "train.csv").is_file():
        return out
    digits = load_digits()
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    ids = []
    for i, image in enumerate(digits.images):
        pixels = (image * (255.0 / 16.0)).astype(np.uint8)
        name = f"{i:04d}.png"
        Image.fromarray(pixels).resize((IMG_SIZE, IMG_SIZE), Image.BICUBIC).convert("RGB").save(
            out / "train_images" / name)
        ids.append(name)
    pd.DataFrame({"image_id": ids, "label": digits.target}).to_csv(out / "train.csv", index=False)
    return out


def timm_folders(digits: Path, folds_csv: Path, out: Path) -> Path:
    """ImageFolder train/ and validation/ of symlinks: fold 0 validates, the rest train."""
    shutil.rmtree(out, ignore_errors=True)
    labels = pd.read_csv(digits / "train.csv").set_index("image_id")["label"]
    folds = pd.read_csv(folds_csv)
    for image_id, fold in zip(folds["image_id"], folds["fold"]):
        split = "validation" if fold == 0 else "train"
        target = out / split / str(labels[image_id]) / image_id
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((digits / "train_images" / image_id).resolve())
    return out


def mixcls_command(digits: Path, run: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "mixcls", "train", "--data", str(digits), "--out", str(run),
            "--model", "resnet18", "--img-size", str(IMG_SIZE), "--folds", "5", "--train-folds", "0",
            "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--optimizer", "adamw", "--lr",
            str(LR), "--weight-decay", str(WEIGHT_DECAY), "--scheduler", "cosine",
            "--warmup-epochs", "0", "--workers", str(WORKERS), "--amp", "none", "--device", "cpu",
            "--cache-dir", str(cache), "--no-progress"]


def timm_command(timm_train: Path, folders: Path, out: Path) -> list[str]:
    return [sys.executable, str(timm_train), str(folders), "--train-split", "train",
            "--val-split", "validation", "--model", "resnet18", "--num-classes", "10",
            "--img-size", str(IMG_SIZE), "-b", str(BATCH), "--opt", "adamw", "--lr", str(LR),
            "--weight-decay", str(WEIGHT_DECAY), "--sched", "cosine", "--epochs", str(EPOCHS),
            "--warmup-epochs", "0", "--cooldown-epochs", "0", "-j", str(WORKERS), "--device", "cpu",
            "--no-prefetcher", "--output", str(out), "--log-interval", "1000",
            "--checkpoint-hist", "1"]


def timed(command: list[str], log: Path, cwd: Path) -> float:
    """Wall seconds of one process from its start to its exit; SystemExit naming the log on failure."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{command[1]} … failed (exit {code}); see {log}")
    return seconds


def mixcls_epoch_seconds(run: Path) -> float:
    history = pd.read_csv(run / "fold_0" / "history.csv")
    return float(history["seconds"].sum())


def timm_valid_accuracy(out: Path) -> float:
    summaries = sorted(out.glob("*/summary.csv"))
    return float(pd.read_csv(summaries[-1])["eval_top1"].iloc[-1]) / 100 if summaries else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", required=True, help="train.py of huggingface/pytorch-image-models")
    parser.add_argument("--work", default="runs/bench_whole_run")
    parser.add_argument("--repeats", type=int, default=2, help="pairs A B (mixcls, timm)")
    args = parser.parse_args(argv)
    timm_train, work = Path(args.timm_train).resolve(), Path(args.work).resolve()
    if not timm_train.is_file():
        raise SystemExit(f"--timm-train {timm_train} is not a file")
    work.mkdir(parents=True, exist_ok=True)
    digits = write_digits(work / "digits")
    cache = work / "mixcls_cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first mixcls run starts cold

    rows, folders = [], None
    for repeat in range(args.repeats):
        run = work / f"mixcls_run_{repeat}"
        shutil.rmtree(run, ignore_errors=True)
        seconds = timed(mixcls_command(digits, run, cache), work / f"mixcls_{repeat}.log", work)
        metrics = pd.read_json(run / "metrics.json", typ="series")
        rows.append({"tool": "mixcls", "repeat": repeat, "wall_s": seconds,
                     "epochs_s": mixcls_epoch_seconds(run),
                     "valid_acc": float(metrics["cv_accuracy"]),
                     "note": "cold cache and index" if repeat == 0 else "index warm"})
        if folders is None:
            folders = timm_folders(digits, run / "folds.csv", work / "timm_data")
        out = work / f"timm_out_{repeat}"
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"timm_{repeat}.log"
        seconds = timed(timm_command(timm_train, folders, out), log, work)
        rows.append({"tool": "timm train.py", "repeat": repeat, "wall_s": seconds,
                     "epochs_s": float("nan"), "valid_acc": timm_valid_accuracy(out), "note": ""})
        print(f"  pair {repeat}: mixcls {rows[-2]['wall_s']:.1f} s, timm {seconds:.1f} s",
              file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    mean = table.groupby("tool")["wall_s"].mean()
    ratio = mean["mixcls"] / mean["timm train.py"]
    import torch
    print(f"resnet18, digits at {IMG_SIZE} px, fold 0 of 5 (1,437 train / 360 valid), {EPOCHS} epochs, "
          f"batch {BATCH}, AdamW {LR} cosine, {WORKERS} workers, fp32, CPU ({os.cpu_count()} cores), "
          f"torch {torch.__version__}; wall time of each whole process, in the order run")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"mean wall: mixcls {mean['mixcls']:.2f} s, timm {mean['timm train.py']:.2f} s")
    print(f"whole_run_ratio_vs_timm={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
