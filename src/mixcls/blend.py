"""Blending finished runs, with a cross-validation figure that can be trusted.

A blend combines the out-of-fold (OOF) probabilities of several runs trained on the same folds.
Anything fitted on the OOF (weights, a stacker, a temperature) is scored *nested*: the rule that
scores fold g is fitted on the other folds' rows only, and those out-of-fold blended
probabilities are pooled into the blend's own oof.csv. The in-sample figure (fitted and scored on
the same rows) is kept beside it, labelled optimistic, because the gap between the two is what a
notebook blend usually hides.

Shapes: member probs (M, N, K), labels (N,), folds (N,); a blended table is (N, K).
The array functions know nothing of files; `blend_runs` and `predict_blend` read and write
blend folders (BLEND/blend.json beside the run-folder files that noise, review and report read).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar
from scipy.special import softmax
from scipy.stats import rankdata
from sklearn.metrics import f1_score

from mixcls.data import DataError, prob_columns
from mixcls.runs import (RunError, RunFolder, atomic_write_csv, atomic_write_json,
                         atomic_write_text, read_json)

BLEND_METHODS = ("mean", "weighted", "rank", "caruana", "stack")
METRICS = ("logloss", "accuracy")
BLEND_FILE = "blend.json"
BLEND_FORMAT = 1
# Log-loss clips like sklearn.metrics.log_loss (float64 eps), so both give the same figure.
EPS = float(np.finfo(np.float64).eps)
STACK_CLIP = 1e-6          # log-probability features of the stacker: log(1e-6) ~ -13.8 at worst
# The stacker's inverse regularisation C is chosen from this grid by a CV over the fold ids of
# the rows it is fitted on (inside each nested fold: the other folds only), lowest mean log-loss.
STACK_C_GRID = (0.01, 0.1, 1.0, 10.0)
STACK_C_DEFAULT = 1.0      # where the rows come from one fold only, so no CV can choose
CARUANA_ITERATIONS = 30    # forward-selection steps per bag (members may be picked repeatedly)
CARUANA_BAGS = 10
CARUANA_BAG_FRACTION = 0.7  # of the members per bag: half of a few runs would drop too many
TEMPERATURE_BOUNDS = (0.05, 20.0)
# --class-bias: the metric the per-class log-probability biases are fitted to, their grid
# (a factor of e^3 ~ 20 either way on a class's probability) and the coordinate-ascent rounds.
CLASS_BIAS_METRICS = ("none", "macro_f1", "accuracy")
CLASS_BIAS_GRID = np.round(np.linspace(-3.0, 3.0, 61), 10)
CLASS_BIAS_ROUNDS = 4

Fitter = Callable[[np.ndarray, np.ndarray, np.ndarray], "BlendParams"]  # probs, labels, folds


# ---------------------------------------------------------------- scores

def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true class; probs (N, K), labels (N,)."""
    p_true = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p_true, EPS, None))))


def score_probs(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro_f1 and logloss of probs (N, K) against labels (N,)."""
    pred = probs.argmax(axis=1)
    k = probs.shape[1]
    return {"accuracy": float((pred == labels).mean()),
            "macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(k)),
                                       zero_division=0)),
            "logloss": log_loss(probs, labels)}


def metric_loss(probs: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """The selection metric as a loss (lower is better): logloss, or 1 - accuracy."""
    if metric == "logloss":
        return log_loss(probs, labels)
    return float(1.0 - (probs.argmax(axis=1) == labels).mean())


# ---------------------------------------------------------------- combining rules

@dataclass
class BlendParams:
    """A fitted combining rule: member weights (M,), or a stacker's coefficients."""

    method: str
    weights: np.ndarray | None = None
    stacker: dict[str, Any] | None = None


def average_probs(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average (N, K) of member probs (M, N, K) with weights (M,) summing to 1."""
    return np.tensordot(weights, probs, axes=1)


def rank_average(probs: np.ndarray) -> np.ndarray:
    """Average of per-class rank percentiles (N, K) over members, rows renormalised to sum to 1.

    Percentiles are ranks (ties averaged) divided by N, computed within the N rows given: a
    rank blend of one image alone is uniform.
    """
    percentiles = rankdata(probs, axis=1) / probs.shape[1]
    mean = percentiles.mean(axis=0)
    return mean / mean.sum(axis=1, keepdims=True)


def stack_features(probs: np.ndarray) -> np.ndarray:
    """(N, M*K) clipped log-probabilities of the members, member after member."""
    m, n, k = probs.shape
    return np.log(np.clip(probs, STACK_CLIP, 1.0)).transpose(1, 0, 2).reshape(n, m * k)


def apply_stacker(stacker: dict[str, Any], probs: np.ndarray) -> np.ndarray:
    """The stacker's probabilities (N, K) for member probs (M, N, K), as sklearn's predict_proba.

    Classes the stacker never saw get probability 0.
    """
    coef, intercept = np.asarray(stacker["coef"]), np.asarray(stacker["intercept"])
    logits = stack_features(probs) @ coef.T + intercept
    if logits.shape[1] == 1:  # sklearn's binary model: one logit for its second class
        logits = np.hstack([np.zeros_like(logits), logits])
    out = np.zeros((probs.shape[1], probs.shape[2]))
    out[:, np.asarray(stacker["classes"], dtype=np.int64)] = softmax(logits, axis=1)
    return out


def apply_blend(params: BlendParams, probs: np.ndarray) -> np.ndarray:
    """Blended probabilities (N, K) of member probs (M, N, K) under a fitted rule."""
    if params.method == "rank":
        return rank_average(probs)
    if params.method == "stack":
        return apply_stacker(params.stacker, probs)
    return average_probs(probs, params.weights)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) of probs (N, K): T > 1 softens, T < 1 sharpens."""
    return softmax(np.log(np.clip(probs, EPS, 1.0)) / temperature, axis=1)


# ---------------------------------------------------------------- fitting

def fit_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-negative weights (M,) summing to 1 that minimise the log-loss of the weighted average.

    The average's log-loss depends on each member's probability of the true class only, and is
    convex in the weights, so SLSQP on the simplex finds the one optimum.
    """
    m = probs.shape[0]
    p_true = probs[:, np.arange(len(labels)), labels].T  # (N, M)

    def loss(w: np.ndarray) -> float:
        return float(-np.mean(np.log(np.clip(p_true @ w, EPS, None))))

    def grad(w: np.ndarray) -> np.ndarray:
        return -(p_true / np.clip(p_true @ w, EPS, None)[:, None]).mean(axis=0)

    result = minimize(loss, np.full(m, 1.0 / m), jac=grad, method="SLSQP",
                      bounds=[(0.0, 1.0)] * m,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                    "jac": lambda w: np.ones_like(w)}],
                      options={"ftol": 1e-12, "maxiter": 1000})
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def selection_key(probs: np.ndarray, labels: np.ndarray, metric: str) -> tuple[float, float]:
    """Lower is better: the metric as a loss, ties (frequent for accuracy) broken by log-loss."""
    return metric_loss(probs, labels, metric), log_loss(probs, labels)


def select_forward(probs: np.ndarray, labels: np.ndarray, *, metric: str,
                   iterations: int = CARUANA_ITERATIONS) -> np.ndarray:
    """Caruana forward selection with replacement: weights (M,) as pick counts / iterations.

    Starts from the best single member, then adds (again and again, if it helps most) the member
    whose inclusion in the running average scores best; remaining ties go to the lower index.
    """
    def best_of(candidates: list[np.ndarray]) -> int:
        keys = [selection_key(p, labels, metric) for p in candidates]
        return min(range(len(keys)), key=keys.__getitem__)

    counts = np.zeros(len(probs))
    best = best_of(list(probs))
    counts[best], total = 1, probs[best].copy()
    for step in range(1, iterations):
        best = best_of([(total + p) / (step + 1) for p in probs])
        counts[best] += 1
        total += probs[best]
    return counts / counts.sum()


def fit_caruana(probs: np.ndarray, labels: np.ndarray, *, metric: str, seed: int,
                iterations: int = CARUANA_ITERATIONS, n_bags: int = CARUANA_BAGS,
                bag_fraction: float = CARUANA_BAG_FRACTION) -> np.ndarray:
    """Bagged forward selection (Caruana et al. 2004): weights (M,) averaged over `n_bags` bags,
    each a random subset of ceil(bag_fraction * M) members (at least 2 where there are 2)."""
    rng = np.random.default_rng(seed)
    m = probs.shape[0]
    size = min(m, max(2, math.ceil(bag_fraction * m)))
    weights = np.zeros(m)
    for _ in range(n_bags):
        chosen = np.sort(rng.choice(m, size=size, replace=False))
        weights[chosen] += select_forward(probs[chosen], labels, metric=metric, iterations=iterations)
    return weights / n_bags


def stack_model(c: float = STACK_C_DEFAULT):
    """The stacker: each feature standardised, then a multinomial LogisticRegression.

    Standardising is for the solver: the members' log-probabilities are large, correlated and
    unevenly spread, and lbfgs on them as they are took 500-1,800 iterations (28-131 CPU seconds
    per fit on 10,000 rows of 4 members x 10 classes); standardised, 40-220. C penalises the
    standardised coefficients.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def fit_stacker(probs: np.ndarray, labels: np.ndarray, *, c: float | None = None,
                folds: np.ndarray | None = None,
                c_grid: Sequence[float] = STACK_C_GRID) -> dict[str, Any]:
    """`stack_model` on the members' clipped log-probabilities (N, M*K).

    With `c` None, C is the value of `c_grid` with the lowest mean log-loss over a CV whose
    validation sets are the distinct `folds` (N,) of these rows (`choose_stack_c`); the model is
    then refitted on all rows. The dict records C and, when chosen, each C's CV log-loss; its
    coef and intercept act on the raw features (the standardisation folded in), so
    `apply_stacker` needs nothing else.
    """
    if len(np.unique(labels)) < 2:
        raise DataError("stack: the rows to fit hold a single class; a stacker needs two or more")
    c_logloss = None
    if c is None:
        c, c_logloss = choose_stack_c(probs, labels, folds, c_grid=c_grid)
    scaler, model = stack_model(c).fit(stack_features(probs), labels)
    # w . (x - mu) / sd + b = (w / sd) . x + (b - (w / sd) . mu)
    coef = model.coef_ / scaler.scale_
    intercept = model.intercept_ - coef @ scaler.mean_
    return {"coef": coef.tolist(), "intercept": intercept.tolist(),
            "classes": model.classes_.astype(int).tolist(), "C": float(c),
            "C_cv_logloss": c_logloss}


def choose_stack_c(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray | None, *,
                   c_grid: Sequence[float] = STACK_C_GRID) -> tuple[float, dict[str, float] | None]:
    """(C, {str(C): mean CV log-loss}) of the stacker, by GridSearchCV with one split per fold id.

    probs (M, N, K), labels and folds (N,). Only these rows are used, so inside a nested fold
    the outer fold's rows never choose its C. Fewer than two fold ids: STACK_C_DEFAULT, None.
    """
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    if folds is None or len(np.unique(folds)) < 2:
        return STACK_C_DEFAULT, None
    search = GridSearchCV(stack_model(), {"logisticregression__C": [float(c) for c in c_grid]},
                          scoring=_stack_scorer(probs.shape[2]), cv=PredefinedSplit(folds),
                          refit=False, error_score="raise")
    search.fit(stack_features(probs), labels)
    losses = -search.cv_results_["mean_test_score"]
    # Ties (rare) go to the smaller C, the simpler model: argmin takes the first.
    best = int(np.argmin(losses))
    return float(c_grid[best]), {str(float(c)): float(v) for c, v in zip(c_grid, losses)}


def _stack_scorer(num_classes: int) -> Callable[[Any, np.ndarray, np.ndarray], float]:
    """Minus our log_loss on all `num_classes` columns: a validation fold may hold a class the
    training folds lack (or the reverse), which sklearn's neg_log_loss refuses."""
    def score(model: Any, features: np.ndarray, labels: np.ndarray) -> float:
        probs = np.zeros((len(features), num_classes))
        probs[:, model.classes_.astype(np.int64)] = model.predict_proba(features)
        return -log_loss(probs, labels)

    return score


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_BOUNDS minimising the log-loss of softmax(log(p) / T); probs (N, K)."""
    result = minimize_scalar(lambda t: log_loss(apply_temperature(probs, t), labels),
                             bounds=TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(result.x)


def apply_class_bias(probs: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """softmax(log p + bias): each class's probability scaled by exp(bias_k), renormalised;
    probs (..., K), bias (K,)."""
    return softmax(np.log(np.clip(probs, EPS, 1.0)) + np.asarray(bias, np.float64), axis=-1)


def _score_decisions(labels: np.ndarray, decisions: np.ndarray, num_classes: int,
                     metric: str) -> np.ndarray:
    """accuracy or macro F1 (sklearn's, with zero_division=0) of each row of `decisions`:
    (C, N) predicted class indices, one row per candidate bias."""
    if metric == "accuracy":
        return (decisions == labels).mean(axis=1)
    # each candidate's counts in its own block of num_classes bins
    flat = decisions + np.arange(len(decisions))[:, None] * num_classes
    size = len(decisions) * num_classes
    per_class = np.bincount(flat.ravel(), minlength=size).reshape(len(decisions), num_classes)
    tp = np.bincount(flat[decisions == labels], minlength=size).reshape(len(decisions), num_classes)
    denominator = per_class + np.bincount(labels, minlength=num_classes)[None, :]
    f1 = np.divide(2 * tp, denominator, out=np.zeros(denominator.shape), where=denominator > 0)
    return f1.mean(axis=1)


def fit_class_bias(probs: np.ndarray, labels: np.ndarray, *, metric: str) -> np.ndarray:
    """(K,) log-probability biases that maximise `metric` (macro_f1 or accuracy) of
    argmax(log p + bias) on these rows: coordinate ascent over CLASS_BIAS_GRID, class by class,
    for up to CLASS_BIAS_ROUNDS rounds (until a round changes nothing). A class's bias moves
    only for a strictly better score, to the best grid value nearest its current one, so with
    nothing to gain the biases stay 0 and the argmax is the plain one.

    Written here because neither scikit-learn nor scipy fits decision biases for a multi-class
    metric: macro F1 is a step function of the biases, so no gradient method applies.
    """
    logp = np.log(np.clip(probs, EPS, 1.0))
    num_classes = probs.shape[1]
    bias = np.zeros(num_classes)
    best = _score_decisions(labels, logp.argmax(1)[None], num_classes, metric)[0]
    for _ in range(CLASS_BIAS_ROUNDS):
        changed = False
        for k in range(num_classes):
            shifted = logp + bias  # (N, K), with class k's column replaced per candidate
            others = np.delete(shifted, k, axis=1)
            other_best = others.max(axis=1)
            other_arg = others.argmax(axis=1)
            other_arg = other_arg + (other_arg >= k)  # back to the full class index
            column = logp[:, k][None, :] + CLASS_BIAS_GRID[:, None]  # (C, N)
            # argmax's rule: the largest wins, a tie goes to the lower class index
            wins = (column > other_best) | ((column == other_best) & (k < other_arg))
            decisions = np.where(wins, k, other_arg[None, :])
            scores = _score_decisions(labels, decisions, num_classes, metric)
            top = scores.max()
            if top > best + 1e-12:
                ties = np.flatnonzero(scores >= top - 1e-12)
                bias[k] = CLASS_BIAS_GRID[ties[np.argmin(np.abs(CLASS_BIAS_GRID[ties] - bias[k]))]]
                best, changed = top, True
        if not changed:
            break
    return bias


def make_fitter(method: str, *, metric: str = "logloss", seed: int = 0) -> Fitter:
    """fit(probs (M, N, K), labels (N,), folds (N,)) -> BlendParams for one of BLEND_METHODS.

    `weighted` and `stack` always fit log-loss (a smooth objective); `metric` steers Caruana's
    selection only; only `stack` reads `folds` (to choose its C by CV over them).
    """
    check_method(method, metric)

    def fit(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> BlendParams:
        m = probs.shape[0]
        if method in ("mean", "rank"):
            return BlendParams(method, weights=np.full(m, 1.0 / m))
        if method == "weighted":
            return BlendParams(method, weights=fit_weights(probs, labels))
        if method == "caruana":
            return BlendParams(method, weights=fit_caruana(probs, labels, metric=metric, seed=seed))
        return BlendParams(method, stacker=fit_stacker(probs, labels, folds=folds))

    return fit


def check_method(method: str, metric: str) -> None:
    if method not in BLEND_METHODS:
        raise ValueError(f"unknown blend method {method!r}; use one of {', '.join(BLEND_METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def fit_objective(method: str, metric: str) -> str:
    """What the method's fit minimises, in words for blend.json and the terminal."""
    return {"mean": "none", "rank": "none", "weighted": "logloss", "stack": "logloss"}.get(method, metric)


# ---------------------------------------------------------------- nested cross-validation

@dataclass
class NestedBlend:
    """The blend scored fold by fold, each fold by a rule fitted without its rows."""

    probs: np.ndarray                                 # (N, K) pooled out-of-fold blended rows
    fold_params: dict[int, BlendParams]
    fold_temperatures: dict[int, float] = field(default_factory=dict)
    fold_class_biases: dict[int, np.ndarray] = field(default_factory=dict)


def fit_nested(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, *, fit: Fitter,
               calibrate: bool = False, class_bias: str = "none") -> NestedBlend:
    """For each fold g: fit on the other folds' rows, blend (calibrate, bias) fold g's rows.

    The temperature for fold g is fitted on the other folds' rows blended by fold g's rule, the
    class biases (--class-bias) on those rows blended and calibrated by fold g's rule and
    temperature, and the stacker's C for fold g is chosen by a CV over the other folds only.
    probs (M, N, K), labels (N,), folds (N,).
    """
    out = np.empty(probs.shape[1:])
    params, temperatures, biases = {}, {}, {}
    for g in np.unique(folds).tolist():
        rest, rows = folds != g, folds == g
        params[g] = fit(probs[:, rest], labels[rest], folds[rest])
        temperature = bias = None
        if calibrate or class_bias != "none":
            temperature, bias, _ = fit_after_blend(apply_blend(params[g], probs[:, rest]), labels[rest],
                                                   calibrate=calibrate, class_bias=class_bias)
        if temperature is not None:
            temperatures[g] = temperature
        if bias is not None:
            biases[g] = bias
        out[rows] = apply_after_blend(apply_blend(params[g], probs[:, rows]), temperature, bias)
    return NestedBlend(out, params, temperatures, biases)


def fit_after_blend(blended: np.ndarray, labels: np.ndarray, *, calibrate: bool, class_bias: str
                    ) -> tuple[float | None, np.ndarray | None, np.ndarray]:
    """What follows the members' combination, fitted on these blended rows (N, K): the
    temperature (`calibrate`), then the class biases on the calibrated rows (`class_bias`);
    each None when off. Also the rows with both applied (apply_after_blend's result)."""
    temperature = fit_temperature(blended, labels) if calibrate else None
    if temperature is not None:
        blended = apply_temperature(blended, temperature)
    bias = fit_class_bias(blended, labels, metric=class_bias) if class_bias != "none" else None
    return temperature, bias, apply_after_blend(blended, None, bias)


def apply_after_blend(blended: np.ndarray, temperature: float | None,
                      bias: np.ndarray | None) -> np.ndarray:
    """The temperature, then the class biases, on blended probabilities; None: skipped."""
    if temperature is not None:
        blended = apply_temperature(blended, temperature)
    if bias is not None:
        blended = apply_class_bias(blended, bias)
    return blended


@dataclass
class BlendFit:
    """A blend fitted on all OOF rows (for prediction) and scored nested and in-sample."""

    params: BlendParams
    temperature: float | None
    class_bias: np.ndarray | None  # (K,) with --class-bias
    in_sample_probs: np.ndarray  # (N, K) fitted and scored on the same rows: optimistic
    nested: NestedBlend


def fit_blend(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, *, method: str,
              metric: str = "logloss", calibrate: bool = False, class_bias: str = "none",
              seed: int = 0) -> BlendFit:
    """Fit the blend on all rows and nested over `folds`; probs (M, N, K), labels/folds (N,).

    The rule is the members' combination, then the temperature (`calibrate`), then one
    log-probability bias per class fitted to `class_bias` (macro_f1 or accuracy; "none": off).
    """
    if len(np.unique(folds)) < 2:
        raise DataError("blend: the OOF rows come from one fold only; nested CV needs two or more")
    check_class_bias(class_bias)
    fit = make_fitter(method, metric=metric, seed=seed)
    nested = fit_nested(probs, labels, folds, fit=fit, calibrate=calibrate, class_bias=class_bias)
    params = fit(probs, labels, folds)
    temperature, bias, in_sample = fit_after_blend(apply_blend(params, probs), labels,
                                                   calibrate=calibrate, class_bias=class_bias)
    return BlendFit(params, temperature, bias, in_sample, nested)


def check_class_bias(class_bias: str) -> None:
    if class_bias not in CLASS_BIAS_METRICS:
        raise ValueError(f"unknown class bias metric {class_bias!r}; use one of "
                         f"{', '.join(CLASS_BIAS_METRICS)}")


def error_correlation(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(M, M) correlation of the members' per-row errors 1 - p(true class); NaN for a constant one."""
    errors = 1.0 - probs[:, np.arange(len(labels)), labels]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.atleast_2d(np.corrcoef(errors))


# ---------------------------------------------------------------- reading the members

@dataclass
class Members:
    """The runs to blend, checked to share classes, folds and labels; rows in the first's order."""

    paths: list[Path]        # absolute run folders
    classes: list[str]
    image_ids: list[str]     # (N,)
    labels: np.ndarray       # (N,)
    folds: np.ndarray        # (N,)
    probs: np.ndarray        # (M, N, K)
    settings: list[dict[str, Any]] = field(default_factory=list)  # per member: member_setting


def _read_folds(run: RunFolder) -> pd.Series:
    """image_id -> fold from RUN/folds.csv, for the validated rows: a run's train-only rows
    (fold -1) have no OOF row, so runs with and without extra training data blend."""
    from mixcls.data import TRAIN_ONLY_FOLD

    folds = run.read_folds().set_index("image_id")["fold"].astype(np.int64)
    return folds[folds != TRAIN_ONLY_FOLD]


def _check_same_classes(first: RunFolder, other: RunFolder) -> None:
    a, b = first.classes, other.classes
    if a == b:
        return
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shown_a, shown_b = (a[i] if i < len(a) else "nothing"), (b[i] if i < len(b) else "nothing")
    raise DataError(f"runs {first.path} and {other.path} have different classes ({len(a)} and "
                    f"{len(b)}): class {i} is {shown_a!r} in the first and {shown_b!r} in the "
                    "second; blend runs trained on the same classes")


def _check_same_folds(first: RunFolder, other: RunFolder, a: pd.Series, b: pd.Series) -> None:
    only = a.index.symmetric_difference(b.index)
    if len(only):
        where = first.path if only[0] in a.index else other.path
        raise DataError(f"runs {first.path} and {other.path} have different folds: "
                        f"{len(only)} image(s) are in the folds.csv of one only, first {only[0]!r} "
                        f"(only in {where}); blend runs trained on the same table and folds")
    differ = a.index[a.to_numpy() != b.reindex(a.index).to_numpy()]
    if len(differ):
        image_id = differ[0]
        raise DataError(f"runs {first.path} and {other.path} have different folds: {len(differ)} "
                        f"image(s) differ, first {image_id!r} (fold {a[image_id]} in the first, "
                        f"fold {b[image_id]} in the second); train both on a table with a fold "
                        "column, or with the same --folds and --seed")


def member_setting(run: RunFolder) -> dict[str, Any]:
    """What a member predicts with and the OOF table that matches it: mixcls tta --apply's views,
    size and tta_oof.csv, else the config's views (the first predict.tta), training size and
    oof.csv. A blend records it, so that a later --apply on the member does not change what
    the blend predicts."""
    from mixcls.tta import inference_oof_path, inference_setting

    setting, cfg = inference_setting(run.path), run.config
    views = setting.views or list(cfg.predict.tta_views[: cfg.predict.tta])
    return {"views": views, "img_size": setting.img_size or cfg.data.img_size,
            "oof": inference_oof_path(run).name}


def _aligned_oof(run: RunFolder, image_ids: list[str], folds: pd.Series) -> pd.DataFrame:
    """The run's OOF table (the one that matches its inference setting) in the order of
    `image_ids`; its folds must be folds.csv's."""
    from mixcls.tta import inference_oof_path

    path = inference_oof_path(run)
    oof = run.read_oof(path).set_index("image_id")
    missing = pd.Index(image_ids).difference(oof.index)
    extra = oof.index.difference(pd.Index(image_ids))
    if len(missing) or len(extra):
        image_id = missing[0] if len(missing) else extra[0]
        raise DataError(f"{path}: its OOF rows differ from the other members' "
                        f"({len(missing)} missing, {len(extra)} extra, first {image_id!r}); blend "
                        "runs that trained every fold of the same table")
    oof = oof.reindex(image_ids)
    wrong = oof.index[oof["fold"].to_numpy() != folds.reindex(oof.index).to_numpy()]
    if len(wrong):
        raise DataError(f"{path}: fold of image {wrong[0]!r} differs from {run.path}/folds.csv")
    return oof


def read_members(run_dirs: Sequence[str | Path]) -> Members:
    """Open and check the runs to blend; DataError names the runs and the first differing ids."""
    if not run_dirs:
        raise DataError("blend: name at least one run folder")
    runs = [RunFolder.open(Path(d).resolve(), require=("oof.csv", "folds.csv")) for d in run_dirs]
    _check_distinct(runs)
    folds = [_read_folds(run) for run in runs]
    for run, run_folds in zip(runs[1:], folds[1:]):
        _check_same_classes(runs[0], run)
        _check_same_folds(runs[0], run, folds[0], run_folds)
    first = runs[0].read_oof()  # its ids and their order; the probabilities come from _aligned_oof
    image_ids = first["image_id"].tolist()
    oofs = [_aligned_oof(run, image_ids, folds[0]) for run in runs]
    labels = oofs[0]["label"].to_numpy(dtype=np.int64)
    for run, oof in zip(runs[1:], oofs[1:]):
        differ = np.flatnonzero(oof["label"].to_numpy(dtype=np.int64) != labels)
        if len(differ):
            raise DataError(f"runs {runs[0].path} and {run.path} give image "
                            f"{image_ids[differ[0]]!r} different labels ({len(differ)} differ)")
    k = len(runs[0].classes)
    # Not renormalised: check_oof bounds the rows' sums, and a mean of one run stays its OOF.
    probs = np.stack([oof[prob_columns(k)].to_numpy(dtype=np.float64) for oof in oofs])
    return Members([run.path for run in runs], runs[0].classes, image_ids, labels,
                   oofs[0]["fold"].to_numpy(dtype=np.int64), probs,
                   [member_setting(run) for run in runs])


def _check_distinct(runs: list[RunFolder]) -> None:
    seen: set[Path] = set()
    for run in runs:
        if (run.path / BLEND_FILE).is_file():
            raise DataError(f"{run.path} is a blend folder; blend its member runs instead")
        if run.path in seen:
            raise DataError(f"run {run.path} is named twice; name each member once")
        seen.add(run.path)


# ---------------------------------------------------------------- checkpoints of the members

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


FULL_CHECKPOINT = "full/best.pt"


def hash_checkpoints(run_dir: str | Path) -> dict[str, str]:
    """{"fold_K/best.pt": sha256} for every fold checkpoint of a run, in fold order, then
    "full/best.pt" when the run has a full-data model (--full-fit)."""
    run = RunFolder(Path(run_dir))
    found = {f"{d.name}/best.pt": sha256_file(d / "best.pt") for d in run.fold_dirs.values()
             if (d / "best.pt").is_file()}
    if (run.path / FULL_CHECKPOINT).is_file():
        found[FULL_CHECKPOINT] = sha256_file(run.path / FULL_CHECKPOINT)
    return found


def _selected(checkpoints: dict[str, str], models: str) -> dict[str, str]:
    """The entries of `checkpoints` that `models` (predict.MODEL_SETS) predicts with."""
    return {name: digest for name, digest in checkpoints.items()
            if (name == FULL_CHECKPOINT) == (models == "full") or models == "all"}


def member_dir(member: dict[str, Any], blend_dir: str | Path) -> Path:
    """A member's run folder: blend.json's absolute path, or a path relative to the blend
    folder (what `mixcls export` writes, so the exported folder can move)."""
    path = Path(member["path"])
    return path if path.is_absolute() else Path(blend_dir) / path


def existing_member_dir(member: dict[str, Any], blend_dir: str | Path) -> Path:
    """`member_dir`, or RunError when that folder is gone."""
    path = member_dir(member, blend_dir)
    if not path.is_dir():
        raise RunError(f"blend {blend_dir}: member run {path} does not exist (moved or "
                       "deleted?); blend the runs again from where they are now")
    return path


def verify_members(spec: dict[str, Any], blend_dir: str | Path, *, models: str = "folds") -> None:
    """RunError naming the member and file unless every member's checkpoints that `models`
    predicts with are as blended (a blend.json written before full/best.pt was hashed knows no
    full model: blend again to predict it with --models full or all)."""
    for member in spec["members"]:
        path = existing_member_dir(member, blend_dir)
        recorded = _selected(member["checkpoints"], models)
        if not recorded:
            wanted = "full/best.pt" if models == "full" else "fold_K/best.pt"
            raise RunError(f"blend {blend_dir}: member run {path} had no {wanted} "
                           "checkpoints when blended, so it cannot predict")
        found = _selected(hash_checkpoints(path), models)
        for name in sorted(set(found) | set(recorded)):
            if found.get(name) != recorded.get(name):
                state = ("is missing" if name not in found else "is new" if name not in
                         recorded else "changed since the blend")
                raise RunError(f"blend {blend_dir}: checkpoint {path / name} of member run "
                               f"{path} {state}; blend the runs again")


def check_same_fold_models(spec: dict[str, Any]) -> None:
    """RunError naming the member and its folds unless every member has the same fold models
    (fold model f of each member is blended with the others' fold model f)."""
    def fold_ids(member: dict[str, Any]) -> list[int]:
        return sorted(int(name.split("/")[0].removeprefix("fold_"))
                      for name in member["checkpoints"] if name != FULL_CHECKPOINT)

    first = spec["members"][0]
    for member in spec["members"][1:]:
        if fold_ids(member) != fold_ids(first):
            raise RunError(f"member run {member['path']} has fold models {fold_ids(member)}, "
                           f"member run {first['path']} has {fold_ids(first)}; a blend predicts "
                           "fold by fold, so its members need the same trained folds (was one "
                           "trained with --train-folds?)")


# ---------------------------------------------------------------- the blend folder

def is_blend_folder(path: str | Path) -> bool:
    return (Path(path) / BLEND_FILE).is_file()


def _params_to_json(params: BlendParams) -> dict[str, Any]:
    weights = None if params.weights is None else params.weights.tolist()
    return {"weights": weights, "stacker": params.stacker}


def _params_from_json(method: str, values: dict[str, Any]) -> BlendParams:
    weights = values.get("weights")
    return BlendParams(method, weights=None if weights is None else np.asarray(weights, dtype=float),
                       stacker=values.get("stacker"))


def make_blend_spec(members: Members, result: BlendFit, *, method: str, metric: str,
                    calibrate: bool, seed: int, checkpoints: list[dict[str, str]],
                    class_bias: str = "none") -> dict[str, Any]:
    """The content of blend.json: members (absolute paths, checkpoint hashes), the rule fitted
    on all rows, and the per-fold nested rules for transparency."""
    nested = result.nested
    return {
        "format": BLEND_FORMAT, "method": method, "metric": metric,
        "fit_objective": fit_objective(method, metric), "calibrate": calibrate, "seed": seed,
        "classes": members.classes,
        "members": [{"name": p.name, "path": str(p), "checkpoints": c, **setting}
                    for p, c, setting in zip(members.paths, checkpoints, members.settings)],
        **_params_to_json(result.params), "temperature": result.temperature,
        "class_bias_metric": class_bias, "class_bias": _floats(result.class_bias),
        "nested": {"folds": {str(g): {**_params_to_json(p),
                                      "temperature": nested.fold_temperatures.get(g),
                                      "class_bias": _floats(nested.fold_class_biases.get(g))}
                             for g, p in nested.fold_params.items()}},
        "settings": {"caruana_iterations": CARUANA_ITERATIONS, "caruana_bags": CARUANA_BAGS,
                     "caruana_bag_fraction": CARUANA_BAG_FRACTION,
                     "stack_C": (result.params.stacker or {}).get("C"),
                     "stack_C_grid": list(STACK_C_GRID),
                     "stack_clip": STACK_CLIP, "temperature_bounds": list(TEMPERATURE_BOUNDS),
                     "class_bias_grid": [float(CLASS_BIAS_GRID[0]), float(CLASS_BIAS_GRID[-1]),
                                         len(CLASS_BIAS_GRID)],
                     "class_bias_rounds": CLASS_BIAS_ROUNDS},
    }


def _floats(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def read_blend(blend_dir: str | Path) -> dict[str, Any]:
    """blend.json, checked enough to predict; RunError/DataError name the file."""
    path = Path(blend_dir) / BLEND_FILE
    if not path.is_file():
        raise RunError(f"{path} does not exist; write the blend with mixcls blend --out {blend_dir}")
    try:
        spec = read_json(path)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("method", "members", "weights", "stacker", "temperature")
               if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    if spec["method"] not in BLEND_METHODS:
        raise DataError(f"{path}: unknown method {spec['method']!r}")
    return spec


def make_blend_oof(members: Members, probs: np.ndarray) -> pd.DataFrame:
    """The run-folder oof.csv table (image_id, label, fold, pred, prob_*) of blended probs (N, K)."""
    from mixcls.metrics import oof_frame

    return oof_frame(np.asarray(members.image_ids, dtype=object), members.labels, members.folds,
                     probs, np.arange(len(probs)))


def make_blend_metrics(members: Members, result: BlendFit, oof: pd.DataFrame, *,
                       method: str, metric: str) -> dict[str, Any]:
    """metrics.json in the run-folder format (nested figures) plus in_sample and the members."""
    from mixcls.metrics import compute_metrics

    metrics = compute_metrics(oof, members.classes)
    nested = score_probs(result.nested.probs, members.labels)
    metrics["cv_logloss"] = nested["logloss"]
    metrics["fold_logloss"] = {str(g): log_loss(result.nested.probs[members.folds == g],
                                                members.labels[members.folds == g])
                               for g in np.unique(members.folds).tolist()}
    metrics["in_sample"] = score_probs(result.in_sample_probs, members.labels)
    metrics["method"], metrics["metric"] = method, metric
    metrics["members"] = [{"name": p.name, "path": str(p), **setting,
                           **{f"cv_{k}": v for k, v in score_probs(probs, members.labels).items()}}
                          for p, probs, setting in zip(members.paths, members.probs,
                                                       members.settings)]
    corr = error_correlation(members.probs, members.labels)
    metrics["error_correlation"] = [[None if np.isnan(v) else float(v) for v in row] for row in corr]
    return metrics


def _check_out_folder(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"blend folder {out} already holds files; pass another --out")
    return out


def blend_runs(run_dirs: Sequence[str | Path], out: str | Path, *, method: str,
               metric: str = "logloss", calibrate: bool = False, class_bias: str = "none",
               seed: int = 0) -> dict[str, Any]:
    """Blend finished runs into the new folder `out`; return its metrics (nested CV figures).

    Every input is read and checked, and the whole blend fitted, before the first file is written.
    """
    from mixcls.blend_report import build_blend_html

    check_method(method, metric)
    check_class_bias(class_bias)
    out = _check_out_folder(Path(out))
    members = read_members(run_dirs)
    checkpoints = [hash_checkpoints(p) for p in members.paths]
    result = fit_blend(members.probs, members.labels, members.folds, method=method,
                       metric=metric, calibrate=calibrate, class_bias=class_bias, seed=seed)
    spec = make_blend_spec(members, result, method=method, metric=metric, calibrate=calibrate,
                           seed=seed, checkpoints=checkpoints, class_bias=class_bias)
    oof = make_blend_oof(members, result.nested.probs)
    metrics = make_blend_metrics(members, result, oof, method=method, metric=metric)
    page = build_blend_html(spec, metrics, out)
    _write_blend_folder(out, members.paths[0], spec=spec, oof=oof, metrics=metrics, page=page)
    return metrics


def _write_blend_folder(out: Path, first: Path, *, spec: dict[str, Any], oof: pd.DataFrame,
                        metrics: dict[str, Any], page: str) -> None:
    """blend.json, oof.csv, metrics.json, report.html and the run-folder files of the first
    member (config.yaml, dataset.json, classes.json, folds.csv) that RunFolder readers need."""
    from mixcls.blend_report import REPORT_NAME

    for name in ("config.yaml", "dataset.json", "folds.csv"):
        if (first / name).is_file():
            atomic_write_text(out / name, (first / name).read_text())
    atomic_write_json(out / "classes.json", spec["classes"])
    atomic_write_csv(out / "oof.csv", oof)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / REPORT_NAME, page)
    atomic_write_json(out / BLEND_FILE, spec)  # last: a folder with blend.json is complete


# ---------------------------------------------------------------- predicting a blend

def predict_blend(blend_dir: str | Path, paths: Sequence[str], *, tta: int | None = None,
                  device: str = "auto", batch_size: int = 64, workers: int = 0,
                  amp: str = "none", models: str = "folds") -> np.ndarray:
    """Blended probabilities (N, K) of the images at `paths`.

    Every member is verified first (folder present, checkpoints unchanged, the same fold models
    as the others), then predicted with the TTA views and image size recorded when it was
    blended (a blend.json from before they were recorded: the member's own), or with the first
    `tta` views when given, one probability table per model (`predict.predict_fold_probs`). The blend's rule, fitted on all OOF rows, combines
    the members model by model (every member's fold-f model together), and those blends are
    averaged (`combine_fold_members`). `models` is predict's: "folds" (default), "all" (the
    full-data model of a --full-fit member is one more entry after the folds) or "full" (it is
    the only entry).
    """
    from mixcls.predict import predict_fold_probs

    spec = read_blend(blend_dir)
    verify_members(spec, blend_dir, models=models)
    if models != "full":
        check_same_fold_models(spec)
    member_fold_probs = [predict_fold_probs(member_dir(m, blend_dir), paths, tta=tta,
                                            views=m.get("views") if tta is None else None,
                                            img_size=m.get("img_size"), device=device,
                                            batch_size=batch_size, workers=workers, amp=amp,
                                            models=models)
                         for m in spec["members"]]
    return combine_fold_members(spec, member_fold_probs)


def combine_fold_members(spec: dict[str, Any], member_fold_probs: Sequence[np.ndarray]) -> np.ndarray:
    """A blend's rule on each fold model's probabilities, then the mean over the fold models.

    `member_fold_probs[m]` is member m's probabilities (F, N, K), one row block per fold model.
    Each OOF row the rule was fitted on came from one fold model, so the rule is applied to one
    fold model's outputs at a time, not to their mean: for the mean, weighted and caruana
    weights that is the same, but the stacker, the rank average and the temperature are not
    linear, and a mean of 5 models is smoother and more confident than any one of them.
    """
    return combine_each_fold(spec, member_fold_probs).mean(axis=0)


def combine_each_fold(spec: dict[str, Any], member_fold_probs: Sequence[np.ndarray]) -> np.ndarray:
    """(F, N, K): the blend's rule (fitted on all OOF rows) on every member's fold-f model
    together, for each f; `combine_fold_members` averages these. One of them alone is the kind
    of model that scored a fold's OOF rows, so its accuracy is what the blend's CV estimates."""
    counts = [np.asarray(p).shape[0] for p in member_fold_probs]
    if len(set(counts)) != 1:
        names = ", ".join(f"{m['path']} ({c})" for m, c in zip(spec["members"], counts))
        raise RunError(f"the blend's members have different numbers of fold models: {names}; "
                       "blend runs trained on the same folds (none with --train-folds)")
    stacked = np.stack([np.asarray(p, np.float64) for p in member_fold_probs])  # (M, F, N, K)
    return np.stack([combine_members(spec, stacked[:, f]) for f in range(stacked.shape[1])])


def combine_members(spec: dict[str, Any], member_probs: np.ndarray) -> np.ndarray:
    """A blend's rule (from `read_blend`) on its members' probabilities (M, N, K) -> (N, K).

    The weights or stacker fitted on all OOF rows, then the temperature (when calibrated), then
    the class biases (with --class-bias; a blend.json from before them has none).
    """
    probs = apply_blend(_params_from_json(spec["method"], spec), np.asarray(member_probs, np.float64))
    temperature, bias = spec["temperature"], spec.get("class_bias")
    return apply_after_blend(probs, None if temperature is None else float(temperature),
                             None if bias is None else np.asarray(bias, np.float64))
