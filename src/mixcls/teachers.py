"""Distillation targets that cannot leak into CV: fold g's targets come from the teacher's
fold-g model only.

A teacher fitted on every labelled row knows fold g's validation labels; soft targets it writes
on fold g's training rows carry that knowledge wherever those rows resemble validation rows, and
fold g's CV rises for nothing. The teacher's fold-g model trained on exactly fold g's training
rows (same folds, `--folds-from TEACHER`), so what it says about them holds nothing of fold g's
validation rows. Each fold's teacher probabilities are computed once and cached in the
student's run folder (RUN/teacher/fold_K.npy) beside the teacher's checkpoint hashes; a cache
whose teacher checkpoints or rows changed is computed again.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mixcls.config import ConfigError
from mixcls.losses import to_soft_targets
from mixcls.runs import RunError, RunFolder, atomic_write_bytes, atomic_write_json, read_json

TEACHER_DIR = "teacher"


def check_teacher(teacher: str | Path, image_ids: Sequence[str], folds: np.ndarray,
                  chosen: Sequence[int]) -> None:
    """ConfigError unless `teacher` is a run with a best.pt for every chosen fold, trained on
    this run's folds (the message names both fingerprints)."""
    from mixcls.blend import is_blend_folder
    from mixcls.folds import folds_fingerprint

    teacher = Path(teacher)
    if not teacher.is_dir() or is_blend_folder(teacher):
        raise ConfigError(f"distill: {teacher} is not a run folder (a blend cannot be a teacher: "
                          "its per-fold models are several runs')")
    theirs = RunFolder(teacher).read_folds()
    mine = dict(zip(image_ids, np.asarray(folds).astype(int).tolist()))
    if dict(zip(theirs["image_id"], theirs["fold"].astype(int))) != mine:
        raise ConfigError(
            f"distill: teacher {teacher} was trained on folds "
            f"{folds_fingerprint(theirs['image_id'], theirs['fold'])}, this run's folds are "
            f"{folds_fingerprint(image_ids, folds)}; train with --folds-from {teacher} so that "
            "fold g's targets come from a model that never saw fold g's validation rows")
    lacking = [g for g in chosen if not (teacher / f"fold_{g}" / "best.pt").is_file()]
    if lacking:
        raise ConfigError(f"distill: teacher {teacher} has no fold_K/best.pt for fold(s) {lacking}")


def predict_teacher_fold(teacher: str | Path, fold: int, paths: Sequence[str], *,
                         device: str = "auto", batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """The teacher's fold-`fold` model on the images at `paths` (plain view): probs (n, K)."""
    from mixcls.devices import resolve_device
    from mixcls.predict import load_model, predict_fold_outputs

    dev = resolve_device(device)
    loaded = load_model(Path(teacher) / f"fold_{fold}" / "best.pt", dev)
    outputs = predict_fold_outputs([loaded], paths, device=dev, views=("orig",),
                                   batch_size=batch_size, workers=workers)
    return outputs.probs[0].astype(np.float64)


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) per row: T > 1 flattens, T < 1 sharpens; probs (n, K). The blend's
    calibration rule, so a teacher's softened probabilities mean what a calibrated blend's do."""
    from mixcls.blend import apply_temperature

    return apply_temperature(np.asarray(probs, dtype=np.float64), temperature)


def distill_targets(targets: np.ndarray, teacher_probs: np.ndarray, *, weight: float,
                    num_classes: int) -> np.ndarray:
    """(1 - w) x given + w x teacher, (n, K) float32; `targets` labels (n,) or soft (n, K).

    With w = 0 the result is the one-hot (or soft) given targets exactly, so the run equals one
    without a teacher.
    """
    import torch

    given = to_soft_targets(torch.as_tensor(targets), num_classes).numpy().astype(np.float64)
    return ((1.0 - weight) * given + weight * teacher_probs).astype(np.float32)


def load_or_predict_teacher(run_dir: Path, teacher: str | Path, fold: int, image_ids: Sequence[str],
                            paths: Sequence[str], *, device: str, batch_size: int, workers: int,
                            log: Callable[[str], None] = print) -> np.ndarray:
    """Teacher probs (n, K) of fold `fold`'s training rows, from RUN/teacher/fold_K.npy when it
    was written for these rows by these teacher checkpoints, else predicted and cached."""
    from mixcls.blend import sha256_file

    folder = Path(run_dir) / TEACHER_DIR
    checkpoint = Path(teacher) / f"fold_{fold}" / "best.pt"
    if not checkpoint.is_file():
        raise RunError(f"distill: teacher checkpoint {checkpoint} does not exist")
    key = {"teacher": str(Path(teacher).resolve()), "fold": fold,
           "checkpoint": f"fold_{fold}/best.pt", "sha256": sha256_file(checkpoint),
           "image_ids": list(image_ids)}
    cached, meta = folder / f"fold_{fold}.npy", folder / f"fold_{fold}.json"
    if cached.is_file() and meta.is_file() and read_json(meta) == key:
        return np.load(cached)
    probs = predict_teacher_fold(teacher, fold, paths, device=device, batch_size=batch_size,
                                 workers=workers)
    buffer = io.BytesIO()
    np.save(buffer, probs)
    atomic_write_bytes(cached, buffer.getvalue())
    atomic_write_json(meta, key)
    log(f"fold {fold}: teacher probabilities of {len(paths)} training rows from "
        f"{checkpoint} (cached in {cached})")
    return probs
