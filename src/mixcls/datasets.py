"""Real datasets that need no download, exported to the competition (Kaggle) layout.

- digits: scikit-learn's 1,797 handwritten digits (8x8, shipped inside the wheel), upscaled.
- fashion-mnist: the four standard IDX files (Debian's `dataset-fashion-mnist` installs them
  under /usr/share/datasets/fashion-mnist/), 70,000 28x28 grey photos of clothing.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import train_test_split

from mixcls.data import DataError
from mixcls.runs import atomic_write_csv, atomic_write_json

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")


def _write_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """out/{split}_images/*.png and out/{split}.csv (image_id, label)."""
    folder = out / f"{split}_images"
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i, image in enumerate(images):
        image_id = f"{prefix}_{i:05d}.png"
        Image.fromarray(image).save(folder / image_id)
        ids.append(image_id)
    atomic_write_csv(out / f"{split}.csv", pd.DataFrame({"image_id": ids, "label": labels}))


def export_digits(out: str | Path, *, size: int = 32, holdout: float = 0.2, seed: int = 0) -> Path:
    """Write digits as train.csv/train_images and test.csv/test_images (a stratified holdout).

    Pixel values 0..16 are scaled to 0..255 and upscaled bicubically to `size` px.
    The folder is complete once `done.json` exists, so an interrupted export is redone.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    stamp = out / "done.json"
    if stamp.is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    digits = load_digits()
    images = np.stack([_upscale((img * (255.0 / 16.0)).astype(np.uint8), size) for img in digits.images])
    labels = digits.target.astype(int)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=holdout,
                                           stratify=labels, random_state=seed)
    _write_split(out, "train", images[idx_train], labels[idx_train], "train")
    _write_split(out, "test", images[idx_test], labels[idx_test], "test")
    atomic_write_json(out / "classes.json", [str(k) for k in range(10)])
    atomic_write_json(stamp, {"source": "sklearn.datasets.load_digits", "size": size,
                              "train": len(idx_train), "test": len(idx_test), "seed": seed})
    return out


def _upscale(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not). Hand-written: the format is a 4-byte magic, the
    dimensions, then raw uint8 data; numpy reads it directly, no package needed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: holds {body.size} bytes, its header says {shape}")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem}(.gz); expected the four Fashion-MNIST IDX files "
                    "(apt-get install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)")


def export_fashion_mnist(source: str | Path, out: str | Path, *, limit: int | None = None,
                         test_limit: int | None = None, seed: int = 0) -> Path:
    """Convert the IDX files to train.csv/train_images and test.csv/test_images (labels kept).

    `limit` keeps a stratified subset of the 60,000 training images; `test_limit` of the 10,000
    test images.
    """
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"Fashion-MNIST folder {source} does not exist")
    arrays = {}
    for split, (img_stem, lab_stem) in FASHION_FILES.items():
        images, labels = read_idx(_find_idx(source, img_stem)), read_idx(_find_idx(source, lab_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{source}: {split} images {images.shape} and labels {labels.shape} disagree")
        arrays[split] = (images, labels.astype(int))
    if (out / "train.csv").exists():
        raise DataError(f"{out} already holds a dataset; choose an empty --out")
    for split, cap in (("train", limit), ("test", test_limit)):
        images, labels = arrays[split]
        if cap is not None and cap < len(labels):
            keep, _ = train_test_split(np.arange(len(labels)), train_size=cap, stratify=labels,
                                       random_state=seed)
            keep = np.sort(keep)
            images, labels = images[keep], labels[keep]
        _write_split(out, split, images, labels, split)
    atomic_write_json(out / "classes.json", FASHION_CLASSES)
    return out

