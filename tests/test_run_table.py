"""The runs table (`mixcls runs`): rows equal the runs' own files, sorting, CSV, bad folders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import f1_score, log_loss

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.config import load_config
from mixcls.run_table import COLUMNS, find_runs, format_runs_table, run_row, runs_table
from mixcls.train import fit_folds

TINY = {"model": "mixcls_cnn_tiny", "img_size": 16, "epochs": 1, "folds": 2, "batch_size": 8,
        "workers": 0, "device": "cpu", "check_images": "header", "preset": "none"}


def train_run(data: Path, out: Path, **overrides) -> Path:
    cfg = load_config(None, {"data": str(data), **TINY, **overrides})
    fit_folds(cfg, out, progress=False, log=lambda message: None)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real runs (other seeds, so other folds; one with cutmix, folds grouped by a plant
    column, lamb, log-loss selection, class weights and SWA) in runs/ and runs/group/."""
    root = tmp_path_factory.mktemp("run_table")
    data = write_tiny_dataset(root / "data", n_per_class=8, num_classes=3, size=16, seed=1)
    runs = root / "runs"
    first = train_run(data, runs / "base", seed=1)
    second = train_run(data, runs / "group" / "cutmix", seed=2, mix="cutmix", loss="label_smoothing",
                       smoothing=0.1, csv=str(_with_plants(data, root / "plants.csv")),
                       images=str(data / "train_images"), group_col="plant",
                       select_metric="logloss", class_weights="1,2,1", optimizer="lamb",
                       swa_epochs=1)
    return runs, first, second


def _with_plants(data: Path, out: Path) -> Path:
    table = pd.read_csv(data / "train.csv")
    table["plant"] = [f"p{i % 6}" for i in range(len(table))]
    table.to_csv(out, index=False)
    return out


def fingerprint_of_csv(path: Path) -> str:
    """The fingerprint rule written out: sha256 of `image_id,fold` lines, first 12 hex chars."""
    folds = pd.read_csv(path, dtype={"image_id": str})
    text = "".join(f"{i},{int(f)}\n" for i, f in zip(folds["image_id"], folds["fold"]))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def numpy_logloss(oof: pd.DataFrame, num_classes: int) -> float:
    probs = oof[[f"prob_{k}" for k in range(num_classes)]].to_numpy(dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    picked = np.clip(probs[np.arange(len(oof)), oof["label"].to_numpy()], np.finfo(np.float64).eps, 1)
    return float(-np.log(picked).mean())


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("*.pt", "report.html"))
    return dest


def test_rows_of_real_runs_equal_their_files(trained):
    runs, first, second = trained
    assert find_runs([runs]) == sorted([first, second])  # fold_K folders are not runs
    table = runs_table([runs], sort="name")
    assert list(table.columns) == COLUMNS
    assert table["name"].tolist() == ["base", "group/cutmix"]
    for run, (_, row) in zip([first, second], table.iterrows()):
        metrics = json.loads((run / "metrics.json").read_text())
        oof = pd.read_csv(run / "oof.csv")
        assert row["finished"] and row["status"].startswith("finished")
        assert row["cv_accuracy"] == pytest.approx(metrics["cv_accuracy"])
        assert row["cv_accuracy"] == pytest.approx((oof["label"] == oof["pred"]).mean())
        assert row["cv_macro_f1"] == pytest.approx(f1_score(oof["label"], oof["pred"], average="macro"))
        if "cv_logloss" in metrics:
            assert row["cv_logloss"] == pytest.approx(metrics["cv_logloss"])
        assert row["cv_logloss"] == pytest.approx(numpy_logloss(oof, 3), rel=1e-6)
        assert row["seconds"] == pytest.approx(metrics["seconds"])
        assert row["folds_fingerprint"] == fingerprint_of_csv(run / "folds.csv")
        assert (row["model"], row["img_size"], row["epochs"]) == ("mixcls_cnn_tiny", 16, 1)
        optim = yaml.safe_load((run / "config.yaml").read_text())
        assert (row["optimizer"], row["lr"]) == (optim["optimizer"], optim["lr"])
    assert table.loc[1, ["mix", "loss"]].tolist() == ["cutmix", "label_smoothing"]
    assert table.loc[0, ["mix", "loss"]].tolist() == ["none", "ce"]
    chosen = ["optimizer", "select_metric", "class_weights", "swa_epochs"]
    assert table.loc[0, chosen].tolist() == ["adamw", "accuracy", "none", 0]
    assert table.loc[1, chosen].tolist() == ["lamb", "logloss", "1,2,1", 1]
    assert pd.isna(table.loc[0, "group_col"]) and table.loc[1, "group_col"] == "plant"
    # Other seeds, other folds: the table says the two runs' scores do not compare row for row.
    assert table.loc[0, "folds_fingerprint"] != table.loc[1, "folds_fingerprint"]


def test_logloss_and_fingerprint_from_files_when_metrics_lack_them(trained, tmp_path):
    _, first, _ = trained
    run = copy_run(first, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("cv_logloss", None)
    metrics.pop("folds_fingerprint", None)
    (run / "metrics.json").write_text(json.dumps(metrics))
    oof = pd.read_csv(run / "oof.csv")
    probs = oof[[f"prob_{k}" for k in range(3)]].to_numpy()
    row = run_row(run)
    assert row["cv_logloss"] == pytest.approx(log_loss(oof["label"], probs / probs.sum(1, keepdims=True)))
    assert row["folds_fingerprint"] == fingerprint_of_csv(run / "folds.csv")
    # Recorded values win over recomputation (metrics.json is what training measured).
    (run / "metrics.json").write_text(json.dumps(metrics | {"cv_logloss": 0.123, "folds_fingerprint": "abc"}))
    row = run_row(run)
    assert (row["cv_logloss"], row["folds_fingerprint"]) == (0.123, "abc")
    # One changed fold in folds.csv changes the computed fingerprint.
    (run / "metrics.json").write_text(json.dumps(metrics))
    folds = pd.read_csv(run / "folds.csv", dtype={"image_id": str})
    folds.loc[3, "fold"] = 1 - folds.loc[3, "fold"]
    folds.to_csv(run / "folds.csv", index=False)
    changed = run_row(run)["folds_fingerprint"]
    assert changed == fingerprint_of_csv(run / "folds.csv") and changed != row["folds_fingerprint"]


def make_bad_runs(trained, root: Path) -> Path:
    """runs/ with the two real runs, one still training, one missing a fold, two broken."""
    runs, first, second = trained
    copy_run(first, root / "base")
    copy_run(second, root / "group" / "cutmix")
    training = copy_run(first, root / "training")
    for name in ("metrics.json", "oof.csv", "fold_1/oof.csv"):
        (training / name).unlink()
    gap = copy_run(first, root / "gap")
    oof = pd.read_csv(gap / "oof.csv")
    oof[oof["fold"] == 0].to_csv(gap / "oof.csv", index=False)
    broken = copy_run(first, root / "broken_config")
    (broken / "config.yaml").write_text("epochs: [not, a, number\n")
    keyless = copy_run(first, root / "broken_metrics")
    metrics = json.loads((keyless / "metrics.json").read_text())
    (keyless / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "cv_accuracy"}))
    empty = copy_run(first, root / "broken_oof")
    (empty / "oof.csv").write_text("image_id,label\nx.png,0\n")
    (root / "notes").mkdir()
    (root / "notes" / "config.yaml").write_text("model: x\n")  # no folds.csv: not a run folder
    return root


def test_unfinished_and_broken_runs_are_rows_not_crashes(trained, tmp_path):
    root = make_bad_runs(trained, tmp_path / "runs")
    table = runs_table([root], sort="accuracy").set_index("name")
    assert sorted(table.index) == ["base", "broken_config", "broken_metrics", "broken_oof", "gap",
                                   "group/cutmix", "training"]
    assert table.loc["broken_metrics", "status"] == "broken: metrics.json has no 'cv_accuracy'"
    assert table.loc["training", "status"] == "unfinished: 1 of 2 folds done"
    assert table.loc["gap", "status"] == "unfinished: oof.csv has no rows of fold(s) 1"
    for name in ("training", "gap"):
        assert not table.loc[name, "finished"] and table.loc[name, "model"] == "mixcls_cnn_tiny"
        assert table.loc[name, ["cv_accuracy", "cv_macro_f1", "cv_logloss"]].isna().all()
    assert table.loc["training", "folds_fingerprint"] == fingerprint_of_csv(root / "training" / "folds.csv")
    assert table.loc["broken_config", "status"].startswith("broken: ")
    assert "config.yaml" in table.loc["broken_config", "status"]
    assert table.loc["broken_oof", "status"].startswith("broken: ") and "oof.csv" in table.loc["broken_oof", "status"]
    assert table.loc[["base", "group/cutmix"], "finished"].all()


@pytest.mark.parametrize("sort", ["logloss", "accuracy", "f1", "name", "seconds"])
def test_sort_orders_best_first_and_missing_last(trained, tmp_path, sort):
    root = make_bad_runs(trained, tmp_path / "runs")
    # Hand-set scores make every order distinct (two tiny runs may tie on accuracy).
    rng = np.random.default_rng()
    for name in ("base", "group/cutmix"):
        path = root / name / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics.update(cv_accuracy=rng.random(), cv_macro_f1=rng.random(), cv_logloss=rng.random() * 2,
                       seconds=rng.random() * 100)
        path.write_text(json.dumps(metrics))
    table = runs_table([root], sort=sort)
    column, best_first_is_low = {"logloss": ("cv_logloss", True), "accuracy": ("cv_accuracy", False),
                                 "f1": ("cv_macro_f1", False), "name": ("name", True),
                                 "seconds": ("seconds", True)}[sort]
    values = table[column].tolist()
    known = [v for v in values if not pd.isna(v)]
    assert known == sorted(known, reverse=not best_first_is_low)
    assert all(pd.isna(v) for v in values[len(known):])  # rows without the value come last
    if sort != "name":  # the finished runs have scores; "gap" has metrics.json's seconds too
        assert len(known) == (3 if sort == "seconds" else 2)
        assert table["name"].tolist()[len(known):] == sorted(table["name"].tolist()[len(known):])
    with pytest.raises(ValueError, match="unknown sort"):
        runs_table([root], sort="speed")


def test_cli_prints_aligned_table_and_writes_csv(trained, tmp_path, capsys):
    runs, _, _ = trained
    out = tmp_path / "table.csv"
    assert main(["runs", str(runs), "--sort", "accuracy", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    table = runs_table([runs], sort="accuracy")
    header, rule, *rows = printed[:2 + len(table)]
    assert header.split() == COLUMNS and set(rule) <= {"-", " "}
    # Aligned: every value of a column ends (numbers) or starts (text) where its header does.
    end = header.index("cv_accuracy") + len("cv_accuracy")
    start = header.index("folds_fingerprint")
    for line, (_, row) in zip(rows, table.iterrows()):
        assert line.startswith(row["name"])
        assert line[:end].endswith(f"{row['cv_accuracy']:.4f}")
        assert line[start:].startswith(row["folds_fingerprint"])
    assert printed[-1] == f"wrote {out} (2 runs)"
    back = pd.read_csv(out, dtype={"folds_fingerprint": str})
    # an empty cell reads back as NaN, whatever the column held (None in a text column)
    pd.testing.assert_frame_equal(back, table.fillna(np.nan), check_dtype=False)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_cli_errors_and_empty_folder(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 0
    assert "no run folders" in capsys.readouterr().out


def test_format_marks_missing_values():
    row = dict.fromkeys(COLUMNS) | {"name": "x", "finished": False, "status": "broken: why"}
    text = format_runs_table(pd.DataFrame([row], columns=COLUMNS))
    last = text.splitlines()[-1]
    assert last.split()[:4] == ["x", "-", "-", "-"] and last.split()[-3:] == ["no", "broken:", "why"]


def test_paired_difference_se_is_the_paired_t_tests():
    """The paired SE equals diff / t of scipy's paired t-test, and the McNemar-count formula."""
    from scipy.stats import ttest_rel

    from mixcls.run_table import paired_accuracy_difference

    rng = np.random.default_rng(4)
    for n, p_a, p_b in [(50, 0.7, 0.8), (1000, 0.9, 0.88), (333, 0.5, 0.5)]:
        a = rng.random(n) < p_a
        b = np.where(rng.random(n) < 0.7, a, rng.random(n) < p_b)  # the runs agree on most rows
        diff, se = paired_accuracy_difference(b, a)
        assert diff == pytest.approx(b.mean() - a.mean())
        assert se == pytest.approx(diff / ttest_rel(b.astype(float), a.astype(float)).statistic)
        only_b, only_a = np.sum(b & ~a), np.sum(a & ~b)  # the discordant rows decide it
        variance = ((only_a + only_b) / n - diff ** 2) * n / (n - 1)
        assert se == pytest.approx(np.sqrt(variance / n))
    assert np.isnan(paired_accuracy_difference(np.array([True]), np.array([False]))[1])


def test_against_compares_runs_on_the_same_folds_row_for_row(trained, tmp_path, capsys):
    runs, first, second = trained
    table_dir = tmp_path / "runs"
    base = copy_run(first, table_dir / "base")
    copy_run(second, table_dir / "other_folds")
    other = copy_run(first, table_dir / "changed")  # the same folds, other predictions
    oof = pd.read_csv(other / "oof.csv", dtype={"image_id": str})
    rng = np.random.default_rng(0)
    flip = rng.random(len(oof)) < 0.5
    pred = np.where(flip, (oof["label"] + rng.integers(0, 3, len(oof))) % 3, oof["pred"])
    probs = np.eye(3)[pred] * 0.9 + 0.1 / 3
    oof[[f"prob_{k}" for k in range(3)]] = probs
    oof["pred"] = pred
    oof.drop(index=oof.index[:3]).to_csv(other / "oof.csv", index=False)  # 3 rows fewer
    table = runs_table([table_dir], sort="name", against=base).set_index("name")
    assert list(table.columns[-3:]) == ["acc_diff", "diff_se", "shared_rows"]

    reference = pd.read_csv(base / "oof.csv", dtype={"image_id": str}).set_index("image_id")
    mine = oof.drop(index=oof.index[:3]).set_index("image_id")
    right_b = (mine["pred"] == mine["label"]).to_numpy()
    right_a = (reference.loc[mine.index, "pred"] == reference.loc[mine.index, "label"]).to_numpy()
    d = right_b.astype(float) - right_a
    assert table.loc["changed", "shared_rows"] == len(reference) - 3
    assert table.loc["changed", "acc_diff"] == pytest.approx(d.mean())
    assert table.loc["changed", "diff_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert table.loc["base", "acc_diff"] == 0 and table.loc["base", "diff_se"] == 0
    assert table.loc[["other_folds"], ["acc_diff", "diff_se", "shared_rows"]].isna().all(axis=None)

    assert main(["runs", str(table_dir), "--against", str(base), "--sort", "name"]) == 0
    header, _, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[-4:] == ["acc_diff", "diff_se", "shared_rows", "status"]
    changed = next(line for line in lines if line.startswith("changed"))
    assert f"{table.loc['changed', 'acc_diff']:+.4f}" in changed.split()
    assert main(["runs", str(table_dir), "--against", str(tmp_path / "nowhere")]) == 2
    assert "--against" in capsys.readouterr().err
