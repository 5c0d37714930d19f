"""Stratified k-fold assignment (optionally grouped), and a fingerprint that tells whether two
runs share folds."""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold


def make_folds(labels: np.ndarray, n_folds: int, seed: int,
               groups: Sequence[str] | np.ndarray | None = None) -> np.ndarray:
    """Fold index (N,) in 0..n_folds-1 for each row, stratified by `labels` (N,) ints.

    With `groups` (N,) (a patient, a plant, a photo session, a cluster of near-duplicate
    images), every row of a group gets the same fold, so no group is both trained on and
    validated: scikit-learn's StratifiedGroupKFold, which keeps the class mix of each fold as
    close to the whole as whole groups allow. A fold may come out empty when a few groups hold
    most rows; the caller checks (`empty_folds`).
    """
    labels = np.asarray(labels)
    folds = np.full(len(labels), -1, dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(labels)), labels)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(labels)), labels, np.asarray(groups))
    for fold, (_, valid_idx) in enumerate(parts):
        folds[valid_idx] = fold
    return folds


def empty_folds(folds: np.ndarray, n_folds: int) -> list[int]:
    """The folds in 0..n_folds-1 that no row has."""
    return sorted(set(range(n_folds)) - set(np.asarray(folds).tolist()))


def find_split_groups(groups: Sequence[str] | np.ndarray, folds: np.ndarray) -> dict[str, list[int]]:
    """Groups whose rows sit in more than one fold, each with its folds (ascending), in the
    order the groups first appear: the leak a grouped CV exists to prevent."""
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=str), "fold": np.asarray(folds)})
    per_group = frame.groupby("group", sort=False)["fold"].unique()
    return {str(g): sorted(int(f) for f in fs) for g, fs in per_group.items() if len(fs) > 1}


FINGERPRINT_CHARS = 12
# The fold of a train-only row (--train-only-col): in every fold's training rows, in none's
# validation rows; folds.csv and a table's fold column write it so.
TRAIN_ONLY_FOLD = -1


def folds_fingerprint(image_ids: Iterable[str], folds: Iterable[int]) -> str:
    """A short stable hash of a fold assignment: the first 12 hex characters of the sha256 of
    the lines `image_id,fold` (one per row, each ending in a newline, in row order, UTF-8).

    Two runs with the same fingerprint validated every image on the same fold, so their CV
    scores (and OOF probabilities) can be compared or blended row by row. Train-only rows
    (fold -1) are validated nowhere and left out, so a run with extra training data and one
    without share the fingerprint of the rows both validate.
    """
    image_ids, folds = list(image_ids), list(folds)
    if len(image_ids) != len(folds):
        raise ValueError(f"{len(image_ids)} image ids but {len(folds)} folds")
    digest = hashlib.sha256()
    for image_id, fold in zip(image_ids, folds):
        if int(fold) != TRAIN_ONLY_FOLD:
            digest.update(f"{image_id},{int(fold)}\n".encode())
    return digest.hexdigest()[:FINGERPRINT_CHARS]
