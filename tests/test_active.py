"""Selection strategies, k-center greedy, review ranking and merging (mixcls.active).

Scores are checked against formulas written here independently (explicit loops,
scipy.stats.entropy) on random Dirichlet probabilities with a fresh seed per run; the seed is
in every failure message so a failure can be replayed.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy

from mixcls.active import (STRATEGIES, MergeError, k_center_greedy, merge_tables, plan_merge,
                           rank_for_review, score_bald, score_entropy, score_least_confidence,
                           score_margin, select)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fixed seed per test (from its name): fresh inputs for each test, the same on every run."""
    return zlib.crc32(request.node.name.encode())


def dirichlet_probs(rng: np.random.Generator, n: int, k: int, alpha: float) -> np.ndarray:
    return rng.dirichlet(np.full(k, alpha), size=n)


def expected_top(scores: list[float], budget: int) -> list[int]:
    """Highest score first, ties to the lower index, by a plain sort of (-score, index)."""
    return [i for _, i in sorted((-s, i) for i, s in enumerate(scores))][:budget]


# --- per-image scores against independent formulas -------------------------------------------

def least_confidence_loop(probs):
    return [1.0 - max(row) for row in probs.tolist()]


def margin_loop(probs):
    out = []
    for row in probs.tolist():
        first, second = sorted(row, reverse=True)[:2]
        out.append(1.0 - (first - second))
    return out


def entropy_loop(probs):
    return [float(entropy(row)) for row in probs]


@pytest.mark.parametrize("alpha", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("name, fn, reference", [
    ("least-confidence", score_least_confidence, least_confidence_loop),
    ("margin", score_margin, margin_loop),
    ("entropy", score_entropy, entropy_loop),
])
def test_uncertainty_scores_match_formula(name, fn, reference, alpha, seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(50, 200)), int(rng.integers(2, 8))
    probs = dirichlet_probs(rng, n, k, alpha)
    want = np.array(reference(probs))
    np.testing.assert_allclose(fn(probs), want, rtol=1e-10, atol=1e-12, err_msg=f"seed {seed}")
    budget = int(rng.integers(1, n))
    indices, scores = select(name, probs=probs, budget=budget, seed=0)
    np.testing.assert_allclose(scores, want, rtol=1e-10, atol=1e-12, err_msg=f"seed {seed}")
    assert indices.tolist() == expected_top(scores.tolist(), budget), f"seed {seed}"


def bald_loop(fold_probs):
    t_members, n, _ = fold_probs.shape
    out = []
    for i in range(n):
        mean = sum(fold_probs[t, i] for t in range(t_members)) / t_members
        out.append(entropy(mean) - sum(entropy(fold_probs[t, i]) for t in range(t_members)) / t_members)
    return out


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_bald_matches_formula(alpha, seed):
    rng = np.random.default_rng(seed)
    t_members, n, k = int(rng.integers(2, 6)), int(rng.integers(30, 120)), int(rng.integers(2, 7))
    fold_probs = rng.dirichlet(np.full(k, alpha), size=(t_members, n))
    want = np.array(bald_loop(fold_probs))
    np.testing.assert_allclose(score_bald(fold_probs), want, rtol=1e-9, atol=1e-12, err_msg=f"seed {seed}")
    indices, scores = select("bald", fold_probs=fold_probs, budget=10, seed=0)
    assert indices.tolist() == expected_top(scores.tolist(), 10), f"seed {seed}"


def test_bald_is_zero_when_folds_agree_and_positive_when_not(seed):
    rng = np.random.default_rng(seed)
    probs = dirichlet_probs(rng, 40, 5, 0.5)
    agree = np.repeat(probs[None], 4, axis=0)
    assert np.abs(score_bald(agree)).max() < 1e-12, f"seed {seed}"
    disagree = agree.copy()
    disagree[0] = dirichlet_probs(rng, 40, 5, 0.5)
    assert (score_bald(disagree) > 1e-6).all(), f"seed {seed}"


def test_uncertainty_uses_fold_mean_when_probs_not_given(seed):
    rng = np.random.default_rng(seed)
    fold_probs = rng.dirichlet(np.ones(4), size=(3, 50))
    _, from_folds = select("entropy", fold_probs=fold_probs, budget=5, seed=0)
    np.testing.assert_allclose(from_folds, entropy_loop(fold_probs.mean(axis=0)), rtol=1e-10)


def test_random_is_reproducible_by_seed_and_differs_between_seeds(seed):
    probs = dirichlet_probs(np.random.default_rng(seed), 500, 3, 1.0)
    a_idx, a_scores = select("random", probs=probs, budget=50, seed=seed)
    b_idx, b_scores = select("random", probs=probs, budget=50, seed=seed)
    c_idx, _ = select("random", probs=probs, budget=50, seed=seed + 1)
    assert a_idx.tolist() == b_idx.tolist() and np.array_equal(a_scores, b_scores)
    assert a_idx.tolist() != c_idx.tolist()
    assert len(set(a_idx.tolist())) == 50


def test_ties_go_to_the_lower_index():
    row = [0.5, 0.3, 0.2]
    probs = np.array([[0.9, 0.05, 0.05], row, row, [0.98, 0.01, 0.01], row])
    for name in ("least-confidence", "margin", "entropy"):
        indices, _ = select(name, probs=probs, budget=3, seed=0)
        assert indices.tolist() == [1, 2, 4], name


# --- k-center greedy ---------------------------------------------------------------------------

def test_k_center_greedy_by_hand_with_labelled():
    # labelled (0,0). Distances: (1,0) 1, (5,0) 5, (0,3) 3, (5,4) sqrt 41, (10,0) 10 -> (10,0);
    # then (5,4) [min(sqrt 41, sqrt 41)]; then (5,0) [min(5, 5, 4) = 4]; then (0,3) [3].
    pool = np.array([[1, 0], [5, 0], [0, 3], [5, 4], [10, 0]], dtype=float)
    indices, scores = k_center_greedy(pool, 4, labelled=np.array([[0.0, 0.0]]))
    assert indices.tolist() == [4, 3, 1, 2]
    np.testing.assert_allclose(scores, [1.0, 4.0, 3.0, math.sqrt(41), 10.0])


def test_k_center_greedy_by_hand_without_labelled():
    # Mean (2, 1.5): (2,1) is nearest, so it starts; it covers radius 4 (to (2,5)), which is
    # picked next; (0,0) and (4,0) then tie at sqrt 5 and the lower index goes first.
    pool = np.array([[0, 0], [4, 0], [2, 1], [2, 5]], dtype=float)
    indices, scores = k_center_greedy(pool, 4)
    assert indices.tolist() == [2, 3, 0, 1]
    np.testing.assert_allclose(scores[[2, 3, 0, 1]], [4.0, 4.0, math.sqrt(5), math.sqrt(5)])


def k_center_loop(points, budget, labelled):
    """Brute force: each step, the unchosen point whose nearest chosen/labelled point is farthest."""
    centres = [tuple(p) for p in labelled]
    picks, pick_dists = [], []
    if not centres:
        mean = [sum(c) / len(points) for c in zip(*points)]
        first = min(range(len(points)), key=lambda i: (math.dist(points[i], mean), i))
        picks.append(first)
        pick_dists.append(max(math.dist(points[first], q) for q in points))
        centres.append(tuple(points[first]))
    while len(picks) < budget:
        best, best_dist = None, -1.0
        for i, p in enumerate(points):
            if i in picks:
                continue
            d = min(math.dist(p, c) for c in centres)
            if d > best_dist:
                best, best_dist = i, d
        picks.append(best)
        pick_dists.append(best_dist)
        centres.append(tuple(points[best]))
    return picks, pick_dists


@pytest.mark.parametrize("n_labelled", [0, 7])
def test_k_center_greedy_matches_brute_force(n_labelled, seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(60, 4))
    labelled = rng.normal(size=(n_labelled, 4))
    budget = int(rng.integers(5, 20))
    indices, scores = select("coreset", features=points, labelled_features=labelled if n_labelled else None,
                             budget=budget, seed=0)
    picks, pick_dists = k_center_loop(points.tolist(), budget, labelled.tolist())
    assert indices.tolist() == picks, f"seed {seed}"
    np.testing.assert_allclose(scores[indices], pick_dists, rtol=1e-10, err_msg=f"seed {seed}")
    rest = np.setdiff1d(np.arange(60), indices)
    centres = np.vstack([labelled, points[indices]])
    final = [min(math.dist(points[i], c) for c in centres) for i in rest]
    np.testing.assert_allclose(scores[rest], final, rtol=1e-10)
    assert np.all(np.diff(scores[indices]) <= 1e-12), "pick distances must not increase"


def test_k_center_greedy_with_duplicate_points_never_repeats_a_pick():
    points = np.array([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2)
    indices, _ = k_center_greedy(points, 5)
    assert sorted(indices.tolist()) == [0, 1, 2, 3, 4]


def test_kmeans_margin_takes_the_most_uncertain_of_each_cluster(seed):
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(6, 3))
    features = np.vstack([c + rng.normal(size=(15, 3)) for c in centres])
    probs = dirichlet_probs(rng, len(features), 4, 1.0)
    indices, scores = select("kmeans-margin", probs=probs, features=features, budget=6, seed=3)
    np.testing.assert_allclose(scores, margin_loop(probs), rtol=1e-10)
    cluster = KMeans(n_clusters=6, n_init=3, random_state=3).fit_predict(features)
    assert sorted(cluster[indices].tolist()) == list(range(6)), f"seed {seed}"
    for i in indices:
        members = np.flatnonzero(cluster == cluster[i])
        best = members[expected_top([scores[m] for m in members], 1)[0]]
        assert i == best, f"seed {seed}"
    assert indices.tolist() == sorted(indices.tolist(), key=lambda i: (-scores[i], i))


# --- select's checks -----------------------------------------------------------------------------

def test_select_names_unknown_strategies_and_lists_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        select("uncertainty", probs=np.full((4, 2), 0.5), budget=1, seed=0)
    message = str(info.value)
    assert "'uncertainty'" in message
    assert all(name in message for name in STRATEGIES)


def test_select_requires_the_inputs_of_each_strategy():
    probs = np.full((5, 2), 0.5)
    with pytest.raises(ValueError, match="bald.*fold_probs"):
        select("bald", probs=probs, budget=1, seed=0)
    with pytest.raises(ValueError, match="T >= 2"):
        select("bald", fold_probs=probs[None], budget=1, seed=0)
    with pytest.raises(ValueError, match="coreset.*features"):
        select("coreset", probs=probs, budget=1, seed=0)
    with pytest.raises(ValueError, match="budget"):
        select("margin", probs=probs, budget=6, seed=0)
    with pytest.raises(ValueError, match="pool size"):
        select("kmeans-margin", probs=probs, features=np.zeros((4, 2)), budget=1, seed=0)
    with pytest.raises(ValueError, match="not probabilities"):
        select("margin", probs=np.array([[0.5, 0.2], [0.5, 0.5]]), budget=1, seed=0)


# --- review ranking ------------------------------------------------------------------------------

def make_oof(rng, n, k, *, n_flipped):
    """OOF rows whose model is confident in the true class; n_flipped rows carry another label."""
    true = rng.integers(0, k, size=n)
    probs = rng.dirichlet(np.full(k, 0.3), size=n) * 0.2
    probs[np.arange(n), true] += 0.8
    labels = true.copy()
    flipped = rng.choice(n, size=n_flipped, replace=False)
    labels[flipped] = (true[flipped] + rng.integers(1, k, size=n_flipped)) % k
    frame = pd.DataFrame({"image_id": [f"img_{i}.png" for i in range(n)], "label": labels,
                          "fold": rng.integers(0, 5, size=n), "pred": probs.argmax(axis=1)})
    for j in range(k):
        frame[f"prob_{j}"] = probs[:, j]
    return frame, set(flipped.tolist())


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_review_score_matches_formula(weight, seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    oof, _ = make_oof(rng, 80, k, n_flipped=8)
    ranked = rank_for_review(oof, num_classes=k, weight=weight)
    probs = oof[[f"prob_{j}" for j in range(k)]].to_numpy()
    want = [weight * (1.0 - probs[i, oof["label"][i]]) + (1 - weight) * entropy(probs[i]) / math.log(k)
            for i in range(len(oof))]
    # atol: scores near 0 (a confident, correct row) agree to float64 rounding, not relatively
    np.testing.assert_allclose(ranked.sort_index()["review_score"], want, rtol=1e-10, atol=1e-14,
                               err_msg=f"seed {seed}")
    assert ranked.index.tolist() == expected_top(want, len(want)), f"seed {seed}"
    assert ranked["rank"].tolist() == list(range(1, 81))


def test_review_puts_planted_flips_first(seed):
    rng = np.random.default_rng(seed)
    oof, flipped = make_oof(rng, 200, 5, n_flipped=20)
    ranked = rank_for_review(oof, num_classes=5)
    assert set(ranked.index[:20].tolist()) == flipped, f"seed {seed}"


def test_review_skips_untrained_rows_and_refuses_partial_ones(seed):
    rng = np.random.default_rng(seed)
    oof, _ = make_oof(rng, 30, 3, n_flipped=3)
    oof.loc[[2, 5], ["prob_0", "prob_1", "prob_2"]] = np.nan
    ranked = rank_for_review(oof, num_classes=3)
    assert sorted(ranked.index.tolist()) == [i for i in range(30) if i not in (2, 5)]
    oof.loc[7, "prob_1"] = np.nan
    with pytest.raises(ValueError, match="not probabilities"):
        rank_for_review(oof, num_classes=3)


# --- merge ---------------------------------------------------------------------------------------

CLASSES = ["healthy", "blight", "mosaic"]


def test_merge_adds_and_corrects_in_the_tables_own_label_form():
    train = pd.DataFrame({"image_id": ["a.png", "b.png", "c.png"], "label": ["0", "1", "2"],
                          "source": ["x", "x", "y"]})
    new = pd.DataFrame({"image_id": ["d.png", "b.png", "c.png", "e.png"],
                        "label": ["mosaic", "healthy", "2", "1"]})
    with pytest.raises(MergeError, match=r"b\.png.*'blight' in train.*'healthy'"):
        plan_merge(train, new, classes=CLASSES)
    plan = plan_merge(train, new, classes=CLASSES, allow_relabel=True)
    assert plan.added == ["d.png", "e.png"] and plan.corrected == ["b.png"]
    assert plan.unchanged == ["c.png"]
    table = plan.table
    assert table["image_id"].tolist() == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert table["label"].tolist() == [0, 0, 2, 2, 1]
    assert table["source"].tolist()[:3] == ["x", "x", "y"]


def test_merge_writes_names_when_the_table_uses_names():
    train = pd.DataFrame({"image_id": ["a.png"], "label": ["blight"]})
    new = pd.DataFrame({"image_id": ["b.png", "c.png"], "label": ["mosaic", "1"]})
    with pytest.raises(MergeError, match=r"c\.png.*'1'"):
        merge_tables(train, new, classes=CLASSES)  # an index is ambiguous in a table of names
    table = merge_tables(train, new.iloc[:1], classes=CLASSES)
    assert table["label"].tolist() == ["blight", "mosaic"]


def test_merge_refuses_conflicts_duplicates_and_unknown_classes_naming_rows():
    train = pd.DataFrame({"image_id": ["a.png", "b.png"], "label": ["0", "1"]})
    new = pd.DataFrame({"image_id": ["x.png", "x.png", "y.png", "y.png", "z.png", "w.png"],
                        "label": ["0", "1", "2", "2", "cat", "7"]})
    with pytest.raises(MergeError) as info:
        merge_tables(train, new, classes=CLASSES, allow_relabel=True)
    message = str(info.value)
    assert "'x.png' given different labels in rows 2, 3" in message
    assert "'y.png' repeated in rows 4, 5" in message
    assert "row 6: 'z.png' label 'cat'" in message and "row 7: 'w.png' label '7'" in message


def test_merge_lists_the_first_20_offending_rows_and_a_count():
    train = pd.DataFrame({"image_id": ["a.png"], "label": ["0"]})
    new = pd.DataFrame({"image_id": [f"n{i}.png" for i in range(33)], "label": ["dog"] * 33})
    with pytest.raises(MergeError) as info:
        merge_tables(train, new, classes=CLASSES)
    message = str(info.value)
    assert "(33)" in message and "and 13 more" in message
    assert "'n19.png'" in message and "'n20.png'" not in message
