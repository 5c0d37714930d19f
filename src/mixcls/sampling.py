"""Seeds, generator states, the epoch sampler and the loaders: what makes a run repeatable.

Randomness is derived from (seed, fold, epoch) at each epoch start, and each image's
augmentation from (epoch seed, row), so a run resumed after a crash, or run with another
number of loader workers, sees exactly the same batches. A resume in the middle of an epoch
restores the python / numpy / torch / mixing generator states saved with its checkpoint.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mixcls.batch_ring import BatchRing
from mixcls.config import ConfigError
from mixcls.device_augment import WarpItem, collate_warp_items
from mixcls.heap import keep_freed_memory


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_states(device: torch.device) -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) generator states, as weights_only-loadable types."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Inverse of `capture_rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def start_epoch_generators(seed: int, fold: int, epoch: int, *, device: torch.device,
                           rng: dict[str, Any] | None = None,
                           mix_rng: torch.Tensor | None = None) -> torch.Generator:
    """Seed every generator for `epoch` (or restore a step checkpoint's `rng` / `mix_rng`);
    return the mixing generator."""
    epoch_seed = derive_seed(seed, fold, epoch)
    mix_gen = torch.Generator(device=device).manual_seed(derive_seed(epoch_seed, 1))
    if rng is not None:
        restore_rng_states(rng, device)
        if mix_rng is not None:
            mix_gen.set_state(mix_rng)
    else:
        seed_everything(epoch_seed)
    return mix_gen


def per_process_batch(global_batch: int, *, world_size: int, accum_steps: int) -> int:
    """The micro-batch of each process that makes `global_batch` images per optimizer step.

    Each process of a torchrun group loads its own micro-batch, so one optimizer step sees
    world_size * accum_steps * micro-batch images; a global batch that does not divide into
    that is refused rather than rounded, since rounding would change the step count silently.
    """
    parts = world_size * accum_steps
    if global_batch < parts or global_batch % parts:
        raise ConfigError(f"batch_size_global: {global_batch} images per step do not divide into "
                          f"{world_size} process(es) x {accum_steps} accumulation step(s) = {parts} "
                          f"equal micro-batches; use a multiple of {parts}")
    return global_batch // parts


class EpochSampler(Sampler):
    """Yields (row, item_seed) pairs of one epoch's permutation, from `skip` on.

    The permutation and the item seeds depend only on `seed` and the epoch, never on state
    carried across epochs. Under torchrun each rank takes every world_size-th item of the
    permutation (padded by wrapping, like DistributedSampler), so with world_size ranks of
    batch B, step s covers the same rows as step s of one process with batch world_size * B.
    `skip` counts this rank's items, i.e. batches already done * batch size.

    The sampler runs in the main process even with persistent loader workers (they receive
    indices only), so `set_epoch` takes effect at the next `iter(loader)`.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _order(self) -> list[int]:
        epoch_seed = derive_seed(self.seed, self.epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            per_rank = -(-self.n // self.world_size)
            order = (order * 2)[:per_rank * self.world_size][self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        return max(0, -(-self.n // self.world_size) - self.skip)

    def __iter__(self):
        epoch_seed = derive_seed(self.seed, self.epoch)
        for row in self._order()[self.skip:]:
            yield row, (epoch_seed * 1_000_003 + row) % 2**32


def worker_init(worker_id: int) -> None:
    """Each loader worker: one OpenCV thread, and glibc's freed pages kept (mixcls.heap)."""
    import cv2
    cv2.setNumThreads(0)  # one decode thread per worker; the workers are the parallelism
    keep_freed_memory()  # inherited from the parent when forked; a spawned worker sets its own


PREFETCH_BATCHES = 4  # per worker (torch's default is 2)
# Image buffers per worker (mixcls.batch_ring): the batches waiting in the queue, the one the
# step uses and one being pinned; a worker finding none free uses torch's own collate.
RING_SLOTS = PREFETCH_BATCHES + 2


def collate_hwc(batch: list) -> Any:
    """default_collate, except that uint8 images (3, H, W) that are views of (H, W, 3) arrays
    (what ToTensorV2 gives) are stacked in that memory order: (B, 3, H, W) with channels_last
    strides, one plain copy per image instead of a channel-splitting one.

    The split is left to the device (prepare_images makes the batch contiguous there, or keeps
    it channels_last for --channels-last): on a 512 px batch of 32 the split took about a
    quarter of a loader worker's time per photo. Same values as default_collate (tested).
    """
    from torch.utils.data import default_collate

    first = batch[0][0] if batch and isinstance(batch[0], (tuple, list)) else None
    if not (isinstance(first, torch.Tensor) and first.dtype == torch.uint8 and first.ndim == 3
            and first.permute(1, 2, 0).is_contiguous()):
        return default_collate(batch)
    images, *rest = zip(*batch)
    # default_collate stacks into shared memory inside a worker: no copy more to send the batch
    stacked = default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return [stacked, *(default_collate(list(column)) for column in rest)]


def collate_items(batch: list, *, hwc: bool = False) -> Any:
    """The collate of a loader without workers: WarpItems (--augment-on-device) padded into a
    WarpBatch; other uint8 images by collate_hwc when `hwc`, else torch's default_collate."""
    from torch.utils.data import default_collate

    if batch and isinstance(batch[0], (tuple, list)) and isinstance(batch[0][0], WarpItem):
        return collate_warp_items(batch, hwc=hwc)
    return collate_hwc(batch) if hwc else default_collate(batch)


def build_collate(*, workers: int, hwc: bool):
    """The collate_fn of mixcls's loaders: with workers, a BatchRing (reused shared-memory image
    buffers); without, collate_items."""
    if workers > 0:
        return BatchRing(workers=workers, slots=RING_SLOTS, hwc=hwc)
    return functools.partial(collate_items, hwc=hwc)


def make_loader(dataset: Dataset, *, batch_size: int, workers: int, sampler: Sampler | None,
                drop_last: bool, device: torch.device, seed: int,
                hwc_batches: bool | None = None) -> DataLoader:
    """A DataLoader whose worker seeds come from `seed`, never from the global torch RNG.

    `hwc_batches` (default: on a CUDA device) collates images with collate_hwc, leaving the
    channel split to the device; on a CPU the step itself would pay for it, so it stays here.
    With workers, each worker stacks its image batches into a few reused shared-memory buffers
    (mixcls.batch_ring) rather than a new one per batch.
    """
    # Its own generator: creating an iterator draws a worker base seed, which must not move
    # the global torch RNG (a resumed epoch creates one iterator more than an unbroken one).
    keep_freed_memory()  # before the workers fork; the decode and augmentation of 0 workers too
    if hwc_batches is None:
        hwc_batches = device.type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, pin_memory=device.type == "cuda",
                      collate_fn=build_collate(workers=workers, hwc=hwc_batches),
                      persistent_workers=workers > 0, worker_init_fn=worker_init,
                      # uint8 batches are small: each worker keeps a few ready ahead of the step
                      prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))
