"""A preset's whole training augmentation on the batch, on the device (--augment-on-device).

On a GPU machine the loader's CPU work sets the pace at Cassava's sizes. With the colour steps
already on the device (--colour-on-device), a disk-cached photo's cost in a loader worker is
mostly the geometry warp (docs/benchmarks.md, loader section), and a photo decoded every epoch
pays it too. Here the loader keeps only what needs the file: it decodes the photo (or reads its
cached copy), draws every random parameter of the preset, and stacks the untouched source
images, padded to the batch's largest, with one small `plan` per image. On the device one
bilinear sample per output pixel (grid_sample) makes the preset's geometry, then DeviceColour
shifts the colours and the cutout holes are filled, in the preset's order.

The draws are albumentations' own: each step's should_apply, get_params and
get_params_dependent_on_data, called in the order albumentations.Compose calls them, from the
generators that data.seed_transform gives the item. So an item's crop, flips, affine and holes
are those the host pipeline (build_train_transform with colour_on_device) draws for the same
seed. The pixels differ from the host's by the arithmetic: float32 bilinear weights without
OpenCV's fixed-point ones and no rounding to uint8; presets that resample twice on the host
(digits: Resize, then Affine) are sampled once here. Tests bound both, and check the warp
against a slow reference loop.
Why by hand: albumentations runs on the host only; kornia would draw its own parameters (not
albumentations'), and torchvision's v2 transforms are not a dependency of mixcls.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate, get_worker_info

from mixcls.transforms import (COLOUR_STEPS, IMAGENET_MEAN, CropFlipAffine, DeviceColour,
                               build_device_colour, build_train_transform, crop_flip_affine_matrix,
                               preset_steps)

MAX_HOLES = 8  # the cutout holes a plan has room for (the cassava preset cuts 1 to 8)
# A plan, float32: [0:6] the 2x3 map from output pixels to source pixels (pixel centres at
# integers); [6:10] the valid box x0, y0, x1, y1 in source pixels (ends exclusive);
# [10] 1: sampling is clamped to the box (edge pixels repeat), 0: black outside the box;
# [11] the number of cutout holes; [12:] the holes x0, y0, x1, y1 in output pixels.
PLAN_SIZE = 12 + 4 * MAX_HOLES


class WarpItem(NamedTuple):
    """One training item's image under --augment-on-device: the source, untouched, and its plan."""
    image: torch.Tensor  # (3, H, W) uint8, a view of the (H, W, 3) source
    plan: torch.Tensor  # (PLAN_SIZE,) float32


class WarpBatch(NamedTuple):
    """A batch of WarpItems: the sources padded (bottom, right) to the largest, and the plans."""
    images: torch.Tensor  # (B, 3, H, W) uint8
    plans: torch.Tensor  # (B, PLAN_SIZE) float32


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _resize(width_in: int, height_in: int, width_out: int, height_out: int) -> np.ndarray:
    """cv2.resize's pixel-centre map (INTER_LINEAR) from width_in x height_in to the output."""
    sx, sy = width_out / width_in, height_out / height_in
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def _check_linear(step: Any) -> None:
    if getattr(step, "interpolation", cv2.INTER_LINEAR) != cv2.INTER_LINEAR:
        raise ValueError(f"--augment-on-device samples bilinearly; {type(step).__name__} uses "
                         f"interpolation {step.interpolation}")


class HostPlan:
    """The loader's half of --augment-on-device: a transform (called as albumentations' are,
    `plan(image=...)`) that draws the preset's parameters and returns {"image": the source as a
    uint8 (3, H, W) view, "plan": (PLAN_SIZE,) float32}.

    `steps` are a preset's (transforms.preset_steps): geometry first (Resize, RandomResizedCrop
    or CropFlipAffine, then HorizontalFlip, then Affine), then its colour steps (drawn on the
    device by DeviceColour, so skipped here), then at most one CoarseDropout. Anything else is a
    ValueError naming the step, raised when the plan is built, before any work."""

    def __init__(self, steps: Sequence, img_size: int):
        self.img_size = int(img_size)
        self.py_random = random.Random()
        self.geometry, self.cutout = [], None
        stage = 0  # 0: geometry, 1: colour, 2: cutout
        for step in steps:
            name = type(step).__name__
            if isinstance(step, COLOUR_STEPS):
                stage = max(stage, 1)
                continue
            if isinstance(step, A.CoarseDropout) and stage < 2:
                if np.ndim(step.fill) != 1 or len(step.fill) != 3:
                    raise ValueError(f"--augment-on-device fills cutout holes with an RGB colour; "
                                     f"CoarseDropout has fill {step.fill!r}")
                if step.num_holes_range[1] > MAX_HOLES:
                    raise ValueError(f"--augment-on-device cuts at most {MAX_HOLES} holes; "
                                     f"CoarseDropout asks for up to {step.num_holes_range[1]}")
                self.cutout, stage = step, 2
                continue
            first = isinstance(step, (A.Resize, A.RandomResizedCrop, CropFlipAffine))
            if stage > 0 or not isinstance(step, (A.Resize, A.RandomResizedCrop, CropFlipAffine,
                                                  A.HorizontalFlip, A.Affine)) \
                    or (first and self.geometry) or (not first and not self.geometry):
                raise ValueError(f"--augment-on-device cannot run {name} at this place in the "
                                 "preset (it runs Resize, RandomResizedCrop or CropFlipAffine, then "
                                 "HorizontalFlip and Affine, then the colour steps, then "
                                 "CoarseDropout)")
            _check_linear(step)
            if isinstance(step, A.Affine) and (step.fit_output or step.border_mode != cv2.BORDER_CONSTANT
                                               or np.any(np.asarray(step.fill) != 0)):
                raise ValueError("--augment-on-device runs Affine with a black constant border "
                                 "and fit_output off")
            self.geometry.append(step)
        if not self.geometry:
            raise ValueError("--augment-on-device needs a preset that sizes the image "
                             "(Resize, RandomResizedCrop or CropFlipAffine first)")

    def set_random_state(self, random_generator: np.random.Generator, py_random) -> None:
        """The generators every step draws from (data.seed_transform), as Compose shares them."""
        self.py_random = py_random
        for step in [*self.geometry, *([self.cutout] if self.cutout is not None else [])]:
            step.set_random_state(random_generator, py_random)

    def __call__(self, *, image: np.ndarray) -> dict[str, torch.Tensor]:
        self.py_random.random()  # Compose draws its own p (even p=1) before its steps draw
        height, width = image.shape[:2]
        matrix, box, clamp, shape = np.eye(3), (0, 0, width, height), True, (height, width)
        for step in self.geometry:
            params = _draw(step, shape)
            if params is None:
                continue
            matrix, box, clamp, shape = _compose(step, params, matrix, box, clamp, shape)
        if shape != (self.img_size, self.img_size):
            raise ValueError(f"the preset's geometry gives {shape[1]}x{shape[0]} images, not "
                             f"{self.img_size}x{self.img_size}")
        plan = np.zeros(PLAN_SIZE, dtype=np.float32)
        plan[0:6] = np.linalg.inv(matrix)[:2].reshape(-1)
        plan[6:10], plan[10] = box, float(clamp)
        if self.cutout is not None:
            params = _draw(self.cutout, shape)
            if params is not None and len(params["holes"]):
                holes = np.asarray(params["holes"]).reshape(-1, 4)
                plan[11] = len(holes)
                plan[12:12 + holes.size] = holes.reshape(-1)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                "plan": torch.from_numpy(plan)}

    def __repr__(self) -> str:
        steps = [type(s).__name__ for s in [*self.geometry, *([self.cutout] if self.cutout else [])]]
        return f"HostPlan({', '.join(steps)}; size {self.img_size})"


def _draw(step: Any, shape: tuple[int, int]) -> dict | None:
    """A step's parameters for an image of `shape`, as BasicTransform.__call__ draws them (None
    when it does not fire). The stand-in image is a zero-strided view: no memory, only a shape."""
    data = {"image": np.broadcast_to(np.zeros((), np.uint8), (*shape, 3))}
    if not step.should_apply():
        return None
    params = step.update_transform_params(params=step.get_params(), data=data)
    params.update(step.get_params_dependent_on_data(params=params, data=data))
    return params


def _compose(step: Any, params: dict, matrix: np.ndarray, box: tuple, clamp: bool,
             shape: tuple[int, int]) -> tuple[np.ndarray, tuple, bool, tuple[int, int]]:
    """(source -> output matrix, valid box, clamp, output shape) after `step` with `params`."""
    height, width = shape
    if isinstance(step, CropFlipAffine):
        x0, y0, x1, y1 = params["crop"]
        m = crop_flip_affine_matrix((x1 - x0, y1 - y0), step.size, params["flips"], params["affine"])
        return m @ _translate(-x0, -y0), (x0, y0, x1, y1), params["affine"] is None, (step.size,) * 2
    if isinstance(step, A.RandomResizedCrop):
        x0, y0, x1, y1 = params["crop_coords"]
        out_h, out_w = step.size
        m = _resize(x1 - x0, y1 - y0, out_w, out_h) @ _translate(-x0, -y0)
        return m, (x0, y0, x1, y1), True, (out_h, out_w)
    if isinstance(step, A.Resize):
        return _resize(width, height, step.width, step.height) @ matrix, box, clamp, (step.height, step.width)
    if isinstance(step, A.HorizontalFlip):
        flip = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        return flip @ matrix, box, clamp, shape
    # A.Affine (and transforms.Affine): its matrix maps the current image onto itself
    return np.asarray(params["matrix"], dtype=np.float64) @ matrix, box, False, shape


def warp_images(images: torch.Tensor, plans: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 sources (B, 3, H, W), padded, and their plans (B, PLAN_SIZE) -> float32
    (B, 3, img_size, img_size) in 0-255: each output pixel one bilinear sample of its source at
    the plan's map of it; clamped to the plan's box, or black outside it, as the plan says."""
    batch, _, height, width = images.shape
    device = images.device
    inverse = plans[:, :6].view(batch, 2, 3)
    box, clamp = plans[:, 6:10], plans[:, 10] > 0
    grid = torch.arange(img_size, device=device, dtype=torch.float32)
    u, v = grid.view(1, 1, -1), grid.view(1, -1, 1)  # output column, row

    def source(row: int, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        c = inverse[:, row]
        coord = c[:, 0, None, None] * u + c[:, 1, None, None] * v + c[:, 2, None, None]
        inf = torch.full_like(low, float("inf"))
        low, high = torch.where(clamp, low, -inf), torch.where(clamp, high, inf)
        return torch.maximum(torch.minimum(coord, high[:, None, None]), low[:, None, None])

    xs = source(0, box[:, 0], box[:, 2] - 1)
    ys = source(1, box[:, 1], box[:, 3] - 1)
    cols = torch.arange(width, device=device)
    rows = torch.arange(height, device=device)
    inside = (((rows >= box[:, 1, None]) & (rows < box[:, 3, None]))[:, :, None]
              & ((cols >= box[:, 0, None]) & (cols < box[:, 2, None]))[:, None, :])
    src = torch.where(inside[:, None], images.float(), 0.0)
    normalised = torch.stack(((2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1), dim=-1)
    return F.grid_sample(src, normalised, mode="bilinear", padding_mode="zeros", align_corners=False)


def cut_holes(images: torch.Tensor, plans: torch.Tensor, fill: torch.Tensor, *,
              max_holes: int = MAX_HOLES) -> torch.Tensor:
    """Each image's cutout holes (the plan's, in output pixels) filled with `fill` (3,);
    `max_holes`: no plan has more (the loop's length, known on the host: no device sync)."""
    batch, _, height, width = images.shape
    holes = plans[:, 12:].view(batch, MAX_HOLES, 4)
    count = plans[:, 11]
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
    for k in range(max_holes):
        x0, y0, x1, y1 = (holes[:, k, j].view(-1, 1, 1) for j in range(4))
        used = (count > k).view(-1, 1, 1)
        mask |= used & (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return torch.where(mask[:, None], fill.to(images.device).view(1, 3, 1, 1), images)


class DeviceAugment:
    """The device's half of --augment-on-device: a WarpBatch -> float32 (B, 3, img_size,
    img_size) in 0-255 (for Normalizer.from_255): the warp, the colour steps (DeviceColour,
    drawing from the training step's generator), then the cutout holes."""

    def __init__(self, img_size: int, *, colour: DeviceColour | None = None,
                 fill: Sequence[float] | None = None):
        self.img_size, self.colour = int(img_size), colour
        self.fill = None if fill is None else torch.tensor([float(f) for f in fill])

    def __call__(self, batch: WarpBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(batch, WarpBatch):
            raise TypeError(f"DeviceAugment takes a WarpBatch (the loader's sources and plans), "
                            f"got {type(batch).__name__}; the loader must use HostPlan")
        images, plans = batch
        # The plans may still be on the host (prepare_images leaves them there): the hole count
        # is read there, never from the device, so no step waits for the GPU.
        max_holes = int(plans[:, 11].max()) if len(plans) else 0
        plans = plans.to(images.device, non_blocking=True)
        x = warp_images(images, plans, self.img_size)
        if self.colour is not None:
            x = self.colour(x, generator)
        if self.fill is not None and max_holes:
            x = cut_holes(x, plans, self.fill, max_holes=max_holes)
        return x

    def __repr__(self) -> str:
        return f"DeviceAugment(size {self.img_size}, {self.colour}, cutout fill {self.fill})"


def build_augment_on_device(preset: str, img_size: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                            rank: int = 0, world_size: int = 1) -> tuple[HostPlan, DeviceAugment]:
    """The loader's HostPlan and the training step's DeviceAugment for a preset."""
    plan = HostPlan(preset_steps(preset, img_size, mean), img_size)
    device = DeviceAugment(img_size, colour=build_device_colour(preset, rank=rank, world_size=world_size),
                           fill=None if plan.cutout is None else plan.cutout.fill)
    return plan, device


def padded_shape(images: Sequence[torch.Tensor], *, hwc: bool = False) -> tuple[int, int, int, int]:
    """The shape stack_sources gives uint8 images (3, h, w) of any sizes: (B, H, W, 3) when
    `hwc`, else (B, 3, H, W), H and W the largest."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    return (len(images), height, width, 3) if hwc else (len(images), 3, height, width)


def stack_sources(images: Sequence[torch.Tensor], *, out: torch.Tensor | None = None,
                  hwc: bool = False) -> torch.Tensor:
    """uint8 images (3, h, w) of any sizes -> (B, 3, H, W), padded with zeros at the bottom and
    right to the largest H and W; channels_last strides when `hwc` (each image a view of an
    (h, w, 3) array, as ToTensorV2 and HostPlan give). `out`: storage for (B·H·W·3) values."""
    shape = padded_shape(images, hwc=hwc)
    numel = int(np.prod(shape))
    if out is None:
        stacked = torch.empty(shape, dtype=torch.uint8)
    else:
        stacked = out[:numel].view(shape)
    parts = [image.permute(1, 2, 0) for image in images] if hwc else list(images)
    if all(part.shape == parts[0].shape for part in parts) and parts[0].shape == stacked.shape[1:]:
        torch.stack(parts, out=stacked)
    else:
        stacked.zero_()
        for i, part in enumerate(parts):
            if hwc:
                stacked[i, :part.shape[0], :part.shape[1]].copy_(part)
            else:
                stacked[i, :, :part.shape[1], :part.shape[2]].copy_(part)
    return stacked.permute(0, 3, 1, 2) if hwc else stacked


def build_train_augment(preset: str, img_size: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                        colour_on_device: bool = False, augment_on_device: bool = False,
                        rank: int = 0, world_size: int = 1
                        ) -> tuple[Any, DeviceColour | DeviceAugment | None]:
    """The training augmentation split between the loader and the device: (the loader's
    transform, the step's device half or None). --augment-on-device moves the whole preset
    (a HostPlan and a DeviceAugment); --colour-on-device only its colour steps; neither keeps
    everything in the loader."""
    if augment_on_device:
        return build_augment_on_device(preset, img_size, mean=mean, rank=rank, world_size=world_size)
    transform = build_train_transform(preset, img_size, mean=mean, colour_on_device=colour_on_device)
    device = build_device_colour(preset, rank=rank, world_size=world_size) if colour_on_device else None
    return transform, device


def collate_warp_items(batch: list, *, hwc: bool = False) -> list:
    """torch's default_collate for items whose image is a WarpItem: [WarpBatch, *the other
    columns]; the sources padded by stack_sources (into shared memory inside a loader worker,
    as default_collate does, so the batch crosses to the main process without a copy)."""
    items, *rest = zip(*batch)
    images = [item.image for item in items]
    hwc = hwc and images[0].permute(1, 2, 0).is_contiguous()
    out = None
    if get_worker_info() is not None:
        numel = int(np.prod(padded_shape(images, hwc=hwc)))
        out = torch.empty(numel, dtype=torch.uint8).share_memory_()
    sources = stack_sources(images, out=out, hwc=hwc)
    plans = default_collate([item.plan for item in items])
    return [WarpBatch(sources, plans), *(default_collate(list(column)) for column in rest)]
