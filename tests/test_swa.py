"""--swa-epochs: a fold's model is the mean of its last epochs' weights, with BatchNorm
statistics measured again on its training rows; it resumes exactly and is refused where an
option would cut or replace the average."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

from conftest import write_tiny_dataset
from mixcls import train as train_module
from mixcls.cli import main
from mixcls.data import ImageDataset
from mixcls.config import OptimConfig, SchedConfig
from mixcls.models import model_mean_std
from mixcls.optim import build_optimizer, build_scheduler
from mixcls.predict import load_model, predict_fold_outputs
from mixcls.runs import load_checkpoint
from mixcls.swa import averaged_epochs, recompute_batchnorm
from mixcls.transforms import Normalizer, build_valid_transform

BASE = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "6", "--workers", "0",
        "--no-progress", "--lr", "3e-3", "--folds", "2", "--epochs", "3"]
PROBS = ["prob_0", "prob_1", "prob_2"]


def _train(data, out, *extra):
    assert main(["train", "--data", str(data), "--out", str(out), *BASE, *extra]) == 0
    return out


def test_averaged_epochs_are_the_last_n():
    assert list(averaged_epochs(5, 2)) == [3, 4]
    assert list(averaged_epochs(3, 3)) == [0, 1, 2]
    assert list(averaged_epochs(4, 0)) == []


def test_batchnorm_statistics_are_the_mean_of_the_batches_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1))
    model[1].running_mean.fill_(7.0)  # whatever was there before is forgotten
    normalizer = Normalizer((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (n, 3, 9, 9), dtype=torch.uint8, generator=generator),
                torch.zeros(n, dtype=torch.int64)) for n in (4, 4, 3)]
    means, variances = [], []
    mean = torch.tensor(normalizer.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalizer.std).view(1, 3, 1, 1)
    with torch.no_grad():
        for images, _ in batches:  # the reference: the conv's output, by hand
            x = model[0]((images.float() / 255.0 - mean) / std)
            means.append(x.mean(dim=(0, 2, 3)))
            variances.append(x.var(dim=(0, 2, 3), unbiased=True))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    model.eval()
    recompute_batchnorm(model, batches, device=torch.device("cpu"), normalizer=normalizer)
    torch.testing.assert_close(model[1].running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack(variances).mean(0))
    assert not model.training  # left in the mode it was in
    for key, value in weights.items():  # and no weight moved
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow
def test_the_fold_model_is_the_mean_of_its_last_epochs(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", size=16)
    snapshots = {}
    real_end = train_module._end_epoch

    def spy(parts, state, row, *args, **kwargs):
        key = (kwargs["fold_dir"].name, int(row["epoch"]))
        snapshots[key] = {k: v.clone() for k, v in parts.net.model.state_dict().items()}
        return real_end(parts, state, row, *args, **kwargs)

    monkeypatch.setattr(train_module, "_end_epoch", spy)
    plain = _train(data, tmp_path / "plain")
    monkeypatch.setattr(train_module, "_end_epoch", real_end)
    swa = _train(data, tmp_path / "swa", "--swa-epochs", "2")
    oof = pd.read_csv(swa / "oof.csv")
    for fold in range(2):
        name = f"fold_{fold}"
        best = load_checkpoint(swa / name / "best.pt")
        # averaging never touches the training: the last weights are the plain run's, bit for bit
        trained = load_checkpoint(swa / name / "last.pt")["model"]
        for key, value in load_checkpoint(plain / name / "last.pt")["model"].items():
            assert torch.equal(trained[key], value), (fold, key)
        for key, value in best["model"].items():
            if "running" in key or "num_batches" in key:
                continue
            expected = (snapshots[(name, 2)][key] + snapshots[(name, 3)][key]) / 2
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        # the first BatchNorm's mean, by hand: the averaged stem convolution over the fold's
        # training rows as validation sees them, in order, in the batches of the pass (2 x 6)
        train_ids = oof.loc[oof["fold"] != fold, "image_id"]
        dataset = ImageDataset([str(data / "train_images" / i) for i in train_ids], None,
                               build_valid_transform(16))
        images = torch.stack([dataset[i][0] for i in range(len(dataset))]).float() / 255.0
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model_mean_std(timm.create_model("test_resnet")))
        with torch.no_grad():
            stem = nn.functional.conv2d((images - mean) / std, best["model"]["conv1.0.weight"],
                                        stride=2, padding=1)
        expected_mean = torch.stack([batch.mean(dim=(0, 2, 3)) for batch in stem.split(12)]).mean(0)
        torch.testing.assert_close(best["model"]["conv1.1.running_mean"], expected_mean,
                                   rtol=1e-4, atol=1e-5)
        summary = json.loads((swa / name / "swa.json").read_text())
        assert (summary["first_epoch"], summary["last_epoch"], summary["epochs_averaged"]) == (2, 3, 2)
        assert best["swa"] == summary
        # the fold's OOF rows are what its best.pt predicts for them
        rows = oof[oof["fold"] == fold]
        model = load_model(swa / name / "best.pt", torch.device("cpu"))
        paths = [str(data / "train_images" / i) for i in rows["image_id"]]
        got = predict_fold_outputs([model], paths, device=torch.device("cpu"), views=["orig"]).probs[0]
        np.testing.assert_allclose(got, rows[PROBS].to_numpy(), atol=1e-6)
        assert summary["valid_accuracy"] == pytest.approx((got.argmax(1) == rows["label"]).mean())
        # history.csv still scores each epoch's own weights
        assert len(pd.read_csv(swa / name / "history.csv")) == 3


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", ["epoch_start", "mid_epoch"])
def test_an_interrupted_swa_run_resumes_to_the_same_model(tmp_path, monkeypatch, stop_at):
    data = write_tiny_dataset(tmp_path / "data", size=16)
    flags = ["--swa-epochs", "2", "--save-every-steps", "1"]
    reference = _train(data, tmp_path / "reference", *flags)
    real_train = train_module.train_one_epoch

    class Stop(RuntimeError):
        pass

    def stopping(*args, **kwargs):  # fold 1's last epoch: its average already holds epoch 2
        if kwargs["desc"] == "fold 1 epoch 3/3":
            if stop_at == "epoch_start":
                raise Stop()
            on_step = kwargs["on_step"]

            def then_stop(i, stats):
                on_step(i, stats)  # the step checkpoint is written first
                if i == 1:
                    raise Stop()
            kwargs["on_step"] = then_stop
        return real_train(*args, **kwargs)

    out = tmp_path / "stopped"
    monkeypatch.setattr(train_module, "train_one_epoch", stopping)
    with pytest.raises(Stop):
        main(["train", "--data", str(data), "--out", str(out), *BASE, *flags])
    monkeypatch.setattr(train_module, "train_one_epoch", real_train)
    assert load_checkpoint(out / "fold_1" / "last.pt")["batch"] == (0 if stop_at == "epoch_start" else 2)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "oof.csv"), pd.read_csv(reference / "oof.csv"),
                                  check_exact=True)
    for fold in range(2):
        a, b = (load_checkpoint(r / f"fold_{fold}" / "best.pt")["model"] for r in (out, reference))
        for key, value in b.items():
            assert torch.equal(a[key], value), (fold, key)


@pytest.mark.slow
def test_the_full_fit_averages_the_same_tail_for_the_runs_epochs(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", size=16)
    out = _train(data, tmp_path / "run", "--swa-epochs", "2", "--full-fit")
    assert json.loads((out / "metrics.json").read_text())["full_fit"]["epochs"] == 3
    best = load_checkpoint(out / "full" / "best.pt")
    assert best["swa"]["first_epoch"] == 2 and best["swa"]["last_epoch"] == 3
    assert len(pd.read_csv(out / "full" / "history.csv")) == 3


def test_swa_lr_alone_is_refused(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=4, size=16)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), *BASE, "--swa-lr", "1e-3"])
    assert code == 2 and "set --swa-epochs too" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--ema"], "use one of --ema and --swa-epochs"),
    (["--patience", "2"], "unset --patience"),
    (["--full-fit", "--full-fit-epochs", "1"], "fewer than swa_epochs=2"),
    (["--epochs", "1"], "swa_epochs: 2 is not allowed"),
    (["--swa-lr", "1e-3", "--warmup-epochs", "2"], "before the --swa-lr tail"),
    (["--swa-lr", "0"], "swa_lr: 0.0 is not allowed"),
])
def test_options_that_would_cut_or_replace_the_average_are_refused(tmp_path, capsys, extra, words):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=4, size=16)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), *BASE, "--swa-epochs", "2", *extra])
    assert code == 2 and words in capsys.readouterr().err
    assert not out.exists()


def _tail_lrs(name, *, steps, epochs, tail_epochs=0, tail_lr=None, state=None, head_lr_mult=4.0):
    """The lr of each group before each of `steps` steps, from a fresh optimizer and schedule
    (loaded from `state`, a (optimizer, scheduler) state-dict pair, when given); and the
    state after them."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.get_classifier = lambda: model[2]
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=0.01, head_lr_mult=head_lr_mult))
    scheduler = build_scheduler(optimizer, SchedConfig(name=name, t0=1, warmup_epochs=0.5),
                                steps_per_epoch=4, epochs=epochs, tail_epochs=tail_epochs,
                                tail_lr=tail_lr)
    if state is not None:
        optimizer.load_state_dict(state[0])
        scheduler.load_state_dict(state[1])
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.asarray(seen), copy.deepcopy((optimizer.state_dict(), scheduler.state_dict()))


@pytest.mark.parametrize("name", ["cosine", "onecycle", "cosine_restarts", "constant"])
def test_swa_lr_runs_the_schedule_before_the_tail_and_holds_the_tail_constant(name):
    got, _ = _tail_lrs(name, steps=20, epochs=5, tail_epochs=2, tail_lr=2e-3)
    plain, _ = _tail_lrs(name, steps=12, epochs=3)  # the schedule over the 3 epochs before it
    np.testing.assert_array_equal(got[:12], plain)
    scale = got[0] / got[0][0]  # the head's groups at 4x, in every step of both parts
    assert sorted(set(np.round(scale, 9))) == [1.0, 4.0]
    np.testing.assert_allclose(got[12:], np.tile(2e-3 * scale, (8, 1)), rtol=1e-12)
    # a resume restores where it stands, in the schedule or in the tail
    for cut in (6, 14):
        _, state = _tail_lrs(name, steps=cut, epochs=5, tail_epochs=2, tail_lr=2e-3)
        rest, _ = _tail_lrs(name, steps=20 - cut, epochs=5, tail_epochs=2, tail_lr=2e-3, state=state)
        np.testing.assert_array_equal(rest, got[cut:])


def test_swa_lr_without_a_schedule_before_it_is_constant_throughout():
    got, _ = _tail_lrs("cosine", steps=8, epochs=2, tail_epochs=2, tail_lr=5e-4, head_lr_mult=1.0)
    np.testing.assert_allclose(got, 5e-4, rtol=1e-12)


@pytest.mark.slow
def test_a_run_with_swa_lr_trains_its_averaged_epochs_at_it(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", size=16)
    out = _train(data, tmp_path / "run", "--swa-epochs", "1", "--swa-lr", "7e-4")
    # history.csv's lr is the one after the epoch's last step: the cosine over epochs 1-2 is
    # half-way down after epoch 1, and from the end of epoch 2 on the tail's lr holds
    lr = pd.read_csv(out / "fold_0" / "history.csv")["lr"].to_numpy()
    np.testing.assert_allclose(lr, [1e-6 + (3e-3 - 1e-6) / 2, 7e-4, 7e-4], rtol=1e-9)
    assert (out / "fold_0" / "swa.json").is_file()
    report = (out / "report.html").read_text()  # the settings and each fold's model say so
    assert "weights averaged (SWA)" in report and "last 1 epoch at lr 0.0007" in report
    assert report.count("SWA 3–3") == 2


def test_under_freeze_bn_the_average_keeps_the_frozen_statistics(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=6, size=16)
    out = _train(data, tmp_path / "run", "--swa-epochs", "2", "--freeze-bn")
    best = load_checkpoint(out / "fold_0" / "best.pt")["model"]
    trained = load_checkpoint(out / "fold_0" / "last.pt")["model"]
    stats = [k for k in best if "running" in k]
    assert stats and all(torch.equal(best[k], trained[k]) for k in stats)  # never measured again
    assert any(not torch.equal(best[k], trained[k]) for k in best if k not in stats
               and "num_batches" not in k)  # while the weights are the average
