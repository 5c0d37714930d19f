"""Active learning on Fashion-MNIST: how many labels each strategy needs to match random sampling.

Exports Fashion-MNIST (a stratified --limit of the training set is the pool, a stratified
--test-limit of the test set is the held-out set), runs `mixcls al-sim` for every strategy and
seed, and reports the learning curves and, per strategy, the labels it needs to reach the
held-out accuracy random sampling reaches with the full budget (first measured point of the
mean curve at or above it; the resolution is one round's --budget).

Every round trains from scratch for at least --min-steps optimizer steps (more epochs while
few rows are labelled), so the first rounds' models are not under-trained: a model that has
barely fitted 200 labels gives uncertainty scores that say little, and the comparison would
then measure the schedule rather than the strategy.

Each (strategy group, seed) is one `mixcls al-sim` job of one thread, --processes at a time
(on a busy 2-core machine one oneDNN thread per process was 15x faster per training step than
two threads fighting other jobs). Each round scores a random --candidates of the unlabelled
rows, as Gal et al. (2017) did for BALD. BALD's ensemble of --bald-members models costs that many times the
training and pool scoring of the others; the table prints each strategy's compute.

    nice -n 5 python benchmarks/active.py --out runs/bench_active
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mixcls.al_sim import labels_to_reach, plot_curve, write_curve
from mixcls.datasets import FASHION_DEFAULT_DIR, export_fashion_mnist
from mixcls.runs import atomic_save_figure

STRATEGIES = "random,entropy,margin,bald,kmeans-margin"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_active", help="new folder for the data and the curves")
    p.add_argument("--source", default=str(FASHION_DEFAULT_DIR), help="Fashion-MNIST IDX folder")
    p.add_argument("--limit", type=int, default=10000, help="pool: stratified training images")
    p.add_argument("--test-limit", type=int, default=None,
                   help="held-out: a stratified subset of the test images (default: all 10,000)")
    p.add_argument("--strategies", default=STRATEGIES)
    p.add_argument("--start", type=int, default=200)
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--bald-members", type=int, default=3)
    p.add_argument("--processes", type=int, default=3, help="parallel al-sim processes")
    p.add_argument("--candidates", type=int, default=5000,
                   help="unlabelled rows scored per round (a random subset of the pool)")
    p.add_argument("--picture", default="docs/active_curve.png", help="copy of the curve picture")
    p.add_argument("--min-steps", type=int, default=300,
                   help="optimizer steps each round trains at least (al-sim --min-steps)")
    p.add_argument("--train-flags", default="--model mixcls_cnn_tiny --img-size 28 --preset none "
                   "--epochs 6 --lr 3e-3 --batch-size 64 --workers 0 --cache-images yes "
                   "--check-images header --device cpu", help="training flags of every round")
    return p.parse_args()


def plan_jobs(strategies: list[str], *, seeds: list[int], bald_members: int) -> list[tuple[list[str], int]]:
    """One al-sim job per (group, seed), longest first: bald alone (bald_members models per
    round), the others in pairs, so the jobs of a seed share their round-0 model within a pair."""
    others = [s for s in strategies if s != "bald"]
    groups = ([["bald"]] if "bald" in strategies else []) + [others[i:i + 2] for i in range(0, len(others), 2)]
    cost = {s: bald_members if s == "bald" else 1 for s in strategies}
    jobs = [(group, seed) for group in groups for seed in seeds]
    return sorted(jobs, key=lambda job: -sum(cost[s] for s in job[0]))


def run_jobs(args: argparse.Namespace, data: Path, out: Path, jobs: list[tuple[list[str], int]]) -> list[Path]:
    """Run the jobs, --processes at a time, each `mixcls al-sim` with one thread; their folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(i: int, group: list[str], seed: int) -> Path:
        part = out / f"part_{i}"
        cmd = [sys.executable, "-m", "mixcls", "al-sim", "--data", str(data), "--out", str(part),
               "--strategy", ",".join(group), "--start", str(args.start), "--budget", str(args.budget),
               "--rounds", str(args.rounds), "--seeds", "1", "--seed", str(seed),
               "--bald-members", str(args.bald_members), "--candidates", str(args.candidates),
               "--min-steps", str(args.min_steps),
               *args.train_flags.split()]
        with open(out / f"part_{i}.log", "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            raise RuntimeError(f"failed ({code}): {' '.join(cmd)}; see {log.name}")
        print(f"done: {','.join(group)} seed {seed}", flush=True)
        return part

    with ThreadPoolExecutor(max_workers=args.processes) as pool:
        futures = [pool.submit(run, i, group, seed) for i, (group, seed) in enumerate(jobs)]
        return [f.result() for f in futures]


def print_table(summary: pd.DataFrame, curve: pd.DataFrame, reach: pd.DataFrame) -> None:
    wide = summary.assign(cell=[f"{m:.4f}±{s:.4f}" for m, s in zip(summary["accuracy_mean"],
                                                                     summary["accuracy_std"].fillna(0))])
    table = wide.pivot(index="strategy", columns="labels", values="cell").loc[reach["strategy"]]
    print("held-out accuracy, mean ± std over seeds, by labels used")
    print(table.to_string())
    cost = curve.groupby("strategy")[["train_seconds", "score_seconds"]].sum() / curve["seed"].nunique()
    print(f"\nlabels to reach random's accuracy at {int(reach['reference_labels'].iloc[0])} labels "
          f"({reach['target'].iloc[0]:.4f}); compute per seed")
    for row in reach.itertuples():
        needed = "not reached" if np.isnan(row.labels_needed) else f"{int(row.labels_needed)}"
        print(f"  {row.strategy:15s} labels_needed {needed:>11s}  fraction {row.label_fraction:.2f}  "
              f"final {row.final_accuracy:.4f}  train {cost.loc[row.strategy, 'train_seconds']:6.0f} s  "
              f"score+select {cost.loc[row.strategy, 'score_seconds']:5.0f} s")


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty")
    strategies = args.strategies.split(",")
    data = export_fashion_mnist(args.source, out / "data", limit=args.limit, test_limit=args.test_limit)
    print(f"exported Fashion-MNIST ({args.limit} pool, {args.test_limit or 'all 10000'} held out) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    jobs = plan_jobs(strategies, seeds=[args.seed + i for i in range(args.seeds)],
                     bald_members=args.bald_members)
    print(f"{len(jobs)} al-sim jobs, {args.processes} at a time: {jobs}", flush=True)
    parts = run_jobs(args, data, out, jobs)
    curve = pd.concat([pd.read_csv(p / "curve.csv") for p in parts], ignore_index=True)
    selections = pd.concat([pd.read_csv(p / "selections.csv") for p in parts], ignore_index=True)
    order = {s: i for i, s in enumerate(strategies)}
    curve = curve.sort_values(["strategy", "seed", "round"], key=lambda c: c.map(order)
                              if c.name == "strategy" else c, kind="stable").reset_index(drop=True)
    title = (f"Fashion-MNIST, {args.train_flags.split()[1]}, {args.limit} pool, "
             f"{args.test_limit or 10000} held out")
    summary = write_curve(out, curve, selections, title=title)
    atomic_save_figure(plot_curve(summary, title=title), args.picture)
    reach = labels_to_reach(summary)
    print_table(summary, curve, reach)
    rivals = reach[reach["strategy"] != "random"].sort_values(["labels_needed", "final_accuracy"],
                                                               ascending=[True, False], na_position="last")
    best = rivals.iloc[0]
    minutes = (time.perf_counter() - started) / 60
    print(f"\nwall time {minutes:.1f} min; curves in {out}, picture {args.picture}")
    print(f"best_strategy={best['strategy']} label_fraction={best['label_fraction']:.2f} "
          f"labels_needed={best['labels_needed']:.0f} random_labels={int(best['reference_labels'])} "
          f"target_accuracy={best['target']:.4f} best_final_accuracy={best['final_accuracy']:.4f} "
          f"seeds={args.seeds} wall_minutes={minutes:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
