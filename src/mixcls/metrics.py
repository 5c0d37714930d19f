"""Scores of a run from its OOF table (accuracy, macro F1, log-loss, per fold and per class) and
the per-epoch validation score that picks a fold's best epoch."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, log_loss

from mixcls.data import prob_columns


def compute_metrics(oof: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """CV accuracy, macro F1, log-loss, per-fold and per-class accuracy, confusion matrix.

    `oof` holds label, pred, fold and prob_0 ... prob_{K-1} per validated row.
    """
    labels, pred = oof["label"].to_numpy(), oof["pred"].to_numpy()
    k = len(classes)
    cm = confusion_matrix(labels, pred, labels=list(range(k)))
    per_class = {classes[i]: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i in range(k)}
    per_fold = {str(f): float((g["label"] == g["pred"]).mean()) for f, g in oof.groupby("fold")}
    return {"cv_accuracy": float((labels == pred).mean()),
            "cv_macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(k)),
                                          zero_division=0)),
            "cv_logloss": cv_logloss(labels, oof[prob_columns(k)].to_numpy(dtype=np.float64)),
            "fold_accuracy": per_fold, "class_accuracy": per_class, "confusion": cm.tolist(),
            "classes": classes, "rows": int(len(oof))}


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro F1 of the argmax of `probs` (N, K) against `labels` (N,), every one of the K
    classes counted (a class never predicted nor present scores 0)."""
    k = probs.shape[1]
    return float(f1_score(labels, probs.argmax(1), average="macro", labels=list(range(k)),
                          zero_division=0))


def cv_logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of `labels` (N,) under `probs` (N, K) (sklearn's log_loss,
    which clips probabilities away from 0)."""
    # float32 softmax rows sum to 1 only within ~1e-7; sklearn would warn about each such row.
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(log_loss(labels, probs, labels=list(range(probs.shape[1]))))


def oof_frame(image_ids: np.ndarray, labels: np.ndarray, folds: np.ndarray, probs: np.ndarray,
              rows: np.ndarray) -> pd.DataFrame:
    """One fold's OOF table: its validation `rows` (index), their ids, labels (N,), folds (N,)
    and probabilities (n_rows, K)."""
    frame = pd.DataFrame({"image_id": image_ids[rows], "label": labels[rows], "fold": folds[rows],
                          "pred": probs.argmax(1)})
    frame[prob_columns(probs.shape[1])] = probs
    frame.index = rows
    return frame


def merge_oof(frames: list[pd.DataFrame], image_ids: list[str]) -> pd.DataFrame:
    """The folds' OOF tables as one, in the order of `image_ids` (the training table's rows)."""
    oof = pd.concat(frames)
    order = {image_id: i for i, image_id in enumerate(image_ids)}
    return oof.assign(_row=oof["image_id"].astype(str).map(order)).sort_values("_row").drop(columns="_row")


# --select-metric NAME -> (history.csv column, sign): the fold keeps the first epoch with the
# highest sign x column, so log-loss (valid_loss, the mean cross-entropy of the validation rows)
# counts lower as better.
SELECT_COLUMNS = {"accuracy": ("valid_accuracy", 1.0), "logloss": ("valid_loss", -1.0),
                  "macro_f1": ("valid_macro_f1", 1.0)}


def epoch_score(row: Mapping[str, float], metric: str) -> float:
    """A history row's `metric` as a score where higher is better (NaN without validation)."""
    column, sign = SELECT_COLUMNS[metric]
    return sign * float(row[column])


def best_epoch_row(history: pd.DataFrame, metric: str) -> pd.Series | None:
    """The row of a fold's history.csv whose weights best.pt holds: the first epoch with the
    best `metric`; None for a history without that column or any validated epoch."""
    column, sign = SELECT_COLUMNS[metric]
    if column not in history.columns or history[column].isna().all():
        return None
    return history.loc[(sign * history[column]).idxmax()]
