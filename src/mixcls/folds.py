"""Stratified k-fold assignment."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold


def make_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (N,) in 0..n_folds-1 for each row, stratified by `labels` (N,) ints."""
    labels = np.asarray(labels)
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[valid_idx] = fold
    return folds
