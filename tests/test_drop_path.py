"""--drop-path-rate: timm's stochastic depth, passed to the model, refused where it has none."""

import numpy as np
import pytest
import torch

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.config import ModelConfig
from mixcls.models import ModelError, build_model, check_model_options, drop_path_rates
from mixcls.predict import load_model


@pytest.mark.parametrize("name", ["test_resnet", "efficientnet_b0"])
def test_the_rate_reaches_the_models_drop_path_layers(name):
    rates = drop_path_rates(build_model(ModelConfig(name=name, drop_path_rate=0.2), 3))
    # timm's rule: the rate grows with depth to (at most) the given one at the last block
    assert rates and np.all(np.diff(rates) >= 0) and 0 < rates[0] and np.isclose(max(rates), 0.2,
                                                                                 atol=0.2 / len(rates))
    assert not any(drop_path_rates(build_model(ModelConfig(name=name), 3)))


def test_training_drops_branches_and_evaluation_does_not():
    torch.manual_seed(0)
    dropped = build_model(ModelConfig(name="test_resnet", drop_path_rate=0.5), 3)
    with torch.no_grad():  # timm zero-initialises each block's last BatchNorm: a new branch is 0
        for param in dropped.parameters():
            param.add_(0.1 * torch.randn_like(param))
    plain = build_model(ModelConfig(name="test_resnet"), 3)
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(8, 3, 32, 32)
    for model in (dropped, plain):
        model.eval()
    assert torch.equal(dropped(x), plain(x))
    for model in (dropped, plain):
        model.train()
    torch.manual_seed(1)
    a = dropped(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, plain(x))


@pytest.mark.parametrize("name", ["mixcls_cnn_tiny", "vgg11"])
def test_a_model_without_stochastic_depth_is_refused_by_name(name):
    # mixcls_cnn_tiny takes (and would ignore) any keyword; vgg11's constructor refuses it
    with pytest.raises(ModelError, match=rf"drop_path_rate: model '{name}' has no stochastic-depth"):
        check_model_options(ModelConfig(name=name, drop_path_rate=0.1), layer_decay=None,
                            head_lr_mult=1.0)
    check_model_options(ModelConfig(name=name), layer_decay=None, head_lr_mult=1.0)


def test_train_refuses_it_before_writing_the_run_folder(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=4, size=16)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--model", "mixcls_cnn_tiny",
                 "--drop-path-rate", "0.1", "--folds", "2", "--workers", "0", "--no-progress"])
    assert code == 2 and "has no stochastic-depth layers" in capsys.readouterr().err
    assert not out.exists()
    code = main(["train", "--data", str(data), "--out", str(out), "--drop-path-rate", "1.0"])
    assert code == 2 and "drop_path_rate" in capsys.readouterr().err and not out.exists()


def test_a_run_saves_the_rate_and_predict_rebuilds_the_model_with_it(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=4, size=16)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "test_resnet",
                 "--img-size", "16", "--batch-size", "4", "--folds", "2", "--epochs", "1",
                 "--drop-path-rate", "0.3", "--workers", "0", "--no-progress"]) == 0
    model = load_model(out / "fold_0" / "best.pt", torch.device("cpu")).model
    assert np.isclose(max(drop_path_rates(model)), 0.3)
