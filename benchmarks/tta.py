"""What `mixcls tta` finds on the OOF rows, and whether the held-out test images agree.

For each run: `mixcls tta --run RUN --img-sizes … --tta-views … --apply` scores every setting
(the first 1, 2, … TTA views at each inference size) on the OOF rows with each fold's own model,
chooses by nested CV (log-loss) and applies the choice. The script then predicts the held-out
test images under every setting, with the fold ensemble (the mean of the fold models, what
`mixcls predict` writes) and with each fold model alone (`test_single`, the kind of model that
scored each OOF row), and runs `mixcls predict` once on the applied run to check that it gives
the chosen setting's probabilities.

Two ways to give it runs:

    python benchmarks/tta.py --data FMNIST --work WORK
        DATA is a folder of `mixcls data fashion-mnist --limit 10000` (train.csv, train_images,
        test.csv, test_images). Two runs are trained in WORK (skipped when there): `crops`, the
        tiny CNN at 28 px with the light preset (random resized crops of 60-100 % of the image,
        horizontal flips), and `no_crops`, the same with preset none (resize only). Random
        crops show the model objects larger than a plain resize does, so a larger inference
        size can pay (Touvron et al. 2019); without crops it should not.
    python benchmarks/tta.py --run RUN --test-csv CSV --test-images DIR --work WORK
        any finished run and a labelled held-out set (image_id,label; labels as the run's
        training table wrote them), e.g. the clothing photos' `grouped` run of group_leak.py.

The run folders are changed: `--apply` writes tta.json and tta_oof.csv into them.

Per run the table gives every setting's CV (all OOF rows), test and test_single accuracy, and
how many folds chose it in the nested fit. The summary rows compare the training's own setting
(one view at the training size, what oof.csv holds) with the chosen one: CV in-sample
(optimistic: chosen on those rows) and nested, and the test gain. Ends with one line per run's
name prefix: `{run}_chosen=… {run}_cv_gain_points=… {run}_nested_cv_gain_points=…
{run}_test_gain_points=… {run}_single_test_gain_points=… {run}_optimism_points=…` and
`predict_max_abs_diff=…` (accuracies in points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from finetune import run as run_mixcls

CROPS_FLAGS = ["--model", "mixcls_cnn_tiny", "--img-size", "28", "--folds", "5",
               "--batch-size", "128", "--lr", "3e-3", "--workers", "0", "--device", "cpu",
               "--cache-images", "yes", "--check-images", "header", "--no-progress", "--seed", "0"]
RUNS = {"crops": ["--preset", "light"], "no_crops": ["--preset", "none"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a Fashion-MNIST export (trains two runs)")
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="a finished run to score (repeatable; with --test-csv, --test-images)")
    parser.add_argument("--test-csv", type=Path)
    parser.add_argument("--test-images", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="folder for runs, logs, caches")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the --data runs")
    parser.add_argument("--img-sizes", default=None,
                        help="inference sizes (default: 0.75, 1.15, 1.3 and 1.5 x the training size)")
    parser.add_argument("--tta-views", default="orig,hflip,zoom")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    if (args.data is None) == (not args.run):
        parser.error("give --data (trains the runs) or --run with --test-csv and --test-images")
    if args.run and (args.test_csv is None or args.test_images is None):
        parser.error("--run needs --test-csv and --test-images")
    return args


def train_runs(data: Path, work: Path, epochs: int, threads: int) -> dict[str, Path]:
    """The two Fashion-MNIST runs (crops, no_crops), trained unless WORK/NAME/metrics.json exists."""
    runs = {}
    for name, flags in RUNS.items():
        out = work / name
        if not (out / "metrics.json").is_file():
            minutes = run_mixcls(["train", "--data", str(data), "--out", str(out), *CROPS_FLAGS,
                                  "--epochs", str(epochs), "--tta-views", "orig,hflip,zoom", *flags],
                                 work / f"{name}_train.log", threads)
            print(f"trained {name} in {minutes:.1f} min")
        runs[name] = out
    return runs


def test_labels(test_csv: Path, run_dir: Path) -> np.ndarray:
    """The test rows' class indices: names mapped through classes.json, or integer labels."""
    classes = json.loads((run_dir / "classes.json").read_text())
    labels = pd.read_csv(test_csv, dtype={"label": str})["label"].str.strip()
    index = {str(name): k for k, name in enumerate(classes)}
    if labels.isin(index).all():
        return labels.map(index).to_numpy(np.int64)
    numbers = pd.to_numeric(labels, errors="coerce")
    if numbers.notna().all() and numbers.between(0, len(classes) - 1).all():
        return numbers.to_numpy(np.int64)
    raise SystemExit(f"{test_csv}: labels are neither {run_dir}/classes.json's names nor 0..K-1")


def sizes_for(run_dir: Path, asked: str | None) -> list[int]:
    if asked:
        return [int(s) for s in asked.split(",")]
    from mixcls.runs import RunFolder

    size = RunFolder.open(run_dir).config.data.img_size
    return sorted({max(8, round(size * f)) for f in (0.75, 1.15, 1.3, 1.5)} - {size})


def apply_tta(run_dir: Path, sizes: list[int], views: str, work: Path, threads: int,
              batch_size: int) -> float:
    """`mixcls tta --apply` on the run (log in WORK); its minutes."""
    return run_mixcls(["tta", "--run", str(run_dir), "--img-sizes", ",".join(map(str, sizes)),
                       "--tta-views", views, "--apply", "--device", "cpu",
                       "--batch-size", str(batch_size)], work / f"{run_dir.name}_tta.log", threads)


def setting_test_probs(run_dir: Path, paths: list[str], grid: pd.DataFrame, cache: Path,
                       batch_size: int) -> np.ndarray:
    """(S, F, N, K): each setting of the grid, each fold model, on the test images (mixcls.tta's
    predict_settings, the pass mixcls tta makes on the OOF rows); cached."""
    if cache.is_file():
        return np.load(cache)
    import torch

    from mixcls.data import load_image_cache
    from mixcls.predict import load_fold_models
    from mixcls.tta import Setting, predict_settings

    settings = [Setting(int(size), tuple(views.split(",")))
                for size, views in zip(grid["img_size"], grid["views"])]
    out = predict_settings(load_fold_models(run_dir, torch.device("cpu")), paths, settings,
                           device=torch.device("cpu"), batch_size=batch_size,
                           cache=load_image_cache(paths, mode="auto")).astype(np.float32)
    partial = cache.with_name(cache.name + ".partial.npy")
    np.save(partial, out)
    partial.replace(cache)
    return out


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(-1) == labels).mean())


def score_run(run_dir: Path, test_csv: Path, test_images: Path, args: argparse.Namespace
              ) -> tuple[pd.DataFrame, dict[str, float], float]:
    sizes = sizes_for(run_dir, args.img_sizes)
    minutes = apply_tta(run_dir, sizes, args.tta_views, args.work, args.threads, args.batch_size)
    grid = pd.read_csv(run_dir / "tta_grid.csv")
    spec = json.loads((run_dir / "tta.json").read_text())
    ids = pd.read_csv(test_csv, dtype={"image_id": str})["image_id"].tolist()
    labels = test_labels(test_csv, run_dir)
    probs = setting_test_probs(run_dir, [str(test_images / i) for i in ids], grid,
                               args.work / f"{run_dir.name}_setting_test_probs.npy", args.batch_size)
    table = grid[["setting", "views", "cv_accuracy", "cv_logloss", "nested_folds", "chosen"]].copy()
    table["test"] = [accuracy(p.mean(0), labels) for p in probs]
    table["test_single"] = [np.mean([accuracy(f, labels) for f in p]) for p in probs]
    for column in ("cv_accuracy", "test", "test_single"):
        table[column] = (100 * table[column]).round(2)
    chosen = int(np.flatnonzero(grid["chosen"])[0])
    base, pick = table.iloc[0], table.iloc[chosen]
    summary = {
        "chosen": spec["setting"].replace(" ", ""),
        "train_cv": base["cv_accuracy"], "in_sample_cv": pick["cv_accuracy"],
        "nested_cv": round(100 * spec["nested"]["accuracy"], 2),
        "train_test": base["test"], "chosen_test": pick["test"],
        "train_single_test": base["test_single"], "chosen_single_test": pick["test_single"],
        "tta_minutes": round(minutes, 1)}
    summary["cv_gain_points"] = round(summary["in_sample_cv"] - summary["train_cv"], 2)
    summary["nested_cv_gain_points"] = round(summary["nested_cv"] - summary["train_cv"], 2)
    summary["test_gain_points"] = round(summary["chosen_test"] - summary["train_test"], 2)
    summary["single_test_gain_points"] = round(summary["chosen_single_test"]
                                               - summary["train_single_test"], 2)
    summary["optimism_points"] = round(summary["in_sample_cv"] - summary["nested_cv"], 2)
    return table, summary, predict_difference(run_dir, test_csv, test_images, probs[chosen], args)


def predict_difference(run_dir: Path, test_csv: Path, test_images: Path, chosen: np.ndarray,
                       args: argparse.Namespace) -> float:
    """Largest |mixcls predict's probability - the chosen setting's fold mean| on the test set."""
    from mixcls.data import prob_columns

    out = args.work / f"{run_dir.name}_predict.csv"
    run_mixcls(["predict", "--run", str(run_dir), "--images", str(test_images), "--ids",
                str(test_csv), "--with-probs", "--out", str(out), "--device", "cpu",
                "--batch-size", str(args.batch_size)], args.work / f"{run_dir.name}_predict.log",
               args.threads)
    written = pd.read_csv(out)[prob_columns(chosen.shape[-1])].to_numpy()
    return float(np.abs(written - chosen.mean(0)).max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data is not None:
        runs = train_runs(args.data, args.work, args.epochs, args.threads)
        test_csv, test_images = args.data / "test.csv", args.data / "test_images"
    else:
        runs = {p.name: p for p in args.run}
        test_csv, test_images = args.test_csv, args.test_images
    print(f"test images: {len(pd.read_csv(test_csv))} ({test_csv}); views {args.tta_views}")
    last, differences = [], []
    for name, run_dir in runs.items():
        table, summary, diff = score_run(run_dir, test_csv, test_images, args)
        differences.append(diff)
        print(f"\n{name} ({run_dir}):")
        print(table.to_string(index=False))
        print(pd.DataFrame([summary]).to_string(index=False))
        last += [f"{name}_{key}={summary[key]}" for key in
                 ("chosen", "cv_gain_points", "nested_cv_gain_points", "test_gain_points",
                  "single_test_gain_points", "optimism_points")]
    print(" ".join(last + [f"predict_max_abs_diff={max(differences):.2e}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
