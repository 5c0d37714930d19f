"""Active learning: which unlabelled images to label next, which given labels to check first,
and merging a person's answers back into the training table. The second half works on files:
a run folder and an image pool (`select_from_pool`), a run's OOF table (`review_run`), two label
tables (`merge_files`); `mixcls select/review/merge` only parse flags and print.

Every strategy works on arrays a model has already produced (probabilities, a stack of fold
probabilities, penultimate features), so the same `select` serves `mixcls select` and a
simulation that retrains between rounds. A higher score always means "more worth a person's
time"; ties are broken by the lower row index so a selection never depends on sort internals.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist
from scipy.special import entr

from mixcls.data import (MAX_LISTED, DataError, format_listing, list_image_files, prob_columns,
                         read_class_names, read_text_table)
from mixcls.runs import RunError, RunFolder, atomic_path

# Softmax outputs averaged over folds and TTA views sum to 1 within float32 rounding;
# anything further off is not a probability table (logits, a wrong column, NaN rows).
SUM_TOLERANCE = 1e-3
# cdist of the pool against this many labelled rows at a time keeps memory near 32 MiB
# per 1 000 pool images, whatever the size of the labelled set.
DISTANCE_CHUNK = 4096


class MergeError(DataError):
    """New labels that cannot be merged; the message lists the offending rows."""


# --- per-image scores --------------------------------------------------------------------------

def _check_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    """probs (N, K) as float64, checked: finite, >= 0, rows summing to 1, K >= 2."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"{name}: expected shape (N, K) with K >= 2, got {probs.shape}")
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1)
    bad |= np.abs(probs.sum(axis=1) - 1.0) > SUM_TOLERANCE
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name}: {len(rows)} row(s) are not probabilities (finite, >= 0, "
                         f"summing to 1), first rows {rows[:MAX_LISTED].tolist()}")
    return probs


def score_random(n: int, *, seed: int) -> np.ndarray:
    """(N,) uniform [0, 1) scores from `seed`: the baseline every strategy must beat."""
    return np.random.default_rng(seed).random(n)


def score_least_confidence(probs: np.ndarray) -> np.ndarray:
    """(N,) 1 - max_k p_k."""
    probs = _check_probs(probs)
    return 1.0 - probs.max(axis=1)


def score_margin(probs: np.ndarray) -> np.ndarray:
    """(N,) 1 - (p_top1 - p_top2): 1 when the two best classes tie, 0 when one class has all."""
    probs = _check_probs(probs)
    top2 = np.sort(probs, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def score_entropy(probs: np.ndarray) -> np.ndarray:
    """(N,) Shannon entropy in nats, -sum_k p_k log p_k with 0 log 0 = 0."""
    probs = _check_probs(probs)
    return entr(probs).sum(axis=1)


def score_bald(fold_probs: np.ndarray) -> np.ndarray:
    """(N,) BALD mutual information H(mean_t p_t) - mean_t H(p_t) from fold_probs (T, N, K).

    T members are folds of an ensemble or Monte-Carlo dropout passes; the score is how much
    they disagree, 0 when all agree exactly.
    """
    fold_probs = np.asarray(fold_probs, dtype=np.float64)
    if fold_probs.ndim != 3 or fold_probs.shape[0] < 2:
        raise ValueError(f"fold_probs: bald needs shape (T, N, K) with T >= 2 members, "
                         f"got {fold_probs.shape}")
    for t, member in enumerate(fold_probs):
        _check_probs(member, f"fold_probs[{t}]")
    mean_entropy = entr(fold_probs).sum(axis=2).mean(axis=0)
    # Mutual information is >= 0 (entropy is concave); clip the float rounding below it.
    return np.maximum(entr(fold_probs.mean(axis=0)).sum(axis=1) - mean_entropy, 0.0)


# --- batch-aware (diversity) selections ------------------------------------------------------

def _min_distances(features: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance from each row of features (N, D) to its nearest row of others (M, D)."""
    out = np.full(len(features), np.inf)
    for start in range(0, len(others), DISTANCE_CHUNK):
        # cdist subtracts before squaring, unlike the |a|^2 + |b|^2 - 2ab shortcut, so near
        # ties between candidates are not decided by cancellation error.
        chunk = cdist(features, others[start:start + DISTANCE_CHUNK])
        np.minimum(out, chunk.min(axis=1), out=out)
    return out


def k_center_greedy(features: np.ndarray, budget: int, *,
                    labelled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center (Sener & Savarese's core-set): each step picks the pool point farthest
    from the labelled rows and the points chosen so far.

    features (N, D) pool features, labelled (M, D) or None. Returns (indices (budget,) in pick
    order, scores (N,)): a chosen point's score is its distance to the nearest labelled or
    earlier-chosen point when it was picked (non-increasing along the picks); other points get
    their distance to the final chosen + labelled set. With nothing labelled the first pick is
    the point nearest the pool mean (a representative start, no seed needed) and its score is
    the radius it alone covers. Ties go to the lower index.
    """
    x = np.asarray(features, dtype=np.float64)
    if not 1 <= budget <= len(x):
        raise ValueError(f"budget: {budget} must be from 1 to the number of points {len(x)}")
    if labelled is not None and len(labelled):
        min_dist = _min_distances(x, np.asarray(labelled, dtype=np.float64))
    else:
        min_dist = np.full(len(x), np.inf)
    chosen = np.zeros(len(x), dtype=bool)
    picks, pick_scores = [], []
    for _ in range(budget):
        if np.isinf(min_dist).all():
            i = int(np.argmin(cdist(x, x.mean(axis=0, keepdims=True))[:, 0]))
        else:
            i = int(np.argmax(np.where(chosen, -np.inf, min_dist)))
        dist_to_i = cdist(x, x[i:i + 1])[:, 0]
        pick_scores.append(min_dist[i] if np.isfinite(min_dist[i]) else dist_to_i.max())
        picks.append(i)
        chosen[i] = True
        np.minimum(min_dist, dist_to_i, out=min_dist)
    scores = min_dist.copy()
    scores[picks] = pick_scores
    return np.asarray(picks, dtype=np.int64), scores


def select_kmeans_margin(probs: np.ndarray, features: np.ndarray, budget: int, *,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustering, then uncertainty: k-means on features into `budget` clusters, then the point
    of highest margin score (`score_margin`) in each cluster.

    Returns (indices (budget,) by descending margin score, scores (N,) = margin scores). When
    the features have fewer distinct points than `budget`, the remaining picks are the most
    uncertain points not yet chosen.
    """
    from sklearn.cluster import KMeans  # local: sklearn's import is slow and only needed here

    scores = score_margin(probs)
    x = np.asarray(features, dtype=np.float64)
    cluster = KMeans(n_clusters=budget, n_init=3, random_state=seed).fit_predict(x)
    order = _order_by_score(scores)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    best = {}
    for i in order:  # descending score: the first point met in a cluster is its best
        best.setdefault(int(cluster[i]), int(i))
    picked = sorted(best.values(), key=lambda i: rank[i])
    if len(picked) < budget:
        taken = set(picked)
        picked += [int(i) for i in order if int(i) not in taken][:budget - len(picked)]
    return np.asarray(picked, dtype=np.int64), scores


# --- the registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Inputs:
    probs: np.ndarray | None
    fold_probs: np.ndarray | None
    features: np.ndarray | None
    labelled_features: np.ndarray | None
    n: int


def _order_by_score(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; equal scores keep ascending index (stable sort)."""
    return np.argsort(-scores, kind="stable")


def _top(scores: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    return _order_by_score(scores)[:budget], scores


class Strategy(NamedTuple):
    """A selection rule: the inputs it needs, and pick(inputs, budget, seed) -> (indices, scores)."""

    needs: tuple[str, ...]
    pick: Callable[[_Inputs, int, int], tuple[np.ndarray, np.ndarray]]
    help: str


STRATEGIES: dict[str, Strategy] = {
    "random": Strategy((), lambda x, b, s: _top(score_random(x.n, seed=s), b),
                       "uniform at random (the baseline)"),
    "least-confidence": Strategy(("probs",), lambda x, b, s: _top(score_least_confidence(x.probs), b),
                                 "1 - max probability"),
    "margin": Strategy(("probs",), lambda x, b, s: _top(score_margin(x.probs), b),
                       "1 - (top-1 minus top-2 probability)"),
    "entropy": Strategy(("probs",), lambda x, b, s: _top(score_entropy(x.probs), b),
                        "entropy of the ensemble probabilities"),
    "bald": Strategy(("fold_probs",), lambda x, b, s: _top(score_bald(x.fold_probs), b),
                     "disagreement of the folds: H(mean p) - mean H(p)"),
    "coreset": Strategy(("features",),
                        lambda x, b, s: k_center_greedy(x.features, b, labelled=x.labelled_features),
                        "k-center greedy on penultimate features (diverse batch)"),
    "kmeans-margin": Strategy(("probs", "features"),
                              lambda x, b, s: select_kmeans_margin(x.probs, x.features, b, seed=s),
                              "k-means into BUDGET clusters, the lowest-margin image of each"),
}


def _gather_inputs(name: str, probs, fold_probs, features, labelled_features) -> _Inputs:
    if fold_probs is not None:
        fold_probs = np.asarray(fold_probs, dtype=np.float64)
        if fold_probs.ndim != 3:
            raise ValueError(f"fold_probs: expected shape (T, N, K), got {fold_probs.shape}")
        if probs is None:
            probs = fold_probs.mean(axis=0)  # the ensemble's probabilities
    if features is not None:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or not np.isfinite(features).all():
            raise ValueError(f"features: expected finite values of shape (N, D), got {features.shape}")
    given = {"probs": probs, "fold_probs": fold_probs, "features": features}
    missing = [need for need in STRATEGIES[name].needs if given[need] is None]
    if name == "bald" and fold_probs is not None and fold_probs.shape[0] < 2:
        missing.append(f"fold_probs with T >= 2 members (got T = {fold_probs.shape[0]})")
    if missing:
        raise ValueError(f"strategy {name!r} needs {' and '.join(missing)}")
    sizes = {key: (np.shape(v)[1] if key == "fold_probs" else len(v))
             for key, v in given.items() if v is not None}
    if not sizes:
        raise ValueError("select needs at least one of probs, fold_probs or features "
                         "(they give the pool size)")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs disagree on the pool size: {sizes}")
    if labelled_features is not None and features is not None:
        labelled_features = np.asarray(labelled_features, dtype=np.float64)
        if labelled_features.ndim != 2 or labelled_features.shape[1] != features.shape[1]:
            raise ValueError(f"labelled_features: expected shape (M, {features.shape[1]}), "
                             f"got {labelled_features.shape}")
    return _Inputs(probs, fold_probs, features, labelled_features, next(iter(sizes.values())))


def select(strategy: str, *, probs: np.ndarray | None = None, fold_probs: np.ndarray | None = None,
           features: np.ndarray | None = None, labelled_features: np.ndarray | None = None,
           budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose `budget` pool images to label next.

    probs (N, K) ensemble probabilities (the mean of fold_probs when not given), fold_probs
    (T, N, K) per fold or per dropout pass, features (N, D) penultimate features, labelled_features
    (M, D) of the images already labelled (coreset starts from them). Returns (indices (budget,)
    into the pool, distinct, most worth labelling first; scores (N,), higher = more worth labelling).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(sorted(STRATEGIES))}")
    inputs = _gather_inputs(strategy, probs, fold_probs, features, labelled_features)
    is_int = isinstance(budget, (int, np.integer)) and not isinstance(budget, bool)
    if not is_int or not 1 <= budget <= inputs.n:
        raise ValueError(f"budget: {budget!r} must be an integer from 1 to the pool size {inputs.n}")
    indices, scores = STRATEGIES[strategy].pick(inputs, int(budget), int(seed))
    return np.asarray(indices, dtype=np.int64), np.asarray(scores, dtype=np.float64)


# --- review: which given labels to check first ------------------------------------------------

# Default weight of the label-issue score. On sklearn digits with 5-20 % planted label flips
# and 5-fold logistic-regression OOF probabilities, the share of flips among the top
# #flips rows was 0.94 at weight 1.0, 0.91-0.94 at 0.9 and 0.28-0.61 at 0.5: a flipped
# label is usually predicted confidently as its true class, so uncertainty alone does not find
# it. Uncertainty keeps a small weight to order ambiguous images among similar issue scores.
REVIEW_WEIGHT = 0.9


def rank_for_review(oof: pd.DataFrame, *, num_classes: int,
                    weight: float = REVIEW_WEIGHT) -> pd.DataFrame:
    """Rank labelled rows for a person to check: most likely wrong or most ambiguous first.

    oof: RUN/oof.csv (image_id, label int, fold, pred, prob_0 … prob_{K-1}); rows whose
    probabilities are all missing (folds not trained) are left out. review_score =
    weight * issue_score + (1 - weight) * uncertainty, where issue_score = 1 - cleanlab's label
    quality (self-confidence) and uncertainty = entropy / log K, both in [0, 1]. Returns those
    rows with issue_score, uncertainty, review_score and rank (1 = check first), sorted by rank.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight: {weight} must be in [0, 1]")
    prob_cols = prob_columns(num_classes)
    missing = [c for c in ["image_id", "label", *prob_cols] if c not in oof.columns]
    if missing:
        raise DataError(f"oof table: missing column(s) {', '.join(missing)}")
    probs_all = oof[prob_cols].to_numpy(dtype=np.float64)
    filled = ~np.isnan(probs_all).all(axis=1)
    rows = oof.loc[filled].copy()
    if rows.empty:
        raise DataError("oof table: no row has probabilities (no fold finished?)")
    probs = _check_probs(probs_all[filled], "oof probabilities")
    labels = pd.to_numeric(rows["label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(labels, np.arange(num_classes))
    if bad.any():
        listed = [f"row {i + 2}: {v!r}" for i, v in rows["label"][bad].items()][:MAX_LISTED]
        raise DataError(f"oof table: {bad.sum()} label(s) outside 0..{num_classes - 1}: {listed}")
    from cleanlab.rank import get_label_quality_scores  # local: cleanlab's import is slow

    rows["issue_score"] = 1.0 - get_label_quality_scores(labels.astype(np.int64), probs)
    rows["uncertainty"] = entr(probs).sum(axis=1) / np.log(num_classes)
    rows["review_score"] = weight * rows["issue_score"] + (1.0 - weight) * rows["uncertainty"]
    rows = rows.iloc[_order_by_score(rows["review_score"].to_numpy())]
    rows["rank"] = np.arange(1, len(rows) + 1)
    return rows


# --- merge: new and corrected labels back into the training table ----------------------------

@dataclass
class MergePlan:
    """The merged table and what changed: ids added, ids corrected, rows that matched already."""

    table: pd.DataFrame
    added: list[str]
    corrected: list[str]
    unchanged: list[str]


def _label_index(train_labels: pd.Series, classes: Sequence[str]) -> tuple[dict[str, int], bool]:
    """{accepted label text: class index}, and whether the table writes labels as indices.

    The same rule as data.load_train_table: a table of digit labels uses indices unless those
    digits are themselves the class names. Names are always accepted, so a person can answer
    with the names of classes.json whatever the table uses.
    """
    values = set(train_labels)
    digits = all(v.isdigit() for v in values)
    indexed = list(classes) == [str(i) for i in range(len(classes))]
    integer = digits and (indexed or not values <= set(classes))
    index = {name: k for k, name in enumerate(classes)}
    if integer:
        index.update({str(k): k for k in range(len(classes))})
    return index, integer


def _texts(frame: pd.DataFrame, column: str, source: str) -> pd.Series:
    if column not in frame.columns:
        raise MergeError(f"{source}: missing column {column!r}; "
                         f"columns are {', '.join(map(str, frame.columns))}")
    return frame[column].astype(str).str.strip().reset_index(drop=True)


def _duplicate_problems(ids: pd.Series, labels: pd.Series, source: str) -> list[str]:
    problems = []
    for image_id, rows in ids[ids.duplicated(keep=False)].groupby(ids, sort=False).groups.items():
        given = labels[rows]
        kind = "given different labels" if given.nunique() > 1 else "repeated"
        problems.append(f"{image_id!r} {kind} in rows {', '.join(str(i + 2) for i in rows)}"
                        f" ({', '.join(map(repr, given))})")
    return [f"{source} {p}" for p in problems]


def plan_merge(train: pd.DataFrame, new: pd.DataFrame, *, classes: Sequence[str],
               allow_relabel: bool = False, id_col: str = "image_id",
               label_col: str = "label") -> MergePlan:
    """Check `new` (image_id, label) against `train` and build the merged table.

    Refuses, listing every offending row (rows numbered as CSV lines, header = 1): empty ids or
    labels, an image id repeated in either table (with the same or different labels), labels
    that are not a class of `classes` (names, or indices when the table uses indices), and,
    unless allow_relabel, new labels that differ from the training table's label for that image.
    Added rows are appended in `new`'s order; corrections keep their row. Labels are written the
    way the training table writes them (indices or names).
    """
    train_ids, train_labels = _texts(train, id_col, "train"), _texts(train, label_col, "train")
    new_ids, new_labels = _texts(new, id_col, "new"), _texts(new, label_col, "new")
    index, integer = _label_index(train_labels, classes)
    allowed = ", ".join(classes) if len(classes) <= 30 else f"{len(classes)} classes"
    problems = []
    for source, ids, labels in (("train", train_ids, train_labels), ("new", new_ids, new_labels)):
        empty = [f"row {i + 2}: id {ids[i]!r}, label {labels[i]!r}"
                 for i in np.flatnonzero((ids.eq("") | labels.eq("")).to_numpy())]
        if empty:
            problems.append(format_listing(f"{source}: rows with an empty image id or label", empty))
        dups = _duplicate_problems(ids, labels, source)
        if dups:
            problems.append(format_listing(f"{source}: image ids given more than once", dups))
        unknown = [f"row {i + 2}: {ids[i]!r} label {labels[i]!r}"
                   for i in np.flatnonzero((~labels.isin(index) & labels.ne("")).to_numpy())]
        if unknown:
            problems.append(format_listing(f"{source}: labels that are not a class ({allowed})",
                                           unknown))
    if problems:
        raise MergeError("\n".join(problems))
    return _apply_merge(train, new_ids, new_labels, train_ids, train_labels, index=index,
                        integer=integer, classes=classes, allow_relabel=allow_relabel,
                        id_col=id_col, label_col=label_col)


def _apply_merge(train: pd.DataFrame, new_ids: pd.Series, new_labels: pd.Series,
                 train_ids: pd.Series, train_labels: pd.Series, *, index: dict[str, int],
                 integer: bool, classes: Sequence[str], allow_relabel: bool, id_col: str,
                 label_col: str) -> MergePlan:
    train_k = train_labels.map(index).to_numpy(dtype=np.int64)
    new_k = new_labels.map(index).to_numpy(dtype=np.int64)
    position = {image_id: i for i, image_id in enumerate(train_ids)}
    added, corrected, unchanged, relabels = [], [], [], []
    for j, image_id in enumerate(new_ids):
        i = position.get(image_id)
        if i is None:
            added.append(j)
        elif train_k[i] == new_k[j]:
            unchanged.append(image_id)
        else:
            corrected.append((i, j))
            relabels.append(f"new row {j + 2}: {image_id!r} is {classes[train_k[i]]!r} in train "
                            f"(row {i + 2}), new label {classes[new_k[j]]!r}")
    if relabels and not allow_relabel:
        raise MergeError(format_listing("new labels that change a training label (pass --allow-relabel "
                                  "to accept corrections)", relabels))
    out_k = train_k.copy()
    for i, j in corrected:
        out_k[i] = new_k[j]
    write = (lambda k: k) if integer else (lambda k: np.asarray(classes, dtype=object)[k])
    table = train.reset_index(drop=True).copy()
    table[label_col] = write(out_k)
    extra = pd.DataFrame({id_col: new_ids[added].to_numpy(), label_col: write(new_k[added])})
    table = pd.concat([table, extra], ignore_index=True) if len(extra) else table
    return MergePlan(table=table, added=new_ids[added].tolist(),
                     corrected=[train_ids[i] for i, _ in corrected], unchanged=unchanged)


def merge_tables(train: pd.DataFrame, new: pd.DataFrame, *, classes: Sequence[str],
                 allow_relabel: bool = False, id_col: str = "image_id",
                 label_col: str = "label") -> pd.DataFrame:
    """The training table with `new`'s labels merged in (see `plan_merge` for the checks)."""
    return plan_merge(train, new, classes=classes, allow_relabel=allow_relabel,
                      id_col=id_col, label_col=label_col).table


# --- select: a run's models over a pool of images ---------------------------------------------

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
        table = read_text_table(csv_path, allow_empty=True)
        if id_col not in table.columns:
            raise DataError(f"{csv_path}: missing column {id_col!r} (id_col of {run.path})")
        ids = table[id_col].str.strip().tolist()
    known = set(ids)
    ids += [i for i in dict.fromkeys(run.read_oof_ids()) if i not in known]
    return pd.DataFrame({"image_id": ids, "path": [str((images_dir / i).resolve()) for i in ids]})


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
        table = read_text_table(pool, allow_empty=True)
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
    from mixcls.duplicates import identical_files

    same_bytes = np.zeros(len(rest), dtype=bool)
    for rows in identical_files(rest["path"].tolist()):
        same_bytes[rows[1:]] = True  # the first of each set stays
    rest = rest.loc[~same_bytes].reset_index(drop=True)
    counts = {"pool": len(pool), "labelled": int(is_labelled.sum()),
              "duplicates": int(same_name.sum() + same_bytes.sum()), "candidates": len(rest)}
    return rest, counts


def drop_near_duplicates(candidates: pd.DataFrame, labelled: pd.DataFrame, max_distance: int, *,
                         workers: int = 0) -> tuple[pd.DataFrame, int]:
    """The candidates less their near-duplicates (pHash within `max_distance` of 256 bits, as
    `mixcls duplicates`): grouped as connected components, a group keeps its first candidate
    in pool order, and a group with a member near a labelled image keeps none. A resized or
    re-saved copy of an image takes a labelling slot for an answer already known, and
    uncertainty strategies favour picking every copy of one uncertain image. Returns (the
    kept candidates, how many were dropped)."""
    from mixcls.duplicates import find_pairs, group_rows, hash_images, nearest_hashes

    hashes = hash_images(candidates["path"].tolist(), workers=workers)
    first = group_rows(len(candidates), find_pairs(hashes, max_distance))
    near_labelled = np.zeros(len(candidates), dtype=bool)
    if len(labelled):
        known = hash_images(labelled["path"].tolist(), workers=workers)
        near_labelled = nearest_hashes(hashes, known)["bits"].to_numpy() <= max_distance
    group_near = pd.Series(near_labelled).groupby(first).transform("any").to_numpy()
    keep = (first == np.arange(len(candidates))) & ~group_near
    return candidates.loc[keep].reset_index(drop=True), int((~keep).sum())


def _predict_module() -> Any:
    # Imported by name when needed: it loads torch models, and tests put a fake in sys.modules.
    return importlib.import_module("mixcls.predict")


def select_from_pool(run_dir: str | Path, pool: str | Path, *, strategy: str, budget: int,
                     seed: int = 42, tta: int | None = None, pool_images: str | Path | None = None,
                     device: str = "auto", batch_size: int = 64, workers: int = 0,
                     near_duplicates: int | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Score the unlabelled pool with the run's models and choose up to `budget` images.

    tta None uses the run's own number of TTA views. With `near_duplicates` (bits), the pool's
    near-duplicates of labelled images and of each other are left out first
    (`drop_near_duplicates`; counted as near_duplicates).

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
    if near_duplicates is not None:
        candidates, dropped = drop_near_duplicates(candidates, labelled, near_duplicates,
                                                   workers=workers)
        counts = {**counts, "near_duplicates": dropped, "candidates": len(candidates)}
    if candidates.empty:
        raise DataError(f"pool {pool}: no image left to label ({counts['labelled']} already "
                        f"labelled, {counts['duplicates']} duplicates"
                        + (f", {counts['near_duplicates']} near-duplicates)"
                           if near_duplicates is not None else ")"))
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
    """fold_probs (F, N, K) always; features (N, D) and labelled_features (M, D) when needed.

    The pool goes through each fold's model once: probabilities and features of one pass.
    """
    predict = _predict_module()
    options = {"device": device, "batch_size": batch_size, "workers": workers}
    with_features = "features" in STRATEGIES[strategy].needs
    pool_outputs = predict.predict_run_outputs(run_dir, paths, tta=tta, features=with_features, **options)
    fold_probs = np.asarray(pool_outputs.probs)
    if fold_probs.ndim != 3 or fold_probs.shape[1:] != (len(paths), num_classes):
        raise RunError(f"{run_dir}: fold probabilities of shape {fold_probs.shape}, expected "
                       f"(folds, {len(paths)}, {num_classes})")
    outputs = {"fold_probs": fold_probs}
    if with_features:
        outputs["features"] = np.asarray(pool_outputs.features).mean(axis=0)
    if strategy == "coreset" and labelled_paths:
        # The batch should cover what the labelled set does not: start from its features.
        outputs["labelled_features"] = predict.extract_features(run_dir, labelled_paths, **options)
    return outputs


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


# --- review and merge on files ------------------------------------------------------------------

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
    train, new = read_text_table(train_csv, allow_empty=True), read_text_table(new_csv, allow_empty=True)
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
