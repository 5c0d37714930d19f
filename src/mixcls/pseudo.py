"""Pseudo-labels that cannot leak into CV: one label per image *per teacher fold*.

A teacher trained on all labelled rows has seen the validation rows of every fold; labels it
writes on near-duplicates of those rows (the same plant photographed twice, last year's data)
hand fold g's answers to fold g's student, and CV rises while the leaderboard does not. Here the
images are predicted once per teacher fold: the rows fold g's student may train on are labelled
by the teacher's fold-g model only, which never trained on fold g's validation rows. The
student must therefore use the teacher's folds (`--folds-from TEACHER`).

The table (long format, one row per (image, fold)): image_id, fold, label, confidence, passed,
prob_0 … prob_{K-1}; its sidecar PSEUDO.csv.json records the teacher, its folds, the images
folder, the threshold and whether the labels are soft.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from mixcls.config import ConfigError
from mixcls.data import DataError, prob_columns
from mixcls.runs import RunFolder, atomic_write_csv, atomic_write_json, read_json

PSEUDO_FORMAT = 1
BASE_COLUMNS = ["image_id", "fold", "label", "confidence", "passed"]
# Soft rows are probability vectors; written to CSV with 8 significant digits they sum to 1
# within this tolerance.
SUM_TOLERANCE = 1e-4


def meta_path(table_path: str | Path) -> Path:
    """The sidecar of a pseudo table: PSEUDO.csv -> PSEUDO.csv.json."""
    return Path(str(table_path) + ".json")


# ---------------------------------------------------------------- teacher probabilities

def teacher_folds(teacher: str | Path) -> pd.DataFrame:
    """The teacher's folds.csv (image_id, fold): the folds its per-fold models were trained on."""
    return RunFolder(Path(teacher)).read_folds()


def _fold_ids_of_run(run_dir: Path) -> list[int]:
    """The folds whose best.pt exists, in the order `predict.load_fold_models` loads them."""
    run = RunFolder(run_dir)
    return [k for k, d in run.fold_dirs.items() if (d / "best.pt").is_file()]


def predict_teacher_folds(teacher: str | Path, paths: Sequence[str], *, tta: int | None = None,
                          device: str = "auto", batch_size: int = 64, workers: int = 0,
                          amp: str = "none") -> tuple[list[int], np.ndarray]:
    """(fold ids, probs (F, N, K)): each teacher fold's own model on the images at `paths`.

    A blend teacher combines its members' fold-g probabilities with the rule nested CV fitted
    *without* fold g (blend.json "nested"), so no part of fold g's teacher, not even a blend
    weight, was fitted on fold g's validation rows.
    """
    from mixcls import blend
    from mixcls.predict import predict_fold_probs

    teacher = Path(teacher)
    if not blend.is_blend_folder(teacher):
        fold_ids = _fold_ids_of_run(teacher)
        probs = predict_fold_probs(teacher, paths, tta=tta, device=device, batch_size=batch_size,
                                   workers=workers, amp=amp)
        return fold_ids, probs.astype(np.float64)
    spec = blend.read_blend(teacher)
    blend.verify_members(spec, teacher)  # the members' fold checkpoints are those blended
    blend.check_same_fold_models(spec)
    members = [blend.member_dir(m, teacher) for m in spec["members"]]
    fold_ids = _fold_ids_of_run(members[0])
    # each member with the views and size it was blended with (as blend.predict_blend)
    member_probs = np.stack([predict_fold_probs(path, paths, tta=tta,
                                                views=m.get("views") if tta is None else None,
                                                img_size=m.get("img_size"), device=device,
                                                batch_size=batch_size, workers=workers, amp=amp)
                             for path, m in zip(members, spec["members"])]).astype(np.float64)
    return fold_ids, np.stack([blend.combine_members(_nested_spec(spec, g, teacher), member_probs[:, i])
                               for i, g in enumerate(fold_ids)])


def _nested_spec(spec: dict[str, Any], fold: int, teacher: Path) -> dict[str, Any]:
    """The blend's rule for fold `fold`, fitted on the other folds' OOF rows only."""
    nested = spec.get("nested", {}).get("folds", {}).get(str(fold))
    if nested is None:
        raise DataError(f"{teacher / 'blend.json'}: no nested rule for fold {fold}; blend the "
                        "runs again with this mixcls")
    return dict(spec, weights=nested.get("weights"), stacker=nested.get("stacker"),
                temperature=nested.get("temperature"))


def teacher_round(teacher: str | Path) -> int:
    """How many pseudo-label rounds are behind `teacher`'s models: 0 for a run trained on labels
    alone, r for a student of a round-r table (metrics.json "pseudo"; older students: 1), the
    most of its members for a blend. A table it writes is round teacher_round + 1.

    The chain stays leak-free round after round: a round-r student's fold-g model trained on fold
    g's training rows and on labels from its teacher's fold-g model, so by induction no model in
    fold g's chain ever trained on fold g's validation rows."""
    from mixcls import blend

    teacher = Path(teacher)
    if blend.is_blend_folder(teacher):
        return max(teacher_round(blend.member_dir(m, teacher))
                   for m in blend.read_blend(teacher)["members"])
    metrics = teacher / "metrics.json"
    info = read_json(metrics).get("pseudo") if metrics.is_file() else None
    return int(info.get("round", 1)) if isinstance(info, dict) else 0


# ---------------------------------------------------------------- selection

def select_passed(probs: np.ndarray, *, threshold: float,
                  max_per_class: int | None = None) -> np.ndarray:
    """(F, N) bool: per fold, rows whose confidence (max prob) is above `threshold` (1.0: none),
    then at most `max_per_class` of them per predicted class, the most confident first (ties:
    the earlier image).  probs (F, N, K)."""
    confidence, labels = probs.max(axis=2), probs.argmax(axis=2)
    passed = confidence > threshold
    if max_per_class is None:
        return passed
    kept = np.zeros_like(passed)
    for f in range(probs.shape[0]):
        for k in np.unique(labels[f][passed[f]]):
            rows = np.flatnonzero(passed[f] & (labels[f] == k))
            order = rows[np.argsort(-confidence[f, rows], kind="stable")]
            kept[f, order[:max_per_class]] = True
    return kept


def make_pseudo_table(image_ids: Sequence[str], fold_ids: Sequence[int], probs: np.ndarray,
                      passed: np.ndarray) -> pd.DataFrame:
    """The long table: for each fold, every image with label, confidence, passed and probs."""
    n_folds, n_images, num_classes = probs.shape
    frame = pd.DataFrame({
        "image_id": np.tile(np.asarray(image_ids, dtype=object), n_folds),
        "fold": np.repeat(np.asarray(fold_ids, dtype=np.int64), n_images),
        "label": probs.argmax(axis=2).reshape(-1),
        "confidence": probs.max(axis=2).reshape(-1),
        "passed": passed.reshape(-1).astype(np.int64)})
    frame[prob_columns(num_classes)] = probs.reshape(-1, num_classes)
    return frame


def make_pseudo(teacher: str | Path, images_dir: str | Path, image_ids: Sequence[str],
                paths: Sequence[str], out: str | Path, *, threshold: float = 0.9,
                max_per_class: int | None = None, soft: bool = False, tta: int | None = None,
                device: str = "auto", batch_size: int = 64, workers: int = 0,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict the images once per teacher fold, select, write `out` and its sidecar; return
    the sidecar's content (with per-fold counts of passing rows)."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold: {threshold} must be in [0, 1]")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"--max-per-class: {max_per_class} must be >= 1")
    teacher = Path(teacher)
    folds = teacher_folds(teacher)  # refuses a folder that is not a run or blend before predicting
    classes = RunFolder(teacher).classes
    fold_ids, probs = predict_teacher_folds(teacher, paths, tta=tta, device=device,
                                            batch_size=batch_size, workers=workers)
    passed = select_passed(probs, threshold=threshold, max_per_class=max_per_class)
    frame = make_pseudo_table(image_ids, fold_ids, probs, passed)
    from mixcls.folds import folds_fingerprint
    meta = {"format": PSEUDO_FORMAT, "teacher": str(teacher.resolve()),
            "images": str(Path(images_dir).resolve()), "classes": classes,
            "folds_fingerprint": folds_fingerprint(folds["image_id"], folds["fold"]),
            "teacher_folds": fold_ids, "threshold": threshold, "max_per_class": max_per_class,
            "soft": soft, "round": teacher_round(teacher) + 1, "images_count": len(image_ids),
            "passed_per_fold": {str(g): int(passed[i].sum()) for i, g in enumerate(fold_ids)}}
    atomic_write_csv(out, frame)
    atomic_write_json(meta_path(out), meta)
    log(f"pseudo labels (round {meta['round']}): {len(image_ids)} images x {len(fold_ids)} "
        f"teacher folds -> {out}; passed per fold: {meta['passed_per_fold']}")
    return meta


# ---------------------------------------------------------------- reading it for training

@dataclass
class PseudoTable:
    """A checked pseudo table: the long frame, its sidecar and the images' folder."""

    path: Path
    frame: pd.DataFrame
    meta: dict[str, Any]

    @property
    def soft(self) -> bool:
        return bool(self.meta["soft"])

    @property
    def images_dir(self) -> Path:
        return Path(self.meta["images"])


def read_pseudo(path: str | Path, *, classes: Sequence[str]) -> PseudoTable:
    """The table at `path` and its sidecar, checked; DataError names the file and the row."""
    path = Path(path)
    side = meta_path(path)
    for p in (path, side):
        if not p.is_file():
            raise DataError(f"pseudo: {p} does not exist; write it with mixcls pseudo --out {path}")
    meta = read_json(side)
    missing = [k for k in ("teacher", "images", "classes", "folds_fingerprint", "soft")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"pseudo: {side} lacks {', '.join(missing)}")
    if [str(c) for c in meta["classes"]] != [str(c) for c in classes]:
        raise DataError(f"pseudo: {side} has classes {meta['classes']}, the training table "
                        f"{list(classes)}")
    frame = pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
    _check_frame(frame, path, num_classes=len(classes), soft=bool(meta["soft"]))
    return PseudoTable(path, frame, meta)


def _check_frame(frame: pd.DataFrame, path: Path, *, num_classes: int, soft: bool) -> None:
    columns = BASE_COLUMNS + prob_columns(num_classes)
    lacking = [c for c in columns if c not in frame.columns]
    if lacking:
        raise DataError(f"pseudo: {path} lacks column(s) {', '.join(lacking)}")
    numeric = frame[columns[1:]].apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna().any(axis=1) | ~np.isfinite(numeric.to_numpy(dtype=float)).all(axis=1)
    labels = numeric["label"].to_numpy()
    bad |= ~numeric["passed"].isin([0, 1]) | (labels < 0) | (labels >= num_classes) \
        | (labels != np.floor(labels))
    if soft:
        probs = numeric[prob_columns(num_classes)].to_numpy(dtype=float)
        bad |= (probs < 0).any(axis=1) | (np.abs(probs.sum(axis=1) - 1) > SUM_TOLERANCE)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"pseudo: {path} row {row + 2} (line) is not a valid pseudo row: "
                        f"{frame.iloc[row].to_dict()}")
    if frame.duplicated(["image_id", "fold"]).any():
        raise DataError(f"pseudo: {path} lists an (image_id, fold) pair twice")


def check_pseudo_folds(pseudo: PseudoTable, image_ids: Sequence[str], folds: np.ndarray,
                       chosen: Sequence[int]) -> None:
    """ConfigError unless the student validates every image on the teacher's fold, and every
    chosen fold has its teacher fold; the message names both fingerprints."""
    from mixcls.folds import folds_fingerprint

    theirs = teacher_folds(pseudo.meta["teacher"]) if Path(pseudo.meta["teacher"]).is_dir() else None
    mine = folds_fingerprint(image_ids, folds)
    same = theirs is not None and dict(zip(theirs["image_id"], theirs["fold"].astype(int))) \
        == dict(zip(image_ids, np.asarray(folds).astype(int).tolist()))
    if not same and mine != pseudo.meta["folds_fingerprint"]:
        raise ConfigError(
            f"pseudo: {pseudo.path} was written by teacher {pseudo.meta['teacher']} on folds "
            f"{pseudo.meta['folds_fingerprint']}, this run's folds are {mine}; train with "
            f"--folds-from {pseudo.meta['teacher']} so that fold g's pseudo labels come from a "
            "model that never saw fold g's validation rows")
    present = set(pd.unique(pseudo.frame["fold"]).astype(int).tolist())
    lacking = [g for g in chosen if g not in present]
    if lacking:
        raise ConfigError(f"pseudo: {pseudo.path} has no rows for fold(s) {lacking} (the teacher "
                          "had no model for them)")


def check_pseudo_images(pseudo: PseudoTable, train_paths: Sequence[str]) -> None:
    """DataError when a passing image is missing or is itself a row of the training table (it
    would then sit in some fold's validation rows and be trained on under another label)."""
    ids = pd.unique(pseudo.frame.loc[pseudo.frame["passed"] == 1, "image_id"]).tolist()
    paths = [str((pseudo.images_dir / i).resolve()) for i in ids]
    missing = [i for i, p in zip(ids, paths) if not Path(p).is_file()]
    if missing:
        raise DataError(f"pseudo: {len(missing)} image(s) of {pseudo.path} are not in "
                        f"{pseudo.images_dir} (first: {', '.join(missing[:5])})")
    labelled = {str(Path(p).resolve()) for p in train_paths}
    shared = [i for i, p in zip(ids, paths) if p in labelled]
    if shared:
        raise DataError(f"pseudo: {len(shared)} image(s) of {pseudo.path} are rows of the training "
                        f"table (first: {', '.join(shared[:5])}); pseudo-label unlabelled images only")


def passed_paths(pseudo: PseudoTable) -> list[str]:
    """The absolute paths of every image that passed for at least one fold, sorted."""
    ids = pd.unique(pseudo.frame.loc[pseudo.frame["passed"] == 1, "image_id"]).tolist()
    return sorted(str((pseudo.images_dir / i).resolve()) for i in ids)


def pseudo_rows_for_fold(pseudo: PseudoTable, fold: int, *,
                         num_classes: int) -> tuple[list[str], np.ndarray]:
    """(paths, targets) of the rows that passed for `fold`: labels (n,) int64, or probs
    (n, K) float32 when the table was written soft."""
    rows = pseudo.frame[(pseudo.frame["fold"].astype(int) == fold) & (pseudo.frame["passed"] == 1)]
    paths = [str((pseudo.images_dir / i).resolve()) for i in rows["image_id"]]
    if pseudo.soft:
        return paths, rows[prob_columns(num_classes)].to_numpy(dtype=np.float32)
    return paths, rows["label"].to_numpy(dtype=np.int64)


def summarize_pseudo(pseudo: PseudoTable, chosen: Sequence[int],
                     classes: Sequence[str]) -> dict[str, Any]:
    """For metrics.json and the report: per fold, the pseudo rows trained on and their class
    mix (by label, the argmax for soft rows)."""
    per_fold = {}
    for g in chosen:
        rows = pseudo.frame[(pseudo.frame["fold"].astype(int) == g) & (pseudo.frame["passed"] == 1)]
        counts = np.bincount(rows["label"].to_numpy(dtype=np.int64), minlength=len(classes))
        per_fold[str(g)] = {"rows": int(len(rows)),
                            "classes": {str(c): int(n) for c, n in zip(classes, counts)}}
    return {"table": str(pseudo.path), "teacher": pseudo.meta["teacher"], "soft": pseudo.soft,
            "threshold": pseudo.meta.get("threshold"), "round": int(pseudo.meta.get("round", 1)),
            "folds": per_fold}
