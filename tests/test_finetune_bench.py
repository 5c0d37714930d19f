"""benchmarks/finetune.py's bookkeeping: which row CV picks, the figures of its final line, a
rerun that trains nothing, and bad flags or a changed split refused before any work. Its
`mixcls` commands are replaced by a stand-in that writes a finished run's metrics and a predict
table of chosen accuracy (training EfficientNet-Lite0 here would take many minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import final_figures, load_benchmark, write_clothing_photos

# (CV %, right test images of 8 with 1 view, with 2 views): pretrained_ft has the best CV of the
# pretrained rows, pretrained_ft_mix the best test accuracy.
PLAN = {"scratch": (50.0, 3, None), "pretrained": (70.0, 5, 6), "pretrained_ft": (80.0, 6, 4),
        "pretrained_ft_mix": (75.0, 7, 8)}


def _stand_in(calls: list[list[str]]):
    def run(args: list[str], log: Path, threads: int) -> float:
        calls.append(args)
        flag = {k: v for k, v in zip(args, args[1:])}
        if args[0] == "train":
            out = Path(flag["--out"])
            out.mkdir(parents=True)
            cv = PLAN[out.name][0] / 100
            (out / "metrics.json").write_text(json.dumps({"cv_accuracy": cv,
                                                          "classes": ["coat", "shoe"]}))
            return 2.0
        name, tta = Path(flag["--run"]).name, int(flag["--tta"])
        right = PLAN[name][tta]
        test = pd.read_csv(flag["--ids"])
        truth = (test["label"] == "shoe").to_numpy().astype(int)
        predicted = np.where(np.arange(len(test)) < right, truth, 1 - truth)
        probs = np.eye(2)[predicted]
        pd.DataFrame({"image_id": test["image_id"], "prob_0": probs[:, 0],
                      "prob_1": probs[:, 1]}).to_csv(flag["--out"], index=False)
        return 0.5
    return run


def test_finetune_picks_by_cv_and_reports_its_tta_row(tmp_path, capsys, monkeypatch):
    finetune = load_benchmark("finetune")
    calls: list[list[str]] = []
    monkeypatch.setattr(finetune, "run", _stand_in(calls))
    monkeypatch.setattr(finetune, "weights_file", lambda: "lite0.pth")
    write_clothing_photos(tmp_path / "photos", 40)  # 8 held out (20 %), 32 for CV
    argv = ["--data", str(tmp_path / "photos"), "--work", str(tmp_path / "work")]
    assert finetune.main(argv) == 0
    out = capsys.readouterr().out
    assert "32 in 5 folds" in out and "8 held out" in out and "best by CV: pretrained_ft " in out
    figures = final_figures(out)
    assert figures == {"scratch_test": "37.50", "pretrained_test": "62.50",
                       "best_test": "50.00", "pretrained_gain_points": "25.00"}
    trains = [c for c in calls if c[0] == "train"]
    assert [Path(c[c.index("--out") + 1]).name for c in trains] == list(PLAN)
    first = str(tmp_path / "work" / "scratch")  # every later row on the first row's folds
    assert all(c[c.index("--folds-from") + 1] == first for c in trains[1:])
    assert "--folds-from" not in trains[0] and "--pretrained-file" not in trains[0]
    assert all(c[c.index("--pretrained-file") + 1] == "lite0.pth" for c in trains[1:])
    assert sum(c[0] == "predict" for c in calls) == 7  # scratch without TTA

    calls.clear()
    assert finetune.main(argv) == 0  # finished runs are predicted again, not trained
    again = capsys.readouterr().out
    assert not [c for c in calls if c[0] == "train"]
    assert again.strip().splitlines()[-1] == out.strip().splitlines()[-1]


def test_finetune_refuses_bad_rows_and_another_split_before_work(tmp_path, monkeypatch):
    finetune = load_benchmark("finetune")
    calls: list[list[str]] = []
    monkeypatch.setattr(finetune, "run", _stand_in(calls))
    monkeypatch.setattr(finetune, "weights_file", lambda: "lite0.pth")
    write_clothing_photos(tmp_path / "photos", 40)
    work = tmp_path / "work"
    base = ["--data", str(tmp_path / "photos"), "--work", str(work)]
    with pytest.raises(SystemExit, match=r"--rows: \['bogus'\]"):
        finetune.main([*base, "--rows", "scratch,pretrained,bogus"])
    with pytest.raises(SystemExit, match="scratch and pretrained are needed"):
        finetune.main([*base, "--rows", "pretrained"])
    assert not work.exists() and not calls
    assert finetune.main([*base, "--rows", "scratch,pretrained"]) == 0
    calls.clear()
    with pytest.raises(SystemExit, match="cv.csv holds another split"):
        finetune.main([*base, "--rows", "scratch,pretrained", "--limit", "30"])
    assert not calls
