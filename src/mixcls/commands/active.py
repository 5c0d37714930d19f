"""`mixcls select`, `mixcls review`, `mixcls merge`: the active-learning loop around a run.

select: which unlabelled pool images a person should label next.
review: which given training labels a person should check first.
merge:  put the person's new or corrected labels back into the training table.
al-sim: measure strategies on a fully labelled dataset (hide labels, query, reveal, retrain).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixcls.active import (REVIEW_WEIGHT, STRATEGIES, MergePlan, format_listing, plan_merge,
                           rank_for_review, select)
from mixcls.config import ConfigError, load_config
from mixcls.data import DataError, list_image_files, prob_columns, read_class_names
from mixcls.runs import RunError, RunFolder, atomic_path, atomic_write_csv


# --- select ------------------------------------------------------------------------------------

def read_run_labelled(run: RunFolder) -> pd.DataFrame:
    """image_id and resolved path of every image the run already has a label for.

    The training table comes from RUN/config.yaml (data, csv, images, id_col); ids in
    RUN/oof.csv are added too, so a moved table still excludes what the run trained on.
    """
    csv_path, images_dir = run.layout()
    id_col = run.config.data.id_col
    if csv_path is None:
        ids = list_image_files(images_dir)
    else:
        table = _read_csv(csv_path)
        if id_col not in table.columns:
            raise DataError(f"{csv_path}: missing column {id_col!r} (id_col of {run.path})")
        ids = table[id_col].str.strip().tolist()
    oof = run.oof_path
    if oof.is_file():
        known = set(ids)
        ids += [i for i in dict.fromkeys(_read_csv(oof)["image_id"].str.strip()) if i not in known]
    return pd.DataFrame({"image_id": ids, "path": [str((images_dir / i).resolve()) for i in ids]})


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV: {exc}") from None


def read_pool(pool: str | Path, *, pool_images: str | Path | None = None) -> pd.DataFrame:
    """image_id and resolved path of each pool image, in pool order (duplicates kept).

    pool is a folder (every image file below it, image_id relative to it) or a CSV with an
    image_id column (relative to the CSV's folder, or to `pool_images`).
    """
    pool = Path(pool)
    if pool.is_dir():
        if pool_images is not None:
            raise DataError(f"--pool-images is for a CSV pool; {pool} is a folder")
        root, ids = pool, list_image_files(pool)
    elif pool.is_file():
        table = _read_csv(pool)
        if "image_id" not in table.columns:
            raise DataError(f"{pool}: missing column 'image_id'; "
                            f"columns are {', '.join(table.columns)}")
        root = Path(pool_images) if pool_images is not None else pool.parent
        ids = table["image_id"].str.strip().tolist()
        empty = [f"row {i + 2}" for i, v in enumerate(ids) if not v]
        if empty:
            raise DataError(format_listing(f"{pool}: rows with an empty image_id", empty))
    else:
        raise DataError(f"pool {pool} does not exist (give a folder of images or a CSV)")
    if not ids:
        raise DataError(f"pool {pool} holds no images")
    paths = [str((root / i).resolve()) for i in ids]
    missing = [f"row {i + 2}: {ids[i]!r}" for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        raise DataError(format_listing(f"{pool}: image files that do not exist under {root}", missing))
    return pd.DataFrame({"image_id": ids, "path": paths})


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def find_candidates(pool: pd.DataFrame, labelled: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Pool rows a person could label: not labelled already (same image_id or same file), and
    each image once (the first of rows sharing an image_id, a file, or identical bytes).

    Returns (candidates with image_id, path; counts of pool, labelled, duplicates, candidates).
    """
    is_labelled = (pool["image_id"].isin(labelled["image_id"]) | pool["path"].isin(labelled["path"]))
    rest = pool.loc[~is_labelled]
    same_name = rest["image_id"].duplicated() | rest["path"].duplicated()
    rest = rest.loc[~same_name]
    # Identical bytes under two names would take two labelling slots for one answer.
    same_bytes = pd.Series([_file_digest(p) for p in rest["path"]], index=rest.index).duplicated()
    rest = rest.loc[~same_bytes].reset_index(drop=True)
    counts = {"pool": len(pool), "labelled": int(is_labelled.sum()),
              "duplicates": int(same_name.sum() + same_bytes.sum()), "candidates": len(rest)}
    return rest, counts


def _predict_module() -> Any:
    # Imported by name when needed: it loads torch models, and tests put a fake in sys.modules.
    return importlib.import_module("mixcls.predict")


def select_from_pool(run_dir: str | Path, pool: str | Path, *, strategy: str, budget: int,
                     seed: int = 42, tta: int | None = None, pool_images: str | Path | None = None,
                     device: str = "auto", batch_size: int = 64,
                     workers: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """Score the unlabelled pool with the run's models and choose up to `budget` images.

    tta None uses the run's own number of TTA views.

    Returns (the selection table, best first: image_id, label (empty, for the person), rank,
    score, pred_class, prob_0 … prob_{K-1}, path; counts from `find_candidates` plus selected).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(sorted(STRATEGIES))}")
    run = RunFolder.open(run_dir)
    n_folds = sum((d / "best.pt").is_file() for d in run.fold_dirs.values())
    if strategy == "bald" and n_folds < 2:
        raise RunError(f"{run.path}: bald needs at least 2 trained folds (fold_*/best.pt), found {n_folds}")
    classes = run.classes
    labelled = read_run_labelled(run)
    candidates, counts = find_candidates(read_pool(pool, pool_images=pool_images), labelled)
    if candidates.empty:
        raise DataError(f"pool {pool}: no image left to label ({counts['labelled']} already "
                        f"labelled, {counts['duplicates']} duplicates)")
    budget = min(budget, len(candidates))
    outputs = _model_outputs(run.path, candidates["path"].tolist(), strategy=strategy,
                             labelled_paths=labelled["path"].tolist(), num_classes=len(classes),
                             tta=tta, device=device, batch_size=batch_size, workers=workers)
    indices, scores = select(strategy, budget=budget, seed=seed, **outputs)
    probs = outputs["fold_probs"].mean(axis=0)
    chosen = candidates.iloc[indices].reset_index(drop=True)
    table = pd.DataFrame({
        "image_id": chosen["image_id"], "label": "", "rank": np.arange(1, len(indices) + 1),
        "score": scores[indices], "pred_class": [classes[k] for k in probs[indices].argmax(axis=1)],
        **dict(zip(prob_columns(len(classes)), probs[indices].T)), "path": chosen["path"]})
    return table, {**counts, "selected": len(table)}


def _model_outputs(run_dir: Path, paths: list[str], *, strategy: str, labelled_paths: list[str],
                   num_classes: int, tta: int | None, device: str, batch_size: int,
                   workers: int) -> dict[str, Any]:
    """fold_probs (F, N, K) always; features (N, D) and labelled_features (M, D) when needed."""
    predict = _predict_module()
    options = {"device": device, "batch_size": batch_size, "workers": workers}
    fold_probs = np.asarray(predict.predict_fold_probs(run_dir, paths, tta=tta, **options))
    if fold_probs.ndim != 3 or fold_probs.shape[1:] != (len(paths), num_classes):
        raise RunError(f"{run_dir}: fold probabilities of shape {fold_probs.shape}, expected "
                       f"(folds, {len(paths)}, {num_classes})")
    outputs = {"fold_probs": fold_probs}
    if "features" in STRATEGIES[strategy].needs:
        outputs["features"] = predict.extract_features(run_dir, paths, **options)
    if strategy == "coreset" and labelled_paths:
        # The batch should cover what the labelled set does not: start from its features.
        outputs["labelled_features"] = predict.extract_features(run_dir, labelled_paths, **options)
    return outputs


def _check_destination(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"--copy-to {folder}: exists and is not an empty folder "
                        "(choose a new folder so earlier selections are not mixed in)")


def place_files(table: pd.DataFrame, folder: str | Path, *, link: bool = False) -> int:
    """Copy (or symlink) each selected image to folder/image_id; returns the number placed."""
    folder = Path(folder)
    for image_id, source in zip(table["image_id"], table["path"]):
        target = folder / image_id
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            target.symlink_to(source)
        else:
            with atomic_path(target) as tmp:
                tmp.write_bytes(Path(source).read_bytes())
    return len(table)


def run_select(args: argparse.Namespace) -> int:
    if args.link and args.copy_to is None:
        raise DataError("--link needs --copy-to DIR")
    if args.budget < 1:
        raise DataError(f"--budget {args.budget} must be >= 1")
    if args.copy_to is not None:
        _check_destination(Path(args.copy_to))
    table, counts = select_from_pool(args.run, args.pool, strategy=args.strategy, budget=args.budget,
                                     seed=args.seed, tta=args.tta, pool_images=args.pool_images,
                                     device=args.device, batch_size=args.batch_size,
                                     workers=args.workers)
    atomic_write_csv(args.out, table)
    print(f"pool {counts['pool']} images: {counts['labelled']} already labelled, "
          f"{counts['duplicates']} duplicates, {counts['candidates']} candidates")
    print(f"selected {counts['selected']} by {args.strategy} -> {args.out}"
          + ("" if counts["selected"] == args.budget else f" (budget {args.budget})"))
    if args.copy_to is not None:
        placed = place_files(table, args.copy_to, link=args.link)
        print(f"{'linked' if args.link else 'copied'} {placed} images into {args.copy_to}")
    return 0


# --- review ------------------------------------------------------------------------------------

def review_run(run_dir: str | Path, *, budget: int, weight: float = REVIEW_WEIGHT) -> pd.DataFrame:
    """The `budget` training rows of RUN/oof.csv most worth checking, with class names.

    Columns: rank, image_id, label (given class name; edit it and `mixcls merge
    --allow-relabel`), pred_class, review_score, issue_score, uncertainty, fold, prob_*.
    """
    run = RunFolder.open(run_dir)
    classes, oof = run.classes, run.read_oof()
    ranked = rank_for_review(oof, num_classes=len(classes), weight=weight).head(budget)
    names = np.asarray(classes, dtype=object)
    prob_cols = prob_columns(len(classes))
    out = pd.DataFrame({
        "rank": ranked["rank"], "image_id": ranked["image_id"],
        "label": names[ranked["label"].to_numpy(dtype=np.int64)],
        "pred_class": names[ranked[prob_cols].to_numpy().argmax(axis=1)],
        "review_score": ranked["review_score"], "issue_score": ranked["issue_score"],
        "uncertainty": ranked["uncertainty"]})
    if "fold" in ranked.columns:
        out["fold"] = ranked["fold"]
    return pd.concat([out, ranked[prob_cols]], axis=1).reset_index(drop=True)


def run_review(args: argparse.Namespace) -> int:
    if args.budget < 1:
        raise DataError(f"--budget {args.budget} must be >= 1")
    table = review_run(args.run, budget=args.budget, weight=args.weight)
    atomic_write_csv(args.out, table)
    print(f"wrote the {len(table)} labels most worth checking -> {args.out}")
    return 0


# --- merge -------------------------------------------------------------------------------------

def _class_list(names: Any, labels: pd.Series) -> list[str]:
    """Class names in index order from a names file (list or {index: name}) or the labels."""
    if isinstance(names, list):
        return [str(v) for v in names]
    if isinstance(names, dict):
        keys = sorted(names, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else k))
        return [str(names[k]) for k in keys]
    values = sorted(set(labels.astype(str).str.strip()) - {""})
    if values and all(v.isdigit() for v in values):
        return [str(k) for k in range(max(int(v) for v in values) + 1)]
    return values


def merge_files(train_csv: str | Path, new_csv: str | Path, *, classes_path: str | Path | None = None,
                allow_relabel: bool = False, id_col: str = "image_id",
                label_col: str = "label") -> MergePlan:
    """Read both tables and the class list, and plan the merge (nothing is written)."""
    train_csv, new_csv = Path(train_csv), Path(new_csv)
    for path in (train_csv, new_csv):
        if not path.is_file():
            raise DataError(f"{path} does not exist")
    train, new = _read_csv(train_csv), _read_csv(new_csv)
    if classes_path is not None:
        try:
            names = json.loads(Path(classes_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"--classes {classes_path}: cannot be read as JSON ({exc})") from None
    else:
        names = read_class_names(train_csv.parent)
    classes = _class_list(names, train.get(label_col, pd.Series(dtype=str)))
    try:
        return plan_merge(train, new, classes=classes, allow_relabel=allow_relabel,
                          id_col=id_col, label_col=label_col)
    except DataError as exc:
        raise type(exc)(f"merging {new_csv} into {train_csv} (train = {train_csv.name}, "
                        f"new = {new_csv.name}):\n{exc}") from None


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
                    "person should label next (never an image the run already has, never one twice). "
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
