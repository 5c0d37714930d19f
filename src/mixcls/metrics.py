"""Scores of a run from its OOF table: accuracy, macro F1, log-loss, per fold and per class."""

from __future__ import annotations

from typing import Any

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
