import numpy as np
import pytest

from mixcls.folds import make_folds


@pytest.mark.parametrize("n_folds", [2, 3, 5])
def test_folds_are_disjoint_cover_and_stratified(n_folds):
    rng = np.random.default_rng()
    labels = rng.integers(0, 4, size=rng.integers(60, 200))
    labels[: 4 * n_folds] = np.repeat(np.arange(4), n_folds)  # every class in every fold
    folds = make_folds(labels, n_folds, seed=int(rng.integers(1e6)))
    assert folds.shape == labels.shape and set(folds.tolist()) == set(range(n_folds))
    for k in range(4):
        counts = np.bincount(folds[labels == k], minlength=n_folds)
        assert counts.max() - counts.min() <= 1


def test_same_seed_same_folds_other_seed_other_folds():
    labels = np.repeat(np.arange(3), 30)
    assert np.array_equal(make_folds(labels, 5, 1), make_folds(labels, 5, 1))
    assert not np.array_equal(make_folds(labels, 5, 1), make_folds(labels, 5, 2))
