"""benchmarks/extra_data.py: its halves, its degraded extra rows and its final line."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import add_test_split, final_figures, load_benchmark, printed_rows, write_tiny_dataset


def test_noisy_labels_move_the_share_asked_to_other_classes():
    bench = load_benchmark("extra_data")
    labels = np.random.default_rng(1).integers(0, 10, 1000)
    noisy = bench.noisy_labels(labels, 0.2, 10)
    assert (noisy != labels).sum() == 200 and noisy.min() >= 0 and noisy.max() <= 9
    assert np.array_equal(bench.noisy_labels(labels, 0.0, 10), labels)


def test_blurred_keeps_the_size_and_loses_detail(tmp_path):
    bench = load_benchmark("extra_data")
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    bench.blurred(tmp_path / "a.png", tmp_path / "b" / "a.png")
    out = np.asarray(Image.open(tmp_path / "b" / "a.png"), dtype=float)
    assert out.shape == (28, 28)
    # neighbouring pixels agree far more after halving and enlarging than in the noise
    assert np.abs(np.diff(out, axis=1)).mean() < 0.6 * np.abs(np.diff(pixels.astype(float), axis=1)).mean()


@pytest.mark.slow
def test_the_final_line_is_the_tables(tmp_path, capsys, one_thread):
    bench = load_benchmark("extra_data")
    data = add_test_split(write_tiny_dataset(tmp_path / "data", n_per_class=20, size=28),
                          n_per_class=4, size=28)
    assert bench.main(["--data", str(data), "--work", str(tmp_path / "work"), "--epochs", "1",
                       "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = {k: float(v) for k, v in final_figures(lines).items()}
    rows = printed_rows(lines, ["run", "oof_rows"])
    assert rows["alone"][0] == rows["train_only"][0] == "30" and rows["validated"][0] == "60"
    for name in ("alone", "validated", "train_only"):
        oof_rows, cv, competition_cv, test_acc, _, gap = map(float, rows[name])
        assert figures[f"{name}_cv"] == cv and figures[f"{name}_test"] == test_acc
        if name != "alone":
            assert figures[f"{name}_gap_points"] == pytest.approx(cv - test_acc, abs=0.011)
    assert figures["extra_gain_points"] == pytest.approx(
        figures["train_only_test"] - figures["alone_test"], abs=0.011)
    # alone and train_only validate the same rows on the same folds
    alone = pd.read_csv(tmp_path / "work" / "alone" / "folds.csv").set_index("image_id")["fold"]
    both = pd.read_csv(tmp_path / "work" / "train_only" / "folds.csv").set_index("image_id")["fold"]
    assert (both[both >= 0].sort_index() == alone.sort_index()).all()
    assert (both[both < 0].index.str.startswith("extra/")).all() and (both < 0).sum() == 30
