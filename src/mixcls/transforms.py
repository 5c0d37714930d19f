"""Albumentations presets for training and validation; deterministic TTA views."""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def _preset_light(size: int) -> list:
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
    ]


def _preset_cassava(size: int) -> list:
    # The classic Cassava baseline (ShiftScaleRotate is Affine in albumentations 2);
    # CoarseDropout is the "cutout" of the mixing table: it stays a transform, not a mixer.
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.08, 1.0)),
        A.Transpose(p=0.5),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), p=0.5),
        A.HueSaturationValue(hue_shift_limit=20, sat_shift_limit=30, val_shift_limit=20, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=(-0.1, 0.1), contrast_limit=(-0.1, 0.1), p=0.5),
    ]


def _preset_digits(size: int) -> list:
    # Handwriting: small shifts, scales and rotations; no flips (a mirrored 2 is no 2).
    return [
        A.Resize(size, size),
        A.Affine(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), rotate=(-10, 10), p=0.8),
    ]


def _preset_none(size: int) -> list:
    return [A.Resize(size, size)]


PRESETS = {"light": _preset_light, "cassava": _preset_cassava, "digits": _preset_digits,
           "none": _preset_none}


def build_train_transform(preset: str, img_size: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    """The training pipeline of a named preset, ending in Normalize + ToTensorV2 (C, H, W float)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(sorted(PRESETS))}")
    steps = PRESETS[preset](img_size)
    if preset == "cassava":
        steps = steps + [A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
                         A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.05, 0.1),
                                         hole_width_range=(0.05, 0.1), p=0.5),
                         ToTensorV2()]
        return A.Compose(steps)
    return A.Compose(steps + _finish(mean, std))


def build_valid_transform(img_size: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    """Resize to the training size and normalise; no randomness."""
    return A.Compose([A.Resize(img_size, img_size)] + _finish(mean, std))


ZOOM_CROP = 0.1  # the zoom view keeps the central 90% of each side


def _zoom(x: torch.Tensor) -> torch.Tensor:
    """The centre (1 - ZOOM_CROP) of each side, resized back: a label-preserving view for data
    that flips would change (digits, text), where the flip views cannot be used."""
    h, w = x.shape[-2:]
    dh, dw = round(h * ZOOM_CROP / 2), round(w * ZOOM_CROP / 2)
    crop = x[..., dh:h - dh, dw:w - dw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


# Views act on a normalised batch (B, C, H, W). The flips and rotations are exact pixel
# permutations; zoom resamples. None needs the image decoded again.
TTA_VIEWS = {
    "orig": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "transpose": lambda x: x.transpose(-1, -2),
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "transverse": lambda x: torch.rot90(x, 2, dims=(-2, -1)).transpose(-1, -2),
    "zoom": _zoom,
}


def apply_tta_view(images: torch.Tensor, view: str) -> torch.Tensor:
    """One deterministic view of a batch (B, C, H, W)."""
    if view not in TTA_VIEWS:
        raise ValueError(f"unknown TTA view {view!r}; use one of {', '.join(TTA_VIEWS)}")
    return TTA_VIEWS[view](images)
