"""metrics.compute_metrics against plain numpy on random OOF tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mixcls.metrics import compute_metrics


def _random_oof(rng: np.random.Generator, n: int, k: int, n_folds: int) -> pd.DataFrame:
    probs = rng.dirichlet(np.ones(k) * 0.7, size=n).astype(np.float32)
    frame = pd.DataFrame({"image_id": [f"{i}.png" for i in range(n)], "label": rng.integers(0, k, n),
                          "fold": rng.integers(0, n_folds, n), "pred": probs.argmax(1)})
    for j in range(k):
        frame[f"prob_{j}"] = probs[:, j]
    return frame


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_a_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    oof = _random_oof(rng, int(rng.integers(30, 200)), k, n_folds=3)
    classes = [f"c{j}" for j in range(k)]
    metrics = compute_metrics(oof, classes)
    labels, pred = oof["label"].to_numpy(), oof["pred"].to_numpy()
    probs = oof[[f"prob_{j}" for j in range(k)]].to_numpy(dtype=np.float64)
    probs /= probs.sum(1, keepdims=True)
    expected_logloss = -np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1)))
    assert metrics["cv_logloss"] == pytest.approx(expected_logloss, rel=1e-6)
    assert metrics["cv_accuracy"] == pytest.approx(np.mean(labels == pred))
    for fold, acc in metrics["fold_accuracy"].items():
        rows = oof["fold"].to_numpy() == int(fold)
        assert acc == pytest.approx(np.mean(labels[rows] == pred[rows]))
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (labels, pred), 1)
    assert metrics["confusion"] == confusion.tolist()
    f1 = []
    for j in range(k):
        tp, fp, fn = confusion[j, j], confusion[:, j].sum() - confusion[j, j], confusion[j].sum() - confusion[j, j]
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert metrics["cv_macro_f1"] == pytest.approx(np.mean(f1))


def test_confident_right_answers_have_a_lower_logloss_than_hesitant_ones():
    rng = np.random.default_rng(3)
    oof = _random_oof(rng, 60, 3, n_folds=2)
    labels = oof["label"].to_numpy()
    sure = oof.copy()
    for j in range(3):
        sure[f"prob_{j}"] = np.where(labels == j, 0.98, 0.01)
    sure["pred"] = labels
    assert compute_metrics(sure, ["a", "b", "c"])["cv_logloss"] < compute_metrics(oof, ["a", "b", "c"])["cv_logloss"]
