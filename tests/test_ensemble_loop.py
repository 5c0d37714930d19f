"""The ensembles loop around training: --folds-from, the folds fingerprint, --full-fit and
predict --models."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

import mixcls.train as train_module
from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
from mixcls.cli import main
from mixcls.folds import make_folds
from mixcls.predict import predict_fold_probs, predict_run

pytestmark = pytest.mark.slow

TINY = TINY_TRAIN_FLAGS


def _fingerprint(frame: pd.DataFrame) -> str:
    """Independent of mixcls: sha256 of the image_id,fold lines, first 12 hex characters."""
    text = "".join(f"{i},{int(f)}\n" for i, f in zip(frame["image_id"], frame["fold"]))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Run A (3 folds, seed 0, with --full-fit for 2 epochs) and run B --folds-from A (seed 5)."""
    root = tmp_path_factory.mktemp("ensemble")
    data = write_tiny_dataset(root / "data", n_per_class=6)
    a, b = root / "a", root / "b"
    assert main(["train", "--data", str(data), "--out", str(a), "--folds", "3", "--seed", "0",
                 "--full-fit", "--full-fit-epochs", "2", *TINY]) == 0
    assert main(["train", "--data", str(data), "--out", str(b), "--folds-from", str(a),
                 "--seed", "5", *TINY]) == 0
    return data, a, b


def test_folds_from_reuses_the_folds_and_both_record_the_same_fingerprint(shared):
    data, a, b = shared
    folds_a, folds_b = pd.read_csv(a / "folds.csv"), pd.read_csv(b / "folds.csv")
    pd.testing.assert_frame_equal(folds_a, folds_b)
    # seed 5 alone would have made other folds: the folds really came from A
    labels = pd.read_csv(data / "train.csv")["label"].to_numpy()
    assert not np.array_equal(make_folds(labels, 3, 5), folds_a["fold"].to_numpy())
    metrics_a = json.loads((a / "metrics.json").read_text())
    metrics_b = json.loads((b / "metrics.json").read_text())
    assert metrics_a["folds_fingerprint"] == metrics_b["folds_fingerprint"] == _fingerprint(folds_a)
    assert metrics_b["folds_trained"] == [0, 1, 2]


def test_folds_from_a_run_with_other_ids_is_refused_naming_them(shared, tmp_path, capsys):
    data, a, _ = shared
    table = pd.read_csv(data / "train.csv")
    table.iloc[3:].to_csv(tmp_path / "fewer.csv", index=False)
    code = main(["train", "--csv", str(tmp_path / "fewer.csv"), "--images", str(data / "train_images"),
                 "--out", str(tmp_path / "c"), "--folds-from", str(a), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "not in the training table" in err
    assert table["image_id"].iloc[0] in err  # the first missing id is named
    assert not (tmp_path / "c").exists()


def test_an_explicit_folds_that_differs_from_folds_from_is_refused(shared, tmp_path, capsys):
    data, a, _ = shared
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "c"), "--folds-from", str(a),
                 "--folds", "2", *TINY])
    assert code == 2 and "holds 3 folds" in capsys.readouterr().err


def test_full_fit_trains_one_model_on_every_row_for_the_asked_epochs(shared, tmp_path, monkeypatch):
    data, a, _ = shared
    history = pd.read_csv(a / "full" / "history.csv")
    assert len(history) == 2 and history["valid_accuracy"].isna().all()
    assert (a / "full" / "best.pt").is_file()
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["full_fit"]["epochs"] == 2 and metrics["full_fit"]["rows"] == 18
    # the data the full model is given: every row, no validation row
    seen = []
    real = train_module.fit_fold

    def spy(cfg, fold_data, **kwargs):
        seen.append((kwargs["fold"], len(fold_data.train_paths), len(fold_data.valid_paths),
                     cfg.train.epochs))
        return real(cfg, fold_data, **kwargs)

    monkeypatch.setattr(train_module, "fit_fold", spy)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "f"), "--folds", "3",
                 "--full-fit", *TINY]) == 0
    assert seen[:3] == [(k, 12, 6, 1) for k in range(3)]
    assert seen[3] == (3, 18, 0, 1)  # median best epoch of 1-epoch folds is 1


def test_full_fit_epochs_is_the_median_best_epoch_of_the_folds(tmp_path):
    best = {0: 3, 1: 5, 2: 4, 3: 8}
    for fold, epoch in best.items():
        accuracy = np.full(10, 0.5)
        accuracy[epoch - 1] = 0.9
        accuracy[epoch:] = 0.9  # later ties do not count: the first best epoch is kept
        (tmp_path / f"fold_{fold}").mkdir()
        pd.DataFrame({"epoch": np.arange(1, 11), "valid_accuracy": accuracy}).to_csv(
            tmp_path / f"fold_{fold}" / "history.csv", index=False)
    expected = int(np.ceil(np.median(list(best.values()))))
    assert train_module.full_fit_epochs(tmp_path, list(best), None) == expected == 5
    assert train_module.full_fit_epochs(tmp_path, [0, 2], None) == 4
    assert train_module.full_fit_epochs(tmp_path, list(best), 7) == 7


def test_predict_models_all_weighs_each_model_once(shared, tmp_path, capsys):
    data, a, b = shared
    paths = sorted(str(p) for p in (data / "train_images").iterdir())[:7]
    options = dict(device="cpu", tta=1)
    folds = predict_fold_probs(a, paths, **options)
    full = predict_fold_probs(a, paths, models="full", **options)
    assert folds.shape[0] == 3 and full.shape[0] == 1
    np.testing.assert_allclose(predict_run(a, paths, models="all", **options),
                               np.concatenate([folds, full]).mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(predict_run(a, paths, models="full", **options), full[0], atol=1e-7)
    assert main(["predict", "--run", str(a), "--images", str(data / "train_images"), "--models",
                 "all", "--with-probs", "--out", str(tmp_path / "all.csv")]) == 0
    code = main(["predict", "--run", str(b), "--images", str(data / "train_images"), "--models",
                 "full", "--out", str(tmp_path / "none.csv")])
    assert code == 2 and "--full-fit" in capsys.readouterr().err
    assert not (tmp_path / "none.csv").exists()
