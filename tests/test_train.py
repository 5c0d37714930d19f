import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.config import config_from_flat
from mixcls.data import ImageDataset, load_train_table
from mixcls.models import build_model, model_mean_std
from mixcls.runs import load_checkpoint
from mixcls.transforms import build_valid_transform

pytestmark = pytest.mark.slow
BASE = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "8", "--workers", "0",
        "--no-progress", "--lr", "3e-3"]


def train(data, out, *extra):
    code = main(["train", "--data", str(data), "--out", str(out), *BASE, *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_tiny_dataset(root / "data")
    return data, train(data, root / "run", "--folds", "2", "--epochs", "1")


def test_run_folder_is_complete(run):
    data, out = run
    cfg = config_from_flat(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg.train.folds == 2 and cfg.model.name == "test_resnet"
    assert json.loads((out / "classes.json").read_text()) == ["0", "1", "2"]
    table = pd.read_csv(data / "train.csv")
    folds = pd.read_csv(out / "folds.csv")
    assert folds["image_id"].tolist() == table["image_id"].tolist()
    assert sorted(folds["fold"].unique()) == [0, 1]
    for k in range(2):
        for name in ("best.pt", "last.pt"):
            ckpt = load_checkpoint(out / f"fold_{k}" / name)  # weights_only=True inside
            assert set(ckpt) >= {"model", "config", "classes"} and ckpt["classes"] == ["0", "1", "2"]
        history = pd.read_csv(out / f"fold_{k}" / "history.csv")
        assert list(history.columns[:2]) == ["epoch", "train_loss"]
        assert {"valid_loss", "valid_accuracy", "lr", "seconds", "images_per_s"} <= set(history.columns)
    oof = pd.read_csv(out / "oof.csv")
    assert list(oof.columns) == ["image_id", "label", "fold", "pred", "prob_0", "prob_1", "prob_2"]
    assert oof["image_id"].tolist() == table["image_id"].tolist()  # every row once, original order
    assert (oof["fold"].to_numpy() == folds["fold"].to_numpy()).all()
    np.testing.assert_allclose(oof[["prob_0", "prob_1", "prob_2"]].sum(axis=1), 1, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cv_accuracy"] == pytest.approx((oof["label"] == oof["pred"]).mean())
    assert set(metrics) >= {"cv_accuracy", "cv_macro_f1", "fold_accuracy", "class_accuracy", "confusion"}
    assert np.array(metrics["confusion"]).sum() == len(oof)


def test_checkpoint_round_trip_gives_identical_logits(run):
    data, out = run
    ckpt = load_checkpoint(out / "fold_0" / "best.pt")
    cfg = config_from_flat(ckpt["config"])
    model = build_model(cfg.model, 3)
    model.load_state_dict(ckpt["model"])
    model.eval()
    table = load_train_table(data)
    mean, std = model_mean_std(model)
    ds = ImageDataset(table.frame["path"][:8].tolist(), None, build_valid_transform(16, mean=mean, std=std))
    x = torch.stack([ds[i][0] for i in range(8)])
    again = build_model(cfg.model, 3)
    again.load_state_dict(load_checkpoint(out / "fold_0" / "best.pt")["model"])
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_same_seed_same_oof_whatever_the_workers(tmp_path, run):
    data, first = run
    second = train(data, tmp_path / "again", "--folds", "2", "--epochs", "1", "--workers", "2")
    a, b = pd.read_csv(first / "oof.csv"), pd.read_csv(second / "oof.csv")
    pd.testing.assert_frame_equal(a, b)


def test_other_seed_other_oof(tmp_path, run):
    data, first = run
    other = train(data, tmp_path / "other", "--folds", "2", "--epochs", "1", "--seed", "7")
    a, b = pd.read_csv(first / "oof.csv"), pd.read_csv(other / "oof.csv")
    assert not np.allclose(a["prob_0"], b["prob_0"])


def test_only_some_folds_and_refuses_to_overwrite(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data")
    out = train(data, tmp_path / "run", "--folds", "3", "--train-folds", "1", "--epochs", "1")
    oof = pd.read_csv(out / "oof.csv")
    folds = pd.read_csv(out / "folds.csv")
    assert set(oof["fold"]) == {1} and len(oof) == (folds["fold"] == 1).sum()
    assert not (out / "fold_0").exists()
    assert main(["train", "--data", str(data), "--out", str(out), *BASE]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_bf16_training_with_accumulation_and_ema(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    # mixcls_cnn_tiny, not test_resnet: torch's CPU bf16 kernels sometimes give test_resnet's
    # 1x1 conv on a 1x1 map non-finite gradients, depending on what ran before in the process.
    out = train(data, tmp_path / "run", "--model", "mixcls_cnn_tiny", "--folds", "2",
                "--train-folds", "0", "--epochs", "2", "--amp", "bf16", "--accum-steps", "2", "--ema", "--ema-decay", "0.5",
                "--grad-clip", "1.0", "--scheduler", "onecycle")
    history = pd.read_csv(out / "fold_0" / "history.csv")
    assert len(history) == 2 and np.isfinite(history["train_loss"]).all()


def test_cleaned_table_trains_on_cleaned_labels_and_scores_on_given_ones(tmp_path):
    """Soft targets and relabelled rows train; validation keeps the labels as given."""
    data = write_tiny_dataset(tmp_path / "data")
    frame = pd.read_csv(data / "train.csv")
    rng = np.random.default_rng()
    frame["label_given"] = frame["label"]
    frame["fold"] = np.arange(len(frame)) % 2
    frame["keep"] = 1
    frame.loc[rng.choice(len(frame), 5, replace=False), "keep"] = 0
    frame["label"] = (frame["label"] + 1) % 3  # every training label changed
    soft = rng.dirichlet(np.ones(3), size=len(frame))
    for k in range(3):
        frame[f"prob_{k}"] = soft[:, k]
    frame.to_csv(tmp_path / "clean.csv", index=False)
    out = tmp_path / "run"
    assert main(["train", "--csv", str(tmp_path / "clean.csv"), "--images", str(data / "train_images"),
                 "--out", str(out), *BASE, "--folds", "2", "--epochs", "1"]) == 0
    oof = pd.read_csv(out / "oof.csv")
    assert oof["label"].tolist() == frame["label_given"].tolist()
    assert oof["fold"].tolist() == frame["fold"].tolist()


def test_batch_size_auto_accumulates_to_the_effective_batch(tmp_path, monkeypatch):
    """The trainer asks memory.find_max_batch (tested on real steps in test_memory) for the
    largest micro-batch within --max-memory-mb, then accumulates to --effective-batch."""
    import mixcls.memory
    asked = {}

    def fake_find_max_batch(model_name, img_size, *, num_classes, budget_mb, device, amp, **kw):
        asked.update(model=model_name, img_size=img_size, budget_mb=budget_mb, num_classes=num_classes)
        return 5

    monkeypatch.setattr(mixcls.memory, "find_max_batch", fake_find_max_batch)
    data = write_tiny_dataset(tmp_path / "data")
    args = [a for a in BASE if a not in ("--batch-size", "8")]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *args, "--batch-size", "auto",
                 "--effective-batch", "16", "--max-memory-mb", "300", "--folds", "2",
                 "--train-folds", "0", "--epochs", "1"]) == 0
    assert asked == {"model": "test_resnet", "img_size": 16, "budget_mb": 300.0, "num_classes": 3}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["batch_size"], metrics["accum_steps"]) == (4, 4)  # plan_batch(16, 5): 4 x 4
    ckpt = load_checkpoint(tmp_path / "run" / "fold_0" / "best.pt")
    assert (ckpt["config"]["batch_size"], ckpt["config"]["accum_steps"]) == (4, 4)


def test_a_failing_report_does_not_fail_a_finished_run(tmp_path, monkeypatch, capsys):
    import mixcls.report

    def broken(run_dir, **kwargs):
        raise OSError("disk hiccup")

    monkeypatch.setattr(mixcls.report, "write_report", broken)
    data = write_tiny_dataset(tmp_path / "data")
    out = train(data, tmp_path / "run", "--folds", "2", "--train-folds", "0", "--epochs", "1")
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()
    assert "report not written (OSError: disk hiccup)" in capsys.readouterr().out


def test_resolve_device_names_a_bad_device_in_a_config_error():
    from mixcls.config import ConfigError
    from mixcls.devices import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="'gpu0' is not a device name"):
        resolve_device("gpu0")
