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
from mixcls.transforms import Normalizer, build_valid_transform

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
    ds = ImageDataset(table.frame["path"][:8].tolist(), None, build_valid_transform(16))
    x = Normalizer(mean, std)(torch.stack([ds[i][0] for i in range(8)]))  # uint8 -> the model's input
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


# --- accumulation, EMA and clipping against a manual computation of the one optimizer step

ONE_STEP = ["--model", "test_efficientnet_gn", "--img-size", "16", "--workers", "0", "--no-progress",
            "--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0", "--scheduler", "constant",
            "--lr", "0.5", "--preset", "none", "--folds", "2", "--train-folds", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def one_step_csv(tmp_path_factory):
    """A table whose fold 0 trains on exactly 8 rows: with --batch-size 8 one optimizer step.

    The model uses GroupNorm (per image), so one batch of 8 and two micro-batches of 4 give
    the same gradient; with BatchNorm they could not.
    """
    root = tmp_path_factory.mktemp("one_step")
    data = write_tiny_dataset(root / "data", size=16)
    frame = pd.read_csv(data / "train.csv")
    frame["fold"] = np.arange(len(frame)) % 2
    train_rows = np.flatnonzero(frame["fold"] == 1)
    frame["keep"] = 1
    frame.loc[train_rows[8:], "keep"] = 0
    frame.to_csv(root / "one_step.csv", index=False)
    return root, ["--csv", str(root / "one_step.csv"), "--images", str(data / "train_images")], {}


def _one_step_run(one_step_csv, name, *extra):
    """(last.pt, its raw float weights) of a one-step run; runs with the same flags train once."""
    root, source, done = one_step_csv
    out = done.setdefault(extra, root / name)
    if not (out / "fold_0" / "last.pt").is_file():
        assert main(["train", *source, "--out", str(out), *ONE_STEP, *extra]) == 0
    ckpt = load_checkpoint(out / "fold_0" / "last.pt")
    raw = ckpt["train_model"] if ckpt["train_model"] is not None else ckpt["model"]
    return ckpt, {k: v for k, v in raw.items() if v.is_floating_point()}


def _initial_weights(ckpt):
    """The weights the fold starts from: the trainer seeds (seed, fold) before building."""
    from mixcls.sampling import derive_seed, seed_everything
    cfg = config_from_flat(ckpt["config"])
    seed_everything(derive_seed(cfg.train.seed, 0))
    model = build_model(cfg.model, 3)
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def _flat(weights):
    return torch.cat([v.flatten().double() for v in weights.values()])


def test_two_micro_batches_of_4_accumulate_to_one_batch_of_8(one_step_csv):
    full, w_full = _one_step_run(one_step_csv, "b8", "--batch-size", "8")
    accum, w_accum = _one_step_run(one_step_csv, "b4x2", "--batch-size", "4", "--accum-steps", "2")
    w0 = _initial_weights(full)
    assert not torch.allclose(_flat(w_full), _flat(w0))  # the step moved the weights
    # Stepping after each micro-batch, or summing instead of averaging them, would differ.
    torch.testing.assert_close(_flat(w_accum), _flat(w_full), rtol=1e-4, atol=1e-6)


def test_ema_weights_follow_the_ema_formula(one_step_csv):
    _, w1 = _one_step_run(one_step_csv, "b8", "--batch-size", "8")
    ckpt, raw = _one_step_run(one_step_csv, "ema", "--batch-size", "8", "--ema", "--ema-decay", "0.25")
    w0 = _initial_weights(ckpt)
    torch.testing.assert_close(_flat(raw), _flat(w1))  # the EMA does not change the training
    ema = {k: v for k, v in ckpt["model"].items() if v.is_floating_point()}
    expected = {k: 0.25 * w0[k] + 0.75 * w1[k] for k in w0}  # ema <- d * ema + (1 - d) * w
    torch.testing.assert_close(_flat(ema), _flat(expected), rtol=1e-5, atol=1e-6)
    best = load_checkpoint(one_step_csv[0] / "ema" / "fold_0" / "best.pt")["model"]
    torch.testing.assert_close(_flat({k: best[k] for k in ema}), _flat(ema))  # best.pt keeps the EMA


def test_clipping_bounds_the_update_and_keeps_its_direction(one_step_csv):
    plain, w1 = _one_step_run(one_step_csv, "b8", "--batch-size", "8")
    clip = 1e-3
    _, w_clip = _one_step_run(one_step_csv, "clip", "--batch-size", "8", "--grad-clip", str(clip))
    w0 = _flat(_initial_weights(plain))
    free, clipped = _flat(w1) - w0, _flat(w_clip) - w0
    lr = 0.5
    assert float(free.norm()) > 10 * lr * clip  # the gradient was far above the bound
    assert float(clipped.norm()) == pytest.approx(lr * clip, rel=1e-3)  # SGD: update = lr * g
    cosine = float(free @ clipped / (free.norm() * clipped.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-4)


# --- settled before the run folder is written; re-used on resume

def test_auto_batch_plan_is_measured_once_and_reused_on_resume(tmp_path, monkeypatch):
    """A resume must not re-measure: memory figures are noisy, and another plan would make the
    mid-epoch last.pt unusable (it was saved with the first plan's batches)."""
    import mixcls.memory
    import mixcls.train
    answers = iter([5, 7])  # the second measurement would plan 6 x 2 instead of 4 x 3
    calls = []

    def noisy_find_max_batch(*args, **kwargs):
        calls.append(1)
        return next(answers)

    monkeypatch.setattr(mixcls.memory, "find_max_batch", noisy_find_max_batch)
    real = mixcls.train.train_one_epoch

    def interrupted_after_first_checkpoint(*args, on_step, **kwargs):
        def step_then_stop(i, stats):
            on_step(i, stats)
            raise KeyboardInterrupt
        return real(*args, on_step=step_then_stop, **kwargs)

    data = write_tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = [a for a in BASE if a not in ("--batch-size", "8")]
    with monkeypatch.context() as mp:
        mp.setattr(mixcls.train, "train_one_epoch", interrupted_after_first_checkpoint)
        assert main(["train", "--data", str(data), "--out", str(out), *args, "--batch-size", "auto",
                     "--effective-batch", "12", "--folds", "2", "--train-folds", "0", "--epochs", "1",
                     "--save-every-steps", "1"]) == 130
    ckpt = load_checkpoint(out / "fold_0" / "last.pt")
    assert ckpt["batch"] == 3 and (ckpt["batch_size"], ckpt["accum_steps"]) == (4, 3)
    assert json.loads((out / "batch_plan.json").read_text()) == {"batch_size": 4, "accum_steps": 3,
                                                                 "source": "auto"}
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert len(calls) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["batch_size"], metrics["accum_steps"]) == (4, 3)


def test_fp16_on_a_cpu_is_refused_before_the_run_folder_and_the_fix_then_runs(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    one_fold = ["--folds", "2", "--train-folds", "0", "--epochs", "1", "--device", "cpu"]
    assert main(["train", "--data", str(data), "--out", str(out), *BASE, *one_fold, "--amp", "fp16"]) == 2
    assert "amp: fp16 needs CUDA" in capsys.readouterr().err
    assert not out.exists()
    train(data, out, *one_fold)  # the corrected command finds no half-begun folder in its way
    assert (out / "metrics.json").is_file()


def test_pretrained_offline_is_refused_at_once_before_the_run_folder(tmp_path, monkeypatch, capsys):
    import time

    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    one_fold = ["--folds", "2", "--train-folds", "0", "--epochs", "1"]
    started = time.perf_counter()
    assert main(["train", "--data", str(data), "--out", str(out), *BASE, *one_fold, "--pretrained"]) == 2
    assert time.perf_counter() - started < 10  # the data check included; timm's retries take ~60 s
    err = capsys.readouterr().err
    assert "'test_resnet'" in err and "not in the local cache" in err and "--pretrained-file" in err
    assert not out.exists()
    train(data, out, *one_fold)
    assert (out / "metrics.json").is_file()


def test_a_run_that_fails_before_its_first_checkpoint_removes_what_it_wrote(tmp_path, monkeypatch):
    import mixcls.train

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the first epoch")

    data = write_tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(mixcls.train, "train_one_epoch", broken)
        with pytest.raises(RuntimeError, match="a bug in the first epoch"):
            train(data, out, "--folds", "2", "--train-folds", "0", "--epochs", "1")
    assert not out.exists()
    train(data, out, "--folds", "2", "--train-folds", "0", "--epochs", "1")


def test_batch_size_global_sets_the_micro_batch_and_is_logged(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = [a for a in BASE if a not in ("--batch-size", "8")]
    bad = ["train", "--data", str(data), "--out", str(out), *args, "--folds", "2", "--train-folds", "0",
           "--epochs", "1", "--accum-steps", "2"]
    assert main([*bad, "--batch-size-global", "7"]) == 2
    err = capsys.readouterr().err
    assert "batch_size_global: 7" in err and "2 accumulation step(s)" in err
    assert not out.exists()
    assert main([*bad, "--batch-size-global", "8"]) == 0
    printed = capsys.readouterr().out
    # 18 training rows, micro-batch 8 / (1 x 2) = 4: 4 batches (drop_last), 2 optimizer steps
    assert "global batch 8 per optimizer step (1 process(es) x micro-batch 4 x 2 accumulation), " \
           "2 optimizer steps per epoch" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["batch_size"], metrics["accum_steps"], metrics["global_batch"]) == (4, 2, 8)


def test_a_timm_optimizer_trains_a_run_and_is_recorded(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=6)
    out = train(data, tmp_path / "run", "--folds", "2", "--epochs", "2", "--optimizer", "lookahead_radam")
    cfg = config_from_flat(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg.optim.name == "lookahead_radam"
    history = pd.read_csv(out / "fold_0" / "history.csv")
    assert np.isfinite(history["train_loss"]).all() and (out / "oof.csv").is_file()
