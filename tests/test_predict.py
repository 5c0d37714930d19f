import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.data import ImageDataset
from mixcls.predict import load_fold_models, predict_fold_probs, predict_run
from mixcls.transforms import TTA_VIEWS, Normalizer, apply_tta_view, build_valid_transform
from mixcls.models import model_mean_std

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = write_tiny_dataset(root / "data")
    out = root / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "test_resnet",
                 "--img-size", "16", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--folds", "2", "--epochs", "1", "--tta-views", "orig,hflip,vflip,transpose"]) == 0
    return data, out


def test_identity_view_equals_a_plain_forward(run):
    data, out = run
    paths = sorted(str(p) for p in (data / "train_images").glob("*.png"))[:10]
    fold_probs = predict_fold_probs(out, paths, tta=1, device="cpu")
    assert fold_probs.shape == (2, 10, 3)
    for k, fm in enumerate(load_fold_models(out, torch.device("cpu"))):
        mean, std = model_mean_std(fm.model)
        ds = ImageDataset(paths, None, build_valid_transform(16))
        with torch.no_grad():
            x = Normalizer(mean, std)(torch.stack([ds[i][0] for i in range(len(paths))]))
            plain = fm.model(x).softmax(1)
        np.testing.assert_allclose(fold_probs[k], plain.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict_run(out, paths, tta=1, device="cpu"), fold_probs.mean(0), atol=1e-7)


def test_loader_workers_give_the_same_probabilities(run):
    # workers stack their batches into reused shared buffers (mixcls.batch_ring); a new loader
    # per fold model gets new workers
    data, out = run
    paths = sorted(str(p) for p in (data / "train_images").glob("*.png"))[:21]
    alone = predict_fold_probs(out, paths, tta=2, device="cpu", batch_size=4)
    with_workers = predict_fold_probs(out, paths, tta=2, device="cpu", batch_size=4, workers=2)
    np.testing.assert_array_equal(with_workers, alone)


def test_tta_views_are_exact_permutations_of_pixels():
    x = torch.randn(2, 3, 5, 5)
    for name in set(TTA_VIEWS) - {"zoom"}:
        y = apply_tta_view(x, name)
        assert torch.equal(torch.sort(y.flatten(1))[0], torch.sort(x.flatten(1))[0])
    assert torch.equal(apply_tta_view(apply_tta_view(x, "hflip"), "hflip"), x)
    assert torch.equal(apply_tta_view(x, "transpose")[0, 0], x[0, 0].T)


def test_predict_cli_writes_submission_with_tta(run, tmp_path):
    data, out = run
    ids = pd.DataFrame({"image_id": ["c2_003.png", "c0_001.png", "c1_000.png"]})
    ids.to_csv(tmp_path / "sample.csv", index=False)
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--run", str(out), "--images", str(data / "train_images"),
                 "--ids", str(tmp_path / "sample.csv"), "--tta", "4", "--out", str(sub),
                 "--with-probs"]) == 0
    frame = pd.read_csv(sub)
    assert frame["image_id"].tolist() == ids["image_id"].tolist()
    probs = frame[["prob_0", "prob_1", "prob_2"]].to_numpy()
    assert (frame["label"].to_numpy() == probs.argmax(1)).all()
    paths = [str(data / "train_images" / i) for i in ids["image_id"]]
    np.testing.assert_allclose(probs, predict_run(out, paths, tta=4, device="cpu"), atol=1e-6)


def test_predict_errors_name_the_problem(run, tmp_path, capsys):
    data, out = run
    pd.DataFrame({"image_id": ["nope.png"]}).to_csv(tmp_path / "ids.csv", index=False)
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--run", str(out), "--images", str(data / "train_images"),
                 "--ids", str(tmp_path / "ids.csv"), "--out", str(sub)]) == 2
    assert "nope.png" in capsys.readouterr().err and not sub.exists()
    assert main(["predict", "--run", str(tmp_path), "--images", str(data / "train_images"),
                 "--out", str(sub)]) == 2
    assert "classes.json" in capsys.readouterr().err
    assert main(["predict", "--run", str(out), "--images", str(data / "train_images"), "--tta", "9",
                 "--out", str(sub)]) == 2
    assert "tta" in capsys.readouterr().err and not sub.exists()


def test_zoom_view_matches_bilinear_resampling_of_the_centre():
    """On a linear ramp bilinear interpolation is exact: pixel j of the zoomed row must be the
    ramp at the input coordinate (j + 0.5) * scale - 0.5 inside the crop (align_corners=False)."""
    from mixcls.transforms import ZOOM_CROP
    w = int(np.random.default_rng().integers(20, 60))
    ramp = torch.arange(w, dtype=torch.float64).expand(1, 1, w, w).clone()
    out = apply_tta_view(ramp, "zoom")[0, 0, 0].numpy()
    dw = round(w * ZOOM_CROP / 2)
    scale = (w - 2 * dw) / w
    j = np.arange(w)
    expected = dw + np.clip((j + 0.5) * scale - 0.5, 0, w - 2 * dw - 1)
    np.testing.assert_allclose(out, expected, atol=1e-9)
    const = torch.full((2, 3, 9, 7), 0.3)
    assert torch.allclose(apply_tta_view(const, "zoom"), const)
