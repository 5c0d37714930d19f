"""Shared fixtures: tiny generated competition folders, classes separable by colour."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

# Base colours of the classes; each image is its class colour plus noise and a random square.
CLASS_COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40), (160, 40, 200)]


def write_tiny_dataset(root: Path, *, n_per_class: int = 12, num_classes: int = 3,
                       size: int = 24, seed: int = 0, string_labels: bool = False,
                       extension: str = "png") -> Path:
    """Write a Kaggle-layout folder (train.csv + train_images/) and return its path."""
    rng = np.random.default_rng(seed)
    images = root / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in range(num_classes):
        for i in range(n_per_class):
            pixels = np.array(CLASS_COLOURS[label], dtype=np.float32)[None, None, :]
            pixels = pixels + rng.normal(0, 20, size=(size, size, 3))
            x, y = rng.integers(0, size - 6, size=2)
            pixels[y:y + 6, x:x + 6] = rng.integers(0, 255, size=3)
            image_id = f"c{label}_{i:03d}.{extension}"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / image_id)
            rows.append({"image_id": image_id,
                         "label": f"class_{label}" if string_labels else label})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def add_test_split(data: Path, *, n_per_class: int, num_classes: int = 3, size: int = 24,
                   seed: int = 3) -> Path:
    """Give a write_tiny_dataset folder the test split of `mixcls data fashion-mnist`'s layout
    (test.csv + test_images/), generated with another seed; return `data`."""
    held = write_tiny_dataset(data.parent / f"{data.name}_held", n_per_class=n_per_class,
                              num_classes=num_classes, size=size, seed=seed)
    shutil.copytree(held / "train_images", data / "test_images")
    shutil.copyfile(held / "train.csv", data / "test.csv")
    return data


def write_clothing_photos(root: Path, n: int) -> None:
    """n random 45x60 JPEGs in root/train/{coat,shoe}/, as the clothing checkout lays them out."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / ("coat" if i % 2 else "shoe")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def last_epoch_accuracy(run: Path) -> float:
    """Validation accuracy of each fold's last epoch, pooled over the rows. The CV (oof.csv) is
    the best epoch's, picked on validation, which lifts a chance-level score; this is not."""
    correct = rows = 0
    for fold_dir in run.glob("fold_*"):
        n = len(pd.read_csv(fold_dir / "oof.csv"))
        correct += pd.read_csv(fold_dir / "history.csv")["valid_accuracy"].iloc[-1] * n
        rows += n
    return correct / rows


def load_benchmark(name: str):
    """benchmarks/NAME.py as a fresh module, with benchmarks/ on sys.path as when it runs as a
    script (its sibling modules import)."""
    import importlib.util
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass's string annotations are resolved through it
    spec.loader.exec_module(module)
    return module


def final_figures(output: str | list[str]) -> dict[str, str]:
    """A benchmark's last printed (non-blank) line, `name=value name=value …`, as {name: value}
    (values as printed)."""
    lines = output.splitlines() if isinstance(output, str) else output
    last = [line for line in lines if line.strip()][-1]
    return dict(pair.split("=", 1) for pair in last.split())


def printed_rows(lines: list[str], header: list[str]) -> dict[str, list[str]]:
    """A benchmark's printed table: the rows after the line whose first words are `header`,
    up to the final line, keyed by their first word."""
    start = next(i for i, line in enumerate(lines) if line.split()[:len(header)] == header)
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1:-1]}


# `mixcls train` flags of a tiny CPU run (append --data/--out and what a test varies).
TINY_TRAIN_FLAGS = ["--model", "mixcls_cnn_tiny", "--img-size", "16", "--epochs", "1",
                    "--batch-size", "8", "--workers", "0", "--preset", "none", "--device", "cpu",
                    "--check-images", "header", "--no-progress"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on a shared 2-core machine two threads per
    process wait on each other far more than they work (tiny runs ~10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a fold starts training."""
    import mixcls.train

    def refuse(*args, **kwargs):
        raise AssertionError("training started although the run should have been refused")
    monkeypatch.setattr(mixcls.train, "train_one_epoch", refuse)


@pytest.fixture
def tiny_export(tmp_path: Path) -> Path:
    """A small stand-in for a `mixcls data fashion-mnist` export, as the benchmarks read it:
    3 classes x 20 training and x 10 test images of 28 px."""
    return add_test_split(write_tiny_dataset(tmp_path / "data", n_per_class=20, size=28),
                          n_per_class=10, size=28)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """3 classes x 12 images of 24 px, integer labels, Kaggle layout."""
    return write_tiny_dataset(tmp_path / "data")


@pytest.fixture
def tiny_data_named(tmp_path: Path) -> Path:
    """Like tiny_data, with a label_num_to_disease_map.json naming the classes."""
    root = write_tiny_dataset(tmp_path / "data_named")
    names = {str(k): f"disease_{k}" for k in range(3)}
    (root / "label_num_to_disease_map.json").write_text(json.dumps(names))
    return root
