"""`mixcls select`, `mixcls review`, `mixcls merge`: the active-learning loop around a run.

select: which unlabelled pool images a person should label next.
review: which given training labels a person should check first.
merge:  put the person's new or corrected labels back into the training table.
al-sim: measure strategies on a fully labelled dataset (hide labels, query, reveal, retrain).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixcls.active import REVIEW_WEIGHT, STRATEGIES, merge_files, place_files, review_run, select_from_pool
from mixcls.config import ConfigError, load_config
from mixcls.data import DataError
from mixcls.duplicates import DEFAULT_MAX_DISTANCE
from mixcls.runs import atomic_write_csv


# --- select ------------------------------------------------------------------------------------

def _check_destination(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"--copy-to {folder}: exists and is not an empty folder "
                        "(choose a new folder so earlier selections are not mixed in)")


def run_select(args: argparse.Namespace) -> int:
    if args.link and args.copy_to is None:
        raise DataError("--link needs --copy-to DIR")
    if args.budget < 1:
        raise DataError(f"--budget {args.budget} must be >= 1")
    if args.copy_to is not None:
        _check_destination(Path(args.copy_to))
    if args.skip_near_duplicates is not None and not 0 <= args.skip_near_duplicates < 256:
        raise DataError(f"--skip-near-duplicates {args.skip_near_duplicates} must be in 0 … 255 bits")
    table, counts = select_from_pool(args.run, args.pool, strategy=args.strategy, budget=args.budget,
                                     seed=args.seed, tta=args.tta, pool_images=args.pool_images,
                                     device=args.device, batch_size=args.batch_size,
                                     workers=args.workers, near_duplicates=args.skip_near_duplicates)
    atomic_write_csv(args.out, table)
    near = (f"{counts['near_duplicates']} near-duplicates (within {args.skip_near_duplicates} "
            "bits), " if "near_duplicates" in counts else "")
    print(f"pool {counts['pool']} images: {counts['labelled']} already labelled, "
          f"{counts['duplicates']} duplicates, {near}{counts['candidates']} candidates")
    print(f"selected {counts['selected']} by {args.strategy} -> {args.out}"
          + ("" if counts["selected"] == args.budget else f" (budget {args.budget})"))
    if args.copy_to is not None:
        placed = place_files(table, args.copy_to, link=args.link)
        print(f"{'linked' if args.link else 'copied'} {placed} images into {args.copy_to}")
    return 0


# --- review ------------------------------------------------------------------------------------

def run_review(args: argparse.Namespace) -> int:
    if args.budget < 1:
        raise DataError(f"--budget {args.budget} must be >= 1")
    table = review_run(args.run, budget=args.budget, weight=args.weight)
    atomic_write_csv(args.out, table)
    print(f"wrote the {len(table)} labels most worth checking -> {args.out}")
    return 0


# --- merge -------------------------------------------------------------------------------------

def run_merge(args: argparse.Namespace) -> int:
    plan = merge_files(args.train, args.new, classes_path=args.classes,
                       allow_relabel=args.allow_relabel, id_col=args.id_col, label_col=args.label_col)
    atomic_write_csv(args.out, plan.table)
    print(f"merged {args.new} into {args.train}: {len(plan.added)} added, {len(plan.corrected)} "
          f"corrected, {len(plan.unchanged)} unchanged -> {args.out} ({len(plan.table)} rows)")
    return 0


# --- al-sim ------------------------------------------------------------------------------------

def run_al_sim(args: argparse.Namespace) -> int:
    from mixcls.al_sim import parse_strategies, simulate  # torch loads only when a simulation runs
    from mixcls.commands.train import config_overrides  # the training flags, as `mixcls train` reads them

    strategies = parse_strategies(args.strategy)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} must be >= 1")
    cfg = load_config(args.config, config_overrides(args))
    if cfg.data.data is None and cfg.data.csv is None:
        raise ConfigError("al-sim needs --data FOLDER (or --csv FILE --images DIR)")
    seeds = [cfg.train.seed + i for i in range(args.seeds)]
    summary = simulate(cfg, strategies=strategies, start=args.start, budget=args.budget,
                       rounds=args.rounds, seeds=seeds, out_dir=args.out, holdout=args.holdout,
                       bald_members=args.bald_members, candidates=args.candidates,
                       batch_size=args.score_batch_size, min_steps=args.min_steps)
    last = summary.groupby("strategy", sort=False).tail(1)  # the summary is sorted by round
    for row in last.itertuples():
        print(f"{row.strategy}: {row.accuracy_mean:.4f} held-out accuracy with {row.labels} labels")
    print(f"wrote {args.out}/curve.csv, curve_summary.csv, selections.csv, curve.png")
    return 0


# --- argparse ----------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    strategies = "; ".join(f"{name}: {s.help}" for name, s in STRATEGIES.items())
    p = subparsers.add_parser(
        "select", help="choose the unlabelled images to label next",
        description="Score a pool of unlabelled images with a trained run and write the ones a "
                    "person should label next (never an image the run already has, never one twice; with "
                    "--skip-near-duplicates, never a resized or re-saved copy of either). "
                    f"Strategies: {strategies}.")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--pool", required=True, help="folder of images, or a CSV with an image_id column")
    p.add_argument("--pool-images", default=None, help="with a CSV pool: the folder its ids are in "
                   "(default: the CSV's folder)")
    p.add_argument("--budget", type=int, required=True, help="how many images to choose")
    p.add_argument("--strategy", default="margin", choices=sorted(STRATEGIES), help="selection rule")
    p.add_argument("--out", required=True,
                   help="CSV to write (fill in its label column, then mixcls merge)")
    p.add_argument("--copy-to", default=None, help="also copy the chosen images into this new folder")
    p.add_argument("--link", action="store_true", help="with --copy-to: symlink instead of copy")
    p.add_argument("--seed", type=int, default=42, help="seed of random and k-means")
    p.add_argument("--tta", type=int, default=None, help="TTA views per fold (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--skip-near-duplicates", type=int, nargs="?", const=DEFAULT_MAX_DISTANCE,
                   default=None, metavar="BITS",
                   help="leave out pool images whose perceptual hash is within BITS of 256 "
                   f"(default {DEFAULT_MAX_DISTANCE}) of a labelled image's or of another pool "
                   "image's (the first in pool order is kept), as mixcls duplicates pairs them")
    p.set_defaults(func=run_select)

    p = subparsers.add_parser(
        "review", help="rank training labels for a person to check",
        description="Rank the run's training labels (RUN/oof.csv) by how likely they are wrong "
                    "(cleanlab label quality) and how uncertain the model is; write the top ones.")
    p.add_argument("--run", required=True, help="trained run folder (with oof.csv)")
    p.add_argument("--budget", type=int, required=True, help="how many labels to list")
    p.add_argument("--out", required=True,
                   help="CSV to write (edit label, then mixcls merge --allow-relabel)")
    p.add_argument("--weight", type=float, default=REVIEW_WEIGHT,
                   help="weight of the label-issue score against model uncertainty, in [0, 1]")
    p.set_defaults(func=run_review)

    p = subparsers.add_parser(
        "merge", help="merge new or corrected labels into a training table",
        description="Add newly labelled images and (with --allow-relabel) corrected labels to a "
                    "training table; refuses repeated ids, conflicting labels and unknown classes.")
    p.add_argument("--train", required=True, help="the training table (CSV)")
    p.add_argument("--new", required=True, help="CSV of image_id, label to merge in")
    p.add_argument("--out", required=True, help="merged table to write (may be --train)")
    p.add_argument("--allow-relabel", action="store_true",
                   help="accept new labels that change a training label (corrections)")
    p.add_argument("--classes", default=None, help="classes.json of the run (default: the class "
                   "file beside --train, else the labels in --train)")
    p.add_argument("--id-col", default="image_id", help="column of image ids in both tables")
    p.add_argument("--label-col", default="label", help="column of labels in both tables")
    p.set_defaults(func=run_merge)

    _register_al_sim(subparsers)


def _register_al_sim(subparsers: argparse._SubParsersAction) -> None:
    from mixcls.commands.train import add_config_flags

    p = subparsers.add_parser(
        "al-sim", help="simulate active learning on a fully labelled dataset",
        description="Hide the labels of a fully labelled training set, then per round: train on the "
                    "labelled rows, measure held-out accuracy, let a strategy choose --budget rows, "
                    "reveal their labels. Held out: DATA/test.csv + DATA/test_images when present, "
                    "else a stratified --holdout fraction of the training table. Writes "
                    "OUT/curve.csv (strategy, seed, round), curve_summary.csv (mean, std over seeds), "
                    "selections.csv and curve.png. All training flags of `mixcls train` apply.")
    p.add_argument("--out", required=True, help="new folder for the curve")
    p.add_argument("--config", help="YAML training config; flags override it")
    p.add_argument("--strategy", default="random,margin",
                   help=f"comma-separated strategies from: {', '.join(sorted(STRATEGIES))}")
    p.add_argument("--start", type=int, default=50, help="random labelled rows to start from")
    p.add_argument("--budget", type=int, default=50, help="rows revealed per round")
    p.add_argument("--rounds", type=int, default=5, help="query rounds (rounds + 1 trainings per curve)")
    p.add_argument("--seeds", type=int, default=3,
                   help="repeat with seeds --seed, --seed + 1, …; the curve is their mean ± std")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="held-out fraction of the training table when DATA has no test.csv")
    p.add_argument("--bald-members", type=int, default=3,
                   help="bald: models trained on the same rows with different seeds (its extra cost)")
    p.add_argument("--candidates", type=int, default=None,
                   help="score a random subset of this many unlabelled rows per round (default: all)")
    p.add_argument("--min-steps", type=int, default=None,
                   help="train each round for at least this many optimizer steps (more epochs when "
                        "few rows are labelled); default: --epochs for every round")
    p.add_argument("--score-batch-size", type=int, default=1024,
                   help="images per forward pass when scoring the pool and the held-out set")
    add_config_flags(p)
    p.set_defaults(func=run_al_sim)
