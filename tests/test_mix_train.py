"""Mixed training end to end through `mixcls train`: every mix spec under bf16 autocast and
gradient accumulation, mixing only in training epochs (never in validation, never in the last
--mix-off-epochs epochs), and --mix-prob 0 the same run as --mix none.

Spies wrap `Mixer.__call__` and the trainer's `train_one_epoch` / `evaluate` (the names
mixcls.train imported) to record, per call of the mixer, which phase was running and whether
the model was in training mode; they call the real functions, so the runs are unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import mixcls.train
from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.mix import Mixer, parse_mix_spec
from mixcls.runs import load_checkpoint

pytestmark = pytest.mark.slow

# 36 images, 2 folds, fold 0 only: 18 training rows, batch 4 -> 4 batches per epoch (the short
# tail is dropped), so --accum-steps 2 makes 2 optimizer steps of 2 micro-batches each.
# mixcls_cnn_tiny, not test_resnet: under CPU bf16 autocast test_resnet at 16 px now and then
# gets non-finite weight gradients in layer4.0.conv1 (a 1x1 conv on a 1x1 map), even on a fresh
# model's first step, which stops the run whatever the mixing; in float32 it never does.
BASE = ["--model", "mixcls_cnn_tiny", "--img-size", "16", "--batch-size", "4", "--workers", "0",
        "--folds", "2", "--train-folds", "0", "--lr", "3e-3", "--no-progress"]
TRAIN_ROWS, BATCH = 18, 4


def train(data, out, *extra):
    assert main(["train", "--data", str(data), "--out", str(out), *BASE, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("mix_train") / "data", size=16)


class Spy:
    """Records each epoch the trainer runs and every mixer call with its context."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.model: torch.nn.Module | None = None
        self.epochs: list[dict] = []       # {"mixer": passed or not, "calls": mixer calls}
        # {"phase", "training", "epoch", "generator", "method", "soft_max", "sums"} per call
        self.calls: list[dict] = []
        self.evaluations = 0
        self.last_method: str | None = None


@pytest.fixture
def spy(monkeypatch) -> Spy:
    spy = Spy()
    real_train, real_evaluate = mixcls.train.train_one_epoch, mixcls.train.evaluate
    real_call, real_plan = Mixer.__call__, Mixer.sample_plan

    def train_one_epoch(model, loader, optimizer, **kwargs):
        spy.phase, spy.model = "train", model
        spy.epochs.append({"mixer": kwargs.get("mixer") is not None, "calls": 0})
        try:
            return real_train(model, loader, optimizer, **kwargs)
        finally:
            spy.phase = None

    def evaluate(model, loader, **kwargs):
        spy.phase, spy.model = "evaluate", model
        spy.evaluations += 1
        try:
            return real_evaluate(model, loader, **kwargs)
        finally:
            spy.phase = None

    def sample_plan(self, *args, **kwargs):
        plan = real_plan(self, *args, **kwargs)
        spy.last_method = plan.method
        return plan

    def call(self, images, targets, generator=None):
        record = {"phase": spy.phase, "training": bool(spy.model is not None and spy.model.training),
                  "epoch": len(spy.epochs), "generator": generator is not None}
        mixed, soft_targets, lam_eff = real_call(self, images, targets, generator)
        if spy.epochs:
            spy.epochs[-1]["calls"] += 1
        spy.calls.append(dict(record, method=spy.last_method,
                              soft_max=float(soft_targets.max(dim=1).values.min()),
                              sums=soft_targets.sum(dim=1).detach().cpu().numpy()))
        return mixed, soft_targets, lam_eff

    monkeypatch.setattr(mixcls.train, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(mixcls.train, "evaluate", evaluate)
    monkeypatch.setattr(Mixer, "sample_plan", sample_plan)
    monkeypatch.setattr(Mixer, "__call__", call)
    return spy


def check_run_folder(data, out, *, epochs: int) -> None:
    """Every file of the run-folder format, consistent with the table and with each other."""
    table = pd.read_csv(data / "train.csv")
    assert json.loads((out / "classes.json").read_text()) == ["0", "1", "2"]
    folds = pd.read_csv(out / "folds.csv")
    assert folds["image_id"].tolist() == table["image_id"].tolist()
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(out / "fold_0" / name)
        assert set(ckpt) >= {"model", "config", "classes", "epoch"}
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    history = pd.read_csv(out / "fold_0" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))
    assert np.isfinite(history[["train_loss", "valid_loss", "valid_accuracy"]].to_numpy()).all()
    oof = pd.read_csv(out / "oof.csv")
    valid = folds.loc[folds["fold"] == 0, "image_id"].tolist()
    assert oof["image_id"].tolist() == valid and (oof["fold"] == 0).all()
    probs = oof[["prob_0", "prob_1", "prob_2"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert (oof["pred"].to_numpy() == probs.argmax(1)).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cv_accuracy"] == pytest.approx((oof["label"] == oof["pred"]).mean())
    assert metrics["accum_steps"] == 2 and metrics["folds_trained"] == [0]
    assert (out / "report.html").is_file()


# (spec, epochs, --mix-off-epochs): the weighted spec also covers switching mixing off for the
# last epoch; the others train one mixed epoch (each epoch costs seconds of bf16 convolutions).
CASES = [("mixup", 1, 0), ("cutmix", 1, 0), ("fmix", 1, 0), ("fmix:0.5,mixup:0.5", 2, 1)]


@pytest.mark.parametrize("spec, epochs, off_epochs", CASES)
def test_mixed_training_end_to_end_bf16_accumulation(tmp_path, data, spy, spec, epochs, off_epochs):
    out = train(data, tmp_path / "run", "--mix", spec, "--epochs", str(epochs), "--amp", "bf16",
                "--accum-steps", "2", "--mix-off-epochs", str(off_epochs))
    check_run_folder(data, out, epochs=epochs)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["mix"] == spec and cfg["mix_off_epochs"] == off_epochs and cfg["amp"] == "bf16"

    n_batches, mixed_epochs = TRAIN_ROWS // BATCH, epochs - off_epochs
    # Every batch of a mixed epoch goes through the mixer; the last --mix-off-epochs get none.
    assert spy.epochs == ([{"mixer": True, "calls": n_batches}] * mixed_epochs
                          + [{"mixer": False, "calls": 0}] * off_epochs)
    assert spy.evaluations == epochs
    assert len(spy.calls) == n_batches * mixed_epochs
    for call in spy.calls:
        assert call["phase"] == "train" and call["training"] and call["epoch"] <= mixed_epochs
        assert call["generator"]                          # the trainer's own mixing generator
        assert call["method"] in parse_mix_spec(spec)     # --mix-prob 1: every batch is mixed
        np.testing.assert_allclose(call["sums"], 1.0, atol=1e-6)
    # λ ~ Beta(1, 1) lies strictly inside (0, 1), so the targets the model trains on are soft.
    assert min(call["soft_max"] for call in spy.calls) < 1.0


def oof_and_weights(out) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    return pd.read_csv(out / "oof.csv"), load_checkpoint(out / "fold_0" / "last.pt")["model"]


def test_mix_prob_zero_is_the_same_run_as_mix_none(tmp_path, data, spy):
    """The mixer draws only from the trainer's per-epoch mixing generator, never from the global
    torch RNG (which drives dropout, weights and augmentation), and an unmixed batch passes
    through untouched; so --mix-prob 0 must reproduce --mix none bit for bit."""
    # Dropout makes the global torch RNG matter: one stray draw by the mixer would change it.
    flags = ["--epochs", "1", "--accum-steps", "2", "--drop-rate", "0.3"]
    none_oof, none_weights = oof_and_weights(train(data, tmp_path / "none", "--mix", "none", *flags))
    assert spy.calls == []
    zero_oof, zero_weights = oof_and_weights(
        train(data, tmp_path / "zero", "--mix", "cutmix", "--mix-prob", "0", *flags))
    assert len(spy.calls) == TRAIN_ROWS // BATCH   # it was called, and declined every batch
    assert all(call["method"] == "none" and call["soft_max"] == 1.0 for call in spy.calls)
    pd.testing.assert_frame_equal(none_oof, zero_oof)
    assert none_weights.keys() == zero_weights.keys()
    assert all(torch.equal(none_weights[k], zero_weights[k]) for k in none_weights)

    # The control: the same flags with mixing on do change the run.
    mixed_oof, _ = oof_and_weights(train(data, tmp_path / "one", "--mix", "cutmix", "--mix-prob", "1", *flags))
    assert not np.allclose(none_oof[["prob_0", "prob_1", "prob_2"]], mixed_oof[["prob_0", "prob_1", "prob_2"]])
