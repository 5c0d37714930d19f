"""Distillation from a teacher's per-fold models (train --distill) and --lr auto."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import mixcls.lr_find as lr_find_module
import mixcls.predict as predict_module
import mixcls.train as train_module
from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
from mixcls import teachers
from mixcls.blend import hash_checkpoints
from mixcls.cli import main
from mixcls.runs import load_checkpoint

TINY = TINY_TRAIN_FLAGS


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Every test of this module runs on one intra-op thread (conftest.one_thread)."""


# ---------------------------------------------------------------- the formulas

def test_soften_is_the_tempered_softmax_of_the_log_probs():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=20)
    for t in (0.5, 1.0, 3.0):
        powered = probs ** (1.0 / t)  # softmax(log p / T) = p^(1/T) / sum p^(1/T)
        np.testing.assert_allclose(teachers.soften(probs, t), powered / powered.sum(1, keepdims=True),
                                   rtol=1e-10)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_distill_targets_mix_the_given_labels_and_the_teacher(weight):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=30)
    teacher = rng.dirichlet(np.ones(4), size=30)
    got = teachers.distill_targets(labels, teacher, weight=weight, num_classes=4)
    expected = (1 - weight) * np.eye(4)[labels] + weight * teacher
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert got.dtype == np.float32
    soft = rng.dirichlet(np.ones(4), size=30)  # a soft-label table's targets
    np.testing.assert_allclose(teachers.distill_targets(soft, teacher, weight=weight, num_classes=4),
                               (1 - weight) * soft + weight * teacher, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A teacher (3 folds) and a plain student on its folds."""
    root = tmp_path_factory.mktemp("distill")
    data = write_tiny_dataset(root / "data", n_per_class=6)
    teacher, plain = root / "teacher", root / "plain"
    assert main(["train", "--data", str(data), "--out", str(teacher), "--folds", "3", *TINY]) == 0
    assert main(["train", "--data", str(data), "--out", str(plain), "--folds-from", str(teacher),
                 *TINY]) == 0
    return root, data, teacher, plain


def test_weight_zero_is_bit_identical_to_plain_training(world):
    root, data, teacher, plain = world
    out = root / "w0"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds-from", str(teacher),
                 "--distill", str(teacher), "--distill-weight", "0", *TINY]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "oof.csv"), pd.read_csv(plain / "oof.csv"))
    for g in range(3):
        a = load_checkpoint(out / f"fold_{g}" / "best.pt")["model"]
        b = load_checkpoint(plain / f"fold_{g}" / "best.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert (out / "teacher" / "fold_0.npy").is_file()  # the teacher was really consulted


def test_fold_g_targets_come_from_the_teacher_fold_g_model_only(world, monkeypatch):
    root, data, teacher, _ = world
    events, seen = [], {}
    real_load, real_fit_fold = predict_module.load_model, train_module.fit_fold

    def spy_load(path, device):
        events.append(("load", str(path)))
        return real_load(path, device)

    def spy_fit(cfg, fold_data, *, fold, **kwargs):
        events.append(("fit", fold))
        seen[fold] = fold_data
        return real_fit_fold(cfg, fold_data, fold=fold, **kwargs)

    monkeypatch.setattr(predict_module, "load_model", spy_load)
    monkeypatch.setattr(train_module, "fit_fold", spy_fit)
    out = root / "w05"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds-from", str(teacher),
                 "--distill", str(teacher), "--distill-weight", "0.5", "--distill-temperature", "2",
                 *TINY]) == 0
    assert events == [e for g in range(3)
                      for e in (("load", str(teacher / f"fold_{g}" / "best.pt")), ("fit", g))]
    monkeypatch.undo()
    folds = pd.read_csv(teacher / "folds.csv")
    labels = pd.read_csv(data / "train.csv")["label"].to_numpy()
    for g in range(3):
        rows = np.flatnonzero(folds["fold"].to_numpy() != g)
        paths = seen[g].train_paths
        assert paths == [str((data / "train_images" / i).resolve()) for i in folds["image_id"][rows]]
        alone = predict_module.predict_fold_outputs(
            [real_load(teacher / f"fold_{g}" / "best.pt", torch.device("cpu"))], paths,
            device=torch.device("cpu"), views=("orig",)).probs[0]
        powered = alone.astype(np.float64) ** 0.5
        expected = 0.5 * np.eye(3)[labels[rows]] + 0.5 * powered / powered.sum(1, keepdims=True)
        np.testing.assert_allclose(seen[g].train_targets, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(seen[g].valid_labels, labels[folds["fold"].to_numpy() == g])
    cached = json.loads((out / "teacher" / "fold_1.json").read_text())
    assert cached["sha256"] == hash_checkpoints(teacher)["fold_1/best.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distill"]["weight"] == 0.5 and metrics["distill"]["temperature"] == 2.0


def test_teacher_probabilities_are_cached_and_recomputed_when_the_checkpoint_changes(world, tmp_path,
                                                                                   monkeypatch):
    _, data, teacher, _ = world
    paths = [str(p) for p in sorted((data / "train_images").iterdir())[:4]]
    ids = [f"id{i}" for i in range(4)]
    calls = []
    real = teachers.predict_teacher_fold

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(teachers, "predict_teacher_fold", counting)
    run = tmp_path / "run"
    first = teachers.load_or_predict_teacher(run, teacher, 2, ids, paths, device="cpu",
                                             batch_size=8, workers=0, log=lambda m: None)
    again = teachers.load_or_predict_teacher(run, teacher, 2, ids, paths, device="cpu",
                                             batch_size=8, workers=0, log=lambda m: None)
    assert calls == [2] and np.array_equal(first, again)
    copy = tmp_path / "teacher_copy"
    shutil.copytree(teacher, copy)
    ckpt = load_checkpoint(copy / "fold_2" / "best.pt")
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, copy / "fold_2" / "best.pt")
    teachers.load_or_predict_teacher(run, copy, 2, ids, paths, device="cpu", batch_size=8,
                                     workers=0, log=lambda m: None)
    assert calls == [2, 2]


def test_a_teacher_on_other_folds_is_refused_naming_both_fingerprints(world, capsys):
    root, data, teacher, _ = world
    out = root / "other"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds", "3", "--seed", "9",
                 "--distill", str(teacher), *TINY]) == 2
    err = capsys.readouterr().err
    assert json.loads((teacher / "metrics.json").read_text())["folds_fingerprint"] in err
    assert "--folds-from" in err and not out.exists()


# ---------------------------------------------------------------- --lr auto

def test_lr_auto_uses_only_fold_0_training_rows_and_records_the_value(world, monkeypatch):
    root, data, teacher, _ = world
    seen = {}
    real = lr_find_module.find_lr_for_config

    def spy(cfg, *, rows=None, **kwargs):
        result, lr = real(cfg, rows=rows, **kwargs)
        seen.update(rows=np.asarray(rows), lr=lr, steps=kwargs.get("steps"))
        return result, lr

    monkeypatch.setattr(lr_find_module, "find_lr_for_config", spy)
    out = root / "auto"
    assert main(["train", "--data", str(data), "--out", str(out), "--folds-from", str(teacher),
                 "--lr", "auto", *TINY]) == 0
    folds = pd.read_csv(out / "folds.csv")["fold"].to_numpy()
    np.testing.assert_array_equal(np.sort(seen["rows"]), np.flatnonzero(folds != 0))
    assert seen["steps"] == 100
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == pytest.approx(seen["lr"])
    assert json.loads((out / "metrics.json").read_text())["lr_found"] == pytest.approx(seen["lr"])
    assert load_checkpoint(out / "fold_0" / "best.pt")["config"]["lr"] == pytest.approx(seen["lr"])
