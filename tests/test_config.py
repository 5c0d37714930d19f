from pathlib import Path

import pytest
import yaml

from mixcls import config
from mixcls.config import (ConfigError, config_from_flat, config_to_flat, dump_config, iter_options,
                           load_config)

ROOT = Path(__file__).resolve().parents[1]


def test_keys_are_unique_and_flags_round_trip():
    keys = [key for key, _, _ in iter_options()]
    assert len(keys) == len(set(keys))
    cfg = load_config(None, {"lr": "2e-4", "img_size": "64", "ema": "true", "train_folds": "0,2",
                             "tta_views": "orig,vflip", "tta": 2, "mix": "fmix:0.5,cutmix:0.5"})
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.data.img_size == 64 and cfg.train.ema is True
    assert cfg.train.train_folds == [0, 2] and cfg.predict.tta_views == ["orig", "vflip"]
    again = config_from_flat(yaml.safe_load(dump_config(cfg)))
    assert config_to_flat(again) == config_to_flat(cfg)


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nepochs: 3\nmodel: resnet34\n")
    cfg = load_config(path, {"epochs": 7})
    assert (cfg.optim.lr, cfg.train.epochs, cfg.model.name) == (0.5, 7, "resnet34")


@pytest.mark.parametrize("values, words", [
    ({"learning_rate": 1}, ["learning_rate"]),
    ({"amp": "fp8"}, ["amp", "fp8", "bf16"]),
    ({"optimizer": "lbfgs"}, ["optimizer", "adamw", "lamb"]),
    ({"epochs": "ten"}, ["epochs", "ten"]),
    ({"epochs": 0}, ["epochs", ">= 1"]),
    ({"mix_prob": 1.5}, ["mix_prob"]),
    ({"tta": 9}, ["tta", "9"]),
    ({"tta_views": "hflip,orig"}, ["tta_views", "orig"]),
    ({"train_folds": "0,7", "folds": 5}, ["train_folds", "7"]),
    ({"mix": "blend"}, ["mix", "blend"]),
    ({"loss": "bi_tempered", "t1": 1.2}, ["t1"]),
])
def test_bad_values_name_the_key(values, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, values)
    for word in words:
        assert word in str(info.value)


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("img_sise: 64\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'img_sise'; did you mean img_size"):
        load_config(path)


def test_cassava_baseline_config_holds_the_classic_settings():
    cfg = load_config(ROOT / "configs" / "cassava_baseline.yaml")
    assert cfg.model.name == "tf_efficientnet_b4_ns" and cfg.data.img_size == 512
    assert (cfg.train.batch_size, cfg.train.accum_steps, cfg.train.epochs, cfg.train.folds) == (16, 2, 10, 5)
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.sched.name == "cosine_restarts" and cfg.sched.t0 == 10


def test_choice_lists_are_the_registries_names():
    """config.py spells the names out (no torch at flag parsing); each list must be exactly the
    names its registry accepts, so a new loss, preset or view cannot be missing from the flags."""
    import torch

    from mixcls import losses, mix, optim, transforms
    from mixcls.devices import amp_dtype

    for names, registry in [(config.PRESETS, transforms.PRESETS), (config.TTA_VIEWS, transforms.TTA_VIEWS),
                            (config.LOSSES, losses.LOSSES), (config.MIX_MODES, mix.MIX_MODES)]:
        assert sorted(names) == sorted(registry) and len(set(names)) == len(names)
    assert sorted(mix.MIX_METHODS) == sorted(mix.MASK_MAKERS)
    model = torch.nn.Linear(2, 2)
    for name in config.OPTIMIZERS:  # optim.py dispatches by name: every listed name must build
        cfg = load_config(None, {"optimizer": name})
        assert isinstance(optim.build_optimizer(model, cfg.optim), torch.optim.Optimizer)
    for name in config.SCHEDULERS:
        cfg = load_config(None, {"scheduler": name})
        opt = optim.build_optimizer(model, cfg.optim)
        optim.build_scheduler(opt, cfg.sched, steps_per_epoch=3, epochs=2)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.build_optimizer(model, config.OptimConfig(name="lbfgs"))
    assert sorted(config.OPTIMIZERS) == sorted(("adamw", "adam", "sgd") + optim.TIMM_OPTIMIZERS)
    for name in config.AMP_MODES:
        amp_dtype(name, torch.device("cuda"))  # every listed name is known (on CUDA fp16 is allowed)
    with pytest.raises(ConfigError, match="not one of"):
        amp_dtype("fp8", torch.device("cpu"))
