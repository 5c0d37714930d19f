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


def test_folds_fingerprint_is_sha256_of_the_lines_and_sees_one_changed_fold():
    import hashlib

    from mixcls.folds import folds_fingerprint

    rng = np.random.default_rng()
    n = int(rng.integers(20, 80))
    image_ids = [f"img_{rng.integers(1e9)}_{i}.png" for i in range(n)]
    folds = rng.integers(0, 5, n)
    text = "".join(f"{i},{f}\n" for i, f in zip(image_ids, folds.tolist()))
    expected = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    assert folds_fingerprint(image_ids, folds) == expected
    assert folds_fingerprint(iter(image_ids), folds.tolist()) == expected  # any iterables
    changed = folds.copy()
    row = int(rng.integers(n))
    changed[row] = (changed[row] + 1) % 5
    assert folds_fingerprint(image_ids, changed) != expected
    order = rng.permutation(n)
    if not np.array_equal(order, np.arange(n)):  # row order is part of the fingerprint
        assert folds_fingerprint([image_ids[i] for i in order], folds[order]) != expected
    with pytest.raises(ValueError, match="image ids"):
        folds_fingerprint(image_ids, folds[:-1])
