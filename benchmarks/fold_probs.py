"""Each fold model's probabilities on images no model trained on, as the benchmarks read them.

Imported by ensemble.py and teachers.py (run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


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


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose argmax is their label."""
    return float((probs.argmax(-1) == labels).mean())
