"""The blend's report: one self-contained HTML page (BLEND/report.html).

The members' own CV beside the blend's nested and in-sample figures (the in-sample one labelled
optimistic, with the gap), the weights fitted on all rows and per fold, and the correlation of
the members' OOF errors (members whose errors correlate less gain more from blending).
Built from blend.json and metrics.json contents, so `blend_runs` can build it before writing.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from mixcls import __version__, runs
from mixcls.report import CSS, Raw, _note, _section, _table, figure_to_data_uri, plot_confusion

REPORT_NAME = "report.html"
SCORES = (("accuracy", "accuracy"), ("macro F1", "macro_f1"), ("log-loss", "logloss"))
NUMERIC = frozenset({1, 2, 3, 4})


def _member_weights(spec: dict[str, Any]) -> list[Any]:
    """One weight per member, or '—' for a stacker (its coefficients are in blend.json)."""
    if spec.get("weights") is None:
        return ["—"] * len(spec["members"])
    return [float(w) for w in spec["weights"]]


def _section_scores(spec: dict[str, Any], metrics: dict[str, Any]) -> str:
    rows = [[m["name"], *(float(m[f"cv_{key}"]) for _, key in SCORES), weight]
            for m, weight in zip(metrics["members"], _member_weights(spec))]
    nested = {"accuracy": metrics["cv_accuracy"], "macro_f1": metrics["cv_macro_f1"],
              "logloss": metrics["cv_logloss"]}
    in_sample = metrics["in_sample"]
    rows.append([Raw("<b>blend, nested CV</b>"), *(float(nested[k]) for _, k in SCORES), ""])
    rows.append(["blend, in-sample (optimistic)", *(float(in_sample[k]) for _, k in SCORES), ""])
    rows.append(["gap: in-sample − nested", *(float(in_sample[k] - nested[k]) for _, k in SCORES), ""])
    table = _table(["", *(label for label, _ in SCORES), "weight"], rows, table_id="blend-scores",
                   numeric=NUMERIC)
    return _section("scores", "Cross-validation", table, intro=(
        "Nested CV: the rule that scores fold g was fitted on the other folds' OOF rows only. "
        "In-sample: fitted and scored on the same rows; it flatters the blend by the gap "
        "(log-loss is better lower, so there a negative gap is the flattery)."))


def _section_weights(spec: dict[str, Any]) -> str:
    names = [m["name"] for m in spec["members"]]
    folds = spec["nested"]["folds"]
    if spec.get("weights") is None:
        per_fold = ", ".join(f"without fold {g}: {v['stacker'].get('C')}" for g, v in folds.items())
        body = _note("A stacker has no member weights; its coefficients and intercept, fitted on "
                     "all rows and per fold, are in blend.json. Its regularisation C, chosen by a "
                     f"CV over the fitted rows' folds: all rows {spec['stacker'].get('C')}, "
                     f"{per_fold}.")
    else:
        rows = [["all rows (used to predict)", *map(float, spec["weights"])]]
        rows += [[f"fitted without fold {g}", *map(float, v["weights"])] for g, v in folds.items()]
        body = _table(["fit", *names], rows, table_id="blend-weights",
                      numeric=frozenset(range(1, len(names) + 1)))
    if spec.get("temperature") is not None:
        temps = ", ".join(f"without fold {g}: {v['temperature']:.3f}" for g, v in folds.items())
        body += _note(f"Temperature {spec['temperature']:.3f} (all rows; {temps}).")
    if spec.get("class_bias") is not None:
        classes = [str(c) for c in spec.get("classes") or range(len(spec["class_bias"]))]
        rows = [["all rows (used to predict)", *map(float, spec["class_bias"])]]
        rows += [[f"fitted without fold {g}", *map(float, v["class_bias"])] for g, v in folds.items()]
        body += _note(f"Class biases for {spec['class_bias_metric']}: added to the blended "
                      "log-probabilities before the argmax (each fold's OOF rows by the biases "
                      "fitted without them).")
        body += _table(["fit", *classes], rows, table_id="blend-class-bias",
                       numeric=frozenset(range(1, len(classes) + 1)))
    return _section("weights", "Weights", body,
                    intro=f"method {spec['method']}, fit objective {spec['fit_objective']}.")


def plot_correlation(corr: np.ndarray, names: list[str]):
    """Heat map of an (M, M) correlation matrix, each cell annotated."""
    from matplotlib.figure import Figure

    m = len(names)
    side = float(np.clip(1.5 + 0.6 * m, 3.0, 9.0))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(np.nan_to_num(corr, nan=0.0), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="correlation")
    ax.set_xticks(range(m), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(m), names, fontsize=8)
    for i in range(m):
        for j in range(m):
            dark = not np.isnan(corr[i, j]) and abs(corr[i, j]) > 0.6
            ax.text(j, i, "—" if np.isnan(corr[i, j]) else f"{corr[i, j]:.2f}", ha="center",
                    va="center", fontsize=8, color="white" if dark else "#1f2933")
    fig.tight_layout()
    return fig


def _section_correlation(spec: dict[str, Any], metrics: dict[str, Any]) -> str:
    names = [m["name"] for m in spec["members"]]
    corr = np.array([[np.nan if v is None else v for v in row] for row in metrics["error_correlation"]],
                    dtype=float)
    rows = [[name, *("—" if np.isnan(v) else float(v) for v in row)] for name, row in zip(names, corr)]
    table = _table(["", *names], rows, table_id="blend-correlation",
                   numeric=frozenset(range(1, len(names) + 1)))
    picture = f'<img class="wide" src="{figure_to_data_uri(plot_correlation(corr, names))}" alt="error correlation">'
    return _section("correlation", "Correlation of the members' errors",
                    f'<div class="row"><div>{table}</div><div>{picture}</div></div>',
                    intro="Pearson correlation of each row's error 1 − p(true class) on the OOF rows.")


def _section_confusion(metrics: dict[str, Any]) -> str:
    uri = figure_to_data_uri(plot_confusion(np.asarray(metrics["confusion"]), metrics["classes"]))
    return _section("confusion", "Confusion matrix (nested OOF)",
                    f'<img class="confusion" src="{uri}" alt="confusion matrix">')


def build_blend_html(spec: dict[str, Any], metrics: dict[str, Any], blend_dir: str | Path) -> str:
    """The whole page as one string; every name from the blend is escaped."""
    name = html.escape(Path(blend_dir).resolve().name)
    subtitle = html.escape(f"{spec['method']} blend of {len(spec['members'])} runs · "
                           f"{len(spec['classes'])} classes · {metrics['rows']} OOF rows")
    sections = [_section_scores(spec, metrics), _section_weights(spec),
                _section_correlation(spec, metrics), _section_confusion(metrics)]
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>mixcls blend: {name}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f'<header><div><h1>Blend report: {name}</h1><div class="path">{subtitle}</div></div>'
            "</header>\n" + "\n".join(sections) +
            f"\n<footer>mixcls {html.escape(__version__)}</footer>\n</main>\n</body>\n</html>\n")


def write_blend_report(blend_dir: str | Path, *, out: str | Path | None = None) -> Path:
    """Rebuild BLEND/report.html (or `out`) from blend.json and metrics.json; return its path."""
    blend_dir = Path(blend_dir)
    spec, metrics = runs.read_json(blend_dir / "blend.json"), runs.read_json(blend_dir / "metrics.json")
    return runs.atomic_write_text(out if out is not None else blend_dir / REPORT_NAME,
                                  build_blend_html(spec, metrics, blend_dir))
