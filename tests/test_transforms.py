"""Augmentation presets (shape, dtype, seeding), the device-side normalisation against
albumentations' Normalize, and TTA views against numpy."""

from __future__ import annotations

import random

import albucore
import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from albumentations.augmentations.geometric import functional as album_geometric
from albumentations.augmentations.pixel import functional as album_pixel
from scipy import stats

from mixcls.data import ImageDataset, seed_transform
from mixcls.transforms import (IMAGENET_MEAN, IMAGENET_STD, PRESETS, TTA_VIEWS, ZOOM_CROP,
                               Affine, CropFlipAffine, HueSaturationValue, Normalizer, apply_tta_view,
                               DeviceColour, brightness_contrast_float, build_device_colour,
                               build_train_transform, build_valid_transform,
                               crop_flip_affine_matrix, shift_hsv_float, shift_hsv_lut, warp_rgb)

MEAN, STD = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_train_presets_give_uint8_tensors_of_the_size(preset):
    rng = np.random.default_rng(7)
    size = int(rng.integers(16, 48))
    transform = build_train_transform(preset, size)
    for seed in range(5):
        seed_transform(transform, seed)
        image = random_image(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        out = transform(image=image)["image"]
        assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
        assert tuple(out.shape) == (3, size, size)


def test_cassava_cutout_fills_with_the_models_mean():
    """Cutout ran after Normalize and filled with 0, the mean; on uint8 it fills with the mean
    rounded to a grey level, which normalises to within half a level of 0."""
    rng = np.random.default_rng(2)
    mean = tuple(float(v) for v in rng.uniform(0.2, 0.8, 3))
    transform = build_train_transform("cassava", 32, mean=mean)
    fill = np.round(np.asarray(mean) * 255)
    white = np.full((40, 40, 3), 255, np.uint8)
    holes = 0
    for seed in range(40):
        seed_transform(transform, seed)
        out = transform(image=white)["image"].numpy().reshape(3, -1).T  # (pixels, 3)
        holes += int((out == fill).all(1).sum())
    assert holes > 0
    std = (0.2, 0.3, 0.25)
    normalised = Normalizer(mean, std)(torch.tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1)).flatten()
    assert torch.all(normalised.abs() <= 0.5 / (255 * torch.tensor(std)) + 1e-6)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_train_presets_repeat_under_a_seed(preset):
    rng = np.random.default_rng(11)
    image = random_image(rng, 40, 36)
    first, second = build_train_transform(preset, 32), build_train_transform(preset, 32)
    outputs = []
    for seed in (3, 3, 4, 5, 6):
        seed_transform(first, seed)
        seed_transform(second, seed)
        a, b = first(image=image)["image"], second(image=image)["image"]
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # a seed fixes the augmentation
        outputs.append(a)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    differ = any(not torch.equal(outputs[0], other) for other in outputs[2:])
    assert differ == (preset != "none")  # other seeds, other augmentations; "none" only resizes


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'heavy'.*cassava"):
        build_train_transform("heavy", 32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uint8_batch_normalised_on_the_device_equals_albumentations_normalize(seed):
    """The old float path (Resize + Normalize + ToTensorV2 on the host) against the new one
    (Resize + ToTensorV2 as uint8, then Normalizer), on random images and a random mean/std."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(8, 40))
    mean, std = tuple(rng.uniform(0.2, 0.8, 3)), tuple(rng.uniform(0.1, 0.4, 3))
    old = A.Compose([A.Resize(size, size), A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
                     A.pytorch.ToTensorV2()])
    images = [random_image(rng, int(rng.integers(10, 60)), int(rng.integers(10, 60))) for _ in range(5)]
    expected = torch.stack([old(image=im)["image"] for im in images])
    new = build_valid_transform(size)
    batch = torch.stack([new(image=im)["image"] for im in images])
    assert batch.dtype == torch.uint8 and batch.shape == expected.shape
    got = Normalizer(mean, std)(batch)
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 1e-6
    # ... and against the formula in float64
    reference = (batch.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=1e-5)


def test_normalizer_refuses_float_images():
    with pytest.raises(TypeError, match="uint8"):
        Normalizer(IMAGENET_MEAN, IMAGENET_STD)(torch.rand(1, 3, 4, 4))


def test_valid_transform_is_deterministic_and_exact():
    rng = np.random.default_rng(5)
    transform = build_valid_transform(24)
    image = random_image(rng, 31, 45)
    outputs = [transform(image=image)["image"] for _ in range(3)]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)
    assert tuple(outputs[0].shape) == (3, 24, 24) and outputs[0].dtype == torch.uint8
    # An image already at the size is not resampled: the pixels themselves, channels first.
    same = random_image(rng, 24, 24)
    np.testing.assert_array_equal(transform(image=same)["image"].numpy(), same.transpose(2, 0, 1))


NUMPY_VIEWS = {
    "orig": lambda a: a,
    "hflip": lambda a: a[..., ::-1],
    "vflip": lambda a: a[..., ::-1, :],
    "transpose": lambda a: np.swapaxes(a, -1, -2),
    "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "transverse": lambda a: np.swapaxes(np.rot90(a, 2, axes=(-2, -1)), -1, -2),
}


@pytest.mark.parametrize("view", sorted(NUMPY_VIEWS))
@pytest.mark.parametrize("shape", [(3, 2, 9, 9), (2, 3, 6, 11)])
def test_tta_views_equal_numpy_flips_and_rotations(view, shape):
    rng = np.random.default_rng(len(view) * 31 + shape[-1])
    images = rng.standard_normal(shape).astype(np.float32)
    out = apply_tta_view(torch.from_numpy(images), view)
    expected = NUMPY_VIEWS[view](images)
    assert tuple(out.shape) == expected.shape
    if shape[-1] == shape[-2]:
        assert tuple(out.shape) == shape  # square batches keep their shape under every view
    np.testing.assert_array_equal(out.numpy(), expected)


def test_the_numpy_table_covers_every_pixel_view():
    assert set(TTA_VIEWS) == set(NUMPY_VIEWS) | {"zoom"}


def bilinear_reference(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling at pixel centres (half-pixel offsets, edges clamped), float64."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        matrix = np.zeros((n_out, n_in))
        for j in range(n_out):
            src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)  # output centre j in input pixels
            i0 = min(int(src), n_in - 1)
            frac = src - i0
            matrix[j, i0] += 1 - frac
            matrix[j, min(i0 + 1, n_in - 1)] += frac
        return matrix

    rows, cols = weights(images.shape[-2], size[0]), weights(images.shape[-1], size[1])
    return np.einsum("oh,bchw,pw->bcop", rows, images.astype(np.float64), cols)


@pytest.mark.parametrize("shape", [(2, 3, 20, 20), (1, 3, 16, 30)])
def test_zoom_view_is_the_centre_crop_resized_back(shape):
    rng = np.random.default_rng(shape[-1])
    images = rng.standard_normal(shape).astype(np.float32)
    out = apply_tta_view(torch.from_numpy(images), "zoom").numpy()
    assert out.shape == images.shape
    h, w = shape[-2:]
    dh, dw = round(h * ZOOM_CROP / 2), round(w * ZOOM_CROP / 2)
    crop = images[..., dh:h - dh, dw:w - dw]
    np.testing.assert_allclose(out, bilinear_reference(crop, (h, w)), atol=1e-5)


def test_unknown_view_names_the_choices():
    with pytest.raises(ValueError, match="unknown TTA view 'spin'.*hflip"):
        apply_tta_view(torch.zeros(1, 3, 4, 4), "spin")


def test_seeded_items_draw_each_step_independently():
    """Two flips of p=0.5 under per-item seeds give all four outcomes about equally often.
    (albumentations' Compose.set_random_seed gives every step the same seed, so they fired
    together: two outcomes, not four.)"""
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)
    transform = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    n = 800
    dataset = ImageDataset(["same"] * n, None, transform, cache=[image] * n)
    counts = np.zeros((2, 2), int)
    for i in range(n):
        corner = int(dataset[(i, 10_000 + i)][0][0, 0, 0])  # 0, 3, 12 or 15: which flips ran
        counts[int(corner in (3, 15)), int(corner in (12, 15))] += 1
    assert counts.min() > 0
    assert stats.chisquare(counts.ravel()).pvalue > 1e-3


def smooth_image(height: int, width: int) -> np.ndarray:
    """Slowly varying colours: resampling it twice or once differs by rounding only."""
    yy, xx = np.mgrid[0:height, 0:width]
    planes = [127 + 120 * np.sin(xx / (17 + 9 * c) + c) * np.cos(yy / (23 + 5 * c)) for c in range(3)]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def chain_of_steps(crop: np.ndarray, size: int, flips, affine) -> np.ndarray:
    """The cassava chain step by step, as albumentations runs it: resize, transpose, flips, affine."""
    out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    for fired, step in zip(flips, (cv2.transpose, lambda x: cv2.flip(x, 1), lambda x: cv2.flip(x, 0))):
        out = step(out) if fired else out
    if affine is not None:
        out = album_geometric.warp_affine(out, affine, cv2.INTER_LINEAR, 0, cv2.BORDER_CONSTANT,
                                          (size, size))
    return out


def fused(crop: np.ndarray, size: int, flips, affine) -> np.ndarray:
    matrix = crop_flip_affine_matrix((crop.shape[1], crop.shape[0]), size, flips, affine)
    border = cv2.BORDER_REPLICATE if affine is None else cv2.BORDER_CONSTANT
    return warp_rgb(crop, matrix, size, border=border)


def test_one_warp_is_the_crop_and_flips_exactly_at_unit_scale():
    """A crop of exactly size x size needs no resampling: every flip combination must give the
    chain's pixels exactly (a wrong sign, order or half-pixel offset would not)."""
    rng = np.random.default_rng(21)
    image = random_image(rng, 90, 120)
    size = 48
    for flips in np.ndindex(2, 2, 2):
        flips = tuple(bool(f) for f in flips)
        x0, y0 = int(rng.integers(0, 120 - size)), int(rng.integers(0, 90 - size))
        crop = image[y0:y0 + size, x0:x0 + size]
        assert np.array_equal(fused(crop, size, flips, None), chain_of_steps(crop, size, flips, None)), flips


def test_one_warp_matches_the_chain_of_steps_on_smooth_images():
    """Random crops, flips and affine matrices (albumentations' own): one warp against the
    chain's two resamplings. Crop and flips alone: within one grey level. With the affine step:
    within three levels away from the black edge it brings, and close on average overall."""
    rng = np.random.default_rng(22)
    image = smooth_image(300, 400)
    size = 96
    affine_step = A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), p=1)
    seed_transform(A.Compose([affine_step]), 5)
    for trial in range(24):
        w, h = int(rng.integers(40, 400)), int(rng.integers(40, 300))
        x0, y0 = int(rng.integers(0, 400 - w + 1)), int(rng.integers(0, 300 - h + 1))
        crop = image[y0:y0 + h, x0:x0 + w]
        flips = tuple(bool(f) for f in rng.integers(0, 2, 3))
        affine = None
        if trial % 2:
            affine = affine_step.get_params_dependent_on_data({"shape": (size, size)}, {})["matrix"]
        ours, theirs = fused(crop, size, flips, affine), chain_of_steps(crop, size, flips, affine)
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        if affine is None:
            assert diff.max() <= 1, (trial, diff.max())
            continue
        inside = album_geometric.warp_affine(np.full((size, size), 255, np.uint8), affine,
                                             cv2.INTER_LINEAR, 0, cv2.BORDER_CONSTANT, (size, size))
        interior = cv2.erode((inside == 255).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert diff[interior].max() <= 3, (trial, diff[interior].max())
        assert diff.mean() < 1.5, (trial, diff.mean())


def test_one_warp_draws_as_the_chain_does():
    """The crop comes from albumentations' RandomResizedCrop code (the same coordinates under
    the same generators); the three flips fire independently at p=0.5, the affine at its p."""
    rng = np.random.default_rng(23)
    step = CropFlipAffine(64, affine_p=0.3)
    reference = A.RandomResizedCrop(size=(64, 64), scale=(0.08, 1.0), p=1.0)
    params = {"shape": (120, 160, 3)}
    flips, affine = np.zeros(8, int), 0
    n = 1600
    for seed in range(n):
        step.set_random_state(np.random.default_rng(seed), random.Random(seed))
        reference.set_random_state(np.random.default_rng(seed), random.Random(seed))
        drawn = step.get_params_dependent_on_data(params, {})
        assert drawn["crop"] == reference.get_params_dependent_on_data(params, {})["crop_coords"]
        flips[int(np.dot(drawn["flips"], (4, 2, 1)))] += 1
        affine += drawn["affine"] is not None
    assert flips.min() > 0 and stats.chisquare(flips).pvalue > 1e-3
    assert stats.binomtest(affine, n, 0.3).pvalue > 1e-3
    image = random_image(rng, 120, 160)
    out = A.Compose([step])(image=image)["image"]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("seed", range(4))
def test_hsv_lookup_equals_albumentations_planes(seed):
    """The one-table shift equals albumentations' per-plane shift pixel for pixel, for
    positive, negative, zero and whole-number shifts, grey pixels included."""
    rng = np.random.default_rng(seed)
    for _ in range(50):
        image = random_image(rng, int(rng.integers(3, 40)), int(rng.integers(3, 40)))
        image[0] = rng.integers(0, 256)  # a grey row: saturation 0
        shifts = [float(rng.choice([0.0, rng.uniform(-30, 30), float(rng.integers(-30, 30))]))
                  for _ in range(3)]
        if not any(shifts):
            continue  # both leave the image alone; the class returns it untouched
        expected = album_pixel.shift_hsv(image.copy(), *shifts)
        assert np.array_equal(shift_hsv_lut(image, *shifts), expected), shifts


def test_hsv_transform_samples_as_albumentations_does():
    rng = np.random.default_rng(9)
    image = random_image(rng, 24, 30)
    limits = dict(hue_shift_limit=20, sat_shift_limit=30, val_shift_limit=20, p=1.0)
    ours, theirs = A.Compose([HueSaturationValue(**limits)]), A.Compose([A.HueSaturationValue(**limits)])
    for seed in range(10):
        seed_transform(ours, seed)
        seed_transform(theirs, seed)
        assert np.array_equal(ours(image=image)["image"], theirs(image=image)["image"])


def test_affine_equals_albumentations_under_the_same_seed():
    """The 4-channel warp gives albumentations' 3-channel pixels, for both presets' settings."""
    rng = np.random.default_rng(12)
    for settings in (dict(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45)),
                     dict(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), rotate=(-10, 10))):
        ours = A.Compose([Affine(**settings, p=1.0)])
        theirs = A.Compose([A.Affine(**settings, p=1.0)])
        for seed in range(12):
            image = random_image(rng, int(rng.integers(8, 90)), int(rng.integers(8, 90)))
            seed_transform(ours, seed)
            seed_transform(theirs, seed)
            expected = theirs(image=image)["image"]
            assert not np.array_equal(expected, image)
            assert np.array_equal(ours(image=image)["image"], expected)


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def test_device_hsv_equals_opencvs_float_conversion():
    """Per image of a batch, each with its own shifts, against OpenCV's float RGB<->HSV with
    the same shifts applied in numpy (hue in degrees: twice the uint8 units)."""
    rng = np.random.default_rng(31)
    images = [random_image(rng, 20, 24) for _ in range(6)]
    images[0][:5] = 128  # grey pixels stay grey
    shifts = rng.uniform([-20, -30, -20], [20, 30, 20], size=(6, 3))
    ours = shift_hsv_float(to_batch(images).float(), *torch.tensor(shifts, dtype=torch.float32).T)
    for i, image in enumerate(images):
        hsv = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = np.mod(hsv[..., 0] + 2 * shifts[i, 0], 360)
        hsv[..., 1] = np.where(hsv[..., 1] > 0, np.clip(hsv[..., 1] + shifts[i, 1] / 255, 0, 1), 0)
        hsv[..., 2] = np.clip(hsv[..., 2] + shifts[i, 2] / 255, 0, 1)
        expected = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255
        np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy(), expected, atol=0.01)
    grey = ours[0, :, :5]
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])


def test_device_hsv_is_albumentations_hsv_without_its_rounding():
    """On uint8 albumentations rounds hue to 2 degrees and truncates it after the shift; the
    float version does neither, so the two agree to a few grey levels on average."""
    rng = np.random.default_rng(32)
    for _ in range(10):
        image = random_image(rng, 30, 30)
        shift = rng.uniform([-20, -30, -20], [20, 30, 20])
        expected = album_pixel.shift_hsv(image.copy(), *shift).astype(np.float64)
        ours = shift_hsv_float(to_batch([image]).float(), *torch.tensor(shift[:, None], dtype=torch.float32))
        diff = np.abs(ours[0].permute(1, 2, 0).numpy() - expected)
        assert diff.mean() < 2.5, diff.mean()


def test_device_brightness_contrast_is_albucores_before_its_truncation():
    rng = np.random.default_rng(33)
    images = [random_image(rng, 16, 16) for _ in range(5)]
    brightness, contrast = rng.uniform(-0.2, 0.2, 5), rng.uniform(-0.2, 0.2, 5)
    ours = brightness_contrast_float(to_batch(images).float(), torch.tensor(brightness, dtype=torch.float32),
                                     torch.tensor(contrast, dtype=torch.float32))
    for i, image in enumerate(images):
        expected = albucore.multiply_add(image, 1 + contrast[i], brightness[i] * 255, inplace=False)
        diff = ours[i].permute(1, 2, 0).numpy() - expected  # albucore's table truncates
        assert diff.min() >= -1e-3 and diff.max() < 1, (diff.min(), diff.max())


def test_device_colour_draws_each_step_with_its_p_and_limits():
    """The cassava preset's two colour steps, read from albumentations' own steps: each fires
    on about p of the images and draws its shifts uniformly in its limits."""
    colour = build_device_colour("cassava")
    host = {type(step).__name__: step for step in PRESETS["cassava"](32)}
    assert [kind for kind, _, _ in colour.steps] == ["hsv", "bc"]
    assert colour.steps[0][2] == (host["HueSaturationValue"].hue_shift_limit,
                                  host["HueSaturationValue"].sat_shift_limit,
                                  host["HueSaturationValue"].val_shift_limit)
    n = 4000
    draws = colour.draw(n, device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    for (kind, p, limits), (_, fired, values) in zip(colour.steps, draws):
        assert stats.binomtest(len(fired), n, p).pvalue > 1e-3
        for column, (low, high) in zip(values.T.numpy(), limits):
            assert stats.kstest(column, stats.uniform(low, high - low).cdf).pvalue > 1e-3


def test_device_colour_repeats_under_its_generator_and_changes_the_batch():
    colour = build_device_colour("cassava")
    batch = to_batch([random_image(np.random.default_rng(i), 12, 12) for i in range(16)])
    first = colour(batch, torch.Generator().manual_seed(5))
    assert torch.equal(first, colour(batch, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, colour(batch, torch.Generator().manual_seed(6)))
    assert first.dtype == torch.float32 and first.min() >= 0 and first.max() <= 255
    as_float = batch.float()
    assert torch.equal(colour(as_float, torch.Generator().manual_seed(5)), first)
    assert torch.equal(as_float, batch.float())  # the float input is not shifted in place
    with pytest.raises(TypeError, match="uint8"):
        colour(batch.double())


def test_device_colour_cpu_index_path_equals_the_gpu_where_path(monkeypatch):
    """On the CPU the fired images are shifted by index, a few at a time; on a GPU all are shifted
    and torch.where keeps the unfired ones. Both give the same batch, unfired images untouched,
    each fired one as the step applied to it alone."""
    from mixcls import transforms

    colour = build_device_colour("cassava")
    rng = np.random.default_rng(7)
    batch = to_batch([random_image(rng, 10, 10) for _ in range(11)])  # 11: chunks of 4, 4, 3
    by_index = colour(batch, torch.Generator().manual_seed(2))
    monkeypatch.setattr(transforms.DeviceColour, "_shift_fired_only", staticmethod(lambda device: False))
    by_where = colour(batch, torch.Generator().manual_seed(2))
    assert torch.allclose(by_index, by_where, atol=1e-4, rtol=0)
    x = batch.float()
    fired_any = torch.zeros(len(batch), dtype=torch.bool)
    for kind, fired, v in colour._draw_all(len(batch), device=torch.device("cpu"),
                                           generator=torch.Generator().manual_seed(2)):
        alone = [transforms._colour_step(kind, x[i:i + 1], v[i:i + 1]) if fired[i] else x[i:i + 1]
                 for i in range(len(x))]
        x = torch.cat(alone)
        fired_any |= fired
    assert torch.allclose(by_index, x, atol=1e-4, rtol=0)
    assert 0 < int(fired_any.sum()) < len(batch)  # both kinds of image are in the batch
    assert torch.equal(by_index[~fired_any], batch.float()[~fired_any])


def test_colour_on_device_takes_the_colour_steps_out_of_the_loader():
    for preset in sorted(PRESETS):
        host = [type(t) for t in build_train_transform(preset, 32).transforms]
        moved = [type(t) for t in build_train_transform(preset, 32, colour_on_device=True).transforms]
        colour = build_device_colour(preset)
        kept = [t for t in host if not issubclass(t, (A.HueSaturationValue, A.RandomBrightnessContrast))]
        assert moved == kept
        assert (colour is None) == (kept == host)
    with pytest.raises(ValueError, match="cannot run"):
        DeviceColour([A.HorizontalFlip()])


def test_device_colour_ranks_draw_their_own_numbers_from_one_generator():
    """Under torchrun the mixing generator is the same on every rank; each rank keeps its own
    slice of the draws, so ranks shift their images differently, and one process (rank 0 of 1)
    draws as without ranks."""
    steps = [A.HueSaturationValue(p=0.5), A.RandomBrightnessContrast(p=0.5)]
    cpu = torch.device("cpu")

    def draws(colour):
        return colour.draw(64, device=cpu, generator=torch.Generator().manual_seed(4))

    plain, alone = draws(DeviceColour(steps)), draws(DeviceColour(steps, rank=0, world_size=1))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(plain, alone))
    first, second = (draws(DeviceColour(steps, rank=r, world_size=2)) for r in (0, 1))
    for (_, fired_a, values_a), (_, fired_b, values_b) in zip(first, second):
        assert not (torch.equal(fired_a, fired_b) and torch.equal(values_a, values_b))
    # rank 0's numbers are the first of the shared draw, rank 1's the next
    u = torch.rand((2, 64, 4), generator=torch.Generator().manual_seed(4))
    assert torch.equal(first[0][1], torch.nonzero(u[0, :, 0] < 0.5).flatten())
    assert torch.equal(second[0][1], torch.nonzero(u[1, :, 0] < 0.5).flatten())
    with pytest.raises(ValueError, match="rank 2"):
        DeviceColour(steps, rank=2, world_size=2)
