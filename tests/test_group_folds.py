"""Grouped folds: `--group-col` keeps each group's rows in one fold, and given folds that split a
group are refused before any training."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
from mixcls.cli import main
from mixcls.data import DataError
from mixcls.folds import empty_folds, find_split_groups, make_folds
from mixcls.noise import write_clean_table


def _reference_split_groups(groups, folds):
    """Slow loop: each group's set of folds, in first-appearance order, kept when > 1."""
    seen: dict[str, set[int]] = {}
    for g, f in zip(groups, folds):
        seen.setdefault(str(g), set()).add(int(f))
    return {g: sorted(fs) for g, fs in seen.items() if len(fs) > 1}


@pytest.mark.parametrize("n_folds", [2, 3, 5])
def test_grouped_folds_keep_every_group_whole_cover_every_row_and_stay_near_the_class_mix(n_folds):
    rng = np.random.default_rng()
    n = int(rng.integers(300, 600))
    groups = rng.integers(0, n // 4, n).astype(str)
    labels = rng.integers(0, 3, n)
    folds = make_folds(labels, n_folds, seed=int(rng.integers(1e6)), groups=groups)
    assert folds.shape == (n,) and set(folds.tolist()) == set(range(n_folds))
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1, g
    # Whole groups of about 4 rows: each fold's class shares stay within a few points of the whole.
    overall = np.bincount(labels, minlength=3) / n
    for f in range(n_folds):
        share = np.bincount(labels[folds == f], minlength=3) / (folds == f).sum()
        assert np.abs(share - overall).max() < 0.12, (f, share, overall)
    # Ungrouped folds of the same rows split groups (so the grouped check above can fail).
    assert _reference_split_groups(groups, make_folds(labels, n_folds, seed=0))


def test_grouped_folds_are_fixed_by_the_seed():
    rng = np.random.default_rng(3)
    groups, labels = rng.integers(0, 60, 400).astype(str), rng.integers(0, 4, 400)
    same = make_folds(labels, 5, 7, groups=groups)
    assert np.array_equal(same, make_folds(labels, 5, 7, groups=groups))
    assert not np.array_equal(same, make_folds(labels, 5, 8, groups=groups))


def test_find_split_groups_matches_a_slow_loop_on_random_folds():
    rng = np.random.default_rng()
    for _ in range(20):
        n = int(rng.integers(1, 200))
        groups = rng.integers(0, int(rng.integers(1, 40)), n).astype(str)
        folds = rng.integers(0, int(rng.integers(1, 5)), n)
        assert find_split_groups(groups, folds) == _reference_split_groups(groups, folds)
    assert find_split_groups(["a", "a", "b"], [1, 1, 0]) == {}


def test_empty_folds_lists_the_folds_no_row_has():
    assert empty_folds(np.array([0, 2, 2, 4]), 5) == [1, 3]
    assert empty_folds(np.array([1, 0]), 2) == []


# ---------------------------------------------------------------- through `mixcls train`

def _grouped_table(root, groups):
    data = write_tiny_dataset(root / "data", n_per_class=8, size=16)
    table = pd.read_csv(data / "train.csv")
    table["plant"] = groups(len(table))
    table.to_csv(data / "train.csv", index=False)
    return data, table


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS,
                 "--folds", "3", *extra])


def test_a_grouped_run_validates_each_group_on_one_fold_and_records_the_groups(tmp_path, capsys,
                                                                               one_thread):
    # 24 rows in 8 plants of 3 photos, each plant's photos of mixed classes.
    data, table = _grouped_table(tmp_path, lambda n: [f"p{i % 8}" for i in range(n)])
    out = tmp_path / "run"
    assert _train(data, out, "--group-col", "plant") == 0
    assert "folds grouped by 'plant': 8 groups, each in one fold" in capsys.readouterr().out
    folds = pd.read_csv(out / "folds.csv")
    merged = table.merge(folds, on="image_id")
    assert len(merged) == len(table)
    assert merged.groupby("plant")["fold"].nunique().max() == 1
    oof = pd.read_csv(out / "oof.csv")
    assert oof.merge(merged, on="image_id").eval("fold_x == fold_y").all()
    assert json.loads((out / "dataset.json").read_text())["groups"] == 8
    assert "group_col: plant" in (out / "config.yaml").read_text()
    # folds.csv keeps each row's group (ids as text: "007" stays "007"), for `mixcls clean`.
    assert folds["group"].astype(str).tolist() == table["plant"].tolist()


def test_clean_keeps_a_grouped_runs_groups_and_the_cleaned_table_trains_grouped(tmp_path, capsys,
                                                                                one_thread):
    data, table = _grouped_table(tmp_path, lambda n: [f"0{i % 8}" for i in range(n)])
    run = tmp_path / "run"
    assert _train(data, run, "--group-col", "plant") == 0
    clean = tmp_path / "clean" / "train_clean.csv"
    assert main(["clean", "--run", str(run), "--policy", "drop", "--max-fraction", "0.2",
                 "--out", str(clean)]) == 0
    cleaned = pd.read_csv(clean, dtype={"plant": str, "image_id": str})
    expected = table.set_index("image_id")["plant"]
    assert cleaned["plant"].tolist() == expected.loc[cleaned["image_id"]].tolist()
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["train", "--csv", str(clean), "--images", str(data / "train_images"),
                 "--out", str(again), *TINY_TRAIN_FLAGS, "--folds", "3", "--group-col", "plant"]) == 0
    assert "8 groups, each in one fold" in capsys.readouterr().out
    assert pd.read_csv(again / "folds.csv")["fold"].tolist() == \
        cleaned.set_index("image_id").loc[pd.read_csv(again / "folds.csv")["image_id"], "fold"].tolist()


def test_clean_refuses_a_group_column_named_like_a_column_of_the_cleaned_table(tmp_path, one_thread):
    data, table = _grouped_table(tmp_path, lambda n: [f"p{i % 8}" for i in range(n)])
    # The cleaned table names its id column image_id, whatever --id-col the run read.
    table = table.rename(columns={"image_id": "name", "plant": "image_id"})
    table.to_csv(data / "train.csv", index=False)
    run = tmp_path / "run"
    assert _train(data, run, "--id-col", "name", "--group-col", "image_id") == 0
    clean = tmp_path / "clean" / "train_clean.csv"
    with pytest.raises(DataError, match="grouped by a column named 'image_id', a column the cleaned"):
        write_clean_table(run, clean, policy="drop")
    assert not clean.exists()


@pytest.mark.parametrize("case, expected", [
    ("missing", r"missing column\(s\) shelf"),
    ("empty", r"rows with an empty plant \(1\):\n  row 5"),
    ("few", r"has 2 group\(s\), fewer than the 3 folds; use --folds 2"),
    ("unequal", r"leave fold\(s\) \[2\] empty \(22 of the 24 rows are in group 'big'\)"),
    ("split", r"puts a group's rows in more than one fold.*\n  group 'p0': folds 0, 1"),
])
def test_bad_groups_are_refused_before_training_naming_the_column_rows_or_groups(
        tmp_path, capsys, monkeypatch, no_training, case, expected):
    def groups(n):
        if case == "few":
            return [f"p{i % 2}" for i in range(n)]
        if case == "unequal":
            return ["big"] * (n - 2) + ["a", "b"]
        return [f"p{i % 8}" if not (case == "empty" and i == 3) else "" for i in range(n)]
    data, table = _grouped_table(tmp_path, groups)
    if case == "unequal":  # scikit-learn fills every fold here; the guard is for splitters that don't
        import mixcls.run_setup

        monkeypatch.setattr(mixcls.run_setup, "make_folds",
                            lambda labels, n_folds, seed, groups: (groups != "big").astype(int))
    if case == "split":  # hand-made folds that put plant p0's rows (0, 8, 16) in two folds
        table["fold"] = [0 if i == 0 else (i % 3) if i % 8 else 1 for i in range(len(table))]
        table.to_csv(data / "train.csv", index=False)
    column = "shelf" if case == "missing" else "plant"
    out = tmp_path / "run"
    assert _train(data, out, "--group-col", column) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcls: error:") and re.search(expected, err), err
    assert not out.exists()


def test_a_class_per_folder_tree_has_no_group_column(tmp_path, capsys, no_training):
    from PIL import Image

    for k in range(2):
        (tmp_path / "tree" / f"c{k}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (k * 200, 0, 0)).save(tmp_path / "tree" / f"c{k}" / f"{i}.png")
    assert _train(tmp_path / "tree", tmp_path / "run", "--group-col", "plant") == 2
    assert "is a class-per-folder tree, which has no columns" in capsys.readouterr().err


# ---------------------------------------------------------------- byte-identical copies

def test_identical_files_groups_equal_bytes_and_only_those(tmp_path):
    from mixcls.duplicates import identical_files

    contents = [b"a" * 10, b"b" * 10, b"a" * 10, b"c" * 5, b"b" * 10, b"a" * 10, b"d" * 10]
    paths = []
    for i, content in enumerate(contents):
        (tmp_path / f"{i}.bin").write_bytes(content)
        paths.append(tmp_path / f"{i}.bin")
    assert identical_files(paths) == [[0, 2, 5], [1, 4]]  # "d"*10 has a size twin, not a copy
    assert identical_files(paths[:2]) == []


def _with_copy(root):
    """The tiny data set plus copy.png, a byte-identical copy of c0_000.png under its label."""
    data = write_tiny_dataset(root / "data", n_per_class=8, size=16)
    (data / "train_images" / "copy.png").write_bytes((data / "train_images" / "c0_000.png").read_bytes())
    table = pd.read_csv(data / "train.csv")
    table = pd.concat([table, pd.DataFrame({"image_id": ["copy.png"], "label": [0]})],
                      ignore_index=True)
    return data, table


@pytest.mark.parametrize("case", ["split", "same_fold", "grouped"])
def test_training_warns_when_byte_identical_images_lie_in_two_folds(tmp_path, capsys, one_thread,
                                                                     case):
    data, table = _with_copy(tmp_path)
    extra = []
    if case == "same_fold":  # given folds that keep the copy with its original
        table["fold"] = [i % 3 for i in range(len(table))]
        table.loc[table["image_id"] == "copy.png", "fold"] = int(
            table.loc[table["image_id"] == "c0_000.png", "fold"].iloc[0])
    if case == "split":
        table["fold"] = [i % 3 for i in range(len(table))]
        table.loc[table["image_id"] == "copy.png", "fold"] = (int(
            table.loc[table["image_id"] == "c0_000.png", "fold"].iloc[0]) + 1) % 3
    if case == "grouped":
        table["plant"] = np.where(table["image_id"].isin(["copy.png", "c0_000.png"]), "twin",
                                  table["image_id"])
        extra = ["--group-col", "plant"]
    table.to_csv(data / "train.csv", index=False)
    assert _train(data, tmp_path / "run", *extra) == 0
    said = capsys.readouterr().out
    warned = ("warning: 1 set(s) of byte-identical training images lie in more than one fold "
              "(e.g. 'c0_000.png' and 'copy.png')") in said
    assert warned == (case == "split"), said
