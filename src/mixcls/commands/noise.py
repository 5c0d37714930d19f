"""`mixcls noise` (suspect labels of a run) and `mixcls clean` (a cleaned training table).

`write_suspects` and `write_clean_table` do the work without argparse, for tests and the report.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mixcls import runs
from mixcls.data import CLASS_FILES, DataError, class_names_in_order, read_class_names, read_image
from mixcls.noise import (DEFAULT_METHOD, FILTER_METHODS, POLICIES, SCORE_METHODS, clean_table,
                          estimate_noise_matrix, find_suspects, select_actions,
                          summarize_class_pairs)

GALLERY_SIZE = 16
GALLERY_COLUMNS = 4


@dataclass
class SuspectResult:
    """What `write_suspects` found: suspects (with class names), class pairs, noise matrix."""

    suspects: pd.DataFrame
    pairs: pd.DataFrame
    noise_matrix: np.ndarray
    classes: list[str]
    n_rows: int
    n_suspects: int  # before --max-rows


def read_run_folds(run_dir: str | Path, oof: pd.DataFrame) -> np.ndarray:
    """(N,) the fold of each OOF row from RUN/folds.csv, which must agree with oof.csv."""
    path = Path(run_dir) / "folds.csv"
    if not path.is_file():
        raise runs.RunError(f"{path} does not exist")
    folds = pd.read_csv(path, dtype={"image_id": str})
    if not {"image_id", "fold"} <= set(folds.columns):
        raise DataError(f"{path}: expected columns image_id, fold; found {', '.join(folds.columns)}")
    fold_of = folds.drop_duplicates("image_id").set_index("image_id")["fold"]
    unscored = fold_of.index.difference(pd.Index(oof["image_id"]))
    if len(unscored):
        # A cleaned table must hold every training row, and rows outside oof.csv have neither
        # OOF probabilities nor a label here; they come from folds not trained (--train-folds).
        raise DataError(f"{path}: {len(unscored)} of {len(fold_of)} images have no OOF "
                        f"probabilities in oof.csv (e.g. {unscored[0]!r}); train every fold "
                        "of the run before cleaning")
    matched = oof["image_id"].map(fold_of)
    missing = oof["image_id"][matched.isna()]
    if len(missing):
        raise DataError(f"{path}: {len(missing)} image id(s) of oof.csv are missing, "
                        f"e.g. {missing.iloc[0]!r}")
    differ = np.flatnonzero(matched.to_numpy(dtype=np.int64) != oof["fold"].to_numpy(dtype=np.int64))
    if len(differ):
        raise DataError(f"{path}: folds disagree with oof.csv for {len(differ)} image(s), "
                        f"e.g. {oof['image_id'].iat[differ[0]]!r}")
    return matched.to_numpy(dtype=np.int64)


def resolve_run_images(run: runs.RunFolder, image_ids: list[str]) -> list[Path]:
    """Image files of `image_ids` in the run's training images folder (RunFolder.find_images_dir)."""
    images_dir = run.find_images_dir()
    paths = [images_dir / image_id for image_id in image_ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"gallery: {len(missing)} image(s) not found, e.g. {missing[0]} "
                        f"(images folder of the run {run.path}: {images_dir})")
    return paths


def plot_suspect_gallery(images: list[np.ndarray], titles: list[str]):
    """A matplotlib Figure: a grid of images, each titled "given → suggested (p)"."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    n = max(len(images), 1)
    cols = min(GALLERY_COLUMNS, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    if not images:
        axes[0, 0].text(0.5, 0.5, "no suspect labels found", ha="center", va="center")
    return fig


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _named(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    names = np.asarray(classes, dtype=object)
    out = frame.copy()
    out.insert(2, "given", names[frame["label_given"].to_numpy()])
    out.insert(3, "suggested", names[frame["label_suggested"].to_numpy()])
    return out


def write_suspects(run_dir: str | Path, out: str | Path, *, gallery: str | Path | None = None,
                   max_rows: int | None = None, method: str = DEFAULT_METHOD,
                   score: str = "self_confidence") -> SuspectResult:
    """Find the run's suspect labels; write them (worst first) to `out`, the gallery if asked.

    Every input is read and checked before the first file is written.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows {max_rows} must be >= 1")
    run = runs.RunFolder.open(run_dir)
    oof, classes = run.read_oof(), run.classes
    k = len(classes)
    suspects = find_suspects(oof, num_classes=k, method=method, score=score)
    pairs = _named(summarize_class_pairs(oof, suspects, num_classes=k), classes)
    noise_matrix = estimate_noise_matrix(oof, k)
    table = _named(suspects, classes).head(max_rows)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    figure = None
    if gallery is not None:
        shown = table.head(GALLERY_SIZE)
        paths = resolve_run_images(run, shown["image_id"].tolist())
        try:
            images = [read_image(p) for p in paths]
        except OSError as exc:
            raise DataError(f"gallery: cannot read an image: {exc}") from None
        titles = [f"{_short(r.given)}\n→ {_short(r.suggested)} ({r.prob_suggested:.2f})\n"
                  f"{_short(r.image_id)}" for r in shown.itertuples()]
        figure = plot_suspect_gallery(images, titles)
        kinds = figure.canvas.get_supported_filetypes()
        if Path(gallery).suffix.lstrip(".").lower() not in kinds:
            raise ValueError(f"gallery {gallery}: use one of the suffixes .{', .'.join(sorted(kinds))}")
    runs.atomic_write_csv(out, table)
    if figure is not None:
        runs.atomic_save_figure(figure, gallery)
    return SuspectResult(table, pairs, noise_matrix, classes, len(oof), len(suspects))


def format_suspect_summary(result: SuspectResult, *, top_pairs: int = 10) -> str:
    """Text for the terminal: counts, the most confused class pairs, the noise matrix."""
    share = result.n_suspects / result.n_rows
    lines = [f"suspects: {result.n_suspects} of {result.n_rows} rows ({share:.1%}); "
             f"{len(result.suspects)} written",
             "class pairs (given -> suggested: flagged rows, estimated rows):"]
    for r in result.pairs.head(top_pairs).itertuples():
        lines.append(f"  {r.given} -> {r.suggested}: {r.n_suspects} flagged, {r.n_estimated:.1f} estimated")
    if result.pairs.empty:
        lines.append("  none")
    lines.append("estimated noise matrix P(given = row | true = column):")
    lines.append(" " * 28 + "".join(f"{k:>7}" for k in range(len(result.classes))))
    for k, (name, row) in enumerate(zip(result.classes, result.noise_matrix)):
        lines.append(f"  {k:>2} {_short(name, 22):<23}" + "".join(f"{v:7.3f}" for v in row))
    return "\n".join(lines)


def write_clean_table(run_dir: str | Path, out: str | Path, *, policy: str,
                      threshold: float = 0.0, max_fraction: float = 0.2, soft_weight: float = 0.5,
                      method: str = DEFAULT_METHOD,
                      score: str = "self_confidence") -> tuple[pd.DataFrame, int]:
    """Write the cleaned training table of the run (labels as class names) to `out`.

    Returns (the table as written, number of rows acted on). Columns: image_id, label,
    label_given, fold (from RUN/folds.csv), keep, and prob_0 … prob_{K-1} for policy soft.
    """
    run = runs.RunFolder.open(run_dir)
    oof, classes = run.read_oof(), run.classes
    folds = read_run_folds(run.path, oof)
    suspects = find_suspects(oof, num_classes=len(classes), method=method, score=score)
    table = clean_table(oof, suspects, num_classes=len(classes), policy=policy, threshold=threshold,
                        max_fraction=max_fraction, soft_weight=soft_weight)
    n_acted = len(select_actions(suspects, n_rows=len(oof), threshold=threshold,
                                 max_fraction=max_fraction))
    integer = run.integer_labels
    # Labels keep the run's own format (integers stay integers, so a retrained run still writes
    # the competition's submission format), and the run's class list goes beside the table, so
    # the trainer reads the classes back in the run's order wherever the table is written.
    values = np.arange(len(classes)) if integer else np.asarray(classes, dtype=object)
    table = table.assign(label=values[table["label"].to_numpy()],
                         label_given=values[table["label_given"].to_numpy()], fold=folds)
    out = Path(out)
    existing = [out.parent / name for name in CLASS_FILES if (out.parent / name).is_file()]
    if existing and class_names_in_order(read_class_names(out.parent)) != list(classes):
        raise DataError(f"{existing[0]} names other classes than the run {run_dir} "
                        f"({len(classes)} classes); write the cleaned table to another folder")
    runs.atomic_write_csv(out, table)
    if not existing:
        runs.atomic_write_json(out.parent / "classes.json", list(classes))
    return table, n_acted


# ----- argparse -----

def _add_suspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder with oof.csv and classes.json")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=FILTER_METHODS,
                   help="cleanlab filter deciding which labels are issues (default: the estimated "
                        "number of issues, lowest OOF probability of the given label first)")
    p.add_argument("--score", default="self_confidence", choices=SCORE_METHODS,
                   help="cleanlab label-quality score ranking the suspects")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "noise", help="find likely label errors from a run's out-of-fold probabilities",
        description="Confident learning (cleanlab) on RUN/oof.csv: a CSV of suspect labels, "
                    "worst first, a summary of confused class pairs and the noise matrix.")
    _add_suspect_options(p)
    p.add_argument("--out", required=True, help="suspects CSV to write")
    p.add_argument("--gallery", help="also draw the top suspects into this image (png, jpg, svg)")
    p.add_argument("--max-rows", type=int, help="write at most this many suspects")
    p.set_defaults(func=run_noise)

    p = subparsers.add_parser(
        "clean", help="write a cleaned training table from a run's suspect labels",
        description="Drop, relabel or soften suspect labels for TRAINING only: the table keeps "
                    "every row, the given label (validation is scored on it) and the run's folds.")
    _add_suspect_options(p)
    p.add_argument("--policy", required=True, choices=POLICIES,
                   help="drop: keep=0; relabel: train on the suggested class; "
                        "soft: train on a blend of the given label and the OOF probabilities")
    p.add_argument("--out", required=True, help="cleaned CSV to write")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="act only on suspects whose suggested class has OOF probability >= this")
    p.add_argument("--max-fraction", type=float, default=0.2,
                   help="act on at most this fraction of all rows, worst first")
    p.add_argument("--soft-weight", type=float, default=0.5,
                   help="policy soft: weight of the OOF probabilities in the blend")
    p.set_defaults(func=run_clean)


def run_noise(args: argparse.Namespace) -> int:
    result = write_suspects(args.run, args.out, gallery=args.gallery, max_rows=args.max_rows,
                            method=args.method, score=args.score)
    print(format_suspect_summary(result))
    print(f"wrote {args.out}" + (f" and {args.gallery}" if args.gallery else ""))
    return 0


def run_clean(args: argparse.Namespace) -> int:
    table, n_acted = write_clean_table(args.run, args.out, policy=args.policy,
                                       threshold=args.threshold, max_fraction=args.max_fraction,
                                       soft_weight=args.soft_weight, method=args.method,
                                       score=args.score)
    verb = {"drop": "excluded from training", "relabel": "relabelled for training",
            "soft": "given soft targets for training"}[args.policy]
    print(f"clean ({args.policy}): {n_acted} of {len(table)} rows {verb}; "
          f"validation is still scored on label_given for every row")
    print(f"wrote {args.out}")
    return 0
