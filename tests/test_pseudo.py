"""Pseudo-label tables (mixcls pseudo) and training with them (mixcls train --pseudo)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import mixcls.train as train_module
from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
from mixcls import blend, pseudo
from mixcls.cli import main
from mixcls.data import DataError
from mixcls.runs import load_checkpoint

TINY = TINY_TRAIN_FLAGS


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Every test of this module runs on one intra-op thread (conftest.one_thread)."""


# ---------------------------------------------------------------- selection, against a slow loop

def _reference_passed(probs, threshold, max_per_class):
    """One row at a time: above the threshold, then per (fold, class) the most confident."""
    n_folds, n_images, _ = probs.shape
    passed = np.zeros((n_folds, n_images), dtype=bool)
    for f in range(n_folds):
        candidates = [(-probs[f, i].max(), i) for i in range(n_images) if probs[f, i].max() > threshold]
        taken = {}
        for _, i in sorted(candidates):  # most confident first, ties: the earlier image
            k = int(probs[f, i].argmax())
            if max_per_class is None or taken.get(k, 0) < max_per_class:
                taken[k] = taken.get(k, 0) + 1
                passed[f, i] = True
    return passed


@pytest.mark.parametrize("threshold, max_per_class", [(0.5, None), (0.4, 3), (0.0, 1), (0.9, 2)])
def test_select_passed_matches_a_slow_reference(threshold, max_per_class):
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(4, 0.4), size=(3, 50))
    probs[1, 5] = probs[1, 6]  # a tie in confidence
    got = pseudo.select_passed(probs, threshold=threshold, max_per_class=max_per_class)
    np.testing.assert_array_equal(got, _reference_passed(probs, threshold, max_per_class))


def test_threshold_one_passes_nothing_even_for_a_certain_row():
    probs = np.zeros((2, 3, 3))
    probs[..., 0] = 1.0  # exactly 1.0, as float32 softmax gives for a confident model
    assert not pseudo.select_passed(probs, threshold=1.0).any()


def test_pseudo_table_is_long_one_row_per_image_and_fold():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=(2, 4))
    passed = probs.max(axis=2) > 0.5
    frame = pseudo.make_pseudo_table(["a", "b", "c", "d"], [0, 1], probs, passed)
    assert len(frame) == 8
    for f in range(2):
        rows = frame[frame["fold"] == f]
        assert rows["image_id"].tolist() == ["a", "b", "c", "d"]
        np.testing.assert_allclose(rows[["prob_0", "prob_1", "prob_2"]].to_numpy(), probs[f])
        np.testing.assert_array_equal(rows["label"], probs[f].argmax(1))
        np.testing.assert_array_equal(rows["passed"], passed[f].astype(int))


# ---------------------------------------------------------------- a blend teacher: nested rules

def test_blend_teacher_combines_each_fold_with_the_rule_fitted_without_that_fold(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    members = []
    for m in range(2):
        run = tmp_path / f"m{m}"
        for g in range(3):
            (run / f"fold_{g}").mkdir(parents=True)
            (run / f"fold_{g}" / "best.pt").write_bytes(b"x")
        members.append(run)
    member_probs = {str(run): rng.dirichlet(np.ones(3), size=(3, 5)) for run in members}
    nested = {str(g): {"weights": list(rng.dirichlet(np.ones(2))), "stacker": None,
                       "temperature": None} for g in range(3)}
    spec = {"method": "weighted", "members": [{"path": str(r), "checkpoints": {}} for r in members],
            "weights": [0.5, 0.5], "stacker": None, "temperature": None,
            "nested": {"folds": nested}}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / blend.BLEND_FILE).write_text(json.dumps(spec))
    monkeypatch.setattr(blend, "verify_members", lambda spec, folder: None)
    monkeypatch.setattr("mixcls.predict.predict_fold_probs", lambda run, paths, **kw: member_probs[str(run)])
    fold_ids, probs = pseudo.predict_teacher_folds(tmp_path / "b", ["p"] * 5)
    assert fold_ids == [0, 1, 2]
    for g in range(3):
        w = nested[str(g)]["weights"]
        expected = w[0] * member_probs[str(members[0])][g] + w[1] * member_probs[str(members[1])][g]
        np.testing.assert_allclose(probs[g], expected)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A teacher (3 folds), an unlabelled pool, and a plain student on the teacher's folds."""
    root = tmp_path_factory.mktemp("pseudo")
    data = write_tiny_dataset(root / "data", n_per_class=6)
    pool = write_tiny_dataset(root / "pool", n_per_class=4, seed=11) / "train_images"
    for path in pool.iterdir():  # names unlike the training images', so ids tell them apart
        path.rename(path.with_name("u_" + path.name))
    teacher = root / "teacher"
    assert main(["train", "--data", str(data), "--out", str(teacher), "--folds", "3", *TINY]) == 0
    plain = root / "plain"
    assert main(["train", "--data", str(data), "--out", str(plain), "--folds-from", str(teacher),
                 *TINY]) == 0
    return root, data, pool, teacher, plain


def _write_pseudo(world, name, *extra):
    root, _, pool, teacher, _ = world
    out = root / name
    assert main(["pseudo", "--run", str(teacher), "--images", str(pool), "--out", str(out),
                 "--device", "cpu", *extra]) == 0
    return out


def test_pseudo_table_labels_come_from_each_teacher_fold_model(world):
    from mixcls.predict import predict_fold_probs, resolve_images
    root, _, pool, teacher, _ = world
    table = pd.read_csv(_write_pseudo(world, "p_all.csv", "--threshold", "0"))
    ids, paths = resolve_images(pool, None)
    expected = predict_fold_probs(teacher, paths, device="cpu")  # (3, N, K), fold order
    for g in range(3):
        rows = table[table["fold"] == g].set_index("image_id").loc[ids]
        np.testing.assert_allclose(rows[["prob_0", "prob_1", "prob_2"]].to_numpy(), expected[g],
                                   rtol=1e-6)
        assert rows["passed"].all()
    meta = json.loads((root / "p_all.csv.json").read_text())
    teacher_metrics = json.loads((teacher / "metrics.json").read_text())
    assert meta["folds_fingerprint"] == teacher_metrics["folds_fingerprint"]


def test_threshold_one_is_bit_identical_to_a_run_without_pseudo(world):
    root, data, _, teacher, plain = world
    table = _write_pseudo(world, "p_none.csv", "--threshold", "1.0")
    assert (pd.read_csv(table)["passed"] == 0).all()
    out = root / "with_none"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds-from", str(teacher),
                 "--pseudo", str(table), *TINY]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "oof.csv"), pd.read_csv(plain / "oof.csv"))
    for g in range(3):
        a = load_checkpoint(out / f"fold_{g}" / "best.pt")["model"]
        b = load_checkpoint(plain / f"fold_{g}" / "best.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in b)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {g: v["rows"] for g, v in metrics["pseudo"]["folds"].items()} == {"0": 0, "1": 0, "2": 0}


def test_each_fold_trains_on_its_own_passing_rows_never_validates_on_them(world, monkeypatch):
    root, data, pool, teacher, _ = world
    table_path = _write_pseudo(world, "p_soft.csv", "--threshold", "0.3", "--soft")
    table = pd.read_csv(table_path)
    seen = {}
    real_fit_fold = train_module.fit_fold

    def spy(cfg, data, *, fold, **kwargs):
        seen[fold] = data
        return real_fit_fold(cfg, data, fold=fold, **kwargs)

    monkeypatch.setattr(train_module, "fit_fold", spy)
    out = root / "soft_student"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds-from", str(teacher),
                 "--pseudo", str(table_path), *TINY]) == 0
    pool_paths = {str(p.resolve()) for p in pool.iterdir()}
    for g, fold_data in seen.items():
        mine = table[(table["fold"] == g) & (table["passed"] == 1)]
        added = [p for p in fold_data.train_paths if p in pool_paths]
        assert added == [str((pool / i).resolve()) for i in mine["image_id"]]
        assert not set(fold_data.valid_paths) & pool_paths
        n = len(added)
        soft = fold_data.train_targets[-n:] if n else np.zeros((0, 3))
        np.testing.assert_allclose(soft, mine[["prob_0", "prob_1", "prob_2"]].to_numpy(), rtol=1e-6)
        labelled = fold_data.train_targets[: len(fold_data.train_targets) - n]
        assert set(np.unique(labelled)) <= {0.0, 1.0}  # the given labels, one-hot
    oof = pd.read_csv(out / "oof.csv")
    assert not set(oof["image_id"]) & {p.name for p in pool.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    for g in range(3):
        mine = table[(table["fold"] == g) & (table["passed"] == 1)]
        assert metrics["pseudo"]["folds"][str(g)]["rows"] == len(mine)
        assert sum(metrics["pseudo"]["folds"][str(g)]["classes"].values()) == len(mine)
    assert "Pseudo-labels" in (out / "report.html").read_text()


def test_max_per_class_keeps_the_most_confident_per_fold(world):
    table = pd.read_csv(_write_pseudo(world, "p_max.csv", "--threshold", "0", "--max-per-class", "2"))
    for (fold, label), group in table.groupby(["fold", "label"]):
        kept = group[group["passed"] == 1]
        assert len(kept) == min(2, len(group))
        dropped = group.loc[group["passed"] == 0, "confidence"].to_numpy()
        assert kept["confidence"].min() >= np.max(dropped, initial=0)


def test_a_student_on_other_folds_is_refused_naming_both_fingerprints(world, capsys):
    root, data, _, teacher, _ = world
    table = _write_pseudo(world, "p_folds.csv", "--threshold", "0.5")
    out = root / "other_folds"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds", "3", "--seed", "9",
                 "--pseudo", str(table), *TINY]) == 2
    err = capsys.readouterr().err
    teacher_print = json.loads((teacher / "metrics.json").read_text())["folds_fingerprint"]
    assert teacher_print in err and "--folds-from" in err
    assert not out.exists()


def test_pseudo_images_that_are_training_rows_are_refused(world, tmp_path, capsys):
    root, data, _, teacher, _ = world
    out = tmp_path / "p_train.csv"
    assert main(["pseudo", "--run", str(teacher), "--images", str(data / "train_images"),
                 "--out", str(out), "--threshold", "0", "--device", "cpu"]) == 0
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "s"), "--folds-from",
                 str(teacher), "--pseudo", str(out), *TINY]) == 2
    assert "rows of the training table" in capsys.readouterr().err


def test_a_broken_pseudo_table_is_refused_naming_the_file_and_row(world, tmp_path):
    source = _write_pseudo(world, "p_src.csv", "--threshold", "0", "--soft")
    bad = tmp_path / "bad.csv"
    frame = pd.read_csv(source)
    frame.loc[3, "prob_0"] = 0.9  # no longer sums to 1
    frame.to_csv(bad, index=False)
    shutil.copy(pseudo.meta_path(source), pseudo.meta_path(bad))
    with pytest.raises(DataError, match=r"bad\.csv row 5"):
        pseudo.read_pseudo(bad, classes=["0", "1", "2"])
    with pytest.raises(DataError, match="classes"):
        pseudo.read_pseudo(source, classes=["a", "b", "c"])
    with pytest.raises(DataError, match="does not exist"):
        pseudo.read_pseudo(tmp_path / "missing.csv", classes=["0", "1", "2"])


def test_pseudo_weight_weighs_the_pseudo_rows_only_and_is_recorded(world, monkeypatch):
    root, data, pool, teacher, _ = world
    table_path = _write_pseudo(world, "p_weight.csv", "--threshold", "0.3")
    seen, batches = {}, []
    real_fit_fold, real_train_one_epoch = train_module.fit_fold, train_module.train_one_epoch

    def spy(cfg, data, *, fold, **kwargs):
        seen[fold] = data
        return real_fit_fold(cfg, data, fold=fold, **kwargs)

    def epoch_spy(model, loader, *args, **kwargs):
        batches.append(next(iter(loader)))
        return real_train_one_epoch(model, loader, *args, **kwargs)

    monkeypatch.setattr(train_module, "fit_fold", spy)
    monkeypatch.setattr(train_module, "train_one_epoch", epoch_spy)
    out = root / "weighted_student"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds-from", str(teacher),
                 "--pseudo", str(table_path), "--pseudo-weight", "0.25", *TINY]) == 0
    table = pd.read_csv(table_path)
    pool_paths = {str(p.resolve()) for p in pool.iterdir()}
    for g, fold_data in seen.items():
        n = int(((table["fold"] == g) & (table["passed"] == 1)).sum())
        assert n > 0
        is_pseudo = np.array([p in pool_paths for p in fold_data.train_paths])
        assert is_pseudo.sum() == n
        np.testing.assert_array_equal(fold_data.train_weights, np.where(is_pseudo, 0.25, 1.0))
    assert all(len(batch) == 3 and set(batch[2].tolist()) <= {0.25, 1.0} for batch in batches)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pseudo"]["weight"] == 0.25
    assert "weighed 0.25 in the loss" in (out / "report.html").read_text()


def test_pseudo_weight_one_adds_no_weights_and_a_bad_weight_is_refused(world, capsys):
    from mixcls.run_setup import FoldData, add_train_rows

    data = FoldData(["a", "b"], ["x", "y"], np.array([0, 1]), [], np.zeros(0, int))
    assert add_train_rows(data, ["z"], np.array([1])).train_weights is None  # the plain mean, bit for bit
    np.testing.assert_array_equal(add_train_rows(data, ["z"], np.array([1]), weight=3.0).train_weights,
                                  [1.0, 1.0, 3.0])
    root, data_dir, _, teacher, _ = world
    for bad in ("0", "-1", "nan"):
        assert main(["train", "--data", str(data_dir), "--out", str(root / "w"), "--pseudo-weight", bad,
                     *TINY]) == 2
        assert "pseudo_weight" in capsys.readouterr().err


def test_teacher_round_counts_the_pseudo_rounds_behind_a_run_or_blend(tmp_path):
    def run(name, metrics):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
        return tmp_path / name
    plain = run("plain", {"cv_accuracy": 0.5})
    old_student = run("old_student", {"pseudo": {"teacher": "x", "folds": {}}})  # before "round"
    second = run("second", {"pseudo": {"teacher": "x", "folds": {}, "round": 2}})
    assert pseudo.teacher_round(plain) == 0
    assert pseudo.teacher_round(old_student) == 1
    assert pseudo.teacher_round(second) == 2
    (tmp_path / "blend").mkdir()
    (tmp_path / "blend" / "blend.json").write_text(json.dumps(
        {"method": "mean", "weights": None, "stacker": None, "temperature": None,
         "members": [{"path": str(plain)}, {"path": str(second)}, {"path": str(old_student)}]}))
    assert pseudo.teacher_round(tmp_path / "blend") == 2
