from pathlib import Path

import pytest
import yaml

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
    ({"optimizer": "lamb"}, ["optimizer", "adamw"]),
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
