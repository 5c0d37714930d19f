"""--select-metric: which validation score picks a fold's best epoch, stops it early and sets
the --full-fit length."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, log_loss

from conftest import write_tiny_dataset
from mixcls import config, metrics
from mixcls.cli import main
from mixcls.data import prob_columns
from mixcls.runs import load_checkpoint
from mixcls.train import full_fit_epochs

BASE = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "8", "--workers", "0",
        "--no-progress", "--lr", "3e-3", "--folds", "2"]


def test_the_config_knows_every_metric_the_trainer_can_select_by():
    assert config.SELECT_METRICS == sorted(metrics.SELECT_COLUMNS)


def _kept_by_the_trainer(history: pd.DataFrame, metric: str) -> int:
    """The trainer's rule, one epoch at a time: a new best only when strictly better."""
    best, kept = float("-inf"), None
    for i, row in history.iterrows():
        score = metrics.epoch_score(row.to_dict(), metric)
        if score > best:
            best, kept = score, i
    return kept


@pytest.mark.parametrize("seed", range(20))
def test_best_epoch_row_is_the_epoch_the_trainer_keeps(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    # rounded to two decimals, so ties happen and the first best must win
    history = pd.DataFrame({"epoch": np.arange(1, n + 1),
                            "valid_accuracy": rng.uniform(0, 1, n).round(2),
                            "valid_loss": rng.uniform(0, 3, n).round(2),
                            "valid_macro_f1": rng.uniform(0, 1, n).round(2)})
    for metric, column, pick in [("accuracy", "valid_accuracy", np.argmax),
                                 ("logloss", "valid_loss", np.argmin),
                                 ("macro_f1", "valid_macro_f1", np.argmax)]:
        row = metrics.best_epoch_row(history, metric)
        expected = int(pick(history[column].to_numpy()))  # numpy: the first extreme
        assert row.name == expected == _kept_by_the_trainer(history, metric)
        assert row["epoch"] == expected + 1


def test_best_epoch_row_without_the_column_or_any_validation_is_none():
    history = pd.DataFrame({"epoch": [1, 2], "valid_accuracy": [0.5, 0.6],
                            "valid_loss": [np.nan, np.nan]})
    assert metrics.best_epoch_row(history, "macro_f1") is None  # a run from before the column
    assert metrics.best_epoch_row(history, "logloss") is None  # the full-data model
    assert metrics.best_epoch_row(history, "accuracy")["epoch"] == 2


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_is_sklearns_on_the_argmax_with_every_class_counted(seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(4), size=30)
    labels = rng.integers(0, 3, 30)  # class 3 never a label: its F1 counts as 0 if predicted
    pred = probs.argmax(1)
    per_class = []
    for k in range(4):  # F1 by its definition
        tp = np.sum((pred == k) & (labels == k))
        fp, fn = np.sum((pred == k) & (labels != k)), np.sum((pred != k) & (labels == k))
        per_class.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert metrics.macro_f1(labels, probs) == pytest.approx(np.mean(per_class))


def test_full_fit_length_follows_the_selection_metric(tmp_path):
    # accuracy peaks at epoch 2 everywhere, log-loss bottoms out at epochs 6, 7, 9
    for fold, low in enumerate([6, 7, 9]):
        loss = np.linspace(2.0, 1.0, 10)
        loss[low - 1] = 0.1
        accuracy = np.full(10, 0.5)
        accuracy[1] = 0.9
        (tmp_path / f"fold_{fold}").mkdir()
        pd.DataFrame({"epoch": np.arange(1, 11), "valid_accuracy": accuracy,
                      "valid_loss": loss}).to_csv(tmp_path / f"fold_{fold}" / "history.csv", index=False)
    assert full_fit_epochs(tmp_path, [0, 1, 2], None) == 2
    assert full_fit_epochs(tmp_path, [0, 1, 2], None, metric="logloss") == 7


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("select") / "data")


def _train(data, out, *extra):
    assert main(["train", "--data", str(data), "--out", str(out), *BASE, *extra]) == 0
    return out


def _fold_oof(out, fold):
    oof = pd.read_csv(out / "oof.csv")
    part = oof[oof["fold"] == fold]
    return part["label"].to_numpy(), part[prob_columns(3)].to_numpy(np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["logloss", "macro_f1"])
def test_each_fold_keeps_the_epoch_best_by_the_metric_and_oof_holds_it(data, tmp_path, metric):
    out = _train(data, tmp_path / metric, "--epochs", "4", "--select-metric", metric)
    column = metrics.SELECT_COLUMNS[metric][0]
    for fold in range(2):
        history = pd.read_csv(out / f"fold_{fold}" / "history.csv")
        values = history[column].to_numpy()
        best = int(np.argmin(values) if metric == "logloss" else np.argmax(values))
        assert load_checkpoint(out / f"fold_{fold}" / "best.pt")["epoch"] == best + 1
        labels, probs = _fold_oof(out, fold)
        # oof.csv holds the kept epoch's probabilities: its score there, computed again by sklearn
        if metric == "logloss":
            again = log_loss(labels, probs / probs.sum(1, keepdims=True), labels=[0, 1, 2])
            assert again == pytest.approx(values[best], abs=1e-4)
        else:
            again = f1_score(labels, probs.argmax(1), average="macro", labels=[0, 1, 2],
                             zero_division=0)
            assert again == pytest.approx(values[best], abs=1e-9)
    assert f"best epoch by valid {metric}" in (out / "report.html").read_text()


@pytest.mark.slow
def test_patience_counts_epochs_without_a_better_selection_metric(data, tmp_path):
    out = _train(data, tmp_path / "p", "--epochs", "8", "--lr", "3e-2", "--select-metric", "logloss",
                 "--patience", "1")
    stopped = 0
    for fold in range(2):
        history = pd.read_csv(out / f"fold_{fold}" / "history.csv")
        best = int(np.argmin(history["valid_loss"].to_numpy())) + 1
        # one epoch without a lower loss after the best one, then the fold stops
        assert len(history) == min(8, best + 1)
        stopped += len(history) < 8
    assert stopped  # at lr 3e-2 the tiny model overshoots: the rule was exercised
