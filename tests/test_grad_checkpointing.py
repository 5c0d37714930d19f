"""--grad-checkpointing: the same training with less activation memory. timm recomputes the
blocks in the backward pass; mixcls puts back the BatchNorm statistics that the recomputation
would update a second time."""

import copy

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.config import ModelConfig
from mixcls.engine import train_one_epoch
from mixcls.losses import build_loss
from mixcls.memory import measure_step
from mixcls.models import ModelError, batchnorm_modules, check_model_options, enable_grad_checkpointing
from mixcls.predict import load_model
from mixcls.runs import load_checkpoint

BASE = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "6", "--workers", "0",
        "--no-progress", "--lr", "3e-3", "--folds", "2", "--epochs", "2"]


def _batches(seed: int, n: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 32, 32, generator=generator),
             torch.randint(0, 4, (6,), generator=generator)) for _ in range(n)]


def _epoch(model, batches, *, recomputed_bn=()):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)  # drop_path draws
    train_one_epoch(model, batches, optimizer, loss_fn=build_loss("ce"), device=torch.device("cpu"),
                    num_classes=4, accum_steps=2, recomputed_bn=recomputed_bn, progress=False)
    return model.state_dict()


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_an_epoch_with_checkpointing_equals_one_without_bit_for_bit(name):
    torch.manual_seed(1)
    plain = timm.create_model(name, num_classes=4, drop_path_rate=0.1)
    checkpointed, unrestored = copy.deepcopy(plain), copy.deepcopy(plain)
    for model in (checkpointed, unrestored):
        enable_grad_checkpointing(model, name)
    batches = _batches(0)
    expected = _epoch(plain, batches)
    got = _epoch(checkpointed, batches, recomputed_bn=batchnorm_modules(checkpointed))
    for key, value in expected.items():
        assert torch.equal(got[key], value), key  # weights and BatchNorm statistics alike
    # Without putting the statistics back, the recomputation updates them twice per batch:
    # the weights still agree, the running means do not.
    loose = _epoch(unrestored, batches)
    means = [k for k in expected if k.endswith("running_mean")]
    assert means and all(torch.equal(loose[k], expected[k]) for k in expected if "running" not in
                         k and "num_batches" not in k)
    assert not all(torch.equal(loose[k], expected[k]) for k in means)


def test_a_model_without_gradient_checkpointing_is_refused_by_name():
    with pytest.raises(ModelError, match=r"'mixcls_cnn_tiny' has no gradient checkpointing"):
        check_model_options(ModelConfig(name="mixcls_cnn_tiny", grad_checkpointing=True),
                            layer_decay=None, head_lr_mult=1.0)
    check_model_options(ModelConfig(name="test_resnet", grad_checkpointing=True), layer_decay=None,
                        head_lr_mult=1.0)


def test_train_refuses_it_before_writing_the_run_folder(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=4, size=16)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), *BASE, "--model", "mixcls_cnn_tiny",
                 "--grad-checkpointing"])
    assert code == 2 and "has no gradient checkpointing" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_a_run_with_checkpointing_is_the_run_without(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", size=16)
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpointing"])):
        out = tmp_path / name
        assert main(["train", "--data", str(data), "--out", str(out), *BASE, *extra]) == 0
        runs[name] = out
    a, b = (pd.read_csv(runs[n] / "oof.csv") for n in ("plain", "ckpt"))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for fold in range(2):
        best_a, best_b = (load_checkpoint(runs[n] / f"fold_{fold}" / "best.pt")["model"]
                          for n in ("plain", "ckpt"))
        for key, value in best_a.items():
            assert torch.equal(best_b[key], value), (fold, key)
    # predict builds the model from the checkpoint without it: there is no backward there
    model = load_model(runs["ckpt"] / "fold_0" / "best.pt", torch.device("cpu"))
    assert getattr(model.model, "grad_checkpointing", False) is False


@pytest.mark.slow
def test_the_memory_of_a_step_drops_with_checkpointing():
    results = [measure_step("efficientnet_b0", 96, num_classes=5, micro_batch=16,
                            grad_checkpointing=on) for on in (False, True)]
    plain, checkpointed = results
    assert checkpointed.grad_checkpointing and checkpointed.label == "16 ckpt"
    # timm checkpoints each of its 16 blocks: only their inputs stay (measured: 99 MiB of 240)
    assert checkpointed.activations_mb < 0.6 * plain.activations_mb, (plain, checkpointed)
    assert np.isclose(checkpointed.params_mb, plain.params_mb)
    assert all(0 < r.step_seconds < r.seconds for r in results)  # the step, not the whole child
