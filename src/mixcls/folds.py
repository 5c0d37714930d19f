"""Stratified k-fold assignment, and a fingerprint that tells whether two runs share folds."""

from __future__ import annotations

import hashlib
from typing import Iterable

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


FINGERPRINT_CHARS = 12


def folds_fingerprint(image_ids: Iterable[str], folds: Iterable[int]) -> str:
    """A short stable hash of a fold assignment: the first 12 hex characters of the sha256 of
    the lines `image_id,fold` (one per row, each ending in a newline, in row order, UTF-8).

    Two runs with the same fingerprint validated every image on the same fold, so their CV
    scores (and OOF probabilities) can be compared or blended row by row.
    """
    image_ids, folds = list(image_ids), list(folds)
    if len(image_ids) != len(folds):
        raise ValueError(f"{len(image_ids)} image ids but {len(folds)} folds")
    digest = hashlib.sha256()
    for image_id, fold in zip(image_ids, folds):
        digest.update(f"{image_id},{int(fold)}\n".encode())
    return digest.hexdigest()[:FINGERPRINT_CHARS]
