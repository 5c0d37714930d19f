"""--train-only-col: extra rows trained on in every fold, validated in none (fold -1)."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
from mixcls.cli import main
from mixcls.config import load_config
from mixcls.data import TRAIN_ONLY_FOLD, DataError
from mixcls.run_setup import fold_rows, prepare_table

pytestmark = pytest.mark.slow


def _flagged_table(root, *, every=4, column="extra_2019", n_per_class=12):
    data = write_tiny_dataset(root, n_per_class=n_per_class)
    table = pd.read_csv(data / "train.csv")
    table[column] = (np.arange(len(table)) % every == 0).astype(int)
    table.to_csv(data / "train.csv", index=False)
    return data, table


def _config(data, **extra):
    return load_config(None, {"data": str(data), "train_only_col": "extra_2019", "folds": 3,
                              "seed": 0, "check_images": "header", **extra})


def test_flagged_rows_train_in_every_fold_and_validate_in_none(tmp_path):
    data, raw = _flagged_table(tmp_path / "data")
    table, folds = prepare_table(_config(data))
    flagged = raw["extra_2019"].to_numpy(bool)
    assert (folds[flagged] == TRAIN_ONLY_FOLD).all() and (folds[~flagged] >= 0).all()
    # the other rows are stratified over the 3 folds: each class 6 validated rows, 2 per fold
    for k in range(3):
        counts = np.bincount(table.labels[folds == k], minlength=3)
        assert counts.tolist() == [3, 3, 3]
    for k in range(3):
        train_rows, valid_rows = fold_rows(table, folds, k)
        assert set(np.flatnonzero(flagged)) <= set(train_rows)
        assert not set(np.flatnonzero(flagged)) & set(valid_rows)
        assert set(train_rows) | set(valid_rows) == set(range(len(folds)))


def test_a_run_scores_only_the_other_rows(tmp_path, capsys, one_thread):
    data, raw = _flagged_table(tmp_path / "data", n_per_class=6)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS,
                 "--folds", "2", "--train-only-col", "extra_2019"]) == 0
    log = capsys.readouterr().out
    flagged = set(raw["image_id"][raw["extra_2019"] == 1])
    assert f"{len(flagged)} train-only row(s) (fold -1)" in log
    oof = pd.read_csv(out / "oof.csv")
    assert set(oof["image_id"]) == set(raw["image_id"]) - flagged
    folds = pd.read_csv(out / "folds.csv")
    assert set(folds["image_id"][folds["fold"] == TRAIN_ONLY_FOLD]) == flagged
    assert json.loads((out / "dataset.json").read_text())["train_only_rows"] == len(flagged)

    # mixcls clean keeps them, untouched, with fold -1; the cleaned table trains as the run did
    assert main(["clean", "--run", str(out), "--policy", "drop", "--threshold", "0",
                 "--out", str(tmp_path / "clean.csv")]) == 0
    assert "train-only row(s) (fold -1) kept as they are" in capsys.readouterr().out
    clean = pd.read_csv(tmp_path / "clean.csv")
    extra = clean[clean["fold"] == TRAIN_ONLY_FOLD].set_index("image_id")
    assert set(extra.index) == flagged and (extra["keep"] == 1).all()
    given = raw.set_index("image_id").loc[sorted(flagged), "label"]
    assert (extra.loc[sorted(flagged), "label"] == given).all()
    again = tmp_path / "again"
    assert main(["train", "--csv", str(tmp_path / "clean.csv"), "--images",
                 str(data / "train_images"), "--out", str(again), *TINY_TRAIN_FLAGS,
                 "--folds", "2"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(again / "folds.csv").sort_values("image_id")
                                  .reset_index(drop=True),
                                  folds.sort_values("image_id").reset_index(drop=True))

    # a run without the extra rows shares the folds of the others, and the two blend
    plain = tmp_path / "plain"
    raw[raw["extra_2019"] == 0].drop(columns="extra_2019").to_csv(tmp_path / "plain.csv", index=False)
    assert main(["train", "--csv", str(tmp_path / "plain.csv"), "--images",
                 str(data / "train_images"), "--out", str(plain), *TINY_TRAIN_FLAGS,
                 "--folds-from", str(out)]) == 0
    assert set(pd.read_csv(plain / "oof.csv")["image_id"]) == set(oof["image_id"])
    fingerprints = [json.loads((r / "metrics.json").read_text())["folds_fingerprint"] for r in (out, plain)]
    assert fingerprints[0] == fingerprints[1]
    assert main(["blend", str(out), str(plain), "--out", str(tmp_path / "blend"),
                 "--method", "mean"]) == 0


@pytest.mark.parametrize("change, message", [
    (lambda t: t.assign(extra_2019=t["extra_2019"].astype(str).replace("1", "maybe")),
     r"column extra_2019 must hold 0 or 1 \(9\):\n  row 2: 'maybe'"),
    (lambda t: t.assign(extra_2019=1), r"every row of .*train\.csv is train-only"),
    (lambda t: t.assign(fold=np.where(t["extra_2019"] == 1, 0, np.arange(len(t)) % 3)),
     r"train-only in one of the column and the fold column"),
    (lambda t: t.assign(extra_2019=(t["label"] == 0) & (np.arange(len(t)) % 12 < 11)),
     r"fewer validated images \(train-only rows are in no fold\) than the 3 folds.*\n  '0': 1 image"),
])
def test_bad_flags_are_refused_before_training(tmp_path, change, message):
    data, raw = _flagged_table(tmp_path / "data")
    change(raw).to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match=message):
        prepare_table(_config(data))


def test_a_group_across_train_only_and_validated_rows_is_refused(tmp_path):
    data, raw = _flagged_table(tmp_path / "data")
    raw["plant"] = [f"p{i // 2}" for i in range(len(raw))]  # rows 0 (flagged) and 1 share a plant
    raw.to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match=r"group 'p0': folds -1, \d"):
        prepare_table(_config(data, group_col="plant"))


def test_a_class_folder_tree_has_no_column_to_flag(tmp_path):
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="train_only_col 'extra_2019'.*class-per-folder tree"):
        prepare_table(load_config(None, {"data": str(root), "train_only_col": "extra_2019"}))


def test_a_copy_on_both_sides_is_warned_about(tmp_path):
    import shutil

    from mixcls.train import _warn_split_copies

    data, raw = _flagged_table(tmp_path / "data")
    flagged, validated = raw["image_id"][raw["extra_2019"] == 1], raw["image_id"][raw["extra_2019"] == 0]
    shutil.copyfile(data / "train_images" / flagged.iloc[0], data / "train_images" / validated.iloc[0])
    table, folds = prepare_table(_config(data))
    said = []
    _warn_split_copies(table, folds, said.append)
    assert len(said) == 1 and repr(flagged.iloc[0]) in said[0] and repr(validated.iloc[0]) in said[0]
    # two train-only copies train together and validate nowhere: nothing to warn about
    from PIL import Image

    noise = np.random.default_rng(5).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "train_images" / validated.iloc[0])  # unique again
    shutil.copyfile(data / "train_images" / flagged.iloc[1], data / "train_images" / flagged.iloc[0])
    table, folds = prepare_table(_config(data))
    said.clear()
    _warn_split_copies(table, folds, said.append)
    assert said == []


def test_train_only_rows_leave_the_folds_fingerprint_alone():
    from mixcls.folds import folds_fingerprint

    ids, folds = ["a", "b", "c", "d"], [0, 1, 0, 1]
    assert folds_fingerprint(ids + ["x", "y"], folds + [TRAIN_ONLY_FOLD] * 2) == folds_fingerprint(ids, folds)
    assert folds_fingerprint(ids + ["x"], folds + [0]) != folds_fingerprint(ids, folds)


def test_the_report_counts_the_train_only_rows(tmp_path, one_thread):
    data, raw = _flagged_table(tmp_path / "data", n_per_class=6)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS,
                 "--folds", "2", "--train-only-col", "extra_2019"]) == 0
    page = (out / "report.html").read_text()
    section = page[page.index('id="cv-summary"'):]
    n = int(raw["extra_2019"].sum())
    assert f"<td>train-only rows</td><td class=num>{n}</td>" in section
    assert "train-only rows flagged by" in page
