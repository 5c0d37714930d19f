"""Albumentations presets for training and validation; the one normalisation; TTA views.

The presets end in uint8 tensors (3, H, W): a batch crosses to the device at a quarter of
the bytes of float32, and `Normalizer` turns it into the model's input there (float, the
weights' own mean and std), for training, evaluation and prediction alike.
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalizer:
    """uint8 images (B, 3, H, W) -> float32 (x / 255 - mean) / std on their device.

    The arithmetic is albumentations' Normalize (subtract mean x 255, multiply by the
    reciprocal of std x 255, in float32), so the numbers equal what the presets gave before
    they stopped normalising on the host.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalizer expects uint8 images (B, 3, H, W), got {images.dtype}; "
                            "the presets' tensors are uint8, already normalised ones must not "
                            "be normalised again")
        shift, scale = self._constants(images.device)
        return (images.float() - shift) * scale

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            # albumentations computes these in float32 numpy; the same numbers here
            shift = np.asarray(self.mean, dtype=np.float32) * 255.0
            scale = np.reciprocal(np.asarray(self.std, dtype=np.float32) * 255.0)
            self._consts[device] = tuple(torch.from_numpy(v.astype(np.float32)).view(1, -1, 1, 1).to(device)
                                         for v in (shift, scale))
        return self._consts[device]

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean}, std={self.std})"


def _finish() -> list:
    return [ToTensorV2()]  # uint8 HWC -> uint8 CHW; Normalizer does the rest on the device


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


def build_train_transform(preset: str, img_size: int, *,
                          mean: Sequence[float] = IMAGENET_MEAN) -> A.Compose:
    """The training pipeline of a named preset, ending in ToTensorV2: uint8 (3, H, W).

    `mean` is the model's: the cassava preset's cutout fills its holes with it (rounded to
    uint8), the colour that normalises to about 0, as when cutout ran after Normalize.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(sorted(PRESETS))}")
    steps = PRESETS[preset](img_size)
    if preset == "cassava":
        fill = tuple(float(round(m * 255)) for m in mean)
        steps = steps + [A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.05, 0.1),
                                         hole_width_range=(0.05, 0.1), fill=fill, p=0.5)]
    return A.Compose(steps + _finish())


def build_valid_transform(img_size: int) -> A.Compose:
    """Resize to the training size; no randomness; uint8 (3, H, W)."""
    return A.Compose([A.Resize(img_size, img_size)] + _finish())


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
