"""Mixing ablation on Fashion-MNIST: none / mixup / cutmix / fmix / fmix+mixup, same everything else.

Every run is `mixcls train` (through `fit_folds`) on the same exported training subset with one
fold split trained (folds 5, train_folds [0]: 4/5 of the rows train, 1/5 validate and pick the
best epoch), then `predict_run` (tta 1) of that fold's best checkpoint on the official test set.
A seed sets the fold split, the initial weights, the batch order and the mixing draws; every
method runs with the same seeds, so the methods are compared on the same splits (paired).
Reported: test accuracy mean ± sample std over the seeds, and the per-seed difference to none.

Runs go seed by seed (all methods of seed 0, then of seed 1, ...); WORK/results.csv is rewritten
after every run, and with --budget-minutes a seed that would overrun the budget is skipped whole,
so every method always has the same seeds. The per-epoch training log goes to WORK/train.log.

    nice -n 5 python benchmarks/mix_ablation.py --work /tmp/mix_ablation --epochs 30 --budget-minutes 45
    nice -n 5 python benchmarks/mix_ablation.py --work /tmp/mix_ablation_short --epochs 12
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mixcls.cli import main as mixcls_main
from mixcls.config import load_config
from mixcls.predict import predict_run
from mixcls.train import fit_folds

# Table name -> --mix spec.
METHODS = {"none": "none", "mixup": "mixup", "cutmix": "cutmix", "fmix": "fmix",
           "fmix_mixup": "fmix:0.5,mixup:0.5"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_data(work: Path, *, source: str, limit: int, test_limit: int | None) -> Path:
    """`mixcls data fashion-mnist` into WORK, reused when a finished export is there."""
    out = work / f"fmnist_{limit}_{test_limit or 'all'}"
    if not (out / "classes.json").is_file():  # written last by the export
        argv = ["data", "fashion-mnist", "--from", source, "--out", str(out), "--limit", str(limit)]
        if test_limit:
            argv += ["--test-limit", str(test_limit)]
        with contextlib.redirect_stdout(sys.stderr):
            if mixcls_main(argv) != 0:
                raise SystemExit("export of Fashion-MNIST failed")
    return out


def train_options(args: argparse.Namespace, data: Path) -> dict:
    """The flat config keys every run shares; only `mix` and `seed` change between runs."""
    return dict(data=str(data), model=args.model, img_size=28, preset=args.preset,
                batch_size=args.batch_size, lr=args.lr, scheduler="cosine",
                warmup_epochs=args.warmup_epochs, epochs=args.epochs, folds=5, train_folds=[0],
                mix_alpha=args.alpha, workers=0, cache_images="yes", check_images="header",
                device="cpu", amp="none")


def run_one(options: dict, *, method: str, seed: int, work: Path, test_paths: list[str],
            test_labels: np.ndarray, train_log) -> dict:
    """Train one fold with `method`, predict the test set; accuracy and seconds."""
    run_dir = work / "runs" / f"{method}_seed{seed}"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} already exists; pass a fresh --work")
    cfg = load_config(None, dict(options, mix=METHODS[method], seed=seed))
    start = time.perf_counter()
    metrics = fit_folds(cfg, run_dir, progress=False,
                        log=lambda msg: print(f"[{method} seed {seed}] {msg}", file=train_log, flush=True))
    trained = time.perf_counter()
    probs = predict_run(run_dir, test_paths, tta=1, device="cpu", batch_size=512)
    done = time.perf_counter()
    history = pd.read_csv(run_dir / "fold_0" / "history.csv")
    best = history.loc[history["valid_accuracy"].idxmax()]
    return {"method": method, "seed": seed, "test_accuracy": float((probs.argmax(1) == test_labels).mean()),
            "valid_accuracy": float(metrics["cv_accuracy"]), "best_epoch": int(best["epoch"]),
            "train_seconds": trained - start, "predict_seconds": done - trained,
            "seconds": done - start}


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per method: test accuracy mean/std over seeds, paired difference to none, seconds."""
    pivot = results.pivot(index="seed", columns="method", values="test_accuracy")
    rows = []
    for method in [m for m in METHODS if m in pivot.columns]:
        acc = pivot[method].dropna()
        row = {"method": method, "seeds": len(acc), "mean": acc.mean(),
               "std": acc.std(ddof=1) if len(acc) > 1 else float("nan")}
        if "none" in pivot.columns:
            diff = (pivot[method] - pivot["none"]).dropna()
            row["diff_mean"] = diff.mean()
            row["diff_std"] = diff.std(ddof=1) if len(diff) > 1 else float("nan")
        part = results[results["method"] == method]
        row["valid"] = part["valid_accuracy"].mean()
        row["best_epoch"] = part["best_epoch"].mean()
        row["seconds"] = part["seconds"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def print_tables(results: pd.DataFrame, summary: pd.DataFrame) -> None:
    print("\nper run")
    print(f"{'method':<12}{'seed':>5}{'test acc':>10}{'valid acc':>11}{'best ep':>9}"
          f"{'train s':>9}{'predict s':>11}{'total s':>9}")
    for r in results.itertuples():
        print(f"{r.method:<12}{r.seed:>5}{r.test_accuracy:>10.4f}{r.valid_accuracy:>11.4f}{r.best_epoch:>9}"
              f"{r.train_seconds:>9.1f}{r.predict_seconds:>11.1f}{r.seconds:>9.1f}")
    print("\ntest accuracy over seeds (mean ± sample std); diff = paired per-seed difference to none")
    print(f"{'method':<12}{'spec':<20}{'seeds':>6}{'test acc':>18}{'diff vs none':>20}"
          f"{'valid acc':>11}{'best ep':>9}{'s/run':>8}")
    for r in summary.itertuples():
        diff = f"{100 * r.diff_mean:+.2f} ± {100 * r.diff_std:.2f} pt" if hasattr(r, "diff_mean") else "-"
        print(f"{r.method:<12}{METHODS[r.method]:<20}{r.seeds:>6}{r.mean:>10.4f} ± {r.std:.4f}"
              f"{diff:>20}{r.valid:>11.4f}{r.best_epoch:>9.1f}{r.seconds:>8.1f}")


def summary_line(summary: pd.DataFrame, results: pd.DataFrame) -> str:
    parts = [f"acc_{r.method}={r.mean:.4f}" for r in summary.itertuples()]
    parts += [f"std_{r.method}={r.std:.4f}" for r in summary.itertuples()]
    best = summary.loc[summary["mean"].idxmax(), "method"]
    return " ".join(parts + [f"best={best}", f"seconds_per_run={results['seconds'].mean():.1f}"])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="folder for the data, the runs and train.log (default: a new temporary one)")
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="the IDX files")
    p.add_argument("--limit", type=int, default=2000, help="stratified training subset (4/5 of it trains)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="stratified subset of the 10,000 official test images (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (each: split, weights, draws)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--model", default="mixcls_cnn_tiny")
    p.add_argument("--preset", default="none", help="albumentations preset of every run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0, help="λ ~ Beta(alpha, alpha) of every mixing method")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="skip the remaining seeds once one more would overrun this (wall minutes)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 because on shared, oversubscribed cores OpenMP threads spin")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; use {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mix_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    data = export_data(work, source=args.source, limit=args.limit, test_limit=args.test_limit)
    test = pd.read_csv(data / "test.csv", dtype={"image_id": str})
    test_paths = [str(data / "test_images" / i) for i in test["image_id"]]
    test_labels = test["label"].to_numpy(dtype=np.int64)
    options = train_options(args, data)
    started, rows, cut = time.perf_counter(), [], []
    with open(work / "train.log", "a") as train_log:
        for seed in seeds:
            elapsed = time.perf_counter() - started
            per_seed = elapsed / (len(rows) // len(methods)) if rows else 0.0
            if args.budget_minutes and elapsed + per_seed > 60 * args.budget_minutes:
                cut.append(seed)  # a whole seed or none: every method keeps the same seeds
                continue
            for method in methods:
                row = run_one(options, method=method, seed=seed, work=work, test_paths=test_paths,
                              test_labels=test_labels, train_log=train_log)
                rows.append(row)
                pd.DataFrame(rows).to_csv(work / "results.csv", index=False)
                log(f"{method:<11} seed {seed}: test acc {row['test_accuracy']:.4f} "
                    f"(valid {row['valid_accuracy']:.4f}, best epoch {row['best_epoch']}) "
                    f"{row['train_seconds']:.0f}s train + {row['predict_seconds']:.0f}s predict; "
                    f"{(time.perf_counter() - started) / 60:.1f} min so far")
    results = pd.DataFrame(rows)
    summary = summarise(results)
    minutes = (time.perf_counter() - started) / 60
    print(f"Fashion-MNIST: {args.limit} training images exported, folds 5 / fold 0 trained "
          f"({len(pd.read_csv(data / 'train.csv')) * 4 // 5} train, the rest validate), "
          f"{len(test_paths)} official test images, tta 1")
    print(f"model {args.model}, 28 px, preset {args.preset}, batch {args.batch_size}, AdamW lr {args.lr} "
          f"cosine (warm-up {args.warmup_epochs} epoch), {args.epochs} epochs, mix alpha {args.alpha}, "
          f"mix prob 1, fp32, {torch.get_num_threads()} torch thread(s), seeds {seeds}; "
          f"{minutes:.1f} min wall, load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if cut:
        print(f"seeds {cut} not run: they would have overrun --budget-minutes {args.budget_minutes}")
    print_tables(results, summary)
    print(summary_line(summary, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
