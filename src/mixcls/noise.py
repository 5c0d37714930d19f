"""Suspect labels from a run's out-of-fold probabilities (confident learning via cleanlab),
and cleaned training tables that never touch the labels validation is scored on.

The cleaned table keeps every row and both labels: `label` is what a fold trains on,
`label_given` what it is scored on, `keep` 0 excludes a row from training only, and `fold` is
the run's fold of the row, so a new run re-uses the folds instead of re-splitting. A row's OOF
probabilities came from the one model that did not train on it, so its suspicion is honest;
cleaning the validation rows too would raise CV without helping the test score. One indirect
path remains: the model that scored a training row of fold g was itself trained on fold g's
validation rows, so those labels can sway which training rows of fold g get cleaned.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mixcls.data import DataError, prob_columns

# cleanlab's filter_by: how rows are judged label issues.
FILTER_METHODS = ("low_self_confidence", "low_normalized_margin", "prune_by_noise_rate",
                  "prune_by_class", "both", "confident_learning", "predicted_neq_given")
# The default: as many rows as confident learning estimates to be mislabelled
# (cleanlab.count.num_label_issues), taken where the OOF probability of the given label is
# lowest. On Fashion-MNIST with 20 % symmetric noise (benchmarks/noise.py) it flagged far fewer
# clean rows of confusable classes than prune_by_noise_rate, which takes each off-diagonal
# count of the confident joint by margin; docs/benchmarks.md has every filter's figures.
DEFAULT_METHOD = "low_self_confidence"
# cleanlab's label-quality scores (low = likely wrong): how suspects are ranked.
SCORE_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
POLICIES = ("drop", "relabel", "soft")
# OOF rows are softmax outputs written as text; allow for the rounding of a CSV round trip.
PROB_SUM_TOLERANCE = 1e-3
MAX_LISTED = 10


def _rows(index: np.ndarray) -> str:
    """'row 2, row 7, … (N rows)' with CSV line numbers (header is line 1)."""
    shown = ", ".join(f"row {i + 2}" for i in index[:MAX_LISTED])
    return shown + (f", … ({len(index)} rows)" if len(index) > MAX_LISTED else "")


def check_oof(oof: pd.DataFrame, *, num_classes: int, source: str = "oof") -> None:
    """Raise DataError naming `source` and the rows unless `oof` is a complete OOF table:
    image_id, label in 0..K-1, fold >= 0, prob_0 … prob_{K-1} >= 0 summing to 1."""
    expected = prob_columns(num_classes)
    found = [c for c in oof.columns if str(c).startswith("prob_")]
    missing = [c for c in ("image_id", "label", "fold") if c not in oof.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; "
                        f"columns are {', '.join(map(str, oof.columns))}")
    if sorted(found) != sorted(expected):
        raise DataError(f"{source}: probability columns {found} do not match the {num_classes} "
                        f"classes of the run (expected prob_0 … prob_{num_classes - 1})")
    if len(oof) == 0:
        raise DataError(f"{source}: no rows")
    for name, high in (("label", num_classes - 1), ("fold", None)):
        values = pd.to_numeric(oof[name], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values) | (values % 1 != 0) | (values < 0)
        if high is not None:
            bad |= values > high
        if bad.any():
            allowed = f"0..{high}" if high is not None else "integers >= 0"
            raise DataError(f"{source}: column {name} must hold {allowed}: {_rows(np.flatnonzero(bad))}")
    dup = oof["image_id"].duplicated(keep=False).to_numpy()
    if dup.any():
        raise DataError(f"{source}: duplicate image ids: {_rows(np.flatnonzero(dup))}")
    probs = oof[expected].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    sums = probs.sum(axis=1)
    bad = ~np.isfinite(sums) | (probs < 0).any(axis=1) | (np.abs(sums - 1) > PROB_SUM_TOLERANCE)
    if bad.any():
        raise DataError(f"{source}: probabilities must be >= 0 and sum to 1 (rows not scored "
                        f"by any fold count too): {_rows(np.flatnonzero(bad))}")


def _labels_and_probs(oof: pd.DataFrame, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int labels and (N, K) float64 probabilities, rows renormalised after CSV rounding."""
    labels = oof["label"].to_numpy(dtype=np.int64)
    probs = oof[prob_columns(num_classes)].to_numpy(dtype=np.float64)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def find_suspects(oof: pd.DataFrame, *, num_classes: int, method: str = DEFAULT_METHOD,
                  score: str = "self_confidence") -> pd.DataFrame:
    """Rows whose given label is likely wrong, worst first.

    `method` is cleanlab's filter (FILTER_METHODS), `score` its label-quality score
    (SCORE_METHODS, in [0, 1], low = likely wrong). Returns one row per suspect: image_id, fold,
    label_given, label_suggested (the most probable other class), prob_given, prob_suggested,
    quality.
    """
    if method not in FILTER_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(FILTER_METHODS)}")
    if score not in SCORE_METHODS:
        raise ValueError(f"unknown score {score!r}; use one of {', '.join(SCORE_METHODS)}")
    from cleanlab.filter import find_label_issues  # local: importing cleanlab takes ~2 s
    from cleanlab.rank import get_label_quality_scores

    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    # n_jobs=1: on 20k rows x 5 classes one process takes ~0.02 s and the worker pool ~0.05 s.
    issues = find_label_issues(labels, probs, filter_by=method, n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method=score)
    rows = np.flatnonzero(issues)
    rows = rows[np.argsort(quality[rows], kind="stable")]
    others = probs[rows].copy()
    others[np.arange(len(rows)), labels[rows]] = -np.inf
    suggested = others.argmax(axis=1)
    return pd.DataFrame({
        "image_id": oof["image_id"].to_numpy()[rows],
        "fold": oof["fold"].to_numpy(dtype=np.int64)[rows],
        "label_given": labels[rows],
        "label_suggested": suggested,
        "prob_given": probs[rows, labels[rows]],
        "prob_suggested": probs[rows, suggested],
        "quality": quality[rows],
    })


def estimate_noise_matrix(oof: pd.DataFrame, num_classes: int) -> np.ndarray:
    """(K, K) cleanlab's estimate of P(given = i | true = j) at [i, j]; columns sum to 1."""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities

    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    _, noise_matrix, _, _ = estimate_py_and_noise_matrices_from_probabilities(labels, probs)
    return noise_matrix


def summarize_class_pairs(oof: pd.DataFrame, suspects: pd.DataFrame, *,
                          num_classes: int) -> pd.DataFrame:
    """Which classes are confused with which: one row per (given, suggested) pair with
    n_suspects (flagged rows) and n_estimated (cleanlab's calibrated confident joint, i.e. the
    estimated count of rows given `label_given` whose true class is `label_suggested`),
    largest n_estimated first; pairs with neither are left out."""
    from cleanlab.count import estimate_joint

    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    joint = estimate_joint(labels, probs) * len(labels)
    flagged = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(flagged, (suspects["label_given"].to_numpy(dtype=np.int64),
                        suspects["label_suggested"].to_numpy(dtype=np.int64)), 1)
    given, true = np.nonzero(~np.eye(num_classes, dtype=bool))
    table = pd.DataFrame({"label_given": given, "label_suggested": true,
                          "n_suspects": flagged[given, true],
                          "n_estimated": joint[given, true]})
    table = table[(table["n_suspects"] > 0) | (table["n_estimated"] > 0.5)]
    return table.sort_values(["n_estimated", "n_suspects"], ascending=False,
                             kind="stable").reset_index(drop=True)


def select_actions(suspects: pd.DataFrame, *, n_rows: int, threshold: float = 0.0,
                   max_fraction: float = 0.2) -> pd.DataFrame:
    """The suspects to act on: OOF probability of the suggested class >= `threshold`, at most
    floor(max_fraction * n_rows) of them, worst quality first."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in [0, 1]")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction {max_fraction} must be in [0, 1]")
    confident = suspects[suspects["prob_suggested"] >= threshold]
    ranked = confident.sort_values("quality", kind="stable")
    return ranked.head(int(np.floor(max_fraction * n_rows)))


def clean_table(oof: pd.DataFrame, suspects: pd.DataFrame, *, num_classes: int, policy: str,
                threshold: float = 0.0, max_fraction: float = 0.2,
                soft_weight: float = 0.5) -> pd.DataFrame:
    """The training table after acting on `suspects` (from find_suspects on the same `oof`).

    One row per OOF row, in its order: image_id, label (int, to train on), label_given (int,
    untouched: validation is scored on it), fold, keep (0: not trained on, still validated),
    and for policy soft prob_0 … prob_{K-1} = (1 - soft_weight) one_hot(given) +
    soft_weight OOF probabilities on the acted rows, one_hot(given) elsewhere.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight {soft_weight} must be in [0, 1]")
    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    acted = select_actions(suspects, n_rows=len(oof), threshold=threshold, max_fraction=max_fraction)
    rows = pd.Index(oof["image_id"]).get_indexer(acted["image_id"])
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} suspect(s) are not rows of the OOF table, "
                         f"e.g. {acted['image_id'].iloc[np.flatnonzero(rows < 0)[0]]!r}")
    table = pd.DataFrame({"image_id": oof["image_id"].to_numpy(), "label": labels.copy(),
                          "label_given": labels.copy(),
                          "fold": oof["fold"].to_numpy(dtype=np.int64),
                          "keep": np.ones(len(oof), dtype=np.int64)})
    if policy == "drop":
        table.loc[rows, "keep"] = 0
    elif policy == "relabel":
        table.loc[rows, "label"] = acted["label_suggested"].to_numpy(dtype=np.int64)
    else:
        soft = np.eye(num_classes)[labels]
        soft[rows] = (1.0 - soft_weight) * soft[rows] + soft_weight * probs[rows]
        table["label"] = soft.argmax(axis=1)
        table[prob_columns(num_classes)] = soft
    return table
