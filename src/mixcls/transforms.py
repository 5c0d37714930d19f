"""Albumentations presets for training and validation; the one normalisation; TTA views.

The presets end in uint8 tensors (3, H, W): a batch crosses to the device at a quarter of
the bytes of float32, and `Normalizer` turns it into the model's input there (float, the
weights' own mean and std), for training, evaluation and prediction alike.
"""

from __future__ import annotations

from typing import Sequence

import albucore
import albumentations as A
import cv2
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


class Transpose(A.Transpose):
    """albumentations' Transpose, returning a contiguous copy made by OpenCV.

    albumentations returns a strided view, and the next step that needs contiguous memory
    copies it with numpy at about 3 ms for a 512x512 RGB image, the dearest step of the
    cassava preset; cv2.transpose makes the same copy in about 0.2 ms. Same pixels exactly.
    """

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] > 4:
            return super().apply(img, **params)
        return cv2.transpose(img)


class Affine(A.Affine):
    """albumentations' Affine, warping an RGB image as 4 channels.

    OpenCV's bilinear warp has a vectorised path for 4-channel uint8 images and not for
    3-channel ones: on a 512x512 photo the warp with a spare alpha channel takes about half the
    time, conversions included. The colour channels are computed alike either way, so the
    pixels are the same exactly (tests compare them).
    """

    def apply(self, img: np.ndarray, matrix: np.ndarray, output_shape: tuple[int, int],
              **params) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or not np.isscalar(self.fill):
            return super().apply(img, matrix, output_shape, **params)
        warped = super().apply(cv2.cvtColor(img, cv2.COLOR_RGB2RGBA), matrix, output_shape, **params)
        return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)


class HueSaturationValue(A.HueSaturationValue):
    """albumentations' HueSaturationValue with its three shifts done as one 3-channel LUT.

    albumentations splits the HSV image into planes, shifts each with its own pass (the
    saturation one through a mask of the grey pixels) and merges them again; on a 512x512
    image that is about three times the cost of the two colour conversions. The shifts are
    functions of one uint8 value each, so one cv2.LUT on the interleaved HSV image does all
    three. Its tables are built by the same operations albumentations applies to the planes
    (hue modulo 180 after the shift, albucore's add_constant for saturation and value, grey
    pixels, saturation 0, left grey), so the pixels are the same exactly (tests compare them).
    """

    def apply(self, img: np.ndarray, hue_shift: float, sat_shift: float, val_shift: float,
              **params) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            return super().apply(img, hue_shift, sat_shift, val_shift, **params)
        if hue_shift == 0 and sat_shift == 0 and val_shift == 0:
            return img
        return shift_hsv_lut(img, hue_shift, sat_shift, val_shift)


def shift_hsv_lut(img: np.ndarray, hue_shift: float, sat_shift: float,
                  val_shift: float) -> np.ndarray:
    """Shift an RGB uint8 image (H, W, 3) in OpenCV's HSV (hue 0-179) by one table lookup."""
    values = np.arange(256, dtype=np.uint8)
    hue = np.mod(values.astype(np.int16) + hue_shift, 180).astype(np.uint8)
    sat = _shifted(values, sat_shift)
    sat[0] = 0  # a grey pixel has no hue to saturate: albumentations keeps it grey
    val = _shifted(values, val_shift)
    table = np.stack([hue, sat, val], axis=-1).reshape(256, 1, 3)
    hsv = cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), table)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _shifted(values: np.ndarray, shift: float) -> np.ndarray:
    """albucore's add_constant (what albumentations applies to a plane) of each uint8 value:
    it rounds a positive shift and truncates a negative one, and the table must do the same."""
    if shift == 0:
        return values.copy()
    return np.asarray(albucore.add_constant(values.reshape(16, 16), shift)).reshape(-1)


def _preset_light(size: int) -> list:
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
    ]


def _preset_cassava(size: int) -> list:
    # The classic Cassava baseline (ShiftScaleRotate is Affine in albumentations 2), with
    # the same Transpose, Affine and HueSaturationValue made cheaper (above);
    # CoarseDropout is the "cutout" of the mixing table: it stays a transform, not a mixer.
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.08, 1.0)),
        Transpose(p=0.5),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), p=0.5),
        HueSaturationValue(hue_shift_limit=20, sat_shift_limit=30, val_shift_limit=20, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=(-0.1, 0.1), contrast_limit=(-0.1, 0.1), p=0.5),
    ]


def _preset_digits(size: int) -> list:
    # Handwriting: small shifts, scales and rotations; no flips (a mirrored 2 is no 2).
    return [
        A.Resize(size, size),
        Affine(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), rotate=(-10, 10), p=0.8),
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
