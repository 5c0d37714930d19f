"""The run report: one self-contained HTML page per run folder.

`write_report(run_dir)` reads the run folder (docs/architecture.md) and writes RUN/report.html:
settings, cross-validation scores, learning curves, the confusion matrix, per-class accuracy,
the most confidently wrong out-of-fold images, a few mixed batches (runs that mix) and the
suspect labels of `mixcls noise` (when RUN/suspects.csv or RUN/suspects.png exist).

The page has no external references: figures and images are base64 PNG data URIs, the CSS is
inline and there is no script, so it can be mailed, attached to a notebook or opened offline.
Every string from the run (class names, image ids, config values) is HTML-escaped. Every input is
read and checked before the page is written; sections whose inputs are absent (history.csv,
the images folder) are replaced by a short note instead of failing the report.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from mixcls import __version__, runs
from mixcls.data import DataError, prob_columns, read_csv, read_image
from mixcls.metrics import best_epoch_row
from mixcls.sam import sam_label
from mixcls.tta import GRID_FILE, TTA_FILE

REPORT_NAME = "report.html"
SUSPECTS_CSV = "suspects.csv"
SUSPECTS_PNG = "suspects.png"
SUSPECT_COLUMNS = ("image_id", "given", "suggested", "prob_suggested")

N_WRONG = 12             # confidently wrong OOF images shown
N_SUSPECTS = 12          # suspect rows shown (table, or thumbnails without a gallery PNG)
MIX_BATCHES = 2          # mixed batches shown
MIX_BATCH_SIZE = 6
MAX_ANNOTATED = 20       # confusion matrices with more classes get colours only, no counts
MAX_TICK_LABELS = 40     # ... and with more than this, class indices instead of names
MAX_CLASS_ROWS = 30      # per-class table: beyond this many classes, only the worst
THUMB_SIDE = 160         # larger images are shrunk to this side before embedding
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Settings shown in the summary: (label, config key).
CONFIG_SUMMARY = [("model", "model"), ("img_size", "img_size"), ("epochs", "epochs"),
                  ("batch", "batch_size"), ("accum", "accum_steps"), ("lr", "lr"),
                  ("optimizer", "optimizer"), ("weight decay", "weight_decay"),
                  ("scheduler", "scheduler"), ("warm-up epochs", "warmup_epochs"), ("amp", "amp"),
                  ("mix", "mix"), ("loss", "loss"), ("folds", "folds"), ("preset", "preset"),
                  ("ema", "ema"), ("seed", "seed")]
MIX_DETAILS = [("mix_alpha", "mix alpha"), ("mix_prob", "mix prob"), ("mix_mode", "mix mode"),
               ("mix_off_epochs", "mix off epochs")]


class Raw(str):
    """HTML built here from escaped parts; `_cell` inserts it as is."""


@dataclass
class RunFiles:
    """What the report reads from a run folder, checked."""

    run_dir: Path
    config: dict[str, Any]
    classes: list[str]
    metrics: dict[str, Any]
    oof: pd.DataFrame
    histories: dict[int, pd.DataFrame] = field(default_factory=dict)
    images_dir: Path | None = None
    suspects: pd.DataFrame | None = None
    suspects_png: bytes | None = None
    tta_grid: pd.DataFrame | None = None   # RUN/tta_grid.csv (mixcls tta)
    tta: dict[str, Any] | None = None      # RUN/tta.json (mixcls tta --apply)
    train_only_rows: int = 0               # dataset.json: rows trained on in every fold, never validated


# ---------------------------------------------------------------- reading the run

def read_run(run_dir: str | Path) -> RunFiles:
    """Read and check the files of a run folder; RunError/DataError/ConfigError name the bad file."""
    run = runs.RunFolder.open(run_dir, require=("metrics.json", "oof.csv"))
    classes = run.classes
    _check_metrics(run.metrics, len(classes), run.path / "metrics.json")
    oof = run.read_oof()
    return RunFiles(run_dir=run.path, config=run.flat_config, classes=classes, metrics=run.metrics,
                    oof=oof, histories=_read_histories(run), images_dir=run.images_dir,
                    suspects=_read_suspects(run.path / SUSPECTS_CSV),
                    suspects_png=_read_png(run.path / SUSPECTS_PNG),
                    tta_grid=_read_tta_grid(run.path / GRID_FILE),
                    tta=runs.read_json(run.path / TTA_FILE) if (run.path / TTA_FILE).is_file() else None,
                    train_only_rows=int(run.dataset.get("train_only_rows") or 0))


def _read_tta_grid(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = read_csv(path)
    missing = [c for c in TTA_GRID_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (write it with mixcls tta "
                        f"--run {path.parent})")
    return frame


def _check_metrics(metrics: Any, num_classes: int, path: Path) -> None:
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [k for k in ("cv_accuracy", "cv_macro_f1", "fold_accuracy", "confusion") if k not in metrics]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    if not isinstance(metrics["fold_accuracy"], dict):
        raise DataError(f"{path}: fold_accuracy must map fold numbers to accuracies")
    shape = np.asarray(metrics["confusion"]).shape
    if shape != (num_classes, num_classes):
        raise DataError(f"{path}: confusion has shape {shape}, expected ({num_classes}, {num_classes}) "
                        "for the classes of classes.json")


def _read_histories(run: runs.RunFolder) -> dict[int, pd.DataFrame]:
    """{fold: history} for every RUN/fold_K/history.csv that has an epoch column and rows."""
    histories = {}
    for fold, folder in run.fold_dirs.items():
        path = folder / "history.csv"
        if not path.is_file():
            continue
        frame = read_csv(path)
        if "epoch" in frame.columns and len(frame):
            histories[fold] = frame
    return histories


def _read_suspects(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = read_csv(path, dtype={"image_id": str, "given": str, "suggested": str})
    missing = [c for c in SUSPECT_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (write it with mixcls noise "
                        f"--out {path})")
    return frame


def _read_png(path: Path) -> bytes | None:
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise DataError(f"{path} is not a PNG file (write the gallery with --gallery {path})")
    return data


# ---------------------------------------------------------------- pictures

def figure_to_data_uri(fig: Any, *, dpi: int = 100) -> str:
    """A matplotlib Figure as a data:image/png;base64 URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return png_data_uri(buffer.getvalue())


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_to_data_uri(image: np.ndarray, *, max_side: int = THUMB_SIDE) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI, shrunk to `max_side` when larger."""
    picture = Image.fromarray(image)
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return png_data_uri(buffer.getvalue())


def plot_learning_curves(histories: dict[int, pd.DataFrame]):
    """Loss, accuracy and learning rate against epoch, one colour per fold.

    Solid lines are validation, dashed ones training (where history.csv has them).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12.5, 3.3), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("loss", ["valid_loss", "train_loss"]), ("accuracy", ["valid_accuracy", "train_accuracy"]),
              ("learning rate", ["lr"])]
    colours = {fold: f"C{i % 10}" for i, fold in enumerate(histories)}
    for ax, (title, columns) in zip(axes, panels):
        for fold, frame in histories.items():
            for column in (c for c in columns if c in frame.columns):
                style = "--" if column.startswith("train") else "-"
                ax.plot(frame["epoch"], frame[column], style, color=colours[fold], marker=".")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        _integer_epochs(ax, histories)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    # One legend for the figure: a colour per fold, a line style per split.
    handles = [Line2D([], [], color=c, marker=".", label=f"fold {fold}") for fold, c in colours.items()]
    handles += [Line2D([], [], color="grey", ls="-", label="validation"),
                Line2D([], [], color="grey", ls="--", label="training")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _integer_epochs(ax: Any, histories: dict[int, pd.DataFrame]) -> None:
    """Whole-epoch ticks: every epoch for short runs, a few integers for long ones."""
    from matplotlib.ticker import MaxNLocator

    last = max(int(frame["epoch"].max()) for frame in histories.values())
    if last <= 15:
        ax.set_xticks(range(1, last + 1))
        ax.set_xlim(0.5, last + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_confusion(confusion: np.ndarray, classes: list[str], *, max_annotated: int = MAX_ANNOTATED):
    """Heat map of a (K, K) confusion matrix (rows: given label, columns: prediction).

    Colour is the share of the row, so rare classes show as clearly as common ones; each cell is
    annotated with its count when K <= `max_annotated` (beyond, the numbers would not be legible).
    """
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = float(np.clip(1.6 + 0.5 * k, 4.0, 11.0))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ticks, names = _confusion_ticks(classes)
    slanted = k > 3 and max(len(n) for n in names) > 3  # long names would overlap side by side
    ax.set_xticks(ticks, names, rotation=45 if slanted else 0, ha="right" if slanted else "center",
                  fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("given label")
    if k <= max_annotated:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=9 if k <= 10 else 7,
                        color="white" if share[i, j] > 0.55 else "#1f2933")
    fig.tight_layout()
    return fig


def _confusion_ticks(classes: list[str]) -> tuple[list[int], list[str]]:
    k = len(classes)
    if k <= MAX_TICK_LABELS:
        return list(range(k)), [_short(name, 18) for name in classes]
    step = math.ceil(k / 20)
    ticks = list(range(0, k, step))
    return ticks, [str(t) for t in ticks]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------- tables and cards

def _cell(value: Any) -> str:
    if isinstance(value, Raw):
        return value
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], *, table_id: str | None = None,
           numeric: frozenset[int] = frozenset()) -> str:
    """An HTML table; every cell is escaped unless it is `Raw`; `numeric` columns align right."""
    def row_html(cells: list[Any], tag: str) -> str:
        parts = [f'<{tag}{" class=num" if i in numeric else ""}>{_cell(c)}</{tag}>'
                 for i, c in enumerate(cells)]
        return "<tr>" + "".join(parts) + "</tr>"

    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    body = "\n".join(row_html(r, "td") for r in rows)
    return (f'<div class="scroll"><table{ident}><thead>{row_html(header, "th")}</thead>\n'
            f"<tbody>\n{body}\n</tbody></table></div>")


def _card(uri: str | None, lines: list[str], *, missing: str = "") -> str:
    """One image with its caption lines (escaped here); `missing` replaces an absent image."""
    if uri is None:
        picture = f'<div class="noimg">{html.escape(missing)}</div>'
    else:
        picture = f'<img src="{uri}" alt="{html.escape(lines[0])}">'
    caption = "".join(f"<span>{html.escape(line)}</span>" for line in lines)
    return f'<figure class="card">{picture}<figcaption>{caption}</figcaption></figure>'


def _section(anchor: str, title: str, body: str, *, intro: str = "") -> str:
    intro_html = f'<p class="intro">{html.escape(intro)}</p>' if intro else ""
    return (f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{intro_html}\n{body}\n</section>')


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _thumbnail(images_dir: Path | None, image_id: str) -> tuple[str | None, str]:
    """(PNG data URI or None, why it is missing) of one training image."""
    if images_dir is None:
        return None, "images folder not found"
    path = images_dir / image_id
    try:
        return image_to_data_uri(read_image(path)), ""
    except (OSError, ValueError):
        return None, f"cannot read {image_id}"


# ---------------------------------------------------------------- sections

def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _trained_folds(run: RunFiles) -> list[int]:
    return sorted(int(k) for k in run.metrics["fold_accuracy"])


def _section_summary(run: RunFiles) -> str:
    """The headline numbers, above everything else."""
    m = run.metrics
    n_folds = int(run.config.get("folds") or len(m["fold_accuracy"]))
    tiles = [("CV accuracy", f"{m['cv_accuracy']:.4f}"), ("CV macro F1", f"{m['cv_macro_f1']:.4f}")]
    if m.get("holdout_accuracy") is not None:
        tiles.append(("holdout accuracy", f"{m['holdout_accuracy']:.4f}"))
    tiles += [("OOF images", str(len(run.oof))), ("classes", str(len(run.classes))),
              ("folds trained", f"{len(_trained_folds(run))} of {n_folds}")]
    if m.get("seconds") is not None:
        tiles.append(("training time", _duration(float(m["seconds"]))))
    body = "".join(f'<div class="tile"><div class="value">{html.escape(v)}</div>'
                   f'<div class="label">{html.escape(k)}</div></div>' for k, v in tiles)
    return f'<div class="tiles">{body}</div>'


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _config_items(cfg: dict[str, Any], metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) of the settings worth a glance, in CONFIG_SUMMARY order."""
    values = dict(cfg)
    if values.get("batch_size") == "auto" and metrics.get("batch_size") is not None:
        # metrics.json holds the micro-batch and accumulation that --batch-size auto chose.
        values["accum_steps"] = metrics.get("accum_steps", values.get("accum_steps"))
        values["batch_size"] = metrics["batch_size"]
    items = []
    for label, key in CONFIG_SUMMARY:
        if key in values:
            items.append((label, values[key]))
        if key == "accum_steps" and isinstance(values.get("batch_size"), int):
            items.append(("effective batch", values["batch_size"] * int(values.get("accum_steps") or 1)))
    if str(values.get("mix", "none")) != "none":
        items += [(label, values[key]) for key, label in MIX_DETAILS if key in values]
    if values.get("smoothing"):
        items.append(("label smoothing", values["smoothing"]))
    if values.get("train_folds") is not None:
        items.append(("train folds", values["train_folds"]))
    if values.get("group_col"):  # grouped folds: this CV and an ungrouped run's differ in kind
        items.append(("folds grouped by", values["group_col"]))
    if values.get("train_only_col"):  # those rows trained every fold and are not in the CV
        items.append(("train-only rows flagged by", values["train_only_col"]))
    for key, label in (("drop_rate", "dropout"), ("drop_path_rate", "drop path")):
        if values.get(key):
            items.append((label, values[key]))
    if values.get("class_weights", "none") != "none":
        items.append(("class weights", values["class_weights"]))
    if values.get("sam", "none") != "none":
        items.append(("sharpness-aware minimization", sam_label(values["sam"], values.get("sam_rho"))))
    if values.get("swa_epochs"):
        at = f" at lr {values['swa_lr']:g}" if values.get("swa_lr") is not None else ""
        n = int(values["swa_epochs"])
        items.append(("weights averaged (SWA)", f"last {n} epoch{'s' if n != 1 else ''}{at}"))
    if values.get("select_metric", "accuracy") != "accuracy":
        items.append(("best epoch by", f"valid {values['select_metric']}"))
    return items


def _section_config(run: RunFiles) -> str:
    items = _config_items(run.config, run.metrics)
    body = "".join(f"<div><dt>{html.escape(k)}</dt><dd>{html.escape(_fmt(v))}</dd></div>" for k, v in items)
    return _section("config", "Settings", f'<dl class="kv">{body}</dl>',
                    intro="From config.yaml; the whole resolved config is in the run folder.")


def _fold_rows(run: RunFiles) -> list[list[Any]]:
    counts = run.oof.groupby("fold").size()
    n_folds = int(run.config.get("folds") or 0)
    folds = sorted(set(range(n_folds)) | set(_trained_folds(run)))
    rows = []
    for fold in folds:
        accuracy = run.metrics["fold_accuracy"].get(str(fold))
        if accuracy is None:
            rows.append([f"fold {fold}", "—", "not trained", "—", "—", "—"])
            continue
        history = run.histories.get(fold)
        best_epoch, epochs, seconds = "—", "—", "—"
        best = None if history is None else best_epoch_row(history, _select_metric(run))
        if best is not None:
            best_epoch, epochs = int(best["epoch"]), len(history)
            swa = int(run.config.get("swa_epochs") or 0)
            if swa:  # the fold's model is the average of its last epochs, not one epoch
                best_epoch = f"SWA {epochs - swa + 1}–{epochs}"
            if "seconds" in history.columns:
                seconds = _duration(float(history["seconds"].sum()))
        rows.append([f"fold {fold}", int(counts.get(fold, 0)), float(accuracy), best_epoch, epochs, seconds])
    return rows


def _select_metric(run: RunFiles) -> str:
    """The run's --select-metric (accuracy for a run made before it existed)."""
    return str(run.config.get("select_metric") or "accuracy")


def _section_cv(run: RunFiles) -> str:
    m = run.metrics
    folds = _table(["fold", "OOF rows", "accuracy", "best epoch", "epochs run", "train time"],
                   _fold_rows(run), table_id="cv-folds", numeric=frozenset({1, 2, 3, 4, 5}))
    summary = [["CV accuracy", float(m["cv_accuracy"]), f"{len(run.oof)} OOF rows"],
               ["CV macro F1", float(m["cv_macro_f1"]), "unweighted mean of the per-class F1"]]
    if m.get("holdout_accuracy") is not None:
        detail = f"{m.get('holdout_rows', '?')} held-out images"
        if m.get("holdout_tta"):
            detail += f", {m['holdout_tta']} TTA view(s)"
        summary.append(["holdout accuracy", float(m["holdout_accuracy"]), detail])
    if run.train_only_rows:
        summary.append(["train-only rows", run.train_only_rows,
                        "trained on in every fold, validated in none: not in the CV"])
    overall = _table(["metric", "value", ""], summary, table_id="cv-summary", numeric=frozenset({1}))
    body = f'<div class="row"><div>{folds}</div><div>{overall}</div></div>'
    return _section("cv", "Cross-validation", body,
                    intro="Each fold is scored by the model that never trained on it (its best "
                          f"epoch by valid {_select_metric(run)}); "
                          "CV pools the out-of-fold predictions of all trained folds.")


def _section_curves(run: RunFiles) -> str:
    if not run.histories:
        return _section("curves", "Learning curves", _note("No fold_K/history.csv in the run folder."))
    uri = figure_to_data_uri(plot_learning_curves(run.histories))
    missing = [f for f in _trained_folds(run) if f not in run.histories]
    extra = _note(f"No history for fold(s) {', '.join(map(str, missing))}.") if missing else ""
    return _section("curves", "Learning curves",
                    f'<img class="wide" src="{uri}" alt="learning curves">{extra}',
                    intro="Solid: validation; dashed: training (on mixed batches when mixing).")


def _class_rows(run: RunFiles) -> list[list[Any]]:
    confusion = np.asarray(run.metrics["confusion"], dtype=np.int64)
    given = confusion.sum(axis=1)
    stored = run.metrics.get("class_accuracy") or {}
    rows = []
    for k, name in enumerate(run.classes):
        accuracy = stored.get(name, confusion[k, k] / given[k] if given[k] else None)
        off = confusion[k].copy()
        off[k] = -1
        worst = int(off.argmax())
        confused = f"{run.classes[worst]} ({off[worst]})" if off[worst] > 0 else "—"
        bar = Raw(f'<span class="bar"><span style="width:{100 * (accuracy or 0):.1f}%"></span></span>')
        predicted = int(confusion[:, k].sum())
        precision = confusion[k, k] / predicted if predicted else None
        # F1 = 2 TP / (2 TP + FP + FN), 0 where that is 0 / 0, as the CV's macro F1 counts it
        f1 = 2 * confusion[k, k] / (given[k] + predicted) if given[k] + predicted else 0.0
        rows.append([name, int(given[k]), int(confusion[k, k]),
                     float(accuracy) if accuracy is not None else "—",
                     float(precision) if precision is not None else "—",
                     float(f1), bar, confused])
    return rows


def _section_classes(run: RunFiles) -> str:
    confusion = np.asarray(run.metrics["confusion"], dtype=np.int64)
    uri = figure_to_data_uri(plot_confusion(confusion, run.classes))
    rows = _class_rows(run)
    note = ""
    if len(rows) > MAX_CLASS_ROWS:
        rows = sorted(rows, key=lambda r: r[3] if isinstance(r[3], float) else 2.0)[:MAX_CLASS_ROWS]
        note = _note(f"The {MAX_CLASS_ROWS} classes of lowest accuracy of {len(run.classes)}.")
    table = _table(["class", "rows", "correct", "accuracy", "precision", "F1", "",
                    "most confused with"], rows,
                   table_id="class-accuracy", numeric=frozenset({1, 2, 3, 4, 5}))
    size = "wide" if len(run.classes) > 6 else "narrow"  # a larger matrix gets more of the row
    picture = f'<img class="confusion" src="{uri}" alt="confusion matrix">'
    body = (f'<div class="row classes {size}"><div>{picture}</div>'
            f"<div>{table}{note}</div></div>")
    return _section("classes", "Confusion matrix and per-class accuracy", body,
                    intro="Rows are the given labels, columns the out-of-fold predictions; colour is "
                          "the share of the row, numbers are image counts. A class's accuracy is "
                          "its recall; precision is the share of its predictions that are right; "
                          "the CV's macro F1 is the mean of every class's F1.")


def find_confident_mistakes(oof: pd.DataFrame, num_classes: int, *, limit: int = N_WRONG) -> pd.DataFrame:
    """OOF rows with pred != label, highest probability of the predicted class first.

    Returns image_id, fold, label, pred, prob (of pred) for at most `limit` rows.
    """
    probs = oof[prob_columns(num_classes)].to_numpy(dtype=np.float64)
    pred = oof["pred"].to_numpy(dtype=np.int64)
    wrong = np.flatnonzero(pred != oof["label"].to_numpy(dtype=np.int64))
    prob = probs[wrong, pred[wrong]]
    order = wrong[np.argsort(-prob, kind="stable")][:limit]
    return pd.DataFrame({"image_id": oof["image_id"].to_numpy()[order],
                         "fold": oof["fold"].to_numpy()[order],
                         "label": oof["label"].to_numpy(dtype=np.int64)[order], "pred": pred[order],
                         "prob": probs[order, pred[order]]})


def _section_mistakes(run: RunFiles) -> str:
    mistakes = find_confident_mistakes(run.oof, len(run.classes))
    n_wrong = int((run.oof["pred"] != run.oof["label"]).sum())
    if mistakes.empty:
        return _section("mistakes", "Most confidently wrong", _note("No out-of-fold image is misclassified."))
    cards = []
    for r in mistakes.itertuples():
        uri, why = _thumbnail(run.images_dir, r.image_id)
        given, predicted = run.classes[r.label], run.classes[r.pred]
        cards.append(_card(uri, [f"given {given} → predicted {predicted} ({r.prob:.2f})",
                                 f"{r.image_id} · fold {r.fold}"], missing=why))
    grid = f'<div class="grid" id="mistakes-grid">{"".join(cards)}</div>'
    return _section("mistakes", "Most confidently wrong", grid,
                    intro=f"{len(mistakes)} of the {n_wrong} misclassified out-of-fold images, highest "
                          "probability of the wrong class first: label errors or hard cases.")


def make_mix_examples(images: np.ndarray, labels: np.ndarray, *, num_classes: int,
                      mix: dict[str, Any], n_batches: int, seed: int) -> list[dict[str, Any]]:
    """Mix `images` (n_batches * B, H, W, 3) uint8 in batches of B with the run's mix settings.

    Every batch is mixed (prob = 1: an unmixed example would show nothing). Returns per batch:
    method, lam (the sampled λ, one or B values), perm (B,), mixed (B, H, W, 3) uint8 and
    soft_targets (B, K) float.
    """
    import torch

    from mixcls.losses import to_soft_targets
    from mixcls.mix import Mixer, apply_mix

    mixer = Mixer(str(mix["method"]), alpha=float(mix.get("alpha", 1.0)), prob=1.0,
                  decay_power=float(mix.get("decay_power", 3.0)), max_soft=float(mix.get("max_soft", 0.0)),
                  mode=str(mix.get("mode", "batch")))
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    targets = to_soft_targets(torch.from_numpy(labels), num_classes)
    batch = len(images) // n_batches
    out = []
    for b in range(n_batches):
        part = slice(b * batch, (b + 1) * batch)
        # sample_plan + apply_mix is what Mixer.__call__ does; the plan also names the method.
        plan = mixer.sample_plan(batch, x.shape[2], x.shape[3], generator)
        mixed, soft_targets, _ = apply_mix(x[part], targets[part], plan)
        pixels = (mixed.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out.append({"method": plan.method, "lam": plan.lam.numpy(), "perm": plan.perm.numpy(),
                    "mixed": pixels, "soft_targets": soft_targets.numpy()})
    return out


def _describe_targets(soft_targets: np.ndarray, classes: list[str]) -> str:
    """'0.62 cat + 0.38 dog' from one soft-target row (the two largest weights)."""
    order = np.argsort(-soft_targets, kind="stable")[:2]
    return " + ".join(f"{soft_targets[k]:.2f} {classes[k]}" for k in order if soft_targets[k] >= 0.005)


def _load_square(path: Path, side: int) -> np.ndarray:
    picture = Image.fromarray(read_image(path)).resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(picture)


def _section_mix(run: RunFiles, *, seed: int) -> str:
    cfg = run.config
    title = "Mixed batches"
    if run.images_dir is None:
        return _section("mix", title, _note("The training images folder of the run (from dataset.json, "
                                            "or config.yaml without it) is not there."))
    # Display side: the training size, but at least 64 px so that boxes and masks are visible.
    side = int(np.clip(int(cfg.get("img_size") or 64), 64, THUMB_SIDE))
    rng = np.random.default_rng(seed)
    n = min(MIX_BATCHES * MIX_BATCH_SIZE, len(run.oof) - len(run.oof) % MIX_BATCH_SIZE)
    if n < MIX_BATCH_SIZE:
        return _section("mix", title, _note("Too few images to show a batch."))
    rows = np.sort(rng.choice(len(run.oof), size=n, replace=False))
    ids = run.oof["image_id"].to_numpy()[rows]
    try:
        images = np.stack([_load_square(run.images_dir / i, side) for i in ids])
    except (OSError, ValueError) as exc:
        return _section("mix", title, _note(f"Cannot read the training images: {exc}"))
    mix = {key: cfg[f"mix_{key}"] for key in ("alpha", "decay_power", "max_soft", "mode")
           if f"mix_{key}" in cfg}
    batches = make_mix_examples(images, run.oof["label"].to_numpy(dtype=np.int64)[rows],
                                num_classes=len(run.classes), mix=dict(mix, method=cfg["mix"]),
                                n_batches=n // MIX_BATCH_SIZE, seed=seed)
    parts = []
    for b, batch in enumerate(batches):
        batch_ids = ids[b * MIX_BATCH_SIZE:(b + 1) * MIX_BATCH_SIZE]
        lam = batch["lam"]
        lam_text = f"sampled λ = {float(lam[0]):.2f}" if lam.size == 1 else "one λ per image"
        cards = [_card(image_to_data_uri(image), [_describe_targets(target, run.classes),
                                                  f"{batch_ids[i]} + {batch_ids[batch['perm'][i]]}"])
                 for i, (image, target) in enumerate(zip(batch["mixed"], batch["soft_targets"]))]
        parts.append(f"<h3>batch {b + 1}: {html.escape(batch['method'])}, {lam_text}</h3>"
                     f'<div class="grid mix">{"".join(cards)}</div>')
    return _section("mix", title, "".join(parts),
                    intro=f"Training images (before augmentation) mixed with the run's settings "
                          f"({cfg['mix']}, α = {_fmt(cfg.get('mix_alpha'))}); captions are the soft "
                          "targets the loss sees. Every batch here is mixed; in training a batch is "
                          f"mixed with probability {_fmt(cfg.get('mix_prob', 1.0))}.")


def _section_suspects(run: RunFiles) -> str:
    parts = []
    if run.suspects is not None:
        n = len(run.suspects)
        parts.append(f'<p class="intro">{n} suspect label(s) in {SUSPECTS_CSV}, most likely wrong first '
                     f"(of {len(run.oof)} out-of-fold images).</p>")
    if run.suspects_png is not None:
        parts.append(f'<img class="wide" src="{png_data_uri(run.suspects_png)}" alt="suspect gallery">')
    if run.suspects is not None and not run.suspects.empty:
        top = run.suspects.head(N_SUSPECTS)
        if run.suspects_png is None:  # no gallery picture: draw the suspects here
            cards = []
            for r in top.itertuples():
                uri, why = _thumbnail(run.images_dir, r.image_id)
                caption = f"given {r.given} → suggested {r.suggested} ({r.prob_suggested:.2f})"
                cards.append(_card(uri, [caption, str(r.image_id)], missing=why))
            parts.append(f'<div class="grid">{"".join(cards)}</div>')
        columns = [c for c in ("rank", "image_id", "fold", "given", "suggested", "prob_given",
                               "prob_suggested", "quality") if c in top.columns]
        rows = [[float(v) if isinstance(v, (float, np.floating)) else v for v in row]
                for row in top[columns].itertuples(index=False)]
        numeric = frozenset(i for i, c in enumerate(columns)
                            if c in ("rank", "fold") or c.startswith(("prob", "quality")))
        parts.append(_table(columns, rows, table_id="suspects", numeric=numeric))
    return _section("suspects", "Suspect labels", "".join(parts),
                    intro="From mixcls noise (confident learning on the out-of-fold probabilities).")


# ---------------------------------------------------------------- the page

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f6f8;color:#1f2933;font:14px/1.45 -apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:20px 28px 40px}
header{display:flex;justify-content:space-between;align-items:baseline;gap:16px;flex-wrap:wrap}
h1{font-size:22px;margin:0 0 2px}
header .path{color:#616e7c;font-size:12px;word-break:break-all}
nav{margin:10px 0 16px;font-size:13px}
nav a{color:#2f6fb3;text-decoration:none;margin-right:14px}
section{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:14px 18px;margin:14px 0}
h2{font-size:17px;margin:0 0 6px}
h3{font-size:14px;margin:12px 0 6px;color:#3e4c59}
.intro,.note{color:#616e7c;margin:0 0 10px;font-size:13px}
.note{font-style:italic}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:4px 0 0}
.tile{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:10px 16px;min-width:130px}
.tile .value{font-size:22px;font-weight:600;font-variant-numeric:tabular-nums}
.tile .label{color:#616e7c;font-size:12px}
dl.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:6px 14px;margin:0}
dl.kv div{border-bottom:1px solid #eef1f4;padding:2px 0}
dt{color:#616e7c;font-size:11px;text-transform:uppercase;letter-spacing:.03em}
dd{margin:0;font-weight:600;word-break:break-word}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.row>div{flex:1 1 400px;min-width:0}
.row.classes.narrow>div:first-child{flex:0 1 40%}
.row.classes.wide>div:first-child{flex:0 1 45%}
table{border-collapse:collapse;font-size:13px;margin:0 0 8px}
th,td{padding:4px 8px;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:top}
td{max-width:280px;overflow-wrap:break-word}
th,td.num{white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}
th{background:#f0f3f6;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;width:60px;height:8px;background:#e4e7eb;border-radius:4px;overflow:hidden}
.bar span{display:block;height:100%;background:#3b82c4}
img.wide{max-width:100%;height:auto;display:block}
img.confusion{max-width:100%;max-height:640px;height:auto;display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:12px}
.grid.mix{grid-template-columns:repeat(6,minmax(0,1fr))}
.card{margin:0;font-size:12px}
.card img,.noimg{width:100%;max-width:160px;aspect-ratio:1;object-fit:contain;background:#eef1f4;
image-rendering:pixelated;border-radius:4px;display:block}
.noimg{display:flex;align-items:center;justify-content:center;color:#9aa5b1;text-align:center}
figcaption span{display:block;word-break:break-word}
figcaption span+span{color:#7b8794;font-size:11px}
footer{color:#9aa5b1;font-size:12px;text-align:center}
"""

NAV = [("config", "Settings"), ("cv", "Cross-validation"), ("curves", "Learning curves"),
       ("classes", "Confusion matrix"), ("mistakes", "Confidently wrong"), ("mix", "Mixed batches"),
       ("suspects", "Suspect labels"), ("pseudo", "Pseudo-labels"), ("tta", "Test-time settings")]
TTA_GRID_COLUMNS = ("setting", "views", "cv_accuracy", "cv_macro_f1", "cv_logloss", "nested_folds",
                    "chosen")


def _section_tta(run: RunFiles) -> str:
    """mixcls tta's grid (tta_grid.csv) and, when applied, the setting predict uses (tta.json)."""
    grid = run.tta_grid
    rows = [[r.setting, r.views, float(r.cv_accuracy), float(r.cv_macro_f1), float(r.cv_logloss),
             int(r.nested_folds), "chosen" if bool(r.chosen) else ""] for r in grid.itertuples()]
    table = _table(["setting", "views", "CV accuracy", "CV macro F1", "CV log-loss",
                    "folds choosing it (nested)", ""], rows, table_id="tta-grid",
                   numeric=frozenset({2, 3, 4, 5}))
    if run.tta is not None:
        nested, in_sample = run.tta.get("nested", {}), run.tta.get("in_sample", {})
        applied = _note(f"Applied: {run.tta.get('setting')} (mixcls predict and blend use it). Its CV "
                        f"accuracy is {in_sample.get('accuracy', float('nan')):.4f} in-sample (chosen "
                        f"on these rows: optimistic) and {nested.get('accuracy', float('nan')):.4f} "
                        "nested (each fold scored with the setting best on the other folds).")
    else:
        applied = _note("Not applied: mixcls predict uses the run's config (mixcls tta --apply to "
                        "change it).")
    return _section("tta", "Test-time settings", table + applied,
                    intro="Each fold's best model scored its own validation rows again under each "
                          "setting: the first n TTA views at an image size (mixcls tta).")


def _section_pseudo(run: RunFiles) -> str:
    """Pseudo rows per fold and their class mix (metrics.json "pseudo", from train --pseudo)."""
    info = run.metrics["pseudo"]
    rows = [[g, v["rows"], *(v["classes"].get(str(c), 0) for c in run.classes)]
            for g, v in sorted(info["folds"].items(), key=lambda item: int(item[0]))]
    round_ = int(info.get("round", 1))
    chain = ("" if round_ == 1 else
             f" That teacher was itself a pseudo-label student: these are round {round_} labels, "
             "and every model of fold g's chain trained on fold g's training rows and on labels "
             "from the fold-g model before it only.")
    intro = (f"Each fold g trained also on the unlabelled images that passed for g in "
             f"{info['table']} ({'soft' if info['soft'] else 'hard'} labels, threshold "
             f"{info.get('threshold')}), labelled by fold g's model of teacher {info['teacher']}, "
             f"which never trained on fold g's validation rows.{chain} Pseudo images are never "
             f"validated on and are not in oof.csv. Each pseudo row weighed "
             f"{info.get('weight', 1.0):g} in the loss against 1 for a labelled row.")
    return _section("pseudo", "Pseudo-labels",
                    _table(["fold", "pseudo rows", *[str(c) for c in run.classes]], rows), intro=intro)


def build_report_html(run: RunFiles, *, seed: int = 0) -> str:
    """The whole page as one string (no external references)."""
    sections = {"config": _section_config(run), "cv": _section_cv(run), "curves": _section_curves(run),
                "classes": _section_classes(run), "mistakes": _section_mistakes(run)}
    if str(run.config.get("mix", "none")) != "none":
        sections["mix"] = _section_mix(run, seed=seed)
    if run.suspects is not None or run.suspects_png is not None:
        sections["suspects"] = _section_suspects(run)
    if isinstance(run.metrics.get("pseudo"), dict):
        sections["pseudo"] = _section_pseudo(run)
    if run.tta_grid is not None:
        sections["tta"] = _section_tta(run)
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in NAV if a in sections)
    name = html.escape(run.run_dir.resolve().name)
    subtitle = html.escape(f"{_fmt(run.config.get('model'))} · {_fmt(run.config.get('img_size'))} px · "
                           f"{len(run.classes)} classes · {run.run_dir.resolve()}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>mixcls report: {name}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f'<header><div><h1>Run report: {name}</h1><div class="path">{subtitle}</div></div></header>\n'
            f"{_section_summary(run)}\n<nav>{nav}</nav>\n" + "\n".join(sections.values()) +
            f"\n<footer>mixcls {html.escape(__version__)} · rebuild with: mixcls report "
            f"{html.escape(str(run.run_dir))}</footer>\n</main>\n</body>\n</html>\n")


def write_report(run_dir: str | Path, *, out: str | Path | None = None, seed: int = 0) -> Path:
    """Read the run folder and write its report (default RUN/report.html); return the path.

    `seed` picks the images of the mixed batches and their mixing draws.
    """
    run = read_run(run_dir)
    page = build_report_html(run, seed=seed)
    return runs.atomic_write_text(Path(out) if out is not None else run.run_dir / REPORT_NAME, page)


# ---------------------------------------------------------------- screenshot

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot_report(html_path: str | Path, png_path: str | Path, *, width: int = 1280,
                      height: int = 2400, chromium: str = "chromium", timeout_s: float = 120.0) -> Path:
    """Render `html_path` in headless Chromium into `png_path` (width × height pixels).

    Needs the `chromium` binary (Debian/Ubuntu: apt-get install chromium). The page has no
    external references, and the flags keep Chromium off the network as well.
    """
    import shutil
    import subprocess
    import tempfile

    binary = shutil.which(chromium)
    if binary is None:
        raise runs.RunError(f"{chromium!r} not found on PATH; install it (Debian/Ubuntu: "
                            "apt-get install chromium) or pass the browser's path")
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise runs.RunError(f"{html_path} does not exist")
    with tempfile.TemporaryDirectory(prefix="mixcls-chromium-") as tmp:
        shot = Path(tmp) / "shot.png"
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}",
                   f"--screenshot={shot}", f"--window-size={width},{height}", html_path.as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        if not shot.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise runs.RunError(f"chromium wrote no screenshot (exit {done.returncode}): {' | '.join(tail)}")
        return runs.atomic_write_bytes(png_path, shot.read_bytes())
