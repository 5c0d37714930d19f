"""`--log tensorboard`: the event files hold what history.csv holds, plus lr per step and the
confusion matrix of the best epoch; without the package, a clear refusal before any output."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.tblog import EPOCH_TAGS

pytestmark = pytest.mark.slow
BASE = ["--model", "mixcls_cnn_tiny", "--img-size", "16", "--batch-size", "4", "--workers", "0",
        "--no-progress", "--folds", "2", "--train-folds", "0", "--epochs", "2", "--accum-steps", "2"]


def test_tensorboard_events_match_the_history(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    data = write_tiny_dataset(tmp_path / "data", size=16)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *BASE, "--log", "tensorboard"]) == 0
    board = event_accumulator.EventAccumulator(str(out / "tensorboard" / "fold_0"),
                                               size_guidance={event_accumulator.SCALARS: 0,
                                                              event_accumulator.IMAGES: 0})
    board.Reload()
    history = pd.read_csv(out / "fold_0" / "history.csv")
    for tag, column in EPOCH_TAGS.items():
        events = board.Scalars(tag)
        assert [e.step for e in events] == history["epoch"].tolist(), tag
        np.testing.assert_allclose([e.value for e in events], history[column], rtol=1e-5, err_msg=tag)
    lr = board.Scalars("train/lr")
    # 18 training rows, batches of 4 (drop_last): 4 micro-batches, 2 optimizer steps per epoch
    assert [e.step for e in lr] == [1, 2, 3, 4]
    np.testing.assert_allclose([lr[1].value, lr[3].value], history["lr"], rtol=1e-5)  # epoch ends
    assert board.Tags()["images"] == ["valid/confusion_matrix"]
    image = board.Images("valid/confusion_matrix")[-1]
    best_epoch = int(history.loc[history["valid_accuracy"].idxmax(), "epoch"])
    assert image.step == best_epoch and image.width > 50 and image.height > 50


def test_without_the_package_the_run_is_refused_before_the_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    data = write_tiny_dataset(tmp_path / "data", size=16)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *BASE, "--log", "tensorboard"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not out.exists()
