"""benchmarks/sam.py: its noisy table, its shared folds and its final line."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import final_figures, load_benchmark, printed_rows
from mixcls.config import load_config


@pytest.mark.slow
def test_the_noise_is_as_asked_and_the_final_line_is_the_tables(tiny_export, tmp_path, capsys,
                                                                  one_thread):
    bench = load_benchmark("sam")
    data = tiny_export
    work = tmp_path / "work"
    assert bench.main(["--data", str(data), "--work", str(work), "--epochs", "1",
                       "--n-train", "45", "--noise", "0.2", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("45 training images") and "changes 9 labels (20.0 %)" in lines[0]
    clean, noisy = (pd.read_csv(work / f, dtype={"image_id": str}) for f in ("train.csv", "train_noisy.csv"))
    assert clean["image_id"].tolist() == noisy["image_id"].tolist()
    assert int((clean["label"] != noisy["label"]).sum()) == 9  # every changed label is wrong
    figures = final_figures(lines)
    rows = printed_rows(lines, ["run", "labels"])
    assert list(rows) == list(bench.RUNS)
    for name, (labels, cv_acc, cv_logloss, test_acc, test_logloss, minutes) in rows.items():
        assert labels == name.split("_")[0]
        assert figures[f"{name}_test_acc"] == test_acc
    acc = {name: float(row[3]) for name, row in rows.items()}
    assert float(figures["clean_gain_points"]) == pytest.approx(acc["clean_sam"] - acc["clean_plain"], abs=0.011)
    best = max(acc["noisy_sam"], acc["noisy_asam"])
    assert float(figures["noisy_gain_points"]) == pytest.approx(best - acc["noisy_plain"], abs=0.011)
    assert float(figures["sam_time_ratio"]) > 0
    folds = [pd.read_csv(work / name / "folds.csv") for name in rows]
    assert all(f.equals(folds[0]) for f in folds)  # one set of folds
    for name, (table, extra) in bench.RUNS.items():
        cfg = load_config(work / name / "config.yaml")
        assert cfg.optim.sam == (extra[1] if extra else "none") and cfg.data.csv.endswith(table)

    # --runs: some of them (found trained, so not run again), and only the figures they make
    assert bench.main(["--data", str(data), "--work", str(work), "--epochs", "1", "--n-train", "45",
                       "--runs", "noisy_plain,noisy_sam", "--threads", "1"]) == 0
    again = final_figures(capsys.readouterr().out.strip().splitlines())
    assert sorted(again) == ["noisy_gain_points", "noisy_plain_test_acc", "noisy_sam_test_acc",
                             "sam_time_ratio"]
    assert float(again["noisy_gain_points"]) == pytest.approx(acc["noisy_sam"] - acc["noisy_plain"], abs=0.011)
    with pytest.raises(SystemExit):
        bench.main(["--data", str(data), "--work", str(work), "--runs", "noisy_plain,noisy_plain"])
