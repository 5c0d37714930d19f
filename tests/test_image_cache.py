"""The disk cache of resized images, the check index and the decode-once start-up."""

from __future__ import annotations

import io
import os
import sqlite3
import threading
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, JpegImagePlugin

import mixcls.image_cache as ic
from conftest import write_tiny_dataset
from mixcls.config import ConfigError, load_config
from mixcls.data import DataError, ImageDataset, load_image_cache, load_train_table, read_image
from mixcls.image_cache import ImageCache, decode_image, load_copy, short_side_for
from mixcls.transforms import build_valid_transform

N_IMAGES = 36  # write_tiny_dataset: 3 classes x 12


def _smooth_image(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like image: low-frequency colour waves, a ramp and mild noise, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        freq, phase = rng.uniform(1, 6, size=2), rng.uniform(0, 2 * np.pi, size=2)
        channels.append(128 + 60 * np.sin(2 * np.pi * freq[0] * x + phase[0])
                        * np.cos(2 * np.pi * freq[1] * y + phase[1]) + 40 * (x - y))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _write_photo_dataset(root: Path, *, n: int = 12, size: tuple[int, int] = (200, 150)) -> Path:
    images = root / "train_images"
    images.mkdir(parents=True)
    rows = []
    for i in range(n):
        image_id = f"p{i:02d}.jpg"
        Image.fromarray(_smooth_image(*size, seed=i)).save(images / image_id, quality=92)
        rows.append({"image_id": image_id, "label": i % 2})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture
def counts(monkeypatch):
    """Counters of the decodes, hashes and copy writes the cache does."""
    seen = {"decode": 0, "hash": 0, "write": 0}
    lock = threading.Lock()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            with lock:
                seen[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ic, "decode_image", counted("decode", ic.decode_image))
    monkeypatch.setattr(ic, "hash_bytes", counted("hash", ic.hash_bytes))
    monkeypatch.setattr(ic, "write_copy", counted("write", ic.write_copy))
    return seen


def _reset(seen):
    seen.update(decode=0, hash=0, write=0)


def _start(root: Path, cache_dir: Path, mode: str = "disk", *, img_size: int = 16,
           check: str = "full") -> tuple[list[str], list]:
    """What the trainer does: check the table through a cache, then take the cached sources."""
    cache = ImageCache(mode, img_size=img_size, cache_dir=cache_dir)
    table = load_train_table(root, check_images=check, image_cache=cache)
    paths = table.frame["path"].tolist()
    return paths, load_image_cache(paths, image_cache=cache)


def test_disk_cache_writes_once_and_follows_a_changed_file(tmp_path, counts):
    root = write_tiny_dataset(tmp_path / "data", size=48)
    paths, sources = _start(root, tmp_path / "cache")
    assert counts == {"decode": N_IMAGES, "hash": N_IMAGES, "write": N_IMAGES}
    short = short_side_for(16)
    for path, source in zip(paths, sources):
        np.testing.assert_array_equal(load_copy(source), decode_image(path, short_side=short))
    _reset(counts)
    again_paths, again = _start(root, tmp_path / "cache")
    assert counts == {"decode": 0, "hash": 0, "write": 0} and again == sources

    changed = paths[5]
    old_pixels = load_copy(sources[5])
    Image.fromarray(_smooth_image(48, 48, seed=99)).save(changed)
    stat = os.stat(changed)  # a new mtime even on a coarse-clock filesystem
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _reset(counts)
    _, third = _start(root, tmp_path / "cache")
    assert counts == {"decode": 1, "hash": 1, "write": 1}
    assert third[5] != sources[5] and [s for i, s in enumerate(third) if i != 5] == \
        [s for i, s in enumerate(sources) if i != 5]
    served = ImageDataset([changed], None, lambda image: {"image": image}, cache=[third[5]])[0][0]
    np.testing.assert_array_equal(served, decode_image(changed, short_side=short))
    assert np.abs(served.astype(int) - old_pixels).mean() > 10


def test_cached_batches_match_decoding_the_originals(tmp_path):
    # 80x60 JPEGs at img_size 32: copies of 49x37 px, the ratio of Cassava's 800x600 at 384 px.
    root = _write_photo_dataset(tmp_path / "data", size=(80, 60))
    img_size = 32
    paths, sources = _start(root, tmp_path / "cache", img_size=img_size)
    resize = build_valid_transform(img_size)  # uint8; as float / 255 below, the old pixels / 255

    def transform(image):
        return {"image": resize(image=image)["image"].float() / 255.0}
    labels = np.arange(len(paths)) % 2
    cached = ImageDataset(paths, labels, transform, cache=sources)
    originals = ImageDataset(paths, labels, transform)
    batch_cached = torch.stack([cached[i][0] for i in range(len(paths))])
    batch_originals = torch.stack([originals[i][0] for i in range(len(paths))])
    assert batch_cached.shape == batch_originals.shape == (len(paths), 3, img_size, img_size)
    # Bound: under 3 grey levels on average (measured 2.0 here, 1.0 on 800x600 photos at 384
    # px): two resamplings round differently, and the transform's bilinear Resize aliases the
    # original's noise, which the area-shrunk copy has averaged out.
    difference = (batch_cached - batch_originals).abs()
    assert difference.mean() < 3 / 255
    # …while the images differ from each other by far more: the bound can fail.
    assert (batch_cached - batch_originals.roll(1, dims=0)).abs().mean() > 10 / 255


@pytest.fixture
def draft_calls(monkeypatch):
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append((self.size, size))
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def _jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_smooth_image(width, height, seed)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _full_then_area(data: bytes, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(read_image(io.BytesIO(data)), size, interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduced_scale_jpeg_decode_is_used_and_close(draft_calls, seed):
    data = _jpeg_bytes(320, 240, seed)  # 4x the 80x60 target
    got = decode_image(io.BytesIO(data), short_side=60)
    assert draft_calls == [((320, 240), (80, 60))] and got.shape == (60, 80, 3)
    difference = np.abs(got.astype(int) - _full_then_area(data, (80, 60)))
    # Bounds: DCT scaling vs a full decode + area resize (measured mean ~0.5, max 3 levels).
    assert difference.mean() < 1.5 and difference.max() <= 12


def test_no_reduced_decode_below_twice_the_target(draft_calls, tmp_path):
    data = _jpeg_bytes(120, 90, 3)  # 1.5x the 80x60 target: a DCT scale of 1/2 would upscale
    got = decode_image(io.BytesIO(data), short_side=60)
    assert draft_calls == []
    np.testing.assert_array_equal(got, _full_then_area(data, (80, 60)))
    small = decode_image(io.BytesIO(data), short_side=120)  # smaller than asked: kept as it is
    np.testing.assert_array_equal(small, read_image(io.BytesIO(data)))
    png = tmp_path / "big.png"  # not a JPEG: no DCT scaling, the plain area resize
    Image.fromarray(_smooth_image(320, 240, 4)).save(png)
    np.testing.assert_array_equal(decode_image(png, short_side=60),
                                  cv2.resize(read_image(png), (80, 60), interpolation=cv2.INTER_AREA))
    assert draft_calls == []


@pytest.mark.parametrize("mode", ["no", "disk", "yes"])
def test_index_skips_unchanged_files_and_rechecks_a_touched_one(tmp_path, counts, mode):
    root = write_tiny_dataset(tmp_path / "data", size=32)
    _start(root, tmp_path / "cache", mode)
    # One decode per image in all: the check's decode feeds the RAM or disk cache.
    assert counts["decode"] == N_IMAGES and counts["hash"] == N_IMAGES
    _reset(counts)
    paths, _ = _start(root, tmp_path / "cache", mode)
    # RAM starts empty in a new process, so "yes" decodes again; nothing else does.
    assert counts == {"decode": N_IMAGES if mode == "yes" else 0, "hash": 0,
                      "write": 0}
    stat = os.stat(paths[7])
    os.utime(paths[7], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _reset(counts)
    _start(root, tmp_path / "cache", mode)
    assert counts["hash"] == 1 and counts["decode"] == (N_IMAGES if mode == "yes" else 1)
    assert counts["write"] == 0  # same bytes, same key: the copy is still good


def test_header_check_then_full_check_decodes_without_hashing(tmp_path, counts):
    root = write_tiny_dataset(tmp_path / "data", size=32)
    _start(root, tmp_path / "cache", "no", check="header")
    assert counts["decode"] == 0 and counts["hash"] == N_IMAGES
    _reset(counts)
    _start(root, tmp_path / "cache", "no", check="full")  # a header pass is no full pass
    assert counts["decode"] == N_IMAGES and counts["hash"] == 0
    _reset(counts)
    _start(root, tmp_path / "cache", "no", check="header")  # a full pass covers a header one
    assert counts == {"decode": 0, "hash": 0, "write": 0}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_image_gives_the_same_error_with_the_index(tmp_path, damage):
    root = write_tiny_dataset(tmp_path / "data", size=32)
    _start(root, tmp_path / "cache")
    path = root / "train_images" / "c2_001.png"
    data = path.read_bytes()
    path.write_bytes(b"not an image" if damage == "garbage" else data[:200])
    with pytest.raises(DataError) as plain:
        load_train_table(root)
    with pytest.raises(DataError) as indexed:
        _start(root, tmp_path / "cache")
    assert str(indexed.value) == str(plain.value)
    assert "cannot be decoded" in str(indexed.value) and "c2_001.png" in str(indexed.value)
    rows = sqlite3.connect(tmp_path / "cache" / ic.INDEX_NAME).execute(
        "SELECT COUNT(*) FROM files").fetchone()[0]
    assert rows == N_IMAGES  # the bad file's old record stays stale, so it is checked every time


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_unwritable_cache_dir_fails_before_any_work(tmp_path, counts, where):
    root = write_tiny_dataset(tmp_path / "data", size=32)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    cache_dir = blocker if where == "a file" else blocker / "cache"
    paths = sorted(str(p) for p in (root / "train_images").iterdir())
    with pytest.raises(ConfigError, match="cache_dir.*blocker.*not a writable folder"):
        load_image_cache(paths, mode="disk", img_size=16, cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="cache_dir"):
        ImageCache("no", cache_dir=cache_dir)
    assert counts == {"decode": 0, "hash": 0, "write": 0}


def test_auto_picks_ram_when_it_fits_else_disk(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", size=32)
    paths = sorted(str(p) for p in (root / "train_images").iterdir())
    decoded = N_IMAGES * 32 * 32 * 3
    roomy = ImageCache("auto", img_size=16, cache_dir=tmp_path / "c", ram_limit_bytes=decoded)
    tight = ImageCache("auto", img_size=16, cache_dir=tmp_path / "c", ram_limit_bytes=decoded - 1)
    assert roomy.plan(paths) == "yes" and tight.plan(paths) == "disk"
    assert ImageCache("auto", ram_limit_bytes=decoded - 1).plan(paths) == "no"  # no folder given
    ram = load_image_cache(paths, image_cache=roomy)
    assert all(np.array_equal(a, read_image(p)) for a, p in zip(ram, paths))
    assert all(isinstance(s, Path) for s in load_image_cache(paths, image_cache=tight))


def test_todays_call_still_caches_in_ram(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", size=32)
    paths = sorted(str(p) for p in (root / "train_images").iterdir())
    cache = load_image_cache(paths, mode="auto")
    assert all(np.array_equal(a, read_image(p)) for a, p in zip(cache, paths))
    assert load_image_cache(paths, mode="no") is None
    with pytest.raises(ValueError, match="disk.*img_size"):
        load_image_cache(paths, mode="disk")
    (root / "train_images" / "c1_002.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="c1_002.png"):
        load_image_cache(paths, mode="yes")


def test_two_processes_sharing_a_cache_folder(tmp_path):
    # Two caches (two sqlite connections) fill one folder at once, as two runs or ranks would.
    root = write_tiny_dataset(tmp_path / "data", size=48)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = _start(root, tmp_path / "cache")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results[0] == results[1]
    assert all(load_copy(s).shape[2] == 3 for s in results[0][1])
    rows = sqlite3.connect(tmp_path / "cache" / ic.INDEX_NAME).execute(
        "SELECT COUNT(*) FROM files").fetchone()[0]
    assert rows == N_IMAGES
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_config_keys():
    cfg = load_config(None, {"cache_images": "disk", "cache_scale": "1.3", "cache_dir": "/tmp/x"})
    assert (cfg.data.cache_images, cfg.data.cache_scale, cfg.data.cache_dir) == ("disk", 1.3, "/tmp/x")
    with pytest.raises(ConfigError, match="cache_scale"):
        load_config(None, {"cache_scale": 0.9})
    with pytest.raises(ConfigError, match="cache_images"):
        load_config(None, {"cache_images": "ssd"})


def test_shrunk_copy_of_a_16_bit_grey_image_is_converted_first(tmp_path):
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 65536, size=(90, 120), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    got = decode_image(path, short_side=30)
    expected = cv2.resize(read_image(path), (40, 30), interpolation=cv2.INTER_AREA)
    assert got.shape == (30, 40, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_dataset_reads_a_loader_or_cached_copies(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", size=32)
    paths = sorted(str(p) for p in (root / "train_images").iterdir())[:4]
    calls = []

    def loader(path):
        calls.append(path)
        return read_image(path)[::-1].copy()  # upside down: shows the loader's image is used

    identity = lambda image: {"image": image}  # noqa: E731
    flipped = ImageDataset(paths, None, identity, loader=loader)
    assert np.array_equal(flipped[2][0], read_image(paths[2])[::-1]) and calls == [paths[2]]
    sources = load_image_cache(paths, mode="disk", img_size=16, cache_dir=tmp_path / "c")
    mixed = [sources[0], str(sources[1]), read_image(paths[2]), sources[3]]  # Path, str, array
    dataset = ImageDataset(paths, np.arange(4), identity, cache=mixed, loader=loader)
    for i in range(4):
        image, target = dataset[i]
        assert target == i and np.array_equal(image, decode_image(paths[i], short_side=19) if i != 2
                                               else read_image(paths[i]))
    assert calls == [paths[2]]  # cached items never go through the loader


@pytest.mark.parametrize("mode", ["yes", "disk"])
def test_the_trainer_decodes_each_image_once_and_a_rerun_not_at_all(tmp_path, counts, mode):
    """fit_folds: the full check's decode fills the cache; a second run finds every file in
    the index and its copy (disk) or decodes only to refill RAM."""
    from mixcls.config import load_config
    from mixcls.train import fit_folds

    data = write_tiny_dataset(tmp_path / "data", n_per_class=4)
    cfg = load_config(None, {"data": str(data), "model": "mixcls_cnn_tiny", "img_size": 16,
                             "epochs": 1, "folds": 2, "batch_size": 8, "workers": 0,
                             "preset": "none", "device": "cpu", "cache_images": mode,
                             "cache_dir": str(tmp_path / "cache"), "check_images": "full"})
    fit_folds(cfg, tmp_path / "run1", progress=False, log=lambda message: None)
    assert counts["decode"] == 12  # 12 images, one decode each for check and cache together
    _reset(counts)
    fit_folds(cfg, tmp_path / "run2", progress=False, log=lambda message: None)
    assert counts["hash"] == 0 and counts["decode"] == (12 if mode == "yes" else 0)
