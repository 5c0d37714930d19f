import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import write_tiny_dataset
from mixcls.config import ConfigError, dump_config, load_config
from mixcls.data import DataError
from mixcls.runs import RunError, RunFolder, atomic_write_csv, atomic_write_json, atomic_write_text


def test_atomic_writes_leave_no_temporary_and_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"k": 1})
        atomic_write_csv(tmp_path / "c.csv", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.csv"]
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"v": 1})

    class Boom:
        def to_csv(self, path, **kwargs):
            open(path, "w").write("half")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_csv(target, Boom())
    assert target.read_text().strip().startswith("{") and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------- RunFolder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run folder) of a real 2-fold, 1-epoch `mixcls train` on tiny colour images."""
    from mixcls.cli import main

    root = tmp_path_factory.mktemp("runfolder")
    data = write_tiny_dataset(root / "data", n_per_class=8, size=16)
    run = root / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two intra-op threads spin on each other on 2 busy cores
    try:
        assert main(["train", "--data", str(data), "--out", str(run), "--model", "mixcls_cnn_tiny",
                     "--img-size", "16", "--batch-size", "8", "--workers", "0", "--no-progress",
                     "--preset", "none", "--folds", "2", "--epochs", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    return data, run


def hand_made_run(folder: Path, data: Path, classes: list) -> Path:
    """config.yaml and classes.json only, as a person or a test writes them."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_config(load_config(overrides={"data": str(data)})))
    (folder / "classes.json").write_text(json.dumps(classes))
    return folder


@pytest.mark.slow
def test_opens_a_trained_run(trained_run):
    data, path = trained_run
    run = RunFolder.open(path)
    # The config is config.yaml as a plain YAML reader sees it, with the flags of the command.
    assert run.flat_config == yaml.safe_load((path / "config.yaml").read_text())
    cfg = run.config
    assert (cfg.model.name, cfg.train.folds, cfg.data.img_size) == ("mixcls_cnn_tiny", 2, 16)
    labels = pd.read_csv(data / "train.csv")["label"]
    assert run.classes == [str(k) for k in sorted(labels.unique())]
    assert run.integer_labels is True
    assert run.dataset["rows"] == len(labels)
    assert run.images_dir.resolve() == (data / "train_images").resolve()
    assert run.fold_dirs == {0: path / "fold_0", 1: path / "fold_1"}
    oof = pd.read_csv(run.oof_path)
    assert run.metrics["cv_accuracy"] == pytest.approx((oof["label"] == oof["pred"]).mean())
    assert run.metrics["rows"] == len(labels)


@pytest.mark.slow
def test_images_dir_falls_back_to_the_config_without_dataset_json(trained_run, tmp_path):
    data, path = trained_run
    run_dir = shutil.copytree(path, tmp_path / "run", ignore=shutil.ignore_patterns("*.pt"))
    (run_dir / "dataset.json").unlink()
    run = RunFolder.open(run_dir)
    assert run.dataset == {}
    assert run.images_dir.resolve() == (data / "train_images").resolve()
    # Without dataset.json the label format comes from the class names ("0", "1", "2").
    assert run.integer_labels is True


def test_images_dir_of_a_hand_made_run_and_when_it_is_gone(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=2, size=8)
    run = RunFolder.open(hand_made_run(tmp_path / "run", data, ["red", "green", "blue"]))
    assert run.dataset == {} and run.images_dir == data / "train_images"
    assert run.integer_labels is False
    shutil.rmtree(data / "train_images")
    run = RunFolder.open(run.path)  # a fresh reader: the old one keeps what it read
    assert run.images_dir is None
    with pytest.raises(DataError, match="train_images"):
        run.find_images_dir()


def test_find_images_gives_the_files_and_names_the_first_missing_one(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=2, size=8)
    run = RunFolder.open(hand_made_run(tmp_path / "run", data, ["red", "green", "blue"]))
    ids = sorted(p.name for p in (data / "train_images").iterdir())[:3]
    assert run.find_images(ids) == [data / "train_images" / i for i in ids]
    (data / "train_images" / ids[1]).unlink()
    (data / "train_images" / ids[2]).unlink()
    with pytest.raises(DataError, match=rf"2 image\(s\) .*/train_images, first '{ids[1]}'"):
        run.find_images(ids)


def test_dataset_json_decides_over_the_config(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=2, size=8)
    other = tmp_path / "moved_images"
    other.mkdir()
    path = hand_made_run(tmp_path / "run", data, ["0", "1", "2"])
    (path / "dataset.json").write_text(json.dumps({"images": str(other), "integer_labels": False}))
    run = RunFolder.open(path)
    assert run.images_dir == other
    assert run.integer_labels is False  # dataset.json says so, whatever the names look like
    # A folder of dataset.json that is gone is not replaced by config.yaml's (which still exists).
    other.rmdir()
    run = RunFolder.open(path)
    assert run.images_dir is None
    with pytest.raises(DataError, match=rf"{other}.*dataset\.json"):
        run.find_images_dir()


@pytest.mark.parametrize("missing", [["config.yaml"], ["classes.json"], ["config.yaml", "classes.json"]])
def test_a_missing_file_is_a_run_error_naming_it(tmp_path, missing):
    path = hand_made_run(tmp_path / "run", tmp_path, ["a", "b"])
    for name in missing:
        (path / name).unlink()
    with pytest.raises(RunError) as info:
        RunFolder.open(path)
    message = str(info.value)
    assert str(path) in message and all(name in message for name in missing)
    kept = {"config.yaml", "classes.json"} - set(missing)
    assert not any(name in message for name in kept)


def test_open_requires_extra_files_and_a_folder(tmp_path):
    path = hand_made_run(tmp_path / "run", tmp_path, ["a", "b"])
    with pytest.raises(RunError, match=r"metrics\.json, oof\.csv missing"):
        RunFolder.open(path, require=("metrics.json", "oof.csv"))
    with pytest.raises(RunError, match=rf"{tmp_path / 'nope'} does not exist"):
        RunFolder.open(tmp_path / "nope")
    with pytest.raises(RunError, match="is not a folder"):
        RunFolder.open(path / "classes.json")
    with pytest.raises(RunError, match=r"metrics\.json does not exist"):
        RunFolder.open(path).metrics


@pytest.mark.parametrize("text, why", [("model: [unclosed\n", "not valid YAML"),
                                       ("- a list\n", "expected a mapping"),
                                       ("no_such_key: 1\n", "unknown key 'no_such_key'"),
                                       ("folds: 1\n", "folds: 1 must be >= 2")])
def test_a_corrupt_config_is_a_config_error_naming_the_file(tmp_path, text, why):
    path = hand_made_run(tmp_path / "run", tmp_path, ["a", "b"])
    (path / "config.yaml").write_text(text)
    run = RunFolder.open(path)  # opening checks presence only; reading checks content
    with pytest.raises(ConfigError, match=re.escape(str(path / "config.yaml")) + ".*" + re.escape(why)):
        run.config


@pytest.mark.parametrize("text", ['["a", ', '["only"]', '{"0": "a", "1": "b"}', '["a", null]'])
def test_bad_classes_are_a_data_error_naming_the_file(tmp_path, text):
    path = hand_made_run(tmp_path / "run", tmp_path, ["a", "b"])
    (path / "classes.json").write_text(text)
    with pytest.raises(DataError, match=r"classes\.json"):
        RunFolder.open(path).classes


def test_fold_dirs_are_in_numeric_order(tmp_path):
    path = hand_made_run(tmp_path / "run", tmp_path, ["a", "b"])
    rng = np.random.default_rng()
    folds = sorted(rng.choice(30, size=6, replace=False).tolist())
    for fold in rng.permutation(folds):
        (path / f"fold_{fold}").mkdir()
    (path / "fold_x").mkdir()
    (path / "fold_99").write_text("a file, not a fold")
    assert list(RunFolder.open(path).fold_dirs.items()) == [(k, path / f"fold_{k}") for k in folds]


@pytest.mark.slow
def test_reads_folds_and_oof_without_importing_noise(trained_run):
    """read_folds / read_oof / read_oof_ids agree with the files, and reading a run pulls in no
    noise module (runs sits below noise: noise reads runs through RunFolder)."""
    import subprocess
    import sys

    data, path = trained_run
    run = RunFolder.open(path)
    folds = pd.read_csv(path / "folds.csv", dtype={"image_id": str})
    pd.testing.assert_frame_equal(run.read_folds(), folds)
    oof = pd.read_csv(path / "oof.csv", dtype={"image_id": str})
    assert run.read_oof()["image_id"].tolist() == oof["image_id"].tolist() == run.read_oof_ids()
    code = ("import sys; from mixcls.runs import RunFolder; r = RunFolder.open(sys.argv[1]); "
            "r.read_oof(); r.read_folds(); print('mixcls.noise' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_read_folds_names_the_file(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=2, size=8)
    run = RunFolder.open(hand_made_run(tmp_path / "run", data, ["red", "green", "blue"]))
    with pytest.raises(RunError, match="folds.csv does not exist"):
        run.read_folds()
    (run.path / "folds.csv").write_text("image_id,split\na.png,0\n")
    with pytest.raises(DataError, match="folds.csv: expected columns image_id, fold"):
        run.read_folds()
    assert run.read_oof_ids() == []
