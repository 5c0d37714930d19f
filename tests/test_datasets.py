import gzip
import struct

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mixcls.cli import main
from mixcls.data import DataError, load_train_table
from mixcls.datasets import FASHION_CLASSES, export_fashion_mnist, read_idx


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder, n_train=40, n_test=20):
    rng = np.random.default_rng()
    folder.mkdir()
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return arrays


def test_read_idx_matches_what_was_written(tmp_path):
    array = np.random.default_rng().integers(0, 256, (3, 4, 5))
    _write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_export_keeps_pixels_labels_and_limits(tmp_path):
    arrays = _fake_fashion(tmp_path / "idx")
    out = export_fashion_mnist(tmp_path / "idx", tmp_path / "fm", limit=20)
    train = pd.read_csv(out / "train.csv")
    test = pd.read_csv(out / "test.csv")
    assert len(train) == 20 and len(test) == 20
    assert sorted(np.bincount(train["label"])) == [2] * 10  # stratified subset
    first = np.asarray(Image.open(out / "test_images" / test["image_id"][0]))
    assert np.array_equal(first, arrays["t10k"][0][0]) and test["label"][0] == arrays["t10k"][1][0]
    table = load_train_table(out)
    assert table.classes == FASHION_CLASSES


def test_fashion_export_errors_on_missing_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "fashion-mnist", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_digits_export_is_a_stratified_kaggle_layout(tmp_path):
    from sklearn.datasets import load_digits
    assert main(["data", "digits", "--out", str(tmp_path / "digits"), "--size", "16"]) == 0
    train = pd.read_csv(tmp_path / "digits" / "train.csv")
    test = pd.read_csv(tmp_path / "digits" / "test.csv")
    target = load_digits().target
    assert len(train) + len(test) == len(target) == 1797 and len(test) == 360
    assert set(train["image_id"]).isdisjoint(test["image_id"])
    np.testing.assert_allclose(np.bincount(test["label"]) / len(test), np.bincount(target) / len(target), atol=0.01)
    with Image.open(tmp_path / "digits" / "train_images" / train["image_id"][0]) as image:
        assert image.size == (16, 16)
