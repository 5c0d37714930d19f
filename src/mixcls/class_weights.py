"""Class weights in the training loss (--class-weights): none, balanced, or one weight per class.

A row's weight is the class weight of its target (Σ_k t_k w_k for a soft target), multiplied
into whatever weight the row already had (a pseudo row's --pseudo-weight). The losses take the
weighted mean Σ_i w_i l_i / Σ_i w_i, so for hard labels and cross-entropy this is exactly
torch's `cross_entropy(weight=...)`.

`balanced` is scikit-learn's rule, n / (K · count_k), computed per fold from that fold's
training rows alone (the validation rows' labels never set a weight): with hard labels every
class then carries the same total weight in an epoch's loss. The counts are each row's existing
weight times its target, so pseudo rows and soft targets count for what they weigh (a soft
row's one weight blends its classes' weights, so there the balance is in the counts, not exact
in the loss). Validation and the OOF scores are untouched: the CV still scores the labels as
given.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mixcls.config import ConfigError


def parse_class_weights(spec: str, num_classes: int | None = None) -> np.ndarray | str | None:
    """None for "none", "balanced" as is, else the K weights (float64) of "w0,w1,…";
    ConfigError names the value. `num_classes` (when known) checks the count."""
    text = str(spec).strip()
    if text in ("none", "balanced"):
        return None if text == "none" else text
    try:
        weights = np.array([float(item) for item in text.split(",")], dtype=np.float64)
    except ValueError:
        raise ConfigError(f"class_weights: {spec!r} is not allowed; use none, balanced, or one "
                          "number > 0 per class, comma-separated (0.5,2,1)") from None
    # > 0: a batch of zero-weight rows would have no weighted mean (0 / 0)
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"class_weights: {spec!r}: every weight must be a finite number > 0")
    if num_classes is not None and len(weights) != num_classes:
        raise ConfigError(f"class_weights: {spec!r} gives {len(weights)} weight(s) for "
                          f"{num_classes} classes")
    return weights


def fit_class_weights(targets: np.ndarray, row_weights: np.ndarray | None, *,
                      num_classes: int) -> np.ndarray:
    """`balanced` weights (K,) for training rows with `targets` (n,) labels or (n, K) soft
    targets and their `row_weights` (n,) (None: 1 each): n_eff / (K · mass_k), mass_k being
    the rows' total weight on class k; a class with no mass gets 0 (no row would use it)."""
    soft = _as_soft(targets, num_classes)
    row_weights = np.ones(len(soft)) if row_weights is None else np.asarray(row_weights, np.float64)
    mass = (row_weights[:, None] * soft).sum(axis=0)
    weights = np.zeros(num_classes)
    present = mass > 0
    weights[present] = mass.sum() / (num_classes * mass[present])
    return weights


def row_class_weights(targets: np.ndarray, class_weights: np.ndarray, *,
                      num_classes: int) -> np.ndarray:
    """Each row's weight (n,) float32: its target's expected class weight, Σ_k t_k w_k."""
    return (_as_soft(targets, num_classes) @ class_weights).astype(np.float32)


def weigh_fold_data(data, spec: str):
    """`data` (a run_setup.FoldData) with its training rows weighted by `spec`, and the class
    weights used (None for "none", which returns `data` itself: the plain run, bit for bit)."""
    parsed = parse_class_weights(spec, data.num_classes)
    if parsed is None:
        return data, None
    k = data.num_classes
    weights = fit_class_weights(data.train_targets, data.train_weights, num_classes=k) \
        if isinstance(parsed, str) else parsed
    rows = row_class_weights(data.train_targets, weights, num_classes=k)
    if data.train_weights is not None:
        rows = rows * data.train_weights.astype(np.float32)
    return dataclasses.replace(data, train_weights=rows), weights


def _as_soft(targets: np.ndarray, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return targets.astype(np.float64)
    return np.eye(num_classes)[targets.astype(np.int64)]
