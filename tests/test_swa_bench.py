"""benchmarks/swa.py: its balanced tables, its shared folds and its final line."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import final_figures, load_benchmark, printed_rows


@pytest.mark.slow
def test_the_final_line_is_the_tables(tiny_export, tmp_path, capsys, one_thread):
    bench = load_benchmark("swa")
    data = tiny_export
    work = tmp_path / "work"
    assert bench.main(["--data", str(data), "--work", str(work), "--epochs", "5",
                       "--n-train", "45", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("45 training images") and "30 test images held out" in lines[0]
    figures = {k: float(v) for k, v in final_figures(lines).items()}
    rows = {name: [float(v) for v in values]
            for name, values in printed_rows(lines, ["run", "cv_acc"]).items()}
    assert sorted(rows) == ["plain", "swa1", "swa3", "swa5", "swa5_lr"]
    for name, (cv_acc, cv_logloss, test_acc, test_logloss, _, gap) in rows.items():
        assert figures[f"{name}_test_acc"] == test_acc
        assert gap == pytest.approx(cv_acc - test_acc, abs=0.011)
    best = max(rows[n][2] for n in ("swa1", "swa3", "swa5", "swa5_lr"))
    assert figures["best_swa_gain_points"] == pytest.approx(best - rows["plain"][2], abs=0.011)
    assert figures["swa3_test_logloss"] == rows["swa3"][3]
    assert figures["max_cv_test_gap_points"] == max(abs(r[5]) for r in rows.values())
    folds = [pd.read_csv(work / name / "folds.csv") for name in rows]
    assert all(f.equals(folds[0]) for f in folds)  # one set of folds
    assert pd.read_csv(work / "train.csv")["label"].value_counts().tolist() == [15, 15, 15]
    assert len(pd.read_csv(work / "test.csv")) == 30  # every test image
    for name, n in (("swa1", 1), ("swa3", 3), ("swa5", 5), ("swa5_lr", 5)):
        assert json.loads((work / name / "fold_0" / "swa.json").read_text())["epochs_averaged"] == n
    assert not (work / "plain" / "fold_0" / "swa.json").exists()
    lr = pd.read_csv(work / "swa5_lr" / "fold_0" / "history.csv")["lr"]
    assert (lr == bench.SWA_LR).all()  # 5 epochs, all of them the constant tail
