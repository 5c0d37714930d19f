"""Each fold model's probabilities on images no model trained on, as the benchmarks read them:
the official test images, and "fresh" images of the training split that no run here saw; and
how far one run's CV leads others', paired on the OOF rows (`cv_leads`).

Imported by ensemble.py and teachers.py (run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import train_test_split


def predict_fold_probs_cached(run_dir: Path, images: Path, ids: pd.Series, out: Path, *,
                              device: str = "cpu") -> np.ndarray:
    """(F, N, K) each fold model's probabilities (its TTA views averaged) of images/ID for the
    ids in order; saved to `out` (.npy, written under a temporary name, then renamed) so a rerun
    of the benchmark does not predict again."""
    if not out.is_file():
        from mixcls.predict import predict_fold_probs

        probs = predict_fold_probs(run_dir, [str(images / i) for i in ids], device=device)
        partial = out.with_name(out.name + ".partial.npy")
        np.save(partial, probs)
        partial.replace(out)
    return np.load(out)


def predict_fold_test_probs(run_dir: Path, data: Path, out: Path, *, device: str = "cpu") -> np.ndarray:
    """`predict_fold_probs_cached` of DATA/test.csv's images (DATA/test_images), in its order."""
    ids = pd.read_csv(data / "test.csv", dtype={"image_id": str})["image_id"]
    return predict_fold_probs_cached(run_dir, data / "test_images", ids, out, device=device)


def predict_fold_fresh_probs(run_dir: Path, fresh: Path, rows: Path, work: Path, *,
                             device: str = "cpu") -> np.ndarray:
    """`predict_fold_probs_cached` of FRESH/train_images for the rows of `rows` (the csv that
    `fresh_rows` wrote), in its order; cached as WORK/fresh_folds_RUN.npy."""
    ids = pd.read_csv(rows, dtype={"image_id": str})["image_id"]
    return predict_fold_probs_cached(run_dir, fresh / "train_images", ids,
                                     work / f"fresh_folds_{run_dir.name}.npy", device=device)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose argmax is their label."""
    return float((probs.argmax(-1) == labels).mean())


def single_accuracy(folds: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the fold models (F, N, K) of each one's accuracy."""
    return float(np.mean([accuracy(fold, labels) for fold in folds]))


def fold_scores(folds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The fold ensemble's accuracy (mean of the F models' probabilities (F, N, K)) and the
    mean accuracy of each fold model alone."""
    return {"ensemble": accuracy(folds.mean(axis=0), labels), "single": single_accuracy(folds, labels)}


def check_fresh_export(fresh: Path | None) -> None:
    """A --fresh FRESH folder must be a `mixcls data fashion-mnist` export (its train.csv);
    checked before any work."""
    if fresh is not None and not (fresh / "train.csv").is_file():
        raise SystemExit(f"--fresh {fresh}: no train.csv; export with mixcls data fashion-mnist")


def pixel_hash(path: Path) -> str:
    return hashlib.sha1(np.asarray(Image.open(path)).tobytes()).hexdigest()


def fresh_rows(data: Path, fresh: Path, work: Path, n: int, seed: int) -> Path:
    """WORK/fresh.csv: n stratified rows of FRESH/train.csv whose pixels are in none of DATA's
    train or test images, so no model here trained on them, nor labelled them: images of the
    training split as the CV rows are, where the test images are the official test split."""
    out = work / "fresh.csv"
    if out.is_file():  # the fresh predictions of every run are cached beside it
        if len(cached := pd.read_csv(out)) != n:
            raise SystemExit(f"{out} holds {len(cached)} fresh rows, not --fresh-rows {n}; "
                             f"remove it and {work}/fresh_folds_*.npy to choose again")
        return out
    seen = {pixel_hash(data / f"{split}_images" / i)
            for split in ("train", "test")
            for i in pd.read_csv(data / f"{split}.csv", dtype={"image_id": str})["image_id"]}
    table = pd.read_csv(fresh / "train.csv", dtype={"image_id": str})
    unseen = table[[pixel_hash(fresh / "train_images" / i) not in seen for i in table["image_id"]]]
    if len(unseen) < n:
        raise SystemExit(f"{fresh}/train.csv has {len(unseen)} images that are not in {data}; "
                         f"--fresh-rows {n} needs more (export all 60,000 with mixcls data "
                         "fashion-mnist and no --limit)")
    if len(unseen) > n:
        unseen, _ = train_test_split(unseen, train_size=n, random_state=seed, stratify=unseen["label"])
    partial = work / "fresh.csv.partial"
    unseen[["image_id", "label"]].to_csv(partial, index=False)
    partial.replace(out)
    return out


def cv_leads(reference: Path, others: dict[str, Path]) -> pd.DataFrame:
    """Per other run: its CV accuracy minus REFERENCE's over the OOF rows both scored, and the
    paired standard error of that difference (mixcls.run_table, as `mixcls runs --against`), in
    percentage points: whether a lead chosen by CV is more than the rows' noise."""
    from mixcls.run_table import oof_correct, paired_oof_difference

    base = oof_correct(reference)
    rows = []
    for name, run_dir in others.items():
        diff, se, shared = paired_oof_difference(run_dir, base)
        rows.append({"row": name, "cv_diff_points": 100 * diff, "paired_se_points": 100 * se,
                     "rows": shared})
    return pd.DataFrame(rows)
