"""benchmarks/imbalance.py: its long tail, its shared folds and its final line."""

from __future__ import annotations

import json


import numpy as np
import pandas as pd
import pytest

from conftest import final_figures, load_benchmark, printed_rows


def test_class_sizes_fall_geometrically_from_n_max_to_the_ratio():
    bench = load_benchmark("imbalance")
    sizes = bench.class_sizes(10, 2000, 0.1)
    assert sorted(sizes.tolist()) == sorted(round(2000 * 0.1 ** (r / 9)) for r in range(10))
    assert sizes.max() == 2000 and sizes.min() == 200
    assert not np.array_equal(sizes, np.sort(sizes)[::-1])  # the order is shuffled


def test_long_tail_keeps_the_sizes_and_refuses_a_short_class():
    bench = load_benchmark("imbalance")
    table = pd.DataFrame({"image_id": [f"{i}.png" for i in range(60)], "label": np.arange(60) % 3})
    kept = bench.long_tail(table, np.array([20, 5, 1]))
    assert kept["label"].value_counts().sort_index().tolist() == [20, 5, 1]
    assert kept["image_id"].is_unique
    with pytest.raises(SystemExit, match="class 1 has 20 images, 21 are needed"):
        bench.long_tail(table, np.array([1, 21, 1]))


@pytest.mark.slow
def test_the_final_line_is_the_tables(tiny_export, tmp_path, capsys, one_thread):
    bench = load_benchmark("imbalance")
    data = tiny_export
    assert bench.main(["--data", str(data), "--work", str(tmp_path / "work"), "--epochs", "1",
                       "--n-max", "20", "--ratio", "0.5", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = {k: float(v) for k, v in final_figures(lines).items()}
    rows = {name: [float(v) for v in values]
            for name, values in printed_rows(lines, ["run", "cv_acc"]).items()}
    assert sorted(rows) == ["balanced", "balanced_bias", "f1_select", "plain", "plain_bias"]
    for name in rows:
        cv_acc, cv_f1, test_acc, test_f1, rare_recall, _, gap = rows[name]
        assert figures[f"{name}_test_f1"] == test_f1
        assert gap == pytest.approx(cv_f1 - test_f1, abs=0.011)
    assert figures["f1_gain_points"] == pytest.approx(
        rows["balanced"][3] - rows["plain"][3], abs=0.011)
    assert figures["rare_recall_balanced"] == rows["balanced"][4]
    assert figures["bias_gain_points"] == pytest.approx(
        rows["plain_bias"][3] - rows["plain"][3], abs=0.011)
    assert figures["rare_recall_plain_bias"] == rows["plain_bias"][4]
    assert figures["balanced_bias_test_f1"] == rows["balanced_bias"][3]
    assert figures["max_cv_test_f1_gap_points"] == max(abs(r[6]) for r in rows.values())
    work = tmp_path / "work"
    folds = [pd.read_csv(work / name / "folds.csv") for name in rows]
    spec = json.loads((work / "plain_bias" / "blend.json").read_text())
    assert spec["class_bias_metric"] == "macro_f1" and spec["members"][0]["name"] == "plain"
    assert all(f.equals(folds[0]) for f in folds)  # one set of folds
    assert "class weights" in (work / "balanced" / "report.html").read_text()
    train = pd.read_csv(work / "train.csv")
    assert sorted(train["label"].value_counts().tolist()) == [10, 14, 20]  # 20 x 0.5^(r/2)
