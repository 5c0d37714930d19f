"""Each fold model's probabilities on the held-out test images, as the benchmarks read them.

Imported by ensemble.py and teachers.py (run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def predict_fold_test_probs(run_dir: Path, data: Path, out: Path, *, device: str = "cpu") -> np.ndarray:
    """(F, N, K) each fold model's test probabilities (its TTA views averaged), in test.csv's
    order; saved to `out` (.npy) so a rerun of the benchmark does not predict again."""
    if not out.is_file():
        from mixcls.predict import predict_fold_probs

        ids = pd.read_csv(data / "test.csv")["image_id"]
        probs = predict_fold_probs(run_dir, [str(data / "test_images" / i) for i in ids], device=device)
        partial = out.with_name(out.name + ".partial.npy")
        np.save(partial, probs)
        partial.replace(out)
    return np.load(out)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose argmax is their label."""
    return float((probs.argmax(-1) == labels).mean())
