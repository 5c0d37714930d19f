"""Blending on arrays and on hand-made run folders: nested CV, fitters, checks of the members."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, log_loss as sk_log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mixcls import blend as b
from mixcls.config import dump_config, load_config
from mixcls.data import DataError, prob_columns
from mixcls.runs import RunError


def noisy_members(rng: np.random.Generator, *, n: int = 600, k: int = 3, m: int = 3,
                  signal: float = 1.2, n_folds: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Members (M, N, K) whose logits add independent noise to a bump at the true class."""
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(m, n, k))
    logits[:, np.arange(n), labels] += signal
    folds = rng.permutation(np.arange(n) % n_folds)
    return softmax(logits, axis=2), labels, folds


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One label per row drawn from probs (N, K)."""
    return (rng.random(len(probs))[:, None] > probs.cumsum(axis=1)).sum(axis=1)


def nearest_rows(table: np.ndarray, rows: np.ndarray) -> set[int]:
    """Indices of `table` (N, D) that the rows (n, D) are (each one exactly one of them)."""
    dist = ((rows[:, None, :] - table[None, :, :]) ** 2).sum(axis=2)
    assert np.all(dist.min(axis=1) < 1e-20)
    return set(dist.argmin(axis=1).tolist())


# ---------------------------------------------------------------- scores and rules

def test_scores_match_sklearn():
    rng = np.random.default_rng(0)
    probs, labels, _ = noisy_members(rng, m=1)
    scores = b.score_probs(probs[0], labels)
    assert scores["logloss"] == pytest.approx(sk_log_loss(labels, probs[0], labels=[0, 1, 2]), rel=1e-12)
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, probs[0].argmax(1), average="macro"))
    assert scores["accuracy"] == pytest.approx(np.mean(probs[0].argmax(1) == labels))


def test_rank_average_matches_a_slow_loop():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(3, 25))
    probs[1, :5] = probs[1, 5]  # ties: equal rows share the average rank
    m, n, k = probs.shape
    expected = np.zeros((n, k))
    for member in range(m):
        for c in range(k):
            for i in range(n):
                below = sum(probs[member, j, c] < probs[member, i, c] for j in range(n))
                equal = sum(probs[member, j, c] == probs[member, i, c] for j in range(n))
                expected[i, c] += (below + (equal + 1) / 2) / n / m
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(b.rank_average(probs), expected, rtol=1e-12)


def _sk_stacker(c):
    """The stacker as sklearn composes it: standardised features, then LogisticRegression."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def test_apply_stacker_equals_sklearn_predict_proba():
    rng = np.random.default_rng(2)
    for k in (2, 4):  # sklearn's binary model has one row of coefficients
        probs = rng.dirichlet(np.ones(k), size=(2, 80))
        labels = rng.integers(0, k, 80)
        stacker = b.fit_stacker(probs, labels, c=1.0)
        model = _sk_stacker(1.0).fit(b.stack_features(probs), labels)
        other = rng.dirichlet(np.ones(k), size=(2, 30))  # rows the scaler never saw
        for p in (probs, other):
            np.testing.assert_allclose(b.apply_stacker(stacker, p),
                                       model.predict_proba(b.stack_features(p)), atol=1e-6)


def test_temperature_matches_a_grid_search():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, size=(3000, 4))
    labels = sample_labels(rng, softmax(logits, axis=1))
    under = softmax(logits * 0.5, axis=1)  # under-confident: the right temperature is 0.5
    def grid_search(grid: np.ndarray) -> tuple[float, float]:
        losses = [b.log_loss(softmax(np.log(under) / t, axis=1), labels) for t in grid]
        return float(grid[int(np.argmin(losses))]), min(losses)

    coarse, _ = grid_search(np.arange(0.2, 2.0, 0.01))
    t_grid, grid_loss = grid_search(np.arange(coarse - 0.01, coarse + 0.01, 1e-5))
    t_fit = b.fit_temperature(under, labels)
    assert t_fit == pytest.approx(t_grid, abs=2e-4)
    assert b.log_loss(b.apply_temperature(under, t_fit), labels) <= grid_loss + 1e-9
    assert t_fit == pytest.approx(0.5, abs=0.05)


def test_weighted_recovers_known_weights_and_the_grid_optimum():
    rng = np.random.default_rng(4)
    true_weights = np.array([0.5, 0.3, 0.2])
    probs = rng.dirichlet(np.full(3, 0.7), size=(3, 10000))
    # Labels drawn from the true mix: the population log-loss optimum is exactly true_weights.
    labels = sample_labels(rng, b.average_probs(probs, true_weights))
    weights = b.fit_weights(probs, labels)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(weights, true_weights, atol=0.04)
    # The sample optimum, independently: a coarse grid over the simplex, then a fine one near
    # its best point (the loss is convex, so the coarse best lies next to the optimum).
    p_true = probs[:, np.arange(len(labels)), labels].T

    def grid_best(centre: np.ndarray, half_width: float, step: float) -> tuple[np.ndarray, float]:
        axis = np.arange(-half_width, half_width + step / 2, step)
        a, c = np.meshgrid(centre[0] + axis, centre[1] + axis)
        grid = np.stack([a.ravel(), c.ravel(), 1 - a.ravel() - c.ravel()], axis=1)
        grid = grid[(grid >= -1e-12).all(axis=1)]
        losses = -np.log(np.clip(p_true @ grid.T, 1e-300, None)).mean(axis=0)
        return grid[np.argmin(losses)], float(losses.min())

    coarse, _ = grid_best(np.array([0.5, 0.5]), 0.5, 0.05)
    best, best_loss = grid_best(coarse, 0.05, 0.0025)
    np.testing.assert_allclose(weights, best, atol=0.0025)
    assert b.log_loss(b.average_probs(probs, weights), labels) <= best_loss + 1e-9


def test_mean_of_one_run_is_its_oof_exactly():
    rng = np.random.default_rng(5)
    probs, labels, folds = noisy_members(rng, m=1)
    fitted = b.fit_blend(probs, labels, folds, method="mean")
    assert np.array_equal(fitted.nested.probs, probs[0])
    assert np.array_equal(fitted.in_sample_probs, probs[0])


@pytest.mark.parametrize("method", ["caruana", "stack"])
def test_caruana_and_stack_beat_the_best_member_in_nested_cv(method):
    rng = np.random.default_rng(6)
    probs, labels, folds = noisy_members(rng)
    fitted = b.fit_blend(probs, labels, folds, method=method, seed=0)
    nested = b.score_probs(fitted.nested.probs, labels)
    members = [b.score_probs(p, labels) for p in probs]
    assert nested["logloss"] < min(s["logloss"] for s in members) - 0.05
    assert nested["accuracy"] > max(s["accuracy"] for s in members) + 0.05


def test_caruana_is_seeded_and_starts_from_the_best_member():
    rng = np.random.default_rng(7)
    probs, labels, _ = noisy_members(rng, m=5)
    first = b.fit_caruana(probs, labels, metric="logloss", seed=3)
    assert np.array_equal(first, b.fit_caruana(probs, labels, metric="logloss", seed=3))
    assert first.sum() == pytest.approx(1.0) and first.min() >= 0
    # A member far better than the rest is picked first and keeps most of the weight.
    strong = probs.copy()
    strong[2] = 0.1 * strong[2] + 0.9 * np.eye(3)[labels]
    counts = b.select_forward(strong, labels, metric="accuracy", iterations=10)
    assert counts.argmax() == 2 and counts[2] >= 0.5


# ---------------------------------------------------------------- nested CV is honest

def planted_members(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Member 0 is perfect on fold 0 and noise elsewhere; member 1 is decent everywhere."""
    probs, labels, folds = noisy_members(rng, n=400, m=2, signal=1.0)
    on_fold0 = folds == 0
    probs[0, on_fold0] = 0.02 / 2 + 0.97 * np.eye(3)[labels[on_fold0]]
    probs[0, ~on_fold0] = rng.dirichlet(np.ones(3), size=int((~on_fold0).sum()))
    return probs, labels, folds


def test_nested_fit_never_sees_the_rows_it_scores(monkeypatch):
    rng = np.random.default_rng(8)
    probs, labels, folds = planted_members(rng)
    flat = lambda p: p.transpose(1, 0, 2).reshape(p.shape[1], -1)  # (N, M*K): a row's identity
    fit, real_fit_temperature = b.make_fitter("weighted"), b.fit_temperature
    fitted, fit_rows, temperature_rows = [], [], []

    def recording_fit(p, y, f):
        fit_rows.append(nearest_rows(flat(probs), flat(p)))
        fitted.append(fit(p, y, f))
        return fitted[-1]

    def recording_temperature(p, y):
        temperature_rows.append(nearest_rows(b.apply_blend(fitted[-1], probs), p))
        return real_fit_temperature(p, y)

    monkeypatch.setattr(b, "fit_temperature", recording_temperature)
    nested = b.fit_nested(probs, labels, folds, fit=recording_fit, calibrate=True)
    fold_ids = sorted(set(folds.tolist()))
    assert len(fit_rows) == len(temperature_rows) == len(fold_ids) == 4
    for g, rows, t_rows in zip(fold_ids, fit_rows, temperature_rows):
        assert rows == t_rows == set(np.flatnonzero(folds != g).tolist())
    assert sorted(nested.fold_params) == fold_ids and sorted(nested.fold_temperatures) == fold_ids


def test_stack_c_is_strong_for_noise_and_weak_for_clean_members():
    rng = np.random.default_rng(14)
    noise, noise_labels, noise_folds = noisy_members(rng, n=120, m=3, signal=0.0)
    clean, clean_labels, clean_folds = noisy_members(rng, n=2000, m=3, signal=3.0)
    c_noise, losses_noise = b.choose_stack_c(noise, noise_labels, noise_folds)
    c_clean, losses_clean = b.choose_stack_c(clean, clean_labels, clean_folds)
    assert c_noise == min(b.STACK_C_GRID) and c_clean >= 1.0
    # The CV losses, independently: one split per fold id, sklearn's own fit and log-loss.
    features = np.log(np.clip(noise, 1e-6, 1)).transpose(1, 0, 2).reshape(len(noise_labels), -1)
    for c in b.STACK_C_GRID:
        per_fold = []
        for g in range(4):
            train, valid = noise_folds != g, noise_folds == g
            model = _sk_stacker(c).fit(features[train], noise_labels[train])
            per_fold.append(sk_log_loss(noise_labels[valid], model.predict_proba(features[valid]),
                                        labels=[0, 1, 2]))
        assert losses_noise[str(c)] == pytest.approx(np.mean(per_fold), rel=1e-6)
    assert b.fit_stacker(noise, noise_labels, folds=noise_folds)["C"] == c_noise


def test_the_stack_c_of_a_nested_fold_is_chosen_without_its_rows(monkeypatch):
    rng = np.random.default_rng(15)
    probs, labels, folds = planted_members(rng)  # member 0 perfect on fold 0 only
    flat = lambda p: p.transpose(1, 0, 2).reshape(p.shape[1], -1)
    real_choose, chosen_rows = b.choose_stack_c, []

    def recording_choose(p, y, f, **kw):
        chosen_rows.append((nearest_rows(flat(probs), flat(p)), set(np.unique(f).tolist())))
        return real_choose(p, y, f, **kw)

    monkeypatch.setattr(b, "choose_stack_c", recording_choose)
    b.fit_blend(probs, labels, folds, method="stack")
    assert len(chosen_rows) == 5  # one per nested fold, then the fit on all rows
    for g, (rows, fold_ids) in zip(range(4), chosen_rows):
        assert rows == set(np.flatnonzero(folds != g).tolist()) and fold_ids == {0, 1, 2, 3} - {g}
    assert chosen_rows[4] == (set(range(len(labels))), {0, 1, 2, 3})


def test_a_member_good_on_one_fold_only_is_not_rewarded_on_that_fold():
    rng = np.random.default_rng(9)
    probs, labels, folds = planted_members(rng)
    fitted = b.fit_blend(probs, labels, folds, method="weighted")
    assert fitted.params.weights[0] > 0.15  # in-sample: fold 0's perfect rows earn it weight
    fold0 = folds == 0
    independent = b.fit_weights(probs[:, ~fold0], labels[~fold0])
    assert independent[0] < 0.05
    np.testing.assert_allclose(fitted.nested.fold_params[0].weights, independent, atol=1e-9)
    np.testing.assert_allclose(fitted.nested.probs[fold0],
                               b.average_probs(probs[:, fold0], independent), atol=1e-12)
    nested_fold0 = b.log_loss(fitted.nested.probs[fold0], labels[fold0])
    in_sample_fold0 = b.log_loss(fitted.in_sample_probs[fold0], labels[fold0])
    assert nested_fold0 > in_sample_fold0 + 0.2
    assert b.log_loss(fitted.nested.probs, labels) > b.log_loss(fitted.in_sample_probs, labels)


def test_error_correlation_matches_pandas():
    rng = np.random.default_rng(10)
    probs, labels, _ = noisy_members(rng, m=3)
    errors = pd.DataFrame({m: 1 - probs[m, np.arange(len(labels)), labels] for m in range(3)})
    np.testing.assert_allclose(b.error_correlation(probs, labels), errors.corr().to_numpy(), atol=1e-12)


# ---------------------------------------------------------------- run folders

def write_run(path: Path, probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, *,
              classes: list[str] | None = None, image_ids: list[str] | None = None) -> Path:
    """A hand-made finished run: config.yaml, classes.json, folds.csv, oof.csv, metrics.json."""
    k = probs.shape[1]
    image_ids = image_ids or [f"img_{i:04d}.png" for i in range(len(labels))]
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(load_config(None, {"folds": int(folds.max()) + 1})))
    (path / "classes.json").write_text(json.dumps(classes or [f"c{i}" for i in range(k)]))
    pd.DataFrame({"image_id": image_ids, "fold": folds}).to_csv(path / "folds.csv", index=False)
    oof = pd.DataFrame({"image_id": image_ids, "label": labels, "fold": folds, "pred": probs.argmax(1)})
    oof[prob_columns(k)] = probs
    oof.to_csv(path / "oof.csv", index=False)
    (path / "metrics.json").write_text(json.dumps({"cv_accuracy": 0.0}))
    return path


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(11)
    probs, labels, folds = noisy_members(rng, n=120, m=2)
    return [write_run(tmp_path / f"run{m}", probs[m], labels, folds) for m in range(2)], probs, labels, folds


def test_blend_runs_writes_the_folder_and_refuses_a_used_one(two_runs, tmp_path):
    paths, probs, labels, folds = two_runs
    out = tmp_path / "blend"
    metrics = b.blend_runs(paths, out, method="weighted", calibrate=True)
    oof = pd.read_csv(out / "oof.csv")
    spec = json.loads((out / "blend.json").read_text())
    assert oof["image_id"].tolist() == [f"img_{i:04d}.png" for i in range(120)]
    assert metrics["cv_logloss"] == pytest.approx(b.log_loss(oof[prob_columns(3)].to_numpy(), labels))
    assert metrics["cv_accuracy"] == pytest.approx(np.mean(oof["pred"] == labels))
    assert spec["members"][0]["path"] == str(paths[0].resolve()) and spec["temperature"] > 0
    assert set(spec["nested"]["folds"]) == {str(g) for g in range(4)}
    assert {"in_sample", "members", "fold_accuracy", "confusion"} <= set(metrics)
    for name in ("classes.json", "folds.csv", "config.yaml", "metrics.json", "report.html"):
        assert (out / name).is_file()
    with pytest.raises(RunError, match="already holds files"):
        b.blend_runs(paths, out, method="mean")


def test_mismatched_folds_and_classes_are_refused_before_writing(two_runs, tmp_path):
    paths, probs, labels, folds = two_runs
    moved = folds.copy()
    moved[[3, 7]] = (moved[[3, 7]] + 1) % 4
    other_folds = write_run(tmp_path / "other_folds", probs[1], labels, moved)
    out = tmp_path / "blend"
    with pytest.raises(DataError, match="different folds") as info:
        b.blend_runs([paths[0], other_folds], out, method="mean")
    assert str(paths[0].resolve()) in str(info.value) and str(other_folds) in str(info.value)
    assert "img_0003.png" in str(info.value) and not out.exists()
    other_classes = write_run(tmp_path / "other_classes", probs[1], labels, folds,
                              classes=["c0", "cX", "c2"])
    with pytest.raises(DataError, match="different classes") as info:
        b.blend_runs([paths[0], other_classes], out, method="mean")
    assert "'cX'" in str(info.value) and str(other_classes) in str(info.value) and not out.exists()
    other_ids = write_run(tmp_path / "other_ids", probs[1], labels, folds,
                          image_ids=[f"img_{i:04d}.png" for i in range(119)] + ["new.png"])
    with pytest.raises(DataError, match="new.png|img_0119.png"):
        b.blend_runs([paths[0], other_ids], out, method="mean")
    with pytest.raises(DataError, match="named twice"):
        b.blend_runs([paths[0], paths[0]], out, method="mean")
    with pytest.raises(ValueError, match="unknown blend method"):
        b.blend_runs(paths, out, method="median")
    assert not out.exists()


def test_verify_members_names_a_moved_run_and_a_changed_checkpoint(two_runs, tmp_path):
    paths, *_ = two_runs
    for path in paths:
        (path / "fold_0").mkdir()
        (path / "fold_0" / "best.pt").write_bytes(b"weights " + path.name.encode())
    b.blend_runs(paths, tmp_path / "blend", method="mean")
    spec = b.read_blend(tmp_path / "blend")
    assert spec["members"][1]["checkpoints"] == {"fold_0/best.pt": b.sha256_file(paths[1] / "fold_0" / "best.pt")}
    b.verify_members(spec, tmp_path / "blend")
    (paths[1] / "fold_0" / "best.pt").write_bytes(b"retrained")
    with pytest.raises(RunError, match="changed since the blend") as info:
        b.verify_members(spec, tmp_path / "blend")
    assert str(paths[1].resolve() / "fold_0" / "best.pt") in str(info.value)
    paths[0].rename(tmp_path / "elsewhere")
    with pytest.raises(RunError, match="does not exist") as info:
        b.verify_members(spec, tmp_path / "blend")
    assert str(paths[0].resolve()) in str(info.value)


def fake_fold_models(paths: list[Path]) -> None:
    """A fold_0/best.pt per hand-made run, so the blend records (and verifies) a checkpoint."""
    for path in paths:
        (path / "fold_0").mkdir()
        (path / "fold_0" / "best.pt").write_bytes(b"weights " + path.name.encode())


@pytest.mark.parametrize("method,calibrate", [(m, False) for m in b.BLEND_METHODS]
                         + [("mean", True), ("weighted", True), ("stack", True)])
def test_predict_blend_applies_the_rule_to_each_fold_model_then_averages(two_runs, tmp_path,
                                                                         monkeypatch, method,
                                                                         calibrate):
    """The rule fitted on all OOF rows (each row one fold model's output) is applied to each fold
    model's test probabilities, and those blends are averaged; the expected values are computed
    here independently (sklearn, scipy, plain numpy) from the members' per-model outputs."""
    import mixcls.predict

    paths, probs, labels, folds = two_runs
    fake_fold_models(paths)
    out = tmp_path / "blend"
    b.blend_runs(paths, out, method=method, calibrate=calibrate, seed=1)
    spec = b.read_blend(out)
    if method == "stack":  # the C chosen by CV is recorded, for the fit on all rows and per fold
        assert spec["settings"]["stack_C"] == spec["stacker"]["C"] in b.STACK_C_GRID
        assert spec["settings"]["stack_C_grid"] == list(b.STACK_C_GRID)
        assert all(f["stacker"]["C"] in b.STACK_C_GRID for f in spec["nested"]["folds"].values())
    rng = np.random.default_rng(12)
    n_models = 3
    test = {str(p.resolve()): rng.dirichlet(np.full(3, 0.5), size=(n_models, 9)) for p in paths}
    asked = []

    def fake_predict_fold_probs(run_dir, image_paths, **kw):
        asked.append(kw["models"])
        return test[str(run_dir)]

    monkeypatch.setattr(mixcls.predict, "predict_fold_probs", fake_predict_fold_probs)
    predicted = b.predict_blend(out, ["x.png"] * 9)
    assert asked == ["folds", "folds"]
    member_fold_probs = np.stack([test[str(p.resolve())] for p in paths])  # (M, F, N, K)

    def rule(member_probs):
        if method == "stack":  # an independent refit on all OOF rows, at the C the blend chose
            model = _sk_stacker(spec["stacker"]["C"])
            model.fit(np.log(np.clip(probs, 1e-6, 1)).transpose(1, 0, 2).reshape(len(labels), -1),
                      labels)
            return model.predict_proba(np.log(np.clip(member_probs, 1e-6, 1))
                                       .transpose(1, 0, 2).reshape(9, -1))
        if method == "rank":
            from scipy.stats import rankdata
            mean = np.mean([rankdata(p, axis=0) / 9 for p in member_probs], axis=0)
            return mean / mean.sum(axis=1, keepdims=True)
        weights = {"mean": np.full(2, 0.5), "weighted": b.fit_weights(probs, labels),
                   "caruana": b.fit_caruana(probs, labels, metric="logloss", seed=1)}[method]
        return np.tensordot(weights, member_probs, axes=1)

    def calibrated(blended):
        t = spec["temperature"]
        assert (t is not None) == calibrate
        return blended if t is None else softmax(np.log(blended) / t, axis=1)

    each = np.stack([calibrated(rule(member_fold_probs[:, f])) for f in range(n_models)])
    np.testing.assert_allclose(b.combine_each_fold(spec, list(member_fold_probs)), each, atol=1e-5)
    per_model = each.mean(axis=0)
    np.testing.assert_allclose(predicted, per_model, atol=1e-5)
    averaged_first = calibrated(rule(member_fold_probs.mean(axis=1)))
    if method in ("mean", "weighted", "caruana") and not calibrate:  # linear: the order is moot
        np.testing.assert_allclose(predicted, averaged_first, atol=1e-6)
    else:  # stack, rank and a temperature are not linear: the test can tell the two apart
        assert np.abs(predicted - averaged_first).max() > 1e-3


@pytest.mark.parametrize("models", ["full", "all"])
def test_predict_blend_with_the_full_models_of_its_members(two_runs, tmp_path, monkeypatch, models):
    """--models all: each member's full-data model is one more entry after its folds; full: the
    only entry. The full checkpoints are hashed at blend time and verified."""
    import mixcls.predict

    paths, probs, labels, folds = two_runs
    fake_fold_models(paths)
    for path in paths:
        (path / "full").mkdir()
        (path / "full" / "best.pt").write_bytes(b"full " + path.name.encode())
    out = tmp_path / "blend"
    b.blend_runs(paths, out, method="weighted", calibrate=True)  # a temperature: not linear
    spec = b.read_blend(out)
    assert all("full/best.pt" in m["checkpoints"] for m in spec["members"])
    rng = np.random.default_rng(13)
    n_models = {"full": 1, "all": 3}[models]
    test = {str(p.resolve()): rng.dirichlet(np.ones(3), size=(n_models, 5)) for p in paths}
    asked = []

    def fake_predict_fold_probs(run_dir, image_paths, **kw):
        asked.append(kw["models"])
        return test[str(run_dir)]

    monkeypatch.setattr(mixcls.predict, "predict_fold_probs", fake_predict_fold_probs)
    predicted = b.predict_blend(out, ["x.png"] * 5, models=models)
    member_fold_probs = np.stack([test[str(p.resolve())] for p in paths])
    weights, t = b.fit_weights(probs, labels), spec["temperature"]
    expected = np.mean([softmax(np.log(np.tensordot(weights, member_fold_probs[:, f], axes=1)) / t,
                                axis=1) for f in range(n_models)], axis=0)
    np.testing.assert_allclose(predicted, expected, atol=1e-6)
    assert asked == [models, models]
    (paths[1] / "full" / "best.pt").write_bytes(b"retrained")
    with pytest.raises(RunError, match=r"full/best.pt of member run .*run1 changed"):
        b.predict_blend(out, ["x.png"] * 5, models=models)
    b.predict_blend(out, ["x.png"] * 5, models="folds")  # the fold models are unchanged


def test_a_member_with_other_fold_models_is_named(two_runs, tmp_path):
    paths, probs, labels, folds = two_runs
    fake_fold_models(paths)
    (paths[0] / "fold_1").mkdir()
    (paths[0] / "fold_1" / "best.pt").write_bytes(b"more")
    out = tmp_path / "blend"
    b.blend_runs(paths, out, method="mean")
    with pytest.raises(RunError, match=r"run1 has fold models \[0\], member run .*run0 has \[0, 1\]"):
        b.predict_blend(out, ["x.png"])


def test_members_with_different_numbers_of_fold_models_are_refused():
    spec = {"method": "mean", "members": [{"path": "/runs/a"}, {"path": "/runs/b"}],
            "weights": [0.5, 0.5], "stacker": None, "temperature": None}
    probs = np.full((5, 4, 3), 1 / 3)
    with pytest.raises(RunError, match=r"/runs/a \(5\), /runs/b \(1\)"):
        b.combine_fold_members(spec, [probs, probs[:1]])


def test_the_report_can_be_rebuilt_from_the_folder(two_runs, tmp_path):
    from mixcls.blend_report import write_blend_report

    paths, *_ = two_runs
    b.blend_runs(paths, tmp_path / "blend", method="stack")
    page = (tmp_path / "blend" / "report.html").read_text()
    assert "A stacker has no member weights" in page and "blend, nested CV" in page
    (tmp_path / "blend" / "report.html").unlink()
    assert write_blend_report(tmp_path / "blend").read_text() == page


# ---------------------------------------------------------------- --class-bias

def under_predicted(rng: np.random.Generator, *, n: int, k: int = 4, shy: int = 2, m: int = 2):
    """Members whose logits hold class `shy` back by 1.5: their argmax under-predicts it."""
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(m, n, k))
    logits[:, np.arange(n), labels] += 1.5
    logits[:, :, shy] -= 1.5
    return softmax(logits, axis=2), labels, rng.permutation(np.arange(n) % 4)


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_the_fast_scores_of_many_predictions_match_sklearn(metric):
    rng = np.random.default_rng(20)
    labels = rng.integers(0, 5, 200)
    decisions = rng.integers(0, 5, (9, 200))
    decisions[0] = 0  # classes never predicted (F1 0, sklearn's zero_division=0)
    decisions[1] = labels
    got = b._score_decisions(labels, decisions, 5, metric)
    expected = [f1_score(labels, p, average="macro", labels=list(range(5)), zero_division=0)
                if metric == "macro_f1" else np.mean(p == labels) for p in decisions]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_bias_is_at_least_the_best_single_threshold_of_two_classes(seed):
    """Two classes: a bias is a threshold on the log-odds; a slow loop over every grid value with
    sklearn's macro F1 gives the best one, which the fit must reach or beat."""
    rng = np.random.default_rng(seed)
    probs, labels, _ = under_predicted(rng, n=300, k=2, shy=1, m=1)
    probs = probs[0]
    bias = b.fit_class_bias(probs, labels, metric="macro_f1")
    fitted = f1_score(labels, b.apply_class_bias(probs, bias).argmax(1), average="macro")
    logp = np.log(probs)
    slow = max(f1_score(labels, (logp[:, 1] + v > logp[:, 0]).astype(int), average="macro")
               for v in b.CLASS_BIAS_GRID)
    assert fitted >= slow - 1e-12
    assert fitted > f1_score(labels, probs.argmax(1), average="macro")  # there was something to gain


def test_class_bias_stays_zero_with_nothing_to_gain():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 90)
    probs = 0.1 / 2 + 0.9 * np.eye(3)[labels]  # every row right already
    np.testing.assert_array_equal(b.fit_class_bias(probs, labels, metric="macro_f1"), np.zeros(3))


def test_class_bias_raises_macro_f1_on_rows_it_never_saw():
    rng = np.random.default_rng(4)
    probs, labels, folds = under_predicted(rng, n=2000)
    plain = b.fit_blend(probs, labels, folds, method="mean")
    biased = b.fit_blend(probs, labels, folds, method="mean", class_bias="macro_f1")
    assert biased.class_bias[2] > 0.5 and plain.class_bias is None  # the shy class is raised
    f1 = lambda p, y: f1_score(y, p.argmax(1), average="macro")  # noqa: E731
    assert f1(biased.nested.probs, labels) > f1(plain.nested.probs, labels) + 0.01
    # fresh rows of the same kind, never seen by any fit: the all-rows biases help there too
    test, test_labels, _ = under_predicted(rng, n=2000)
    blended = test.mean(axis=0)
    assert f1(b.apply_class_bias(blended, biased.class_bias), test_labels) > f1(blended, test_labels) + 0.01
    # the in-sample figure (biases fitted on the rows they score) is the optimistic one
    assert f1(biased.in_sample_probs, labels) >= f1(biased.nested.probs, labels)


def test_nested_class_biases_are_fitted_without_the_fold_on_its_calibrated_blend(monkeypatch):
    rng = np.random.default_rng(5)
    probs, labels, folds = under_predicted(rng, n=400)
    real = b.fit_class_bias
    seen = []

    def recording(p, y, *, metric):
        seen.append((p.copy(), y.copy()))
        return real(p, y, metric=metric)

    monkeypatch.setattr(b, "fit_class_bias", recording)
    nested = b.fit_nested(probs, labels, folds, fit=b.make_fitter("weighted"), calibrate=True,
                          class_bias="macro_f1")
    for g, (p, y) in zip(sorted(set(folds.tolist())), seen):
        rest = folds != g
        expected = b.apply_temperature(b.apply_blend(nested.fold_params[g], probs[:, rest]),
                                       nested.fold_temperatures[g])
        np.testing.assert_allclose(p, expected)
        np.testing.assert_array_equal(y, labels[rest])
        rows = folds == g  # and fold g's rows get that fold's rule, temperature and biases
        scored = b.apply_class_bias(b.apply_temperature(b.apply_blend(
            nested.fold_params[g], probs[:, rows]), nested.fold_temperatures[g]),
            nested.fold_class_biases[g])
        np.testing.assert_allclose(nested.probs[rows], scored)


def test_a_blend_predicts_with_its_class_biases_per_fold_model(two_runs, tmp_path, monkeypatch):
    import mixcls.predict

    paths, probs, labels, folds = two_runs
    fake_fold_models(paths)
    out = tmp_path / "blend"
    b.blend_runs(paths, out, method="mean", calibrate=True, class_bias="accuracy")
    spec = b.read_blend(out)
    assert spec["class_bias_metric"] == "accuracy" and len(spec["class_bias"]) == 3
    assert all(len(f["class_bias"]) == 3 for f in spec["nested"]["folds"].values())
    rng = np.random.default_rng(13)
    test = {str(p.resolve()): rng.dirichlet(np.full(3, 0.5), size=(2, 7)) for p in paths}
    monkeypatch.setattr(mixcls.predict, "predict_fold_probs", lambda run_dir, *a, **k: test[str(run_dir)])
    member_fold_probs = np.stack([test[str(p.resolve())] for p in paths])  # (M, F, N, K)
    bias, t = np.asarray(spec["class_bias"]), spec["temperature"]
    each = [softmax(np.log(softmax(np.log(member_fold_probs[:, f].mean(0)) / t, axis=1)) + bias,
                    axis=1) for f in range(2)]
    np.testing.assert_allclose(b.predict_blend(out, ["x.png"] * 7), np.mean(each, axis=0), atol=1e-9)
    assert "blend-class-bias" in (out / "report.html").read_text()


def test_an_unknown_class_bias_metric_is_refused_before_writing(two_runs, tmp_path):
    paths, *_ = two_runs
    with pytest.raises(ValueError, match="unknown class bias metric 'logloss'"):
        b.blend_runs(paths, tmp_path / "blend", method="mean", class_bias="logloss")
    assert not (tmp_path / "blend").exists()
