"""`mixcls blend` end to end on tiny trained runs: the folder, noise/review/report, predict."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_dataset
from mixcls import blend as b
from mixcls.cli import main
from mixcls.config import load_config
from mixcls.data import prob_columns
from mixcls.predict import predict_fold_probs
from mixcls.run_table import run_row
from mixcls.train import fit_folds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs (2 folds, 1 epoch) on a table whose fold column both re-use."""
    root = tmp_path_factory.mktemp("blend")
    data = write_tiny_dataset(root / "data", n_per_class=8)
    table = pd.read_csv(data / "train.csv")
    table["fold"] = np.arange(len(table)) % 2
    table.to_csv(data / "train.csv", index=False)
    runs = []
    for seed, lr in ((0, 3e-3), (1, 1e-2)):
        cfg = load_config(None, {"data": str(data), "model": "mixcls_cnn_tiny", "img_size": 16,
                                 "epochs": 1, "folds": 2, "batch_size": 8, "workers": 0,
                                 "preset": "none", "device": "cpu", "seed": seed, "lr": lr,
                                 "check_images": "header"})
        fit_folds(cfg, root / f"run{seed}", progress=False, log=lambda message: None)
        runs.append(root / f"run{seed}")
    return data, runs


def test_blend_cli_writes_a_folder_that_noise_review_and_report_read(trained, tmp_path, capsys):
    data, runs = trained
    out = tmp_path / "blend"
    assert main(["blend", *map(str, runs), "--out", str(out), "--method", "weighted",
                 "--calibrate"]) == 0
    printed = capsys.readouterr().out
    assert "nested CV" in printed and "optimistic" in printed and "run0" in printed
    spec = json.loads((out / "blend.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["path"] for m in spec["members"]] == [str(r.resolve()) for r in runs]
    assert set(spec["members"][0]["checkpoints"]) == {"fold_0/best.pt", "fold_1/best.pt"}
    assert len(spec["weights"]) == 2 and sum(spec["weights"]) == pytest.approx(1.0)
    assert set(spec["nested"]["folds"]) == {"0", "1"}
    oof = pd.read_csv(out / "oof.csv")
    assert oof["image_id"].tolist() == pd.read_csv(runs[0] / "oof.csv")["image_id"].tolist()
    assert metrics["cv_accuracy"] == pytest.approx(np.mean(oof["pred"] == oof["label"]))
    assert metrics["in_sample"]["logloss"] <= metrics["cv_logloss"] + 1e-9
    # the blend against its best member, paired on the OOF rows, from the two oof.csv files
    best = max(metrics["members"], key=lambda m: m["cv_accuracy"])
    member = pd.read_csv(Path(best["path"]) / "oof.csv").set_index("image_id").loc[oof["image_id"]]
    d = (oof["pred"] == oof["label"]).to_numpy(float) - (member["pred"] == member["label"]).to_numpy(float)
    line = next(x for x in printed.splitlines() if "best member" in x)
    assert f"({best['name']})" in line and f"{d.mean():+.4f}," in line.split()
    assert f"{d.std(ddof=1) / np.sqrt(len(d)):.4f}" in line.split() and f"{len(d)} OOF rows" in line
    page = (out / "report.html").read_text()
    assert "optimistic" in page and "blend-correlation" in page and "run1" in page
    assert main(["noise", "--run", str(out), "--out", str(tmp_path / "suspects.csv")]) == 0
    assert main(["review", "--run", str(out), "--budget", "5", "--out", str(tmp_path / "review.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "review.csv")) == 5
    assert main(["report", str(out), "--out", str(tmp_path / "run_report.html")]) == 0
    assert "blend-correlation" in (tmp_path / "run_report.html").read_text()  # the blend's own page
    row = run_row(out)  # the runs table lists a blend by its method, with the nested scores
    assert row["model"] == "blend:weighted of 2 runs" and row["loss"] is None
    assert row["cv_accuracy"] == pytest.approx(metrics["cv_accuracy"]) and row["finished"]
    assert main(["blend", *map(str, runs), "--out", str(out), "--method", "mean"]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_mean_blend_of_one_run_is_its_oof(trained, tmp_path):
    _, runs = trained
    assert main(["blend", str(runs[0]), "--out", str(tmp_path / "one"), "--method", "mean"]) == 0
    blended, own = pd.read_csv(tmp_path / "one" / "oof.csv"), pd.read_csv(runs[0] / "oof.csv")
    columns = ["image_id", "label", "fold", "pred", *prob_columns(3)]
    pd.testing.assert_frame_equal(blended[columns], own[columns], check_exact=True)


def test_one_run_with_class_biases_scores_its_oof_rows_by_biases_fitted_without_them(
        trained, tmp_path, capsys):
    _, runs = trained
    out = tmp_path / "biased"
    assert main(["blend", str(runs[0]), "--out", str(out), "--method", "mean",
                 "--class-bias", "macro_f1"]) == 0
    printed = capsys.readouterr().out
    spec = json.loads((out / "blend.json").read_text())
    assert "class biases for macro_f1 (all rows): " + " ".join(f"{v:+.1f}" for v in spec["class_bias"]) in printed
    assert run_row(out)["model"] == "blend:mean of 1 runs, class bias for macro_f1"
    own, blended = pd.read_csv(runs[0] / "oof.csv"), pd.read_csv(out / "oof.csv")
    for fold, rule in spec["nested"]["folds"].items():
        rows = own["fold"] == int(fold)
        logits = np.log(np.clip(own.loc[rows, prob_columns(3)].to_numpy(), 1e-300, 1)) + rule["class_bias"]
        assert (blended.loc[rows, "pred"].to_numpy() == logits.argmax(1)).all()


def test_blend_predict_is_the_per_fold_weighted_average_of_its_members(trained, tmp_path):
    data, runs = trained
    out = tmp_path / "blend"
    b.blend_runs(runs, out, method="weighted", calibrate=True)
    spec = b.read_blend(out)
    ids = ["c0_001.png", "c2_005.png", "c1_007.png", "c0_004.png"]
    paths = [str(data / "train_images" / i) for i in ids]
    members = [predict_fold_probs(r, paths, device="cpu") for r in runs]  # (F, N, K) each
    expected = np.mean([b.apply_temperature(sum(w * p[f] for w, p in zip(spec["weights"], members)),
                                            spec["temperature"]) for f in range(len(members[0]))], axis=0)
    np.testing.assert_allclose(b.predict_blend(out, paths, device="cpu"), expected, atol=1e-6)
    pd.DataFrame({"image_id": ids}).to_csv(tmp_path / "ids.csv", index=False)
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--run", str(out), "--images", str(data / "train_images"), "--ids",
                 str(tmp_path / "ids.csv"), "--out", str(sub), "--with-probs", "--device", "cpu"]) == 0
    frame = pd.read_csv(sub)
    np.testing.assert_allclose(frame[prob_columns(3)].to_numpy(), expected, atol=1e-6)
    assert frame["label"].tolist() == expected.argmax(1).tolist()


def test_a_moved_member_or_a_changed_checkpoint_stops_predict(trained, tmp_path, capsys):
    data, runs = trained
    copies = [shutil.copytree(r, tmp_path / r.name) for r in runs]
    out = tmp_path / "blend"
    assert main(["blend", *map(str, copies), "--out", str(out), "--method", "stack"]) == 0
    predict = ["predict", "--run", str(out), "--images", str(data / "train_images"),
               "--out", str(tmp_path / "sub.csv"), "--device", "cpu"]
    checkpoint = copies[1] / "fold_1" / "best.pt"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert str(checkpoint.resolve()) in err and "changed since the blend" in err
    copies[0].rename(tmp_path / "moved")
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert str(copies[0].resolve()) in err and "does not exist" in err
    assert not (tmp_path / "sub.csv").exists()


def test_blend_cli_refuses_runs_on_other_folds(trained, tmp_path, capsys):
    _, runs = trained
    other = shutil.copytree(runs[1], tmp_path / "other")
    folds = pd.read_csv(other / "folds.csv")
    first = folds["image_id"].iloc[0]
    folds.loc[0, "fold"] = 1 - folds.loc[0, "fold"]
    folds.to_csv(other / "folds.csv", index=False)
    assert main(["blend", str(runs[0]), str(other), "--out", str(tmp_path / "b"), "--method", "mean"]) == 2
    err = capsys.readouterr().err
    assert "different folds" in err and first in err and str(other) in err
    assert not (tmp_path / "b").exists()
