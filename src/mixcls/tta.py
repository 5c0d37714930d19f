"""Test-time settings scored on the OOF rows: TTA views x inference image sizes, chosen by
nested CV, and the setting a run predicts with.

A run's oof.csv holds one view at the training size, while `mixcls predict` averages the
run's TTA views, and a model trained on random crops often scores better at a larger size
than it trained at (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").
Neither gain is in the CV until each fold model scores its own validation rows again under
each setting. Choosing the best of S settings on those rows is itself a fit, so the honest
figure is nested: fold g is scored with the setting that is best on the other folds' rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from mixcls.data import DataError, prob_columns
from mixcls.runs import RunError, RunFolder, atomic_write_csv, atomic_write_json, read_json
from mixcls.transforms import TTA_VIEWS

TTA_FILE = "tta.json"          # the applied setting (mixcls tta --apply)
TTA_OOF_FILE = "tta_oof.csv"   # the OOF probabilities under the applied setting
GRID_FILE = "tta_grid.csv"     # every setting's CV scores (written by every mixcls tta)
TTA_FORMAT = 1


@dataclass(frozen=True)
class InferenceSetting:
    """What a run predicts with: TTA views and image size (None: each model's config), and
    where that came from ("config", or the path of tta.json)."""

    views: list[str] | None
    img_size: int | None
    source: str

    @property
    def applied(self) -> bool:
        return self.source != "config"


def inference_setting(run_dir: str | Path) -> InferenceSetting:
    """The run's applied tta.json when it has one (checked; DataError names the file), else the
    config's setting (views and size left to each checkpoint's config)."""
    path = Path(run_dir) / TTA_FILE
    if not path.is_file():
        return InferenceSetting(None, None, "config")
    try:
        spec = read_json(path)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    views = spec.get("views") if isinstance(spec, dict) else None
    img_size = spec.get("img_size") if isinstance(spec, dict) else None
    if (not isinstance(views, list) or not views or views[0] != "orig"
            or any(v not in TTA_VIEWS for v in views)):
        raise DataError(f"{path}: 'views' must be a list of TTA views starting with 'orig' "
                        f"(known: {', '.join(TTA_VIEWS)}); found {views!r}")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1:
        raise DataError(f"{path}: 'img_size' must be a positive integer; found {img_size!r}")
    return InferenceSetting(list(views), img_size, str(path))


def inference_oof_path(run: RunFolder) -> Path:
    """The OOF table that matches what the run predicts with: tta_oof.csv when a setting was
    applied, else oof.csv (one view at the training size)."""
    return run.path / TTA_OOF_FILE if (run.path / TTA_FILE).is_file() else run.oof_path


# ---------------------------------------------------------------- the grid

@dataclass(frozen=True)
class Setting:
    """One test-time setting: images resized to img_size, the mean over `views`."""

    img_size: int
    views: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.img_size}px x{len(self.views)}"


@dataclass
class OofGrid:
    """Every setting's OOF probabilities (S, N, K) on the run's OOF rows (oof.csv order)."""

    settings: list[Setting]
    image_ids: list[str]
    labels: np.ndarray
    folds: np.ndarray
    probs: np.ndarray
    train_oof: np.ndarray  # oof.csv's probabilities (N, K), the training's own pass


def make_settings(img_sizes: Sequence[int], n_views: Sequence[int], tta_views: Sequence[str], *,
                  train_size: int) -> list[Setting]:
    """The grid, the training's own setting (train_size, one view) first so that ties keep it;
    ValueError names a bad size, count or view."""
    if not tta_views or tta_views[0] != "orig":
        raise ValueError(f"tta views must start with 'orig'; found {list(tta_views)}")
    unknown = [v for v in tta_views if v not in TTA_VIEWS]
    if unknown:
        raise ValueError(f"unknown TTA view(s) {unknown}; use {', '.join(TTA_VIEWS)}")
    if len(set(tta_views)) != len(tta_views):
        raise ValueError(f"tta views repeat a view: {list(tta_views)}")
    bad = [n for n in n_views if not 1 <= n <= len(tta_views)]
    if bad:
        raise ValueError(f"views: {bad} outside 1..{len(tta_views)} (the number of tta views "
                         f"{list(tta_views)})")
    small = [s for s in img_sizes if s < 8]
    if small:
        raise ValueError(f"img sizes must be at least 8 px; found {small}")
    sizes = list(dict.fromkeys([train_size, *img_sizes]))
    counts = sorted({1, *n_views})
    return [Setting(size, tuple(tta_views[:n])) for size in sizes for n in counts]


def score_run_settings(run_dir: str | Path, settings: Sequence[Setting], *, device: str = "auto",
                       batch_size: int = 64, workers: int = 0, amp: str = "none",
                       log: Callable[[str], None] = lambda _: None) -> OofGrid:
    """Each fold's best model on its own validation rows (those of oof.csv), once per image
    size with every view of the largest setting; the first n views' mean is the n-view setting.

    Everything is checked (run folder, checkpoints, images present) before the first model
    runs; a fold's images are decoded once for all sizes when they fit in RAM.
    """
    from mixcls.data import load_image_cache
    from mixcls.devices import amp_dtype, resolve_device
    from mixcls.predict import load_model

    run, oof = _open_scored_run(run_dir)
    folds = oof["fold"].to_numpy(dtype=np.int64)
    checkpoints = {g: run.path / f"fold_{g}" / "best.pt" for g in np.unique(folds).tolist()}
    gone = [str(p) for p in checkpoints.values() if not p.is_file()]
    if gone:
        raise RunError(f"{run.path}: oof.csv scores folds whose checkpoints are missing: {', '.join(gone)}")
    paths = [str(p) for p in run.find_images(oof["image_id"].tolist())]
    _views_per_size(settings)  # a bad grid fails here, before any model runs
    dev = resolve_device(device)
    dtype = amp_dtype(amp, dev)
    k = len(run.classes)
    probs = np.zeros((len(settings), len(oof), k), np.float64)
    for g, ckpt in checkpoints.items():
        model = [load_model(ckpt, dev)]
        rows = np.flatnonzero(folds == g)
        fold_paths = [paths[r] for r in rows]
        # the fold's images decoded once for every size when they fit in RAM (data's limit)
        probs[:, rows] = predict_settings(
            model, fold_paths, settings, device=dev, batch_size=batch_size, workers=workers,
            amp_dtype=dtype, cache=load_image_cache(fold_paths, mode="auto"),
            log=lambda size, views: log(f"fold {g}: {len(rows)} rows at {size} px, "
                                        f"{len(views)} view(s)"))[:, 0]
    return OofGrid(list(settings), oof["image_id"].tolist(), oof["label"].to_numpy(np.int64),
                   folds, probs, oof[prob_columns(k)].to_numpy(np.float64))


def predict_settings(models: Sequence, paths: Sequence[str], settings: Sequence[Setting], *,
                     device, batch_size: int = 64, workers: int = 0, amp_dtype=None,
                     cache: list | None = None,
                     log: Callable[[int, tuple[str, ...]], None] = lambda size, views: None
                     ) -> np.ndarray:
    """(S, F, N, K) float64: each setting's probabilities of the images at `paths` from each of
    the loaded models (predict.LoadedModel). One pass per image size runs every view of the
    longest setting at that size (`per_view`); the n-view setting is the running mean of the
    first n."""
    from mixcls.predict import predict_fold_outputs

    sizes = _views_per_size(settings)
    out = None
    for size, (views, rows) in sizes.items():
        log(size, views)
        per_view = predict_fold_outputs(models, paths, device=device, views=views, img_size=size,
                                        per_view=True, batch_size=batch_size, workers=workers,
                                        amp_dtype=amp_dtype, cache=cache).probs  # (F, V, N, K)
        running = np.cumsum(per_view.astype(np.float64), axis=1)
        if out is None:
            out = np.zeros((len(settings), *running.shape[:1], *running.shape[2:]), np.float64)
        for i in rows:
            n = len(settings[i].views)
            out[i] = running[:, n - 1] / n
    return out


def _views_per_size(settings: Sequence[Setting]) -> dict[int, tuple[tuple[str, ...], list[int]]]:
    """{img_size: (the views one pass runs, the indices of the settings at that size)}, sizes in
    grid order; ValueError when a size's settings do not share one view list."""
    rows = {size: [i for i, s in enumerate(settings) if s.img_size == size]
            for size in dict.fromkeys(s.img_size for s in settings)}
    return {size: (_longest_prefix_list([settings[i].views for i in at]), at)
            for size, at in rows.items()}


def _longest_prefix_list(views: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The longest of the views lists; ValueError unless the others are its prefixes (the
    running mean over one pass of its views gives them all)."""
    longest = max(views, key=len)
    wrong = [v for v in views if longest[:len(v)] != v]
    if wrong:
        raise ValueError(f"settings of one size must take the first n of one view list; "
                         f"{list(wrong[0])} is not a prefix of {list(longest)}")
    return longest


def _open_scored_run(run_dir: str | Path) -> tuple[RunFolder, pd.DataFrame]:
    from mixcls.blend import is_blend_folder

    if is_blend_folder(run_dir):
        raise RunError(f"{run_dir} is a blend, which has no fold models of its own: run "
                       "mixcls tta --apply on each member, then blend them again")
    run = RunFolder.open(run_dir, require=("oof.csv",))
    return run, run.read_oof()


# ---------------------------------------------------------------- the choice

@dataclass
class SettingChoice:
    """The setting best on all OOF rows (`chosen`, optimistic), each fold's choice made on
    the other folds' rows, and the nested OOF probabilities (N, K) those choices give."""

    chosen: int
    fold_choices: dict[int, int]
    nested_probs: np.ndarray


def choose_setting(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, *,
                   metric: str) -> SettingChoice:
    """Pick among S settings' OOF probs (S, N, K) by `metric` (logloss or accuracy, whose ties
    log-loss breaks; then the first setting wins); nested: fold g's rows get the setting best
    on the rows of the others."""
    from mixcls.blend import selection_key

    def best(mask: np.ndarray) -> int:
        keys = [selection_key(p[mask], labels[mask], metric) for p in probs]
        return min(range(len(keys)), key=keys.__getitem__)

    everything = np.ones(len(labels), bool)
    nested = np.empty(probs.shape[1:], np.float64)
    fold_choices = {}
    unique = np.unique(folds).tolist()
    for g in unique:
        own = folds == g
        # one fold alone has no other rows to choose on: it keeps the first setting
        fold_choices[g] = best(~own) if len(unique) > 1 else 0
        nested[own] = probs[fold_choices[g]][own]
    return SettingChoice(best(everything), fold_choices, nested)


def grid_table(grid: OofGrid, choice: SettingChoice) -> pd.DataFrame:
    """One row per setting: img_size, views, CV accuracy, macro F1, log-loss on all OOF rows,
    how many folds chose it in the nested fit, and whether it is the chosen one."""
    from mixcls.blend import score_probs

    rows = []
    for i, (setting, probs) in enumerate(zip(grid.settings, grid.probs)):
        scores = score_probs(probs, grid.labels)
        rows.append({"setting": setting.name, "img_size": setting.img_size,
                     "n_views": len(setting.views), "views": ",".join(setting.views),
                     "cv_accuracy": scores["accuracy"], "cv_macro_f1": scores["macro_f1"],
                     "cv_logloss": scores["logloss"],
                     "nested_folds": sum(c == i for c in choice.fold_choices.values()),
                     "chosen": i == choice.chosen})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- writing

def write_grid(run_dir: str | Path, table: pd.DataFrame) -> Path:
    """RUN/tta_grid.csv: every setting's scores (the last mixcls tta's)."""
    return atomic_write_csv(Path(run_dir) / GRID_FILE, table)


def apply_setting(run_dir: str | Path, grid: OofGrid, choice: SettingChoice, *,
                  metric: str) -> Path:
    """Make the chosen setting the run's: tta_oof.csv (its OOF probabilities, oof.csv's
    columns) first, tta.json (the setting, nested and in-sample scores) last, so a run with
    tta.json always has the matching table."""
    from mixcls.blend import score_probs
    from mixcls.metrics import oof_frame

    run_dir = Path(run_dir)
    setting = grid.settings[choice.chosen]
    probs = grid.probs[choice.chosen]
    frame = oof_frame(np.asarray(grid.image_ids, dtype=object), grid.labels, grid.folds, probs,
                      np.arange(len(probs)))
    atomic_write_csv(run_dir / TTA_OOF_FILE, frame)
    spec = {"format": TTA_FORMAT, "views": list(setting.views), "img_size": setting.img_size,
            "metric": metric, "setting": setting.name,
            "in_sample": score_probs(probs, grid.labels),
            "nested": score_probs(choice.nested_probs, grid.labels),
            "train_oof": score_probs(grid.train_oof, grid.labels),
            "fold_choices": {str(g): grid.settings[i].name for g, i in choice.fold_choices.items()},
            "settings": [s.name for s in grid.settings]}
    return atomic_write_json(run_dir / TTA_FILE, spec)
