"""Suspect labels from a run's out-of-fold probabilities (confident learning via cleanlab),
and cleaned training tables that never touch the labels validation is scored on.

The cleaned table keeps every row and both labels: `label` is what a fold trains on,
`label_given` what it is scored on, `keep` 0 excludes a row from training only, and `fold` is
the run's fold of the row, so a new run re-uses the folds instead of re-splitting. A row's OOF
probabilities came from the one model that did not train on it, so its suspicion is honest;
cleaning the validation rows too would raise CV without helping the test score. One indirect
path remains: the model that scored a training row of fold g was itself trained on fold g's
validation rows, so those labels can sway which training rows of fold g get cleaned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mixcls.data import (TRAIN_ONLY_FOLD, DataError, check_oof, prob_columns, read_image,
                         write_table_with_classes)
from mixcls.runs import RunFolder, atomic_save_figure, atomic_write_csv

# cleanlab's filter_by: how rows are judged label issues.
FILTER_METHODS = ("low_self_confidence", "low_normalized_margin", "prune_by_noise_rate",
                  "prune_by_class", "both", "confident_learning", "predicted_neq_given")
# The default: as many rows as confident learning estimates to be mislabelled
# (cleanlab.count.num_label_issues), taken where the OOF probability of the given label is
# lowest. On Fashion-MNIST with 20 % symmetric noise (benchmarks/noise.py) it flagged far fewer
# clean rows of confusable classes than prune_by_noise_rate, which takes each off-diagonal
# count of the confident joint by margin; docs/benchmarks.md has every filter's figures.
DEFAULT_METHOD = "low_self_confidence"
# cleanlab's label-quality scores (low = likely wrong): how suspects are ranked.
SCORE_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
POLICIES = ("drop", "relabel", "soft")
def _labels_and_probs(oof: pd.DataFrame, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int labels and (N, K) float64 probabilities, rows renormalised after CSV rounding."""
    labels = oof["label"].to_numpy(dtype=np.int64)
    probs = oof[prob_columns(num_classes)].to_numpy(dtype=np.float64)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def find_suspects(oof: pd.DataFrame, *, num_classes: int, method: str = DEFAULT_METHOD,
                  score: str = "self_confidence") -> pd.DataFrame:
    """Rows whose given label is likely wrong, worst first.

    `method` is cleanlab's filter (FILTER_METHODS), `score` its label-quality score
    (SCORE_METHODS, in [0, 1], low = likely wrong). Returns one row per suspect: image_id, fold,
    label_given, label_suggested (the most probable other class), prob_given, prob_suggested,
    quality.
    """
    if method not in FILTER_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(FILTER_METHODS)}")
    if score not in SCORE_METHODS:
        raise ValueError(f"unknown score {score!r}; use one of {', '.join(SCORE_METHODS)}")
    from cleanlab.filter import find_label_issues  # local: importing cleanlab takes ~2 s
    from cleanlab.rank import get_label_quality_scores

    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    # n_jobs=1: on 20k rows x 5 classes one process takes ~0.02 s and the worker pool ~0.05 s.
    issues = find_label_issues(labels, probs, filter_by=method, n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method=score)
    rows = np.flatnonzero(issues)
    rows = rows[np.argsort(quality[rows], kind="stable")]
    others = probs[rows].copy()
    others[np.arange(len(rows)), labels[rows]] = -np.inf
    suggested = others.argmax(axis=1)
    return pd.DataFrame({
        "image_id": oof["image_id"].to_numpy()[rows],
        "fold": oof["fold"].to_numpy(dtype=np.int64)[rows],
        "label_given": labels[rows],
        "label_suggested": suggested,
        "prob_given": probs[rows, labels[rows]],
        "prob_suggested": probs[rows, suggested],
        "quality": quality[rows],
    })


def estimate_noise_matrix(oof: pd.DataFrame, num_classes: int) -> np.ndarray:
    """(K, K) cleanlab's estimate of P(given = i | true = j) at [i, j]; columns sum to 1."""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities

    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    _, noise_matrix, _, _ = estimate_py_and_noise_matrices_from_probabilities(labels, probs)
    return noise_matrix


def summarize_class_pairs(oof: pd.DataFrame, suspects: pd.DataFrame, *,
                          num_classes: int) -> pd.DataFrame:
    """Which classes are confused with which: one row per (given, suggested) pair with
    n_suspects (flagged rows) and n_estimated (cleanlab's calibrated confident joint, i.e. the
    estimated count of rows given `label_given` whose true class is `label_suggested`),
    largest n_estimated first; pairs with neither are left out."""
    from cleanlab.count import estimate_joint

    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    joint = estimate_joint(labels, probs) * len(labels)
    flagged = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(flagged, (suspects["label_given"].to_numpy(dtype=np.int64),
                        suspects["label_suggested"].to_numpy(dtype=np.int64)), 1)
    given, true = np.nonzero(~np.eye(num_classes, dtype=bool))
    table = pd.DataFrame({"label_given": given, "label_suggested": true,
                          "n_suspects": flagged[given, true],
                          "n_estimated": joint[given, true]})
    table = table[(table["n_suspects"] > 0) | (table["n_estimated"] > 0.5)]
    return table.sort_values(["n_estimated", "n_suspects"], ascending=False,
                             kind="stable").reset_index(drop=True)


def select_actions(suspects: pd.DataFrame, *, n_rows: int, threshold: float = 0.0,
                   max_fraction: float = 0.2) -> pd.DataFrame:
    """The suspects to act on: OOF probability of the suggested class >= `threshold`, at most
    floor(max_fraction * n_rows) of them, worst quality first."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in [0, 1]")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction {max_fraction} must be in [0, 1]")
    confident = suspects[suspects["prob_suggested"] >= threshold]
    ranked = confident.sort_values("quality", kind="stable")
    return ranked.head(int(np.floor(max_fraction * n_rows)))


def clean_table(oof: pd.DataFrame, suspects: pd.DataFrame, *, num_classes: int, policy: str,
                threshold: float = 0.0, max_fraction: float = 0.2,
                soft_weight: float = 0.5) -> pd.DataFrame:
    """The training table after acting on `suspects` (from find_suspects on the same `oof`).

    One row per OOF row, in its order: image_id, label (int, to train on), label_given (int,
    untouched: validation is scored on it), fold, keep (0: not trained on, still validated),
    and for policy soft prob_0 … prob_{K-1} = (1 - soft_weight) one_hot(given) +
    soft_weight OOF probabilities on the acted rows, one_hot(given) elsewhere.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight {soft_weight} must be in [0, 1]")
    check_oof(oof, num_classes=num_classes)
    labels, probs = _labels_and_probs(oof, num_classes)
    acted = select_actions(suspects, n_rows=len(oof), threshold=threshold, max_fraction=max_fraction)
    rows = pd.Index(oof["image_id"]).get_indexer(acted["image_id"])
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} suspect(s) are not rows of the OOF table, "
                         f"e.g. {acted['image_id'].iloc[np.flatnonzero(rows < 0)[0]]!r}")
    table = pd.DataFrame({"image_id": oof["image_id"].to_numpy(), "label": labels.copy(),
                          "label_given": labels.copy(),
                          "fold": oof["fold"].to_numpy(dtype=np.int64),
                          "keep": np.ones(len(oof), dtype=np.int64)})
    if policy == "drop":
        table.loc[rows, "keep"] = 0
    elif policy == "relabel":
        table.loc[rows, "label"] = acted["label_suggested"].to_numpy(dtype=np.int64)
    else:
        soft = np.eye(num_classes)[labels]
        soft[rows] = (1.0 - soft_weight) * soft[rows] + soft_weight * probs[rows]
        table["label"] = soft.argmax(axis=1)
        table[prob_columns(num_classes)] = soft
    return table


# --- suspects and cleaned tables of a run folder -------------------------------------------------

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


def read_run_folds(run: RunFolder, oof: pd.DataFrame) -> np.ndarray:
    """(N,) the fold of each OOF row from RUN/folds.csv, which must agree with oof.csv."""
    path = run.path / "folds.csv"
    folds = run.read_folds()
    fold_of = folds.drop_duplicates("image_id").set_index("image_id")["fold"]
    validated = fold_of[fold_of != TRAIN_ONLY_FOLD]  # train-only rows are never in oof.csv
    unscored = validated.index.difference(pd.Index(oof["image_id"]))
    if len(unscored):
        # A cleaned table must hold every training row, and rows outside oof.csv have neither
        # OOF probabilities nor a label here; they come from folds not trained (--train-folds).
        raise DataError(f"{path}: {len(unscored)} of {len(validated)} images have no OOF "
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


def train_only_table(run: RunFolder, *, num_classes: int, soft: bool) -> pd.DataFrame:
    """The run's train-only rows (fold -1 in folds.csv) as rows of a cleaned table: their
    labels as the run's training table gives them (they have no OOF row to act on), fold -1,
    keep 1, and for a soft table their one-hot targets."""
    from mixcls.data import load_train_table

    folds = run.read_folds()
    ids = folds["image_id"][folds["fold"] == TRAIN_ONLY_FOLD].tolist()
    columns = ["image_id", "label", "label_given", "fold", "keep"] + \
        (prob_columns(num_classes) if soft else [])
    if not ids:
        return pd.DataFrame(columns=columns)
    cfg = run.config.data
    source = load_train_table(cfg.data, csv=cfg.csv, images=cfg.images, id_col=cfg.id_col,
                              label_col=cfg.label_col, check_images="header",
                              classes=run.classes).frame.set_index("image_id")
    gone = [i for i in ids if i not in source.index]
    if gone:
        raise DataError(f"{run.path / 'folds.csv'}: {len(gone)} train-only image(s) are not in "
                        f"the run's training table any more, first {gone[0]!r}")
    labels = source.loc[ids, "label"].to_numpy(dtype=np.int64)
    table = pd.DataFrame({"image_id": ids, "label": labels, "label_given": labels,
                          "fold": TRAIN_ONLY_FOLD, "keep": 1})
    if soft:
        table[prob_columns(num_classes)] = np.eye(num_classes)[labels]
    return table[columns]


def read_run_groups(run: RunFolder, oof: pd.DataFrame) -> np.ndarray:
    """(N,) the group of each OOF row from a grouped run's folds.csv (read_run_folds checked the
    ids); DataError when folds.csv has no group column (a run trained before groups were kept)."""
    folds = run.read_folds()
    if "group" not in folds.columns:
        raise DataError(f"{run.path / 'folds.csv'}: the run was grouped by "
                        f"{run.config.data.group_col!r}, but its folds.csv has no group column; "
                        "train the run again to clean it with its groups")
    group_of = folds.drop_duplicates("image_id").set_index("image_id")["group"]
    return oof["image_id"].map(group_of).to_numpy(dtype=object)


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


# --- the files of `mixcls noise` and `mixcls clean` --------------------------------------------

def write_suspects(run_dir: str | Path, out: str | Path, *, gallery: str | Path | None = None,
                   max_rows: int | None = None, method: str = DEFAULT_METHOD,
                   score: str = "self_confidence") -> SuspectResult:
    """Find the run's suspect labels; write them (worst first) to `out`, the gallery if asked.

    Every input is read and checked before the first file is written.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows {max_rows} must be >= 1")
    run = RunFolder.open(run_dir)
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
        try:
            paths = run.find_images(shown["image_id"].tolist())
        except DataError as exc:
            raise DataError(f"gallery: {exc}") from None
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
    atomic_write_csv(out, table)
    if figure is not None:
        atomic_save_figure(figure, gallery)
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
    label_given, fold (from RUN/folds.csv), keep, prob_0 … prob_{K-1} for policy soft, and the
    run's `--group-col` column (its groups, from RUN/folds.csv) when it was grouped, so the
    cleaned table trains with the same --group-col. The run's train-only rows follow, untouched,
    with fold -1.
    """
    run = RunFolder.open(run_dir)
    oof, classes = run.read_oof(), run.classes
    folds = read_run_folds(run, oof)
    suspects = find_suspects(oof, num_classes=len(classes), method=method, score=score)
    table = clean_table(oof, suspects, num_classes=len(classes), policy=policy, threshold=threshold,
                        max_fraction=max_fraction, soft_weight=soft_weight)
    extra = train_only_table(run, num_classes=len(classes), soft=policy == "soft")
    n_acted = len(select_actions(suspects, n_rows=len(oof), threshold=threshold,
                                 max_fraction=max_fraction))
    integer = run.integer_labels
    # Labels keep the run's own format (integers stay integers, so a retrained run still writes
    # the competition's submission format), and the run's class list goes beside the table, so
    # the trainer reads the classes back in the run's order wherever the table is written.
    values = np.arange(len(classes)) if integer else np.asarray(classes, dtype=object)
    table = table.assign(fold=folds)
    group_col = run.config.data.group_col
    if group_col is not None:
        if group_col in table.columns:
            raise DataError(f"the run {run_dir} was grouped by a column named {group_col!r}, a "
                            f"column the cleaned table has already ({', '.join(table.columns)})")
        table[group_col] = read_run_groups(run, oof)
        extra[group_col] = read_run_groups(run, extra)
    # the train-only rows last, with fold -1: the retrained run trains on them in every fold
    table = pd.concat([table, extra], ignore_index=True) if len(extra) else table
    table = table.assign(label=values[table["label"].to_numpy(dtype=np.int64)],
                         label_given=values[table["label_given"].to_numpy(dtype=np.int64)])
    write_table_with_classes(out, table, classes, source=f"the run {run_dir}", what="cleaned table")
    return table, n_acted
