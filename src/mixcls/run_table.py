"""The runs table: one row per run folder with its CV scores, settings and folds fingerprint.

A run folder is one holding config.yaml and folds.csv (what `mixcls train` writes before the
first fold). Runs whose folds fingerprints match validated every image on the same fold, so
their scores compare row for row. A run is finished when metrics.json is there and oof.csv
holds rows of every fold in its `folds_trained`; an unfinished run shows its settings and how
many folds are done, with empty scores; a run folder that cannot be read gives a row marked
broken with the reason instead of stopping the table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from mixcls.blend import BLEND_FILE
from mixcls.config import ConfigError
from mixcls.data import DataError, prob_columns
from mixcls.folds import folds_fingerprint
from mixcls.metrics import cv_logloss
from mixcls.runs import RunError, RunFolder, read_json
from mixcls.sam import sam_label
from mixcls.tta import TTA_FILE

RUN_MARKERS = ("config.yaml", "folds.csv")
COLUMNS = ["name", "cv_accuracy", "cv_macro_f1", "cv_logloss", "model", "img_size", "loss", "mix",
           "optimizer", "lr", "epochs", "swa_epochs", "select_metric", "class_weights", "group_col", "tta", "tta_cv_accuracy", "seconds", "folds_fingerprint",
           "finished", "status"]
SCORES = ("cv_accuracy", "cv_macro_f1", "cv_logloss")
# With --against RUN: accuracy minus RUN's on the shared OOF rows, its paired SE, those rows.
AGAINST_COLUMNS = ["acc_diff", "diff_se", "shared_rows"]
# --sort KEY -> (column, ascending): best first for scores, fastest first for seconds.
SORT_KEYS = {"logloss": ("cv_logloss", True), "accuracy": ("cv_accuracy", False),
             "f1": ("cv_macro_f1", False), "name": ("name", True), "seconds": ("seconds", True)}
# What a damaged run folder raises while it is read; anything else is a bug and propagates.
READ_ERRORS = (RunError, DataError, ConfigError, ValueError, KeyError, OSError)


def is_run_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in RUN_MARKERS)


def find_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """Every run folder at or below each of `dirs`, sorted, each once; RunError for a missing dir."""
    found: set[Path] = set()
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise RunError(f"runs folder {folder} does not exist (or is not a folder)")
        candidates = [folder, *(p.parent for p in folder.rglob("config.yaml"))]
        found.update(p for p in candidates if is_run_folder(p))
    return sorted(found)


def run_row(run_dir: str | Path) -> dict[str, Any]:
    """One row of the table (the keys of COLUMNS, name = the folder's name); None where unknown.

    A folder that cannot be read gives finished=False and status "broken: <reason>".
    """
    run_dir = Path(run_dir)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(name=run_dir.name, finished=False)
    try:
        run = RunFolder.open(run_dir, require=RUN_MARKERS)
        row.update(_settings(run))
        row.update(_progress(run))
    except READ_ERRORS as exc:
        row.update(dict.fromkeys(SCORES), finished=False, status=f"broken: {_reason(exc)}")
    return row


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):  # str() of a KeyError is the bare key
        return f"metrics.json has no {exc.args[0]!r}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _settings(run: RunFolder) -> dict[str, Any]:
    """What the run was trained with, from config.yaml; a blend folder (its config.yaml is its
    first member's) shows its method and members instead, its scores being the nested ones."""
    if (run.path / BLEND_FILE).is_file():
        spec = read_json(run.path / BLEND_FILE)
        bias = spec.get("class_bias_metric")
        biased = f", class bias for {bias}" if bias not in (None, "none") else ""
        return {"model": f"blend:{spec.get('method')} of {len(spec.get('members', []))} runs{biased}"}
    cfg = run.config
    return {"model": cfg.model.name, "img_size": cfg.data.img_size, "loss": cfg.loss.name,
            "mix": cfg.mix.method, "optimizer": _optimizer(cfg), "lr": cfg.optim.lr,
            "epochs": cfg.train.epochs, "swa_epochs": cfg.train.swa_epochs,
            "select_metric": cfg.train.select_metric,
            "class_weights": cfg.train.class_weights, "group_col": cfg.data.group_col,
            **_applied_tta(run)}


def _optimizer(cfg) -> str:
    """The optimizer's name, and --sam's setting after it ("adamw, sam rho=0.05")."""
    if cfg.optim.sam == "none":
        return cfg.optim.name
    return f"{cfg.optim.name}, {sam_label(cfg.optim.sam, cfg.optim.sam_rho)}"


def _applied_tta(run: RunFolder) -> dict[str, Any]:
    """The setting `mixcls tta --apply` chose (e.g. "448px x4") and its nested CV accuracy."""
    if not (run.path / TTA_FILE).is_file():
        return {}
    spec = read_json(run.path / TTA_FILE)
    nested = spec.get("nested") if isinstance(spec, dict) else None
    return {"tta": spec.get("setting"),
            "tta_cv_accuracy": _number((nested or {}).get("accuracy"))}


def _progress(run: RunFolder) -> dict[str, Any]:
    """Scores, seconds, fingerprint and status: finished, or how far an unfinished run got."""
    metrics = run.metrics if (run.path / "metrics.json").is_file() else None
    fingerprint = (metrics or {}).get("folds_fingerprint") or _fingerprint_of(run)
    row = {"folds_fingerprint": fingerprint,
           "seconds": _number((metrics or {}).get("seconds"))}
    if metrics is None or not run.oof_path.is_file():
        done, chosen = _folds_done(run)
        return row | {"status": f"unfinished: {len(done)} of {len(chosen)} folds done"}
    oof = run.read_oof()
    trained = [int(f) for f in metrics.get("folds_trained", sorted(oof["fold"].unique()))]
    missing = sorted(set(trained) - set(oof["fold"].astype(int)))
    if missing:
        return row | {"status": f"unfinished: oof.csv has no rows of fold(s) "
                                f"{', '.join(map(str, missing))}"}
    logloss = metrics.get("cv_logloss")
    return row | {"cv_accuracy": _number(metrics["cv_accuracy"]),
                  "cv_macro_f1": _number(metrics["cv_macro_f1"]),
                  "cv_logloss": _number(logloss) if logloss is not None
                  else cv_logloss(oof["label"].to_numpy(),
                                  oof[prob_columns(len(run.classes))].to_numpy(np.float64)),
                  "finished": True, "status": f"finished ({len(trained)} folds)"}


def _folds_done(run: RunFolder) -> tuple[list[int], list[int]]:
    """(folds with their fold_K/oof.csv, folds the config trains) of a run still training."""
    train = run.config.train
    chosen = train.train_folds if train.train_folds is not None else list(range(train.folds))
    done = [f for f in chosen if (run.path / f"fold_{f}" / "oof.csv").is_file()]
    return done, list(chosen)


def _fingerprint_of(run: RunFolder) -> str:
    """folds_fingerprint of folds.csv's rows (for runs whose metrics.json does not record it)."""
    folds = run.read_folds()
    empty = (folds["image_id"] == "") | folds["fold"].isna()
    if empty.any():
        raise DataError(f"{run.path / 'folds.csv'}: empty image_id or fold in row(s) "
                        f"{', '.join(map(str, folds.index[empty][:5] + 2))}")
    return folds_fingerprint(folds["image_id"], folds["fold"])


def _number(value: Any) -> float | None:
    """A float, or None for a missing or non-finite value."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def paired_accuracy_difference(correct: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean of correct − reference, its standard error) over rows scored by both runs.

    Paired on the rows: the two runs judged the same images, so the SE is that of the per-row
    difference (std with n − 1 over √n), much smaller than either accuracy's own SE when the
    runs err on the same images. It counts the rows' sampling noise only, not how much a
    retrained run (another seed) would move.
    """
    d = correct.astype(np.float64) - reference.astype(np.float64)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else math.nan), math.nan
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def oof_correct(run_dir: str | Path) -> pd.Series:
    """image_id -> whether the run's OOF prediction of it is right."""
    oof = RunFolder.open(run_dir, require=RUN_MARKERS).read_oof()
    return pd.Series((oof["pred"] == oof["label"]).to_numpy(), index=oof["image_id"].to_numpy())


def paired_oof_difference(run_dir: str | Path, reference: pd.Series) -> tuple[float, float, int]:
    """(accuracy difference, paired SE, rows) of a run's OOF against a reference's oof_correct,
    over the image ids both scored."""
    correct = oof_correct(run_dir)
    shared = correct.index.intersection(reference.index)
    diff, se = paired_accuracy_difference(correct.loc[shared].to_numpy(),
                                          reference.loc[shared].to_numpy())
    return diff, se, len(shared)


def _against_columns(row: dict[str, Any], run_dir: Path, reference: dict[str, Any],
                     reference_correct: pd.Series) -> dict[str, Any]:
    """acc_diff, diff_se and shared_rows of a row against the reference run (None where the two
    did not validate on the same folds or the row is not a finished run)."""
    if not row["finished"] or row["folds_fingerprint"] != reference["folds_fingerprint"]:
        return dict.fromkeys(AGAINST_COLUMNS)
    diff, se, rows = paired_oof_difference(run_dir, reference_correct)
    return {"acc_diff": diff, "diff_se": _number(se), "shared_rows": rows}


def runs_table(dirs: Iterable[str | Path], *, sort: str = "logloss",
               against: str | Path | None = None) -> pd.DataFrame:
    """The table (COLUMNS) of every run folder under `dirs`, named by its path relative to the
    dir it was found under, sorted by `sort` (SORT_KEYS; rows without the score last).

    With `against` (a finished run folder), AGAINST_COLUMNS follow: each run's CV accuracy minus
    the reference's on the OOF rows both scored, with the paired standard error, for the runs
    on the reference's folds.
    """
    if sort not in SORT_KEYS:
        raise ValueError(f"unknown sort {sort!r}; use one of {', '.join(SORT_KEYS)}")
    reference, reference_correct = None, None
    if against is not None:  # checked before the table is read
        reference = run_row(against)
        if not reference["finished"]:
            raise RunError(f"--against {against}: not a finished run ({reference['status']})")
        reference_correct = oof_correct(Path(against))
    rows = []
    for folder in map(Path, dirs):
        for run_dir in find_runs([folder]):
            relative = run_dir.relative_to(folder).as_posix()
            row = run_row(run_dir) | {"name": relative if relative != "." else run_dir.name}
            if reference is not None:
                row |= _against_columns(row, run_dir, reference, reference_correct)
            rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS + (AGAINST_COLUMNS if against is not None else []))
    column, ascending = SORT_KEYS[sort]
    # Name breaks ties so that the order never depends on the file system's listing.
    table = table.sort_values([column, "name"], ascending=[ascending, True], na_position="last",
                              kind="mergesort")
    return table.reset_index(drop=True)


def format_runs_table(table: pd.DataFrame) -> str:
    """The table as aligned text: numbers right-aligned, '-' where a value is missing."""
    formats = {"cv_accuracy": "{:.4f}", "cv_macro_f1": "{:.4f}", "cv_logloss": "{:.4f}",
               "seconds": "{:.0f}", "img_size": "{:.0f}", "epochs": "{:.0f}", "lr": "{:.3g}",
               "tta_cv_accuracy": "{:.4f}", "acc_diff": "{:+.4f}", "diff_se": "{:.4f}", "shared_rows": "{:.0f}"}
    # status stays last (its text is not padded); the --against columns come before it
    columns = [c for c in COLUMNS if c != "status"] + \
        [c for c in AGAINST_COLUMNS if c in table.columns] + ["status"]
    cells = [[_cell(value, formats.get(column)) for column, value in row.items()]
             for row in table[columns].to_dict("records")]
    widths = [max([len(column), *(len(r[i]) for r in cells)]) for i, column in enumerate(columns)]
    right = {i for i, column in enumerate(columns) if column in formats}

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(parts).rstrip()

    # The last column (status) is not padded, so its rule stays as long as its header.
    rule = ["-" * w for w in widths[:-1]] + ["-" * len(columns[-1])]
    return "\n".join([line(columns), line(rule), *map(line, cells)])


def _cell(value: Any, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt.format(value) if fmt else str(value)
