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
        return self.from_255(images)

    def from_255(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in 0-255 (DeviceColour's output) -> the model's input, as for uint8."""
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


class CropFlipAffine(A.ImageOnlyTransform):
    """RandomResizedCrop, Transpose, HorizontalFlip, VerticalFlip and Affine in one warp.

    The chain resamples the photo twice (the crop's resize, then the affine warp) and copies it
    once per flip; every one of these maps pixel coordinates affinely, so their product is one
    2x3 matrix and a single cv2.warpAffine of the crop makes the output. The parameters are
    drawn by albumentations' own RandomResizedCrop and Affine (their sampling code, fed this
    step's generators), each flip with its own draw, so the distribution is the chain's.
    The pixels differ from the chain's by the interpolation: one bilinear sample instead of two.
    Outside the crop the output is what the chain gives: the crop's edge pixels repeated where
    only the crop and flips ran (the resize clamps), black where the affine step ran (its
    constant border), the black edge then blurred over one source pixel instead of one output
    pixel. Tests bound the difference on smooth images and check the geometry exactly.
    Why by hand: albumentations applies each step on its own and has no fused warp.
    """

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (0.75, 4 / 3), transpose_p: float = 0.5,
                 hflip_p: float = 0.5, vflip_p: float = 0.5, affine_p: float = 0.5,
                 translate_percent=(-0.0625, 0.0625), affine_scale=(0.9, 1.1), rotate=(-45, 45),
                 p: float = 1.0):
        super().__init__(p=p)
        self.size = int(size)
        self.flip_ps = (float(transpose_p), float(hflip_p), float(vflip_p))
        self.affine_p = float(affine_p)
        self._crop = A.RandomResizedCrop(size=(self.size, self.size), scale=scale, ratio=ratio, p=1.0)
        self._affine = A.Affine(translate_percent=translate_percent, scale=affine_scale,
                                rotate=rotate, p=1.0)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        for step in (self._crop, self._affine):  # draw from this step's (shared) generators
            step.py_random, step.random_generator = self.py_random, self.random_generator
        crop = self._crop.get_params_dependent_on_data(params, data)["crop_coords"]
        flips = tuple(self.py_random.random() < q for q in self.flip_ps)
        affine = None
        if self.py_random.random() < self.affine_p:
            affine = self._affine.get_params_dependent_on_data(
                {"shape": (self.size, self.size)}, data)["matrix"]
        return {"crop": crop, "flips": flips, "affine": affine}

    def apply(self, img: np.ndarray, crop: tuple[int, int, int, int], flips: tuple[bool, bool, bool],
              affine: np.ndarray | None, **params) -> np.ndarray:
        x0, y0, x1, y1 = crop
        matrix = crop_flip_affine_matrix((x1 - x0, y1 - y0), self.size, flips, affine)
        return warp_rgb(img[y0:y1, x0:x1], matrix, self.size,
                        border=cv2.BORDER_REPLICATE if affine is None else cv2.BORDER_CONSTANT)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "flip_ps", "affine_p")


def crop_flip_affine_matrix(crop_size: tuple[int, int], size: int, flips: tuple[bool, bool, bool],
                            affine: np.ndarray | None) -> np.ndarray:
    """The 3x3 map from a crop of (width, height) pixels to the output: resized to size x size,
    then transposed, flipped left-right and top-bottom where `flips` says, then the 3x3
    `affine` (an albumentations Affine matrix for a size x size image). Pixel-centre
    coordinates, as cv2.resize (INTER_LINEAR) and cv2.flip use them."""
    sx, sy = size / crop_size[0], size / crop_size[1]
    m = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    last = size - 1.0
    steps = (np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]),      # transpose
             np.array([[-1.0, 0, last], [0, 1, 0], [0, 0, 1]]),   # horizontal flip
             np.array([[1.0, 0, 0], [0, -1, last], [0, 0, 1]]))   # vertical flip
    for fired, step in zip(flips, steps):
        if fired:
            m = step @ m
    if affine is not None:
        m = np.asarray(affine, dtype=np.float64) @ m
    return m


def warp_rgb(img: np.ndarray, matrix: np.ndarray, size: int, *,
             border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Bilinear warp by a 3x3 source -> output matrix to size x size (black outside the source
    under BORDER_CONSTANT). An RGB uint8 image goes through OpenCV's vectorised 4-channel path
    (see Affine)."""
    rgb = img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    src = cv2.cvtColor(img, cv2.COLOR_RGB2RGBA) if rgb else np.ascontiguousarray(img)
    out = cv2.warpAffine(src, np.ascontiguousarray(matrix[:2], dtype=np.float64), (size, size),
                         flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)
    if out.ndim == 2 and img.ndim == 3:
        out = out[:, :, None]
    return cv2.cvtColor(out, cv2.COLOR_RGBA2RGB) if rgb else out


def _preset_light(size: int) -> list:
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
    ]


def _preset_cassava(size: int) -> list:
    # The classic Cassava baseline: RandomResizedCrop, Transpose, both flips, ShiftScaleRotate
    # (Affine in albumentations 2), HueSaturationValue, RandomBrightnessContrast; the geometry in
    # one warp (CropFlipAffine), the HSV shift as one lookup table. CoarseDropout is the
    # "cutout" of the mixing table: it stays a transform, not a mixer.
    return [
        CropFlipAffine(size, scale=(0.08, 1.0), transpose_p=0.5, hflip_p=0.5, vflip_p=0.5,
                       affine_p=0.5, translate_percent=(-0.0625, 0.0625), affine_scale=(0.9, 1.1),
                       rotate=(-45, 45)),
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


COLOUR_STEPS = (A.HueSaturationValue, A.RandomBrightnessContrast)  # what --colour-on-device moves


def build_train_transform(preset: str, img_size: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                          colour_on_device: bool = False) -> A.Compose:
    """The training pipeline of a named preset, ending in ToTensorV2: uint8 (3, H, W).

    `mean` is the model's: the cassava preset's cutout fills its holes with it (rounded to
    uint8), the colour that normalises to about 0, as when cutout ran after Normalize.
    With `colour_on_device` the colour steps are left out: `build_device_colour` gives them,
    applied to the batch on the device.
    """
    steps = preset_steps(preset, img_size, mean)
    if colour_on_device:
        steps = [step for step in steps if not isinstance(step, COLOUR_STEPS)]
    return A.Compose(steps + _finish())


def build_device_colour(preset: str, *, rank: int = 0, world_size: int = 1) -> "DeviceColour | None":
    """The preset's colour steps as one batched step on the device (None when it has none)."""
    colour = [step for step in preset_steps(preset, 32, IMAGENET_MEAN) if isinstance(step, COLOUR_STEPS)]
    return DeviceColour(colour, rank=rank, world_size=world_size) if colour else None


def preset_steps(preset: str, img_size: int, mean: Sequence[float]) -> list:
    """A preset's albumentations steps, in order, without the final ToTensorV2."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(sorted(PRESETS))}")
    steps = PRESETS[preset](img_size)
    if preset == "cassava":
        fill = tuple(float(round(m * 255)) for m in mean)
        steps = steps + [A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.05, 0.1),
                                         hole_width_range=(0.05, 0.1), fill=fill, p=0.5)]
    return steps


class DeviceColour:
    """A preset's HueSaturationValue and RandomBrightnessContrast steps, on a batch on its device.

    On a GPU machine the loader's CPU work sets the pace at Cassava's sizes, and the colour
    shifts are a third of it (two colour-space conversions per photo); batched on the device they
    cost next to nothing. The steps keep their order, probabilities and ranges (read from the
    albumentations steps themselves): per image, each fires with its p and draws its shifts
    uniformly in its limits, as albumentations does, from the training step's generator (the
    mixing one, saved with step checkpoints, so a resumed run draws the same; under torchrun
    every rank draws the numbers of all ranks from it and takes its own). The arithmetic
    is albumentations' in float without rounding between steps: HSV is OpenCV's (hue in units
    of 2 degrees as on uint8 images, grey pixels left grey), brightness/contrast is
    x * (1 + contrast) + brightness * 255, each clipped to [0, 255]. What moves: the cutout
    holes of the cassava preset are cut on the host, before these shifts, so they take them.

    Takes uint8 (B, 3, H, W) (or float32 in 0-255: device_augment's warp gives those), returns
    float32 in 0-255 for Normalizer.from_255.
    """

    def __init__(self, steps: Sequence, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        self.rank, self.world_size = rank, world_size
        self._limit_tensors: dict[torch.device, list] = {}
        self.steps = []
        for step in steps:
            if isinstance(step, A.HueSaturationValue):
                limits = (step.hue_shift_limit, step.sat_shift_limit, step.val_shift_limit)
                self.steps.append(("hsv", float(step.p), tuple(tuple(map(float, lim)) for lim in limits)))
            elif isinstance(step, A.RandomBrightnessContrast):
                if not step.brightness_by_max or step.ensure_safe_range:
                    raise ValueError("DeviceColour does brightness by the maximum, without safe ranges")
                limits = (step.brightness_limit, step.contrast_limit)
                self.steps.append(("bc", float(step.p), tuple(tuple(map(float, lim)) for lim in limits)))
            else:
                raise ValueError(f"DeviceColour cannot run {type(step).__name__}")

    def draw(self, n: int, *, device: torch.device,
             generator: torch.Generator | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Per step: its kind, the indices of the images it fires on, and their shifts
        (fired, len(limits)). One fixed-size draw per step and image, fired or not, so the
        stream does not depend on which images fired. Under torchrun the generator is the same
        on every rank: each draws every rank's numbers and keeps its own, so ranks differ."""
        return [(kind, torch.nonzero(fired).flatten(), shifts[fired])
                for kind, fired, shifts in self._draw_all(n, device=device, generator=generator)]

    def _draw_all(self, n: int, *, device: torch.device, generator: torch.Generator | None
                  ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Per step: its kind, whether it fires on each image (n,) bool, and every image's
        shifts (n, len(limits)): the draws of `draw`, kept on the device, with no index lists
        (whose size the host would have to wait for)."""
        draws = []
        for (kind, p, limits), (low, high) in zip(self.steps, self._limits(device)):
            u = torch.rand((self.world_size, n, 1 + len(limits)), generator=generator,
                           device=device)[self.rank]
            draws.append((kind, u[:, 0] < p, low + (high - low) * u[:, 1:]))
        return draws

    def _limits(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each step's (low, high) limits as tensors on `device`, made once per device."""
        if device not in self._limit_tensors:
            self._limit_tensors[device] = [
                tuple(torch.tensor([lim[j] for lim in limits], device=device) for j in (0, 1))
                for _, _, limits in self.steps]
        return self._limit_tensors[device]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype == torch.uint8:
            x = images.float()
        elif images.dtype == torch.float32:
            x = images  # never written: each step makes a new tensor
        else:
            raise TypeError(f"DeviceColour expects uint8 images (B, 3, H, W) or float32 ones in "
                            f"0-255, got {images.dtype}")
        if self._shift_fired_only(x.device):
            # The host waits for nothing here, so draw's index lists are free: shift only the
            # fired images, a few at a time (the HSV round trip's dozen full-size intermediates
            # stay cache-sized; the whole batch at once cost 6x as much per image at 512 px).
            for kind, index, v in self.draw(x.shape[0], device=x.device, generator=generator):
                if index.numel():
                    x = x.index_copy(0, index, torch.cat([
                        _colour_step(kind, x[part], shifts)
                        for part, shifts in zip(index.split(CPU_CHUNK), v.split(CPU_CHUNK))]))
            return x
        # On a GPU every image is shifted and the unfired ones keep their pixels (torch.where):
        # an index list's size would make the host wait for the GPU.
        for kind, fired, v in self._draw_all(x.shape[0], device=x.device, generator=generator):
            x = torch.where(fired.view(-1, 1, 1, 1), _colour_step(kind, x, v), x)
        return x

    @staticmethod
    def _shift_fired_only(device: torch.device) -> bool:
        """Pick the fired images by index (the CPU) or shift all and keep (other devices)."""
        return device.type == "cpu"

    def __repr__(self) -> str:
        return f"DeviceColour({self.steps})"


CPU_CHUNK = 4  # images per colour shift on the CPU (DeviceColour)


def _colour_step(kind: str, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One DeviceColour step on images x (N, 3, H, W) with their shifts v (N, len(limits))."""
    if kind == "hsv":
        return shift_hsv_float(x, v[:, 0], v[:, 1], v[:, 2])
    return brightness_contrast_float(x, v[:, 0], v[:, 1])


def brightness_contrast_float(x: torch.Tensor, brightness: torch.Tensor,
                              contrast: torch.Tensor) -> torch.Tensor:
    """albumentations' RandomBrightnessContrast (brightness by the maximum) per image of
    (N, 3, H, W) floats in 0-255: x * (1 + contrast) + brightness * 255, clipped."""
    view = (-1, 1, 1, 1)
    return (x * (1.0 + contrast.view(view)) + 255.0 * brightness.view(view)).clamp_(0, 255)


def shift_hsv_float(x: torch.Tensor, hue_shift: torch.Tensor, sat_shift: torch.Tensor,
                    val_shift: torch.Tensor) -> torch.Tensor:
    """Shift RGB float images (N, 3, H, W) in 0-255 in OpenCV's HSV, per image: hue by
    hue_shift x 2 degrees (uint8 hue units), saturation and value by shift / 255 of their
    range, each clipped; pixels with no saturation stay grey. Float throughout, no rounding.
    By hand: torch has no HSV conversion, and kornia's would be a dependency for 20 lines."""
    rgb = x / 255.0
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(1)
    delta = value - rgb.min(1)[0]
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    # OpenCV's hue sectors, in units of 60 degrees, ties broken in the order R, G, B
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = torch.where(value > 0, delta / torch.where(value > 0, value, torch.ones_like(value)),
                      torch.zeros_like(value))
    view = (-1, 1, 1)
    hue = torch.remainder(hue * 60.0 + 2.0 * hue_shift.view(view), 360.0)
    sat = torch.where(sat > 0, (sat + sat_shift.view(view) / 255.0).clamp(0, 1), sat)
    value = (value + val_shift.view(view) / 255.0).clamp(0, 1)
    # back to RGB: channel n is v - v s clip(min(k, 4 - k), 0, 1), k = (n + h / 60) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue / 60.0, 6.0)
        out.append(value - value * sat * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(out, 1) * 255.0


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
