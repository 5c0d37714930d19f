"""Fine-tuning controls: --freeze-epochs and --freeze-bn read back from the weights and
BatchNorm buffers of a real run, --head-lr-mult and --layer-decay read back from the
optimizer's groups against timm's layer ids computed here."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn

import mixcls.train
from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.config import ModelConfig, OptimConfig, SchedConfig
from mixcls.engine import unwrap_model
from mixcls.models import ModelError, build_model, check_model_options
from mixcls.optim import OptimError, build_optimizer, build_scheduler
from mixcls.runs import load_checkpoint

BASE = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "8", "--workers", "0",
        "--no-progress", "--folds", "2", "--train-folds", "0"]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _spied_run(tmp_path, *flags: str) -> list[tuple[dict, dict, set]]:
    """Per epoch: (state before, state after, ids of the parameters with optimizer state)."""
    data = write_tiny_dataset(tmp_path / "data", size=16)
    real = mixcls.train.train_one_epoch
    epochs = []

    def spy(model, loader, optimizer, **kwargs):
        bare = unwrap_model(model)
        before = _snapshot(bare)
        stats = real(model, loader, optimizer, **kwargs)
        epochs.append((before, _snapshot(bare), {id(p) for p in optimizer.state}))
        return stats

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mixcls.train, "train_one_epoch", spy)
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *BASE, *flags]) == 0
    return epochs


def _head_keys(model: nn.Module) -> set[str]:
    name = model.pretrained_cfg["classifier"]
    return {k for k in model.state_dict() if k.startswith(name + ".")}


def test_freeze_epochs_leave_the_body_bit_equal_then_train_it(tmp_path):
    epochs = _spied_run(tmp_path, "--epochs", "2", "--freeze-epochs", "1", "--weight-decay", "0.1")
    model = timm.create_model("test_resnet", num_classes=3)
    head = _head_keys(model)
    params = dict(model.named_parameters())
    bn_buffers = {k for k in model.state_dict() if k.endswith(("running_mean", "running_var",
                                                                 "num_batches_tracked"))}
    (before, after, state_ids), (before2, after2, _) = epochs
    body = set(before) - head
    assert bn_buffers <= body and len(body) > 10
    frozen_changed = [k for k in body if not torch.equal(before[k], after[k])]
    assert frozen_changed == []  # weights (weight decay 0.1 included) AND BatchNorm statistics
    assert all(not torch.equal(before[k], after[k]) for k in head)  # the head trained
    # the optimizer never saw the body: state only for the head's two tensors
    assert len(state_ids) == len(head)
    moved = [k for k in body if not torch.equal(before2[k], after2[k])]
    assert {k for k in body if k in params} <= set(moved)  # epoch 2 trains every weight
    assert any(k.endswith("running_mean") for k in moved)  # and the BN statistics move again


def test_freeze_bn_keeps_running_statistics_bit_equal_over_an_epoch(tmp_path):
    (before, after, _), = _spied_run(tmp_path, "--epochs", "1", "--freeze-bn")
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    weights = [k for k in before if k.endswith("weight")]
    assert all(not torch.equal(before[k], after[k]) for k in weights)  # everything else trains


def _layer_ids(model: nn.Module) -> dict[str, int]:
    """timm's own grouping, read independently of mixcls.optim."""
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def _group_lr_by_param(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_decay_and_head_mult_put_the_expected_lrs_in_the_groups(seed):
    rng = np.random.default_rng(seed)
    lr, decay, mult = float(10 ** rng.uniform(-4, -2)), float(rng.uniform(0.5, 0.95)), float(rng.uniform(2, 20))
    model = timm.create_model("test_resnet", num_classes=4)
    ids = _layer_ids(model)
    top = max(ids.values())
    head = {id(p) for p in model.get_classifier().parameters()}
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=lr, weight_decay=0.05,
                                                   layer_decay=decay, head_lr_mult=mult))
    got = _group_lr_by_param(optimizer)
    assert len(got) == len(list(model.parameters()))  # every parameter in exactly one group
    for name, param in model.named_parameters():
        expected = lr * decay ** (top - ids[name]) * (mult if id(param) in head else 1.0)
        assert got[id(param)] == pytest.approx(expected, rel=1e-12), name
    # The schedule scales every group by one factor: the ratios hold at every step.
    scheduler = build_scheduler(optimizer, SchedConfig(name="cosine", warmup_epochs=1, min_lr=lr / 50),
                                steps_per_epoch=4, epochs=3)
    initial = np.array([g["lr"] for g in optimizer.param_groups])
    for _ in range(11):
        optimizer.step()
        scheduler.step()
        now = np.array([g["lr"] for g in optimizer.param_groups])
        np.testing.assert_allclose(now / initial, now[0] / initial[0], rtol=1e-10)


@pytest.mark.parametrize("name", ["onecycle", "cosine_restarts", "constant"])
def test_every_schedule_keeps_the_head_ratio(name):
    model = timm.create_model("test_resnet", num_classes=2)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.01, head_lr_mult=7.0))
    scheduler = build_scheduler(optimizer, SchedConfig(name=name, t0=1, min_lr=1e-4),
                                steps_per_epoch=3, epochs=4)
    head = {id(p) for p in model.get_classifier().parameters()}
    for _ in range(12):
        lrs = {("head" if id(g["params"][0]) in head else "body"): g["lr"] for g in optimizer.param_groups}
        assert lrs["head"] == pytest.approx(7.0 * lrs["body"], rel=1e-10)
        optimizer.step()
        scheduler.step()


def test_small_cnn_layer_decay_follows_its_convolutions():
    model = build_model(ModelConfig(name="mixcls_cnn_tiny"), 3)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    optimizer = build_optimizer(model, OptimConfig(lr=1.0, layer_decay=0.5))
    got = _group_lr_by_param(optimizer)
    params = dict(model.named_parameters())
    top = len(convs)  # the classifier is the layer after the last convolution
    for layer, (conv, bn) in enumerate(zip(convs, bns)):
        assert got[id(params[conv + ".weight"])] == pytest.approx(0.5 ** (top - layer))
        assert got[id(params[bn + ".weight"])] == pytest.approx(0.5 ** (top - layer))
    assert got[id(params["fc.weight"])] == 1.0


def test_layer_decay_without_a_group_matcher_is_refused_naming_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(OptimError, match="layer_decay: Sequential has no group_matcher"):
        build_optimizer(model, OptimConfig(layer_decay=0.7))
    with pytest.raises(OptimError, match="head_lr_mult: Sequential has no get_classifier"):
        build_optimizer(model, OptimConfig(head_lr_mult=3.0))
    check_model_options(ModelConfig(name="mixcls_cnn_tiny", freeze_epochs=1), layer_decay=0.7,
                            head_lr_mult=2.0)  # mixcls's own CNNs have both


def test_no_fine_tuning_keys_give_the_groups_of_before():
    model = timm.create_model("test_resnet", num_classes=2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.003))
    assert len(optimizer.param_groups) == 2
    assert all("lr_scale" not in g and g["lr"] == 0.003 for g in optimizer.param_groups)


def test_a_pretrained_file_says_what_it_loaded(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    lines = []
    model = build_model(ModelConfig(name="test_resnet", pretrained_file=str(path)), 3, log=lines.append)
    loaded = len(model.state_dict()) - 2  # every tensor of the file but fc.weight, fc.bias
    assert len(lines) == 1 and str(path) in lines[0] and f"{loaded} tensors loaded" in lines[0]
    assert "fc.weight" in lines[0]  # the classifier (10 classes there, 3 here) is left new
    silent = []
    build_model(ModelConfig(name="test_resnet"), 3, log=silent.append)
    assert silent == []  # from scratch: nothing to say


def test_freeze_epochs_beyond_the_run_is_a_config_error():
    from mixcls.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="freeze_epochs: 5 is not allowed"):
        load_config(None, {"epochs": 3, "freeze_epochs": 5})
    with pytest.raises(ConfigError, match="layer_decay"):
        load_config(None, {"layer_decay": 1.5})
    with pytest.raises(ModelError, match="no get_classifier"):
        from mixcls.models import head_parameters
        head_parameters(nn.Linear(2, 2))


def test_a_run_resumed_after_its_frozen_epoch_ends_as_an_unbroken_one(tmp_path):
    """The phase comes from the epoch number: a run stopped at the end of its frozen epoch
    and resumed trains epoch 2 unfrozen, with the head's optimizer state and nothing else,
    to the very weights of the unbroken run."""
    data = write_tiny_dataset(tmp_path / "data", size=16)
    flags = [*BASE, "--epochs", "2", "--freeze-epochs", "1"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "unbroken"), *flags]) == 0
    real, calls = mixcls.train.train_one_epoch, []

    def stop_at_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "resumed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mixcls.train, "train_one_epoch", stop_at_epoch_2)
        assert main(["train", "--data", str(data), "--out", str(run), *flags]) == 130
    assert load_checkpoint(run / "fold_0" / "last.pt")["epoch"] == 1
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    for name in ("best.pt", "last.pt"):
        got, want = (load_checkpoint(p / "fold_0" / name)["model"] for p in (run, tmp_path / "unbroken"))
        assert all(torch.equal(got[k], want[k]) for k in want), name
