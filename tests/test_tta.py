"""mixcls tta: test-time settings scored on the OOF rows, chosen by nested CV, applied to
predict and blend."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

from conftest import write_tiny_dataset
from mixcls.blend import predict_blend, read_blend
from mixcls.cli import main
from mixcls.data import DataError, prob_columns
from mixcls.engine import evaluate
from mixcls.predict import load_model, predict_fold_outputs, predict_fold_probs, predict_run
from mixcls.pseudo import predict_teacher_folds
from mixcls.run_table import run_row
from mixcls.tta import (TTA_FILE, TTA_OOF_FILE, Setting, SettingChoice, apply_setting,
                        choose_setting, inference_setting, make_settings, score_run_settings)

pytestmark = pytest.mark.slow
VIEWS = ("orig", "hflip", "vflip", "transpose")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A 3-fold run of the test ResNet at 16 px (light preset: random crops and flips)."""
    root = tmp_path_factory.mktemp("tta")
    data = write_tiny_dataset(root / "data", n_per_class=8)
    out = root / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "test_resnet",
                 "--img-size", "16", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--folds", "3", "--epochs", "2", "--preset", "light", "--device", "cpu",
                 "--tta-views", ",".join(VIEWS), "--check-images", "header"]) == 0
    return data, out


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run that a test may change (apply a setting, blend it)."""
    data, out = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return data, copy


def _oof(run_dir, name="oof.csv"):
    return pd.read_csv(run_dir / name, dtype={"image_id": str})


def test_the_training_setting_scored_again_is_oof_csv(trained):
    _, out = trained
    grid = score_run_settings(out, [Setting(16, ("orig",))], device="cpu")
    oof = _oof(out)
    assert grid.image_ids == oof["image_id"].tolist()
    np.testing.assert_allclose(grid.probs[0], oof[prob_columns(3)].to_numpy(), atol=2e-6)
    np.testing.assert_allclose(grid.train_oof, oof[prob_columns(3)].to_numpy())


def test_each_setting_is_the_fold_model_predicting_its_rows_with_those_views(trained):
    data, out = trained
    settings = make_settings([20, 12], [2, 4], VIEWS, train_size=16)
    assert [s.name for s in settings] == ["16px x1", "16px x2", "16px x4", "20px x1",
                                          "20px x2", "20px x4", "12px x1", "12px x2", "12px x4"]
    grid = score_run_settings(out, settings, device="cpu", batch_size=5)
    oof = _oof(out)
    for fold in range(3):
        rows = np.flatnonzero(oof["fold"].to_numpy() == fold)
        model = load_model(out / f"fold_{fold}" / "best.pt", torch.device("cpu"))
        paths = [str(data / "train_images" / i) for i in oof["image_id"].iloc[rows]]
        for i, setting in enumerate(settings):
            expected = predict_fold_outputs([model], paths, device=torch.device("cpu"),
                                            views=setting.views, img_size=setting.img_size).probs[0]
            np.testing.assert_allclose(grid.probs[i, rows], expected, atol=1e-6)
    # the sizes and views change the probabilities: the grid is not one table nine times
    assert np.abs(grid.probs[3] - grid.probs[0]).max() > 1e-4
    assert np.abs(grid.probs[1] - grid.probs[0]).max() > 1e-4


def test_per_view_probabilities_average_to_the_tta_mean(trained):
    data, out = trained
    model = load_model(out / "fold_0" / "best.pt", torch.device("cpu"))
    paths = sorted(str(p) for p in (data / "train_images").glob("*.png"))[:7]
    each = predict_fold_outputs([model], paths, device=torch.device("cpu"), views=VIEWS,
                                per_view=True, batch_size=3).probs
    mean = predict_fold_outputs([model], paths, device=torch.device("cpu"), views=VIEWS,
                                batch_size=3).probs
    assert each.shape == (1, 4, 7, 3) and mean.shape == (1, 7, 3)
    np.testing.assert_allclose(each.mean(axis=1), mean, atol=1e-6)
    for v, view in enumerate(VIEWS):
        alone = predict_fold_outputs([model], paths, device=torch.device("cpu"), views=[view]).probs
        np.testing.assert_allclose(each[:, v], alone, atol=1e-6)
    empty = evaluate(model.model, [], device=torch.device("cpu"), tta_views=VIEWS, per_view=True,
                     num_classes=3)[0]
    assert empty.shape == (4, 0, 3)


def _reference_choice(probs, labels, folds, metric):
    """A slow loop with scikit-learn's scores: the setting best on the other folds' rows."""
    def key(p, rows):
        score = (1 - accuracy_score(labels[rows], p[rows].argmax(1)) if metric == "accuracy"
                 else log_loss(labels[rows], p[rows], labels=range(probs.shape[2])))
        return score, log_loss(labels[rows], p[rows], labels=range(probs.shape[2]))

    nested = np.zeros(probs.shape[1:])
    for g in np.unique(folds):
        others = np.flatnonzero(folds != g)
        keys = [key(p, others) for p in probs]
        best = min(range(len(probs)), key=lambda i: keys[i])
        nested[folds == g] = probs[best][folds == g]
    everything = np.arange(len(labels))
    keys = [key(p, everything) for p in probs]
    return min(range(len(probs)), key=lambda i: keys[i]), nested


@pytest.mark.parametrize("metric", ["logloss", "accuracy"])
def test_choose_setting_matches_a_reference_loop(metric):
    rng = np.random.default_rng(3)
    for _ in range(20):
        s, n, k = rng.integers(2, 6), 60, 4
        probs = rng.dirichlet(np.ones(k) * 0.7, size=(s, n))
        labels = rng.integers(0, k, n)
        folds = rng.integers(0, 4, n)
        choice = choose_setting(probs, labels, folds, metric=metric)
        chosen, nested = _reference_choice(probs, labels, folds, metric)
        assert choice.chosen == chosen
        np.testing.assert_allclose(choice.nested_probs, nested)


def test_nested_choice_never_uses_a_folds_own_rows():
    # setting 1 is perfect on fold 0 and wrong everywhere else; setting 0 is fair everywhere
    rng = np.random.default_rng(0)
    n, k = 90, 3
    labels, folds = rng.integers(0, k, n), np.repeat([0, 1, 2], 30)
    fair = np.full((n, k), 0.2)
    fair[np.arange(n), labels] = 0.6
    planted = np.full((n, k), 0.45)
    planted[np.arange(n), labels] = 0.1
    own = folds == 0
    planted[own] = 0.0
    planted[own, labels[own]] = 1.0
    choice = choose_setting(np.stack([fair, planted]), labels, folds, metric="accuracy")
    assert choice.fold_choices[0] == 0  # fold 0 is scored by what the other folds chose
    np.testing.assert_array_equal(choice.nested_probs[own], fair[own])


def test_settings_of_one_size_must_share_a_view_list(trained):
    _, out = trained
    with pytest.raises(ValueError, match=r"\['orig', 'vflip'\] is not a prefix of"):
        score_run_settings(out, [Setting(16, ("orig", "hflip", "zoom")), Setting(16, ("orig", "vflip"))],
                           device="cpu")


def test_make_settings_refuses_bad_grids():
    with pytest.raises(ValueError, match=r"outside 1\.\.2"):
        make_settings([], [3], ["orig", "hflip"], train_size=16)
    with pytest.raises(ValueError, match="start with 'orig'"):
        make_settings([], [1], ["hflip", "orig"], train_size=16)
    with pytest.raises(ValueError, match="unknown TTA view"):
        make_settings([], [1], ["orig", "upside"], train_size=16)
    with pytest.raises(ValueError, match="at least 8 px"):
        make_settings([4], [1], ["orig"], train_size=16)


def test_apply_makes_predict_and_the_runs_table_use_the_setting(run):
    data, out = run
    paths = sorted(str(p) for p in (data / "train_images").glob("*.png"))[:9]
    before = predict_run(out, paths, device="cpu")
    settings = make_settings([20], [2], VIEWS, train_size=16)
    grid = score_run_settings(out, settings, device="cpu")
    chosen = [s.name for s in settings].index("20px x2")
    apply_setting(out, grid, SettingChoice(chosen, {0: chosen, 1: chosen, 2: chosen},
                                           grid.probs[chosen]), metric="logloss")
    setting = inference_setting(out)
    assert setting.applied and setting.views == ["orig", "hflip"] and setting.img_size == 20
    np.testing.assert_allclose(_oof(out, TTA_OOF_FILE)[prob_columns(3)].to_numpy(),
                               grid.probs[chosen], atol=1e-7)
    after = predict_run(out, paths, device="cpu")
    np.testing.assert_allclose(after, predict_run(out, paths, device="cpu", views=["orig", "hflip"],
                                                  img_size=20), atol=1e-7)
    assert np.abs(after - before).max() > 1e-4
    # explicit flags win: one view at the training size is the run's training-time prediction
    np.testing.assert_allclose(predict_run(out, paths, device="cpu", tta=1, img_size=16),
                               predict_run(out, paths, device="cpu", views=["orig"], img_size=16))
    row = run_row(out)
    assert row["tta"] == "20px x2"
    assert row["tta_cv_accuracy"] == pytest.approx(json.loads((out / TTA_FILE).read_text())
                                                   ["nested"]["accuracy"])


def test_a_blend_fits_on_tta_oof_and_predicts_with_the_recorded_setting(run, tmp_path):
    data, out = run
    assert main(["tta", "--run", str(out), "--img-sizes", "20", "--views", "2", "--apply",
                 "--device", "cpu"]) == 0
    applied = json.loads((out / TTA_FILE).read_text())
    blend = tmp_path / "blend"
    assert main(["blend", str(out), "--out", str(blend), "--method", "mean"]) == 0
    member = read_blend(blend)["members"][0]
    assert (member["views"], member["img_size"], member["oof"]) == \
        (applied["views"], applied["img_size"], TTA_OOF_FILE)
    np.testing.assert_allclose(_oof(blend)[prob_columns(3)].to_numpy(),
                               _oof(out, TTA_OOF_FILE)[prob_columns(3)].to_numpy(), atol=1e-7)
    paths = sorted(str(p) for p in (data / "train_images").glob("*.png"))[:6]
    recorded = predict_fold_probs(out, paths, device="cpu", views=applied["views"],
                                  img_size=applied["img_size"]).mean(0)
    np.testing.assert_allclose(predict_blend(blend, paths, device="cpu"), recorded, atol=1e-6)
    # as a pseudo-label teacher the blend's members predict with that setting too
    recorded_folds = predict_fold_probs(out, paths, device="cpu", views=applied["views"],
                                        img_size=applied["img_size"])
    # another setting applied to the member later does not change what the blend predicts
    assert main(["tta", "--run", str(out), "--reset"]) == 0
    assert not (out / TTA_FILE).exists() and not (out / TTA_OOF_FILE).exists()
    np.testing.assert_allclose(predict_blend(blend, paths, device="cpu"), recorded, atol=1e-6)
    _, teacher_probs = predict_teacher_folds(blend, paths, device="cpu")
    np.testing.assert_allclose(teacher_probs, recorded_folds, atol=1e-6)


def test_the_command_refuses_a_blend_and_bad_flags(run, tmp_path, capsys):
    data, out = run
    blend = tmp_path / "blend"
    assert main(["blend", str(out), "--out", str(blend), "--method", "mean"]) == 0
    assert main(["tta", "--run", str(blend)]) == 2
    assert "is a blend" in capsys.readouterr().err
    assert main(["tta", "--run", str(out), "--views", "5"]) == 2
    assert "outside 1..4" in capsys.readouterr().err
    assert main(["predict", "--run", str(blend), "--images", str(data / "train_images"),
                 "--out", str(tmp_path / "s.csv"), "--img-size", "20"]) == 2
    assert "blended with" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    assert main(["tta", "--run", str(out)]) == 0  # scores, writes the grid, applies nothing
    assert (out / "tta_grid.csv").is_file() and not (out / TTA_FILE).exists()
    assert len(pd.read_csv(out / "tta_grid.csv")) == 4


def test_a_damaged_tta_json_is_named(run):
    _, out = run
    (out / TTA_FILE).write_text(json.dumps({"views": ["hflip"], "img_size": 16}))
    with pytest.raises(DataError, match=rf"{TTA_FILE}.*'views'"):
        inference_setting(out)
    (out / TTA_FILE).write_text(json.dumps({"views": ["orig"], "img_size": "big"}))
    with pytest.raises(DataError, match="'img_size'"):
        inference_setting(out)


def test_missing_images_are_named_before_any_model_runs(run):
    data, out = run
    first = _oof(out)["image_id"].iloc[0]
    (data / "train_images" / first).rename(data / "train_images" / "moved.png")
    try:
        with pytest.raises(DataError, match=rf"first '{first}'"):
            score_run_settings(out, [Setting(16, ("orig",))], device="cpu")
    finally:
        (data / "train_images" / "moved.png").rename(data / "train_images" / first)


def test_one_fold_has_no_other_rows_to_choose_on():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=(3, 40))
    labels, folds = rng.integers(0, 3, 40), np.zeros(40, int)
    choice = choose_setting(probs, labels, folds, metric="logloss")
    assert choice.fold_choices == {0: 0}
    np.testing.assert_array_equal(choice.nested_probs, probs[0])
    losses = [log_loss(labels, p, labels=range(3)) for p in probs]
    assert choice.chosen == int(np.argmin(losses))


def test_the_report_shows_the_grid_and_the_applied_setting(run):
    from mixcls.report import write_report

    _, out = run
    assert (out / "report.html").is_file()
    assert main(["tta", "--run", str(out), "--img-sizes", "20", "--views", "1", "--apply",
                 "--device", "cpu"]) == 0
    page = (out / "report.html").read_text()
    grid = pd.read_csv(out / "tta_grid.csv")
    section = page[page.index('id="tta-grid"'):]
    assert [s for s in grid["setting"] if f"<td>{s}</td>" in section] == list(grid["setting"])
    assert f"Applied: {json.loads((out / TTA_FILE).read_text())['setting']}" in page
    assert main(["tta", "--run", str(out), "--reset"]) == 0
    assert "Not applied" in (out / "report.html").read_text()
    grid.drop(columns="nested_folds").to_csv(out / "tta_grid.csv", index=False)
    with pytest.raises(DataError, match=r"tta_grid\.csv: missing column\(s\) nested_folds"):
        write_report(out)
