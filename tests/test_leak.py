"""Planted leak detectors for pseudo-labels and distillation (issue 15).

The labels are random: nothing can be learnt but each image itself, so any CV above chance
comes from knowledge of the validation rows' own labels. The images are distinct colour-block
patterns that mixcls_cnn_tiny memorises within a few epochs.

- pseudo: the unlabelled pool holds a near-duplicate (small noise) of every training image. A
  teacher fitted on all rows labels the duplicate of fold g's validation row i with i's own
  label, and fold g's student learns it: CV near 1. mixcls's per-fold teacher (fold g's model
  never saw fold g's validation rows) labels it with a guess: CV at chance.
- distill: the table holds every pattern twice, the original O_i (label y_i) and a
  near-duplicate D_i (an independent random label z_i) in the next fold. A teacher fitted on all
  rows has seen O_i with y_i, so its target for D_i (a training row of O_i's fold) carries y_i;
  the per-fold teacher of O_i's fold never saw O_i and answers z_i: chance.

Measured (seeds 0/1, 12 epochs, CPU, one thread), CV / last-epoch accuracy:
  pseudo (chance 0.25, sd 0.040 at 120 rows): teacher 0.333 / 0.275, per-fold teacher's student
  0.358 / 0.333 (bounds 0.49 / 0.41), all-rows teacher's student 0.992 / 0.992 (bound >= 0.57);
  a second round, the per-fold student as teacher: 0.367 / 0.358 (same bounds).
  distill (chance 0.125, sd 0.034 at 96 rows): teacher 0.177 / 0.104, per-fold 0.167 / 0.167
  (bounds 0.33 / 0.26), all-rows 0.542 / 0.510 (bound >= 0.40).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import last_epoch_accuracy
from mixcls.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Every test of this module runs on one intra-op thread (conftest.one_thread)."""

EPOCHS = "12"
TINY = ["--model", "mixcls_cnn_tiny", "--img-size", "16", "--epochs", EPOCHS, "--batch-size", "16",
        "--workers", "0", "--preset", "none", "--device", "cpu", "--check-images", "header",
        "--no-progress", "--lr", "0.01", "--seed", "0"]


def _pattern(rng: np.random.Generator) -> np.ndarray:
    """(16, 16, 3) uint8: 4 x 4 random colour blocks, each 4 px wide."""
    return np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)


def _near_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _cv(run: Path) -> float:
    return float(json.loads((run / "metrics.json").read_text())["cv_accuracy"])


def _scores(run: Path) -> dict[str, float]:
    return {"cv": _cv(run), "last": last_epoch_accuracy(run)}


def _leaky_copy(teacher: Path, out: Path) -> Path:
    """The teacher with every fold model replaced by its full-data model (fitted on all rows):
    the teacher that a notebook would use, built here only to show what mixcls prevents."""
    shutil.copytree(teacher, out)
    for fold_dir in out.glob("fold_*"):
        shutil.copy(teacher / "full" / "best.pt", fold_dir / "best.pt")
    return out


def _train_teacher(data: Path, out: Path, *extra: str) -> Path:
    assert main(["train", "--data", str(data), "--out", str(out), "--full-fit",
                 "--full-fit-epochs", EPOCHS, *extra, *TINY]) == 0
    return out


# ---------------------------------------------------------------- pseudo-labels

N_PSEUDO, K_PSEUDO = 120, 4


@pytest.fixture(scope="module")
def pseudo_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("leak_pseudo")
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(K_PSEUDO), N_PSEUDO // K_PSEUDO))
    for i in range(N_PSEUDO):
        image = _pattern(rng)
        _save(image, root / "data" / "train_images" / f"x{i:03d}.png")
        _save(_near_copy(image, rng), root / "pool" / f"u{i:03d}.png")
    pd.DataFrame({"image_id": [f"x{i:03d}.png" for i in range(N_PSEUDO)],
                  "label": labels}).to_csv(root / "data" / "train.csv", index=False)
    teacher = _train_teacher(root / "data", root / "teacher", "--folds", "3")
    leaky = _leaky_copy(teacher, root / "leaky")
    cv = {"teacher": _scores(teacher)}
    for name, source in (("honest", teacher), ("leaky", leaky)):
        table = root / f"{name}.csv"
        # threshold 0: every duplicate passes, the strongest test of the construction
        assert main(["pseudo", "--run", str(source), "--images", str(root / "pool"), "--out",
                     str(table), "--threshold", "0", "--device", "cpu"]) == 0
        assert main(["train", "--data", str(root / "data"), "--out", str(root / f"student_{name}"),
                     "--pseudo", str(table), "--folds-from", str(teacher), *TINY]) == 0
        cv[name] = _scores(root / f"student_{name}")
    # round 2: the honest student is the teacher; its fold-g model learnt the duplicates with
    # labels from the first teacher's fold-g model, so it still knows nothing of fold g's rows
    assert main(["pseudo", "--run", str(root / "student_honest"), "--images", str(root / "pool"),
                 "--out", str(root / "round2.csv"), "--threshold", "0", "--device", "cpu"]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "student_round2"),
                 "--pseudo", str(root / "round2.csv"), "--folds-from", str(teacher), *TINY]) == 0
    cv["round2"] = _scores(root / "student_round2")
    return root, cv


def test_pseudo_labels_from_a_teacher_fitted_on_all_rows_leak_and_per_fold_ones_do_not(pseudo_world):
    _, cv = pseudo_world
    chance = 1 / K_PSEUDO
    sigma = np.sqrt(chance * (1 - chance) / N_PSEUDO)  # 0.040 at 120 rows
    _check_detector("pseudo", cv, chance=chance, sigma=sigma)


def test_a_second_round_from_the_per_fold_student_stays_at_chance_and_is_recorded(pseudo_world):
    root, cv = pseudo_world
    chance = 1 / K_PSEUDO
    sigma = np.sqrt(chance * (1 - chance) / N_PSEUDO)
    print(f"round 2 student: CV {cv['round2']['cv']:.3f} / last epoch {cv['round2']['last']:.3f}")
    assert cv["round2"]["last"] <= chance + 4 * sigma
    assert cv["round2"]["cv"] <= chance + 6 * sigma
    assert json.loads((root / "honest.csv.json").read_text())["round"] == 1
    assert json.loads((root / "round2.csv.json").read_text())["round"] == 2
    assert json.loads((root / "student_honest" / "metrics.json").read_text())["pseudo"]["round"] == 1
    assert json.loads((root / "student_round2" / "metrics.json").read_text())["pseudo"]["round"] == 2
    assert "round 2 labels" in (root / "student_round2" / "report.html").read_text()
    assert "round 2 labels" not in (root / "student_honest" / "report.html").read_text()


def test_pseudo_rows_are_never_validation_rows_nor_in_oof(pseudo_world):
    root, _ = pseudo_world
    student = root / "student_honest"
    oof = pd.read_csv(student / "oof.csv")
    train_ids = pd.read_csv(root / "data" / "train.csv")["image_id"].tolist()
    assert sorted(oof["image_id"]) == sorted(train_ids)
    assert not set(oof["image_id"]) & {p.name for p in (root / "pool").iterdir()}
    for fold_dir in sorted(student.glob("fold_*")):
        assert not set(pd.read_csv(fold_dir / "oof.csv")["image_id"]) & \
            {p.name for p in (root / "pool").iterdir()}
    metrics = json.loads((student / "metrics.json").read_text())
    assert {g: v["rows"] for g, v in metrics["pseudo"]["folds"].items()} == \
        {"0": N_PSEUDO, "1": N_PSEUDO, "2": N_PSEUDO}


# ---------------------------------------------------------------- distillation

N_PAIRS, K_DISTILL = 48, 8


@pytest.fixture(scope="module")
def distill_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("leak_distill")
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat(np.arange(K_DISTILL), N_PAIRS // K_DISTILL))
    z = rng.permutation(np.repeat(np.arange(K_DISTILL), N_PAIRS // K_DISTILL))
    fold_of = np.arange(N_PAIRS) % 3
    rows = []
    for i in range(N_PAIRS):
        image = _pattern(rng)
        _save(image, root / "data" / "train_images" / f"o{i:03d}.png")
        _save(_near_copy(image, rng), root / "data" / "train_images" / f"d{i:03d}.png")
        # D_i sits in the fold after O_i's, so it is a training row whenever O_i is validated
        rows += [{"image_id": f"o{i:03d}.png", "label": int(y[i]), "fold": int(fold_of[i])},
                 {"image_id": f"d{i:03d}.png", "label": int(z[i]), "fold": int((fold_of[i] + 1) % 3)}]
    pd.DataFrame(rows).to_csv(root / "data" / "train.csv", index=False)
    teacher = _train_teacher(root / "data", root / "teacher", "--folds", "3")
    leaky = _leaky_copy(teacher, root / "leaky")
    cv = {"teacher": _scores(teacher)}
    for name, source in (("honest", teacher), ("leaky", leaky)):
        # the table's own fold column gives the student the teacher's folds
        assert main(["train", "--data", str(root / "data"), "--out", str(root / f"student_{name}"),
                     "--folds", "3", "--distill", str(source), "--distill-weight", "1", *TINY]) == 0
        cv[name] = _scores(root / f"student_{name}")
    return root, cv


def test_distillation_from_a_teacher_fitted_on_all_rows_leaks_and_per_fold_does_not(distill_world):
    _, cv = distill_world
    chance, n = 1 / K_DISTILL, 2 * N_PAIRS
    sigma = np.sqrt(chance * (1 - chance) / n)  # 0.034 at 96 rows
    _check_detector("distill", cv, chance=chance, sigma=sigma)


def _check_detector(name: str, cv: dict[str, dict[str, float]], *, chance: float,
                    sigma: float) -> None:
    """The leaky student far above chance, mixcls's at chance: sd is the binomial sd of a
    chance-level accuracy on these rows; the CV may sit a little higher than the last epoch
    (the best epoch is picked on validation), so it gets 6 sd, the last epoch 4."""
    print(f"{name} leak detector: chance {chance:.3f} (sd {sigma:.3f}); CV / last epoch: teacher "
          + ", ".join(f"{k} {v['cv']:.3f} / {v['last']:.3f}" for k, v in cv.items()))
    assert cv["leaky"]["cv"] >= chance + 8 * sigma and cv["leaky"]["last"] >= chance + 8 * sigma
    assert cv["honest"]["last"] <= chance + 4 * sigma
    assert cv["honest"]["cv"] <= chance + 6 * sigma
