"""--class-weights: the per-row loss weights against scikit-learn's balanced rule and torch's
weighted cross-entropy; per fold from the training rows only; refused before any work."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from conftest import write_tiny_dataset
from mixcls import train as train_module
from mixcls.class_weights import (fit_class_weights, parse_class_weights, row_class_weights,
                                  weigh_fold_data)
from mixcls.cli import main
from mixcls.config import ConfigError, load_config
from mixcls.losses import build_loss, to_soft_targets
from mixcls.run_setup import FoldData


@pytest.mark.parametrize("seed", range(10))
def test_balanced_is_sklearns_rule_on_hard_labels(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    labels = rng.choice(k, size=int(rng.integers(k, 200)), p=rng.dirichlet(np.ones(k)))
    labels[:k] = np.arange(k)  # every class present, as sklearn requires
    expected = compute_class_weight("balanced", classes=np.arange(k), y=labels)
    np.testing.assert_allclose(fit_class_weights(labels, None, num_classes=k), expected, rtol=1e-12)


def test_balanced_masses_are_equal_with_soft_targets_and_row_weights():
    rng = np.random.default_rng(0)
    soft = rng.dirichlet(np.ones(4) * 0.3, size=50)
    soft[:, 3] = 0  # a class nobody has: weight 0, and the others still balance
    soft /= soft.sum(1, keepdims=True)
    row_weights = rng.uniform(0.2, 3, 50)
    weights = fit_class_weights(soft, row_weights, num_classes=4)
    assert weights[3] == 0
    # each present class's mass (the rows' weights times their share of it), times its class
    # weight, is the same: n_eff / K
    mass = (row_weights[:, None] * soft).sum(0)
    np.testing.assert_allclose(mass[:3] * weights[:3], row_weights.sum() / 4, rtol=1e-12)
    # with hard labels that is the final rows' total weight per class
    labels = np.random.default_rng(1).choice(3, 60, p=[0.7, 0.2, 0.1])
    hard_weights = fit_class_weights(labels, row_weights[:50].repeat(2)[:60], num_classes=3)
    final = row_weights[:50].repeat(2)[:60] * row_class_weights(labels, hard_weights, num_classes=3)
    totals = [final[labels == c].sum() for c in range(3)]
    np.testing.assert_allclose(totals, totals[0], rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_ce_is_torchs_cross_entropy_with_class_weights(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(32, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (32,), generator=generator)
    class_weights = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    rows = torch.as_tensor(row_class_weights(labels.numpy(), class_weights.numpy(), num_classes=5))
    ours = build_loss("ce")(logits, to_soft_targets(labels, 5).double(), rows.double())
    torchs = F.cross_entropy(logits, labels, weight=class_weights)
    assert float(ours) == pytest.approx(float(torchs), rel=1e-6)  # rows are float32


def _fold_data(targets, weights=None):
    n = len(targets)
    return FoldData(["a", "b", "c"], [f"{i}.png" for i in range(n)], np.asarray(targets),
                    ["v.png"], np.array([0]), train_weights=weights)


def test_none_leaves_the_fold_as_it_is_and_a_list_multiplies_existing_weights():
    data = _fold_data([0, 1, 2, 2])
    same, used = weigh_fold_data(data, "none")
    assert same is data and used is None
    pseudo = _fold_data([0, 1, 2, 2], weights=np.array([1, 1, 0.5, 0.5], np.float32))
    weighted, used = weigh_fold_data(pseudo, "2,1,4")
    np.testing.assert_array_equal(used, [2, 1, 4])
    np.testing.assert_allclose(weighted.train_weights, [2, 1, 2, 2])
    assert weighted.valid_labels.tolist() == [0]  # validation untouched


@pytest.mark.parametrize("spec, words", [
    ("heavy", ["class_weights", "'heavy'", "balanced"]),
    ("1,-2,1", ["> 0"]),
    ("1,inf,1", ["> 0"]),
    ("1,0,1", ["> 0"]),
])
def test_bad_specs_name_the_value(spec, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, {"class_weights": spec})
    for word in words:
        assert word in str(info.value)


def test_a_list_of_the_wrong_length_is_refused_before_the_run_folder(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=3, size=8)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--model", "mixcls_cnn_tiny",
                 "--img-size", "8", "--epochs", "1", "--folds", "2", "--no-progress",
                 "--class-weights", "1,2"])
    assert code == 2 and "gives 2 weight(s) for 3 classes" in capsys.readouterr().err
    assert not out.exists()
    assert parse_class_weights("1,2,3", 3).tolist() == [1, 2, 3]


def test_each_fold_and_the_full_fit_are_balanced_on_their_own_training_rows(tmp_path, monkeypatch):
    """A spy around fit_fold sees what each fold and the full fit train with."""
    data = write_tiny_dataset(tmp_path / "data", n_per_class=6, size=8)
    table = pd.read_csv(data / "train.csv")
    table[(table["label"] != 2) | (table.index % 3 == 0)].to_csv(data / "train.csv", index=False)
    seen, real = [], train_module.fit_fold

    def spy(cfg, fold_data, **kwargs):
        seen.append((kwargs["fold"], fold_data))
        return real(cfg, fold_data, **kwargs)

    monkeypatch.setattr(train_module, "fit_fold", spy)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model",
                 "mixcls_cnn_tiny", "--img-size", "8", "--epochs", "1", "--folds", "2",
                 "--no-progress", "--workers", "0", "--class-weights", "balanced",
                 "--full-fit"]) == 0
    assert [fold for fold, _ in seen] == [0, 1, 2]  # two folds, then the full fit
    sizes = set()
    for fold, fold_data in seen:
        labels = np.asarray(fold_data.train_targets)
        sizes.add(len(labels))
        # sklearn's rule on this part's labels alone: the validation rows set nothing
        expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
        np.testing.assert_allclose(fold_data.train_weights, expected[labels], rtol=1e-6)
    assert len(sizes) >= 2  # the folds and the full fit counted different rows
