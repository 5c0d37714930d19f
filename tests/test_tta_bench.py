"""benchmarks/tta.py: its test columns are the fold ensemble's (and one fold model's) accuracy
under each setting, its gains are the table's differences, and mixcls predict agrees."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from conftest import load_benchmark, write_tiny_dataset
from mixcls.cli import main as mixcls_main
from mixcls.predict import predict_fold_probs

pytestmark = pytest.mark.slow


@pytest.fixture
def bench_run(tmp_path, one_thread):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=8)
    test = write_tiny_dataset(tmp_path / "test", n_per_class=5, seed=7)
    out = tmp_path / "run"
    assert mixcls_main(["train", "--data", str(data), "--out", str(out), "--model",
                        "mixcls_cnn_tiny", "--img-size", "16", "--batch-size", "8", "--workers",
                        "0", "--no-progress", "--folds", "3", "--epochs", "2", "--preset",
                        "light", "--device", "cpu", "--check-images", "header"]) == 0
    return out, test


def test_the_table_scores_each_setting_on_the_test_images(bench_run, tmp_path):
    bench = load_benchmark("tta")
    run_dir, test = bench_run
    args = argparse.Namespace(img_sizes="12,20", tta_views="orig,hflip", work=tmp_path / "work",
                              threads=1, batch_size=16)
    args.work.mkdir()
    table, summary, diff = bench.score_run(run_dir, test / "train.csv", test / "train_images", args)
    labels = pd.read_csv(test / "train.csv")["label"].to_numpy()
    paths = [str(test / "train_images" / i) for i in pd.read_csv(test / "train.csv")["image_id"]]
    assert list(table["setting"]) == ["16px x1", "16px x2", "12px x1", "12px x2", "20px x1", "20px x2"]
    for row in table.itertuples():
        folds = predict_fold_probs(run_dir, paths, device="cpu", views=row.views.split(","),
                                   img_size=int(row.setting.split("px")[0]))
        assert row.test == pytest.approx(100 * np.mean(folds.mean(0).argmax(1) == labels), abs=0.006)
        single = np.mean([np.mean(f.argmax(1) == labels) for f in folds])
        assert row.test_single == pytest.approx(100 * single, abs=0.006)
    chosen = table[table["chosen"]].iloc[0]
    assert summary["chosen"] == chosen.setting.replace(" ", "")
    assert summary["test_gain_points"] == pytest.approx(chosen.test - table.iloc[0].test, abs=0.011)
    assert summary["cv_gain_points"] == pytest.approx(chosen.cv_accuracy - table.iloc[0].cv_accuracy,
                                                      abs=0.011)
    assert summary["optimism_points"] == pytest.approx(summary["in_sample_cv"] - summary["nested_cv"],
                                                       abs=0.011)
    assert diff < 1e-5  # mixcls predict on the applied run gives the chosen setting


@pytest.mark.parametrize("argv", [["--work", "w"], ["--work", "w", "--run", "r"],
                                  ["--work", "w", "--data", "d", "--run", "r"]])
def test_bad_flag_sets_are_refused(argv):
    bench = load_benchmark("tta")
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(argv)
    assert stop.value.code == 2


def test_labels_are_names_or_indices(tmp_path):
    bench = load_benchmark("tta")
    run = tmp_path / "run"
    run.mkdir()
    (run / "classes.json").write_text('["cat", "dog"]')
    pd.DataFrame({"image_id": ["a", "b"], "label": ["dog", "cat"]}).to_csv(tmp_path / "n.csv", index=False)
    pd.DataFrame({"image_id": ["a", "b"], "label": [1, 0]}).to_csv(tmp_path / "i.csv", index=False)
    pd.DataFrame({"image_id": ["a", "b"], "label": [1, 2]}).to_csv(tmp_path / "bad.csv", index=False)
    assert bench.test_labels(tmp_path / "n.csv", run).tolist() == [1, 0]
    assert bench.test_labels(tmp_path / "i.csv", run).tolist() == [1, 0]
    with pytest.raises(SystemExit, match="neither"):
        bench.test_labels(tmp_path / "bad.csv", run)
