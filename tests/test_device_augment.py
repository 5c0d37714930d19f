"""--augment-on-device: the loader's draws against albumentations' own pipeline, the device warp
against a slow bilinear loop, padding, the loaders with and without workers, the step."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
from mixcls.cli import main
from mixcls.config import ConfigError, load_config, validate
from mixcls.data import ImageDataset, seed_transform
from mixcls.device_augment import (MAX_HOLES, PLAN_SIZE, DeviceAugment, HostPlan, WarpBatch,
                                   WarpItem, build_augment_on_device, build_train_augment,
                                   stack_sources, warp_images)
from mixcls.engine import prepare_batch
from mixcls.sampling import EpochSampler, make_loader
from mixcls.transforms import PRESETS, Normalizer, build_train_transform


def smooth_image(rng: np.random.Generator, height: int, width: int, scale: int = 8) -> np.ndarray:
    """Random colours varying over about `scale` pixels: bilinear samples of it are well defined."""
    small = rng.integers(0, 256, (height // scale + 2, width // scale + 2, 3)).astype(np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def host_and_device(preset: str, image: np.ndarray, seed: int, size: int = 48):
    """(the host pipeline's image, the device's), both float (3, size, size), same seed, no colour."""
    host = build_train_transform(preset, size, colour_on_device=True)
    plan, device = build_augment_on_device(preset, size)
    device.colour = None  # the host pipeline without colour steps is what is compared
    seed_transform(host, seed)
    seed_transform(plan, seed)
    out = plan(image=image)
    warped = device(WarpBatch(out["image"][None], out["plan"][None]))[0]
    return host(image=image)["image"].float(), warped, out["plan"]


@pytest.mark.parametrize("preset", ["cassava", "light", "none"])
def test_one_warp_gives_the_host_pipelines_pixels_for_the_same_seed(preset):
    """Presets that resample once on the host: the same draws (crop, flips, affine, holes) and
    the same pixels but for the host's rounding to uint8 and OpenCV's fixed-point weights."""
    rng = np.random.default_rng(1)
    holes = 0
    for seed in range(30):
        image = smooth_image(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        host, device, plan = host_and_device(preset, image, seed)
        assert device.shape == host.shape == (3, 48, 48)
        assert (device - host).abs().max() <= 1.0, (preset, seed)
        holes += int(plan[11])
    assert (holes > 0) == (preset == "cassava")  # cutout fired, and its holes matched


def test_the_digits_preset_is_resampled_once_instead_of_twice():
    """digits resizes, then warps (two samples on the host); one sample here: OpenCV's warp of
    the source by the plan's map, and close to the host's two samples on smooth images (the
    largest differences are the black border's edge, blurred over a source pixel instead of an
    output pixel)."""
    rng = np.random.default_rng(2)
    diffs = []
    for seed in range(30):
        image = smooth_image(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)), scale=16)
        host, device, plan = host_and_device("digits", image, seed)
        inverse = plan[:6].double().view(2, 3).numpy()
        once = cv2.warpAffine(image.astype(np.float32), inverse, (48, 48),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE if plan[10] else cv2.BORDER_CONSTANT)
        np.testing.assert_allclose(device.permute(1, 2, 0).numpy(), once, atol=0.5)
        diffs.append((device - host).abs())
    diffs = torch.stack(diffs)
    assert diffs.mean() < 1.0 and diffs.median() < 0.5


def slow_warp(image: np.ndarray, plan: np.ndarray, size: int) -> np.ndarray:
    """A plan's warp pixel by pixel: map, clamp to the box or read black outside it, bilinear."""
    inverse = plan[:6].reshape(2, 3).astype(np.float64)
    x0, y0, x1, y1 = plan[6:10]
    out = np.zeros((3, size, size))
    for v in range(size):
        for u in range(size):
            x, y = inverse @ (u, v, 1.0)
            if plan[10]:
                x, y = min(max(x, x0), x1 - 1), min(max(y, y0), y1 - 1)
            fx, fy = int(np.floor(x)), int(np.floor(y))
            for xx, yy, w in ((fx, fy, (1 - x + fx) * (1 - y + fy)), (fx + 1, fy, (x - fx) * (1 - y + fy)),
                              (fx, fy + 1, (1 - x + fx) * (y - fy)), (fx + 1, fy + 1, (x - fx) * (y - fy))):
                if x0 <= xx < x1 and y0 <= yy < y1:
                    out[:, v, u] += w * image[yy, xx]
    return out


def random_plan(rng: np.random.Generator, height: int, width: int, clamp: bool) -> np.ndarray:
    plan = np.zeros(PLAN_SIZE, dtype=np.float32)
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.5, 2.0)
    plan[:6] = [scale * np.cos(angle), -scale * np.sin(angle), rng.uniform(-5, width / 2),
                scale * np.sin(angle), scale * np.cos(angle), rng.uniform(-5, height / 2)]
    x0, y0 = rng.integers(0, width // 3), rng.integers(0, height // 3)
    plan[6:10] = [x0, y0, rng.integers(x0 + 2, width + 1), rng.integers(y0 + 2, height + 1)]
    plan[10] = float(clamp)
    return plan


def test_warp_equals_a_slow_bilinear_loop_on_random_plans():
    rng = np.random.default_rng(3)
    for clamp in (True, False):
        for _ in range(3):
            image = rng.integers(0, 256, (int(rng.integers(9, 20)), int(rng.integers(9, 20)), 3),
                                 dtype=np.uint8)
            plan = random_plan(rng, *image.shape[:2], clamp)
            got = warp_images(torch.from_numpy(image).permute(2, 0, 1)[None],
                              torch.from_numpy(plan)[None], 12)[0].double().numpy()
            np.testing.assert_allclose(got, slow_warp(image, plan, 12), atol=2e-3)


def test_padded_sources_warp_as_each_alone():
    """stack_sources pads a batch of sizes to the largest; each image's warp is unchanged."""
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((14, 20), (22, 11), (9, 9))]
    plans = torch.from_numpy(np.stack([random_plan(rng, *im.shape[:2], clamp=k != 1)
                                       for k, im in enumerate(images)]))
    tensors = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    for hwc in (False, True):
        batch = stack_sources(tensors, hwc=hwc)
        assert batch.shape == (3, 3, 22, 20)
        assert batch.is_contiguous(memory_format=torch.channels_last) == hwc
        together = warp_images(batch, plans, 10)
        for k, t in enumerate(tensors):
            torch.testing.assert_close(together[k], warp_images(t[None], plans[k:k + 1], 10)[0],
                                       atol=1e-3, rtol=0)  # float32 rounding of the normalised grid
            assert torch.equal(batch[k, :, :t.shape[1], :t.shape[2]], t)
        assert int(batch[1, :, :, 11:].abs().sum()) == 0  # the padding is black


def test_steps_it_cannot_run_are_refused_by_name_before_any_work(monkeypatch):
    with pytest.raises(ValueError, match="Rotate"):
        HostPlan([A.Resize(16, 16), A.Rotate()], 16)
    with pytest.raises(ValueError, match="RandomResizedCrop at this place"):
        HostPlan([A.Resize(16, 16), A.RandomResizedCrop(size=(16, 16))], 16)
    with pytest.raises(ValueError, match="HorizontalFlip at this place"):
        HostPlan([A.HorizontalFlip(), A.Resize(16, 16)], 16)
    with pytest.raises(ValueError, match="interpolation"):
        HostPlan([A.Resize(16, 16, interpolation=cv2.INTER_AREA)], 16)
    with pytest.raises(ValueError, match=f"at most {MAX_HOLES} holes"):
        HostPlan([A.Resize(16, 16), A.CoarseDropout(num_holes_range=(1, 12), fill=(1, 2, 3))], 16)
    for preset in PRESETS:  # every preset of mixcls runs on the device
        validate(load_config(overrides={"preset": preset, "augment_on_device": True}))
    monkeypatch.setitem(PRESETS, "light", lambda size: [A.Resize(size, size), A.Rotate()])
    with pytest.raises(ConfigError, match="augment_on_device: preset 'light'.*Rotate"):
        validate(load_config(overrides={"preset": "light", "augment_on_device": True}))


def dataset_of_sizes(rng: np.random.Generator, preset: str = "cassava", size: int = 24) -> ImageDataset:
    images = [smooth_image(rng, int(rng.integers(20, 40)), int(rng.integers(20, 40))) for _ in range(20)]
    plan, _ = build_augment_on_device(preset, size)
    return ImageDataset([f"im{i}" for i in range(20)], np.arange(20) % 3, plan, cache=images)


@pytest.mark.parametrize("hwc", [False, True])
def test_loaders_with_and_without_workers_give_the_same_warp_batches(hwc):
    """The ring (workers) and collate_items (none) pad alike; the draws follow the item seeds."""
    dataset = dataset_of_sizes(np.random.default_rng(5))
    epochs = {}
    for workers in (0, 2):
        sampler = EpochSampler(len(dataset), seed=7)
        loader = make_loader(dataset, batch_size=6, workers=workers, sampler=sampler,
                             drop_last=False, device=torch.device("cpu"), seed=1, hwc_batches=hwc)
        epochs[workers] = [(b[0].images.clone(), b[0].plans.clone(), b[1].clone()) for b in loader]
    assert len(epochs[0]) == 4
    for (i0, p0, t0), (i2, p2, t2) in zip(epochs[0], epochs[2]):
        assert isinstance(p0, torch.Tensor) and p0.shape[1] == PLAN_SIZE
        assert torch.equal(i0, i2) and torch.equal(p0, p2) and torch.equal(t0, t2)
        assert i0.is_contiguous(memory_format=torch.channels_last) == hwc
    # a resumed epoch (the sampler skipping the first batch) draws the same later batches
    sampler = EpochSampler(len(dataset), seed=7)
    sampler.set_epoch(0, skip=6)
    loader = make_loader(dataset, batch_size=6, workers=0, sampler=sampler, drop_last=False,
                         device=torch.device("cpu"), seed=1, hwc_batches=hwc)
    for (images, plans, _), batch in zip(epochs[0][1:], loader):
        assert torch.equal(batch[0].plans, plans) and torch.equal(batch[0].images, images)


def test_the_training_step_warps_colours_cuts_and_normalises_the_batch():
    rng = np.random.default_rng(6)
    dataset = dataset_of_sizes(rng)
    items = [dataset[(i, 100 + i)] for i in range(8)]
    assert all(isinstance(item[0], WarpItem) for item in items)
    batch = WarpBatch(stack_sources([item[0].image for item in items]),
                      torch.stack([item[0].plan for item in items]))
    targets = torch.tensor([item[1] for item in items])
    _, augment = build_augment_on_device("cassava", 24, mean=(0.4, 0.5, 0.6))
    normalizer = Normalizer((0.4, 0.5, 0.6), (0.2, 0.2, 0.2))
    images, soft, _ = prepare_batch(batch, targets, device=torch.device("cpu"), num_classes=3,
                                    normalizer=normalizer, device_augment=augment,
                                    generator=torch.Generator().manual_seed(3))
    expected = normalizer.from_255(augment(batch, torch.Generator().manual_seed(3)))
    assert torch.equal(images, expected) and images.shape == (8, 3, 24, 24)
    uncoloured = DeviceAugment(24, fill=augment.fill)(batch)
    assert not torch.equal(normalizer.from_255(uncoloured), expected)  # the colour steps ran
    # the holes keep the fill colour (the mean x 255, rounded), after the colour shifts
    holes = batch.plans[:, 11]
    k = int(torch.nonzero(holes).flatten()[0])
    x0, y0, x1, y1 = batch.plans[k, 12:16].int().tolist()
    torch.testing.assert_close(augment(batch)[k, :, y0:y1, x0:x1],
                               torch.tensor([102.0, 128.0, 153.0]).view(3, 1, 1).expand(3, y1 - y0, x1 - x0))
    with pytest.raises(TypeError, match="DeviceAugment"):
        prepare_batch(batch, targets, device=torch.device("cpu"), num_classes=3, normalizer=normalizer)


def test_build_train_augment_splits_the_preset_three_ways():
    host, device = build_train_augment("cassava", 32)
    assert device is None and "HueSaturationValue" in repr(host)
    host, device = build_train_augment("cassava", 32, colour_on_device=True)
    assert "HueSaturationValue" not in repr(host) and "DeviceColour" in repr(device)
    host, device = build_train_augment("cassava", 32, colour_on_device=True, augment_on_device=True)
    assert isinstance(host, HostPlan) and isinstance(device, DeviceAugment)
    assert device.colour is not None and device.fill is not None


def test_train_and_lr_find_run_with_augment_on_device(tmp_path, one_thread):
    data = write_tiny_dataset(tmp_path / "data", size=20)
    flags = [f for f in TINY_TRAIN_FLAGS]
    flags[flags.index("--preset") + 1] = "cassava"
    for workers in ("0", "2"):
        flags[flags.index("--workers") + 1] = workers
        out = tmp_path / f"run{workers}"
        assert main(["train", "--data", str(data), "--out", str(out), "--folds", "2",
                     "--augment-on-device", *flags]) == 0
        assert "augment_on_device: true" in (out / "config.yaml").read_text()
    oof = [(tmp_path / f"run{w}" / "oof.csv").read_text() for w in ("0", "2")]
    assert oof[0] == oof[1]  # the same run with and without loader workers
    assert main(["lr-find", "--data", str(data), "--out", str(tmp_path / "lr.png"), "--steps", "10",
                 "--augment-on-device", *[f for f in flags if f not in ("--epochs", "1", "--no-progress")]]) == 0
    assert (tmp_path / "lr.png").is_file()
