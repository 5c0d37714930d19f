"""Loader workers that reuse their shared-memory image batches instead of allocating new ones.

Inside a DataLoader worker torch's `default_collate` stacks every batch into a new
shared-memory storage, and the main process maps it anew. The stack then faults in fresh,
zero-filled pages: on this project's 2-core machine about 0.7 ms per 512 px photo, a quarter of
what a disk-cached photo costs in the whole pipeline (docs/benchmarks.md, loader section). torch
has no option to reuse those buffers, so this module keeps a small ring of them per worker.

How a batch travels:
- each worker owns `slots` shared uint8 buffers, made the first time it needs them; a buffer is
  sent to the main process once, with the first batch stacked into it, and kept there in the
  ring's table; later batches in that buffer send only (worker, slot, shape);
- the main process builds the batch as a tensor over the kept buffer. The tensor holds a lease:
  when the last view of the batch is gone (the step converted it to float on the device, or
  pinned a copy) the lease marks the slot free in a small array shared with the workers;
- a worker stacks the next batch into a free slot of its own; when none is free (the caller
  keeps every batch of an epoch, say) it falls back to torch's own collate, so a batch is never
  overwritten while anything still sees it. (Batches still queued when non-persistent workers
  are shut down mid-epoch may never reach the main process; their slots then stay leased, and
  that DataLoader's later workers use torch's collate for them: slower, never wrong.)

Only uint8 image batches take the ring (mixcls's loaders yield uint8, or WarpItems whose uint8
sources of any size are padded to the batch's largest); anything else, and every batch made
outside a worker, is torch's `default_collate` (device_augment.collate_warp_items for WarpItems).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import uuid
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

from mixcls.device_augment import WarpBatch, WarpItem, collate_warp_items, padded_shape, stack_sources

# ring id -> the main process's BatchRing (its table of received slots); weak, so a ring dies
# with its DataLoader and iterators, while a batch still in use keeps its own slot alive.
_RINGS: weakref.WeakValueDictionary[str, BatchRing] = weakref.WeakValueDictionary()

FREE, LEASED = 0, 1


class _Lease:
    """Marks one slot free again when the last view of its batch is collected."""

    def __init__(self, state, index: int):
        self.state, self.index = state, index

    def __del__(self):
        with self.state.get_lock():
            self.state[self.index] = FREE


class BatchRing:
    """collate_fn for a DataLoader with `workers` workers, each reusing `slots` image buffers.

    `hwc`: stack uint8 images (3, H, W) that are views of (H, W, 3) arrays in that memory order,
    as sampling.collate_hwc does (a batch with channels_last strides); otherwise (B, 3, H, W)
    contiguous, as default_collate gives. Create it in the main process before the workers start,
    with the DataLoader's multiprocessing `context` when it sets one (default: the default one).
    """

    def __init__(self, *, workers: int, slots: int, hwc: bool = False, context=None):
        if workers < 1 or slots < 1:
            raise ValueError(f"a batch ring needs workers >= 1 and slots >= 1, got {workers}, {slots}")
        self.workers, self.slots, self.hwc = workers, slots, hwc
        self.ring_id = uuid.uuid4().hex
        self._state = (context or multiprocessing).Array(ctypes.c_int8, workers * slots)  # + lock
        self._received: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # main process
        self.buffers_received = 0  # main process: how many buffers the workers have sent
        self._own: dict[int, torch.Tensor] = {}  # a worker's buffers, by slot
        self._generation: dict[int, int] = {}  # a worker's buffer generation, by slot
        self._sent: set[tuple[int, int]] = set()  # (slot, generation) a worker has sent
        _RINGS[self.ring_id] = self

    def __getstate__(self) -> dict:
        # A spawned worker gets the shared state, never the main process's table of buffers.
        state = self.__dict__.copy()
        state.update(_received={}, _own={}, _generation={}, _sent=set(), buffers_received=0)
        return state

    def __call__(self, batch: list) -> Any:
        info = get_worker_info()
        warp = bool(batch) and isinstance(batch[0], (tuple, list)) and isinstance(batch[0][0], WarpItem)
        images = [sample[0].image for sample in batch] if warp else _uint8_images(batch)
        if info is None or images is None or info.id >= self.workers:
            return self._fallback(batch, warp)
        hwc = self.hwc and images[0].permute(1, 2, 0).is_contiguous()
        shape = padded_shape(images, hwc=hwc)  # WarpItems' sources differ in size: padded
        slot = self._claim(info.id)
        if slot is None:
            return self._fallback(batch, warp)
        numel = int(np.prod(shape))
        buffer, generation, first = self._buffer(slot, numel)
        stack_sources(images, out=buffer, hwc=hwc)
        rest = [default_collate(list(column)) for column in list(zip(*batch))[1:]]
        sent = _RingBatch(self.ring_id, info.id, slot, generation, buffer if first else None,
                          shape, hwc)
        if warp:
            sent = WarpBatch(sent, default_collate([sample[0].plan for sample in batch]))
        return [sent, *rest]  # a list, as default_collate gives for (image, label) samples

    def _fallback(self, batch: list, warp: bool) -> Any:
        return collate_warp_items(batch, hwc=self.hwc) if warp else default_collate(batch)

    def _claim(self, worker: int) -> int | None:
        """A free slot of `worker`, now leased; None when every one is in use."""
        with self._state.get_lock():
            for slot in range(self.slots):
                if self._state[worker * self.slots + slot] == FREE:
                    self._state[worker * self.slots + slot] = LEASED
                    return slot
        return None

    def _buffer(self, slot: int, numel: int) -> tuple[torch.Tensor, int, bool]:
        """(the worker's buffer for `slot`, its generation, whether the main process lacks it)."""
        buffer = self._own.get(slot)
        if buffer is None or buffer.numel() < numel:
            # A larger batch than the slot held (a new image size): a new buffer, a new generation.
            buffer = torch.empty(numel, dtype=torch.uint8).share_memory_()
            self._own[slot] = buffer
            self._generation[slot] = self._generation.get(slot, 0) + 1
        generation = self._generation[slot]
        first = (slot, generation) not in self._sent
        self._sent.add((slot, generation))
        return buffer, generation, first


def _uint8_images(batch: list) -> list[torch.Tensor] | None:
    """The images of a batch of (image, ...) samples when they are uint8 (3, H, W) of one shape."""
    if not batch or not isinstance(batch[0], (tuple, list)):
        return None
    images = [sample[0] for sample in batch]
    first = images[0]
    if not (isinstance(first, torch.Tensor) and first.dtype == torch.uint8 and first.ndim == 3):
        return None
    if any(not isinstance(image, torch.Tensor) or image.dtype != torch.uint8
           or image.shape != first.shape for image in images):
        return None
    return images


class _RingBatch:
    """A batch in a worker's slot, on its way to the main process, where it unpickles as a tensor."""

    def __init__(self, ring_id, worker, slot, generation, buffer, shape, hwc):
        self.args = (ring_id, worker, slot, generation, buffer, shape, hwc)

    def __reduce__(self):
        return _receive, self.args


def _receive(ring_id: str, worker: int, slot: int, generation: int, buffer: torch.Tensor | None,
             shape: tuple[int, ...], hwc: bool) -> torch.Tensor:
    """In the main process: the batch as a tensor over its slot, holding the slot's lease."""
    ring = _RINGS.get(ring_id)
    if ring is None:
        raise RuntimeError(f"batch ring {ring_id}: a worker's batch arrived after its DataLoader "
                           "and iterators were collected")
    key = (worker, slot)
    if buffer is not None:
        ring._received[key] = (generation, buffer)
        ring.buffers_received += 1
    else:
        kept = ring._received.get(key)
        if kept is None or kept[0] != generation:
            raise RuntimeError(f"batch ring {ring_id}: worker {worker} sent a batch in slot {slot} "
                               f"(buffer generation {generation}) whose buffer never reached "
                               "this process")
        buffer = kept[1]
    numel = int(np.prod(shape))
    # A ctypes array over the buffer is what carries the lease: numpy and then torch keep it
    # alive as long as any view of the batch exists, and its __dict__ holds the lease and the
    # buffer (so the memory outlives the ring's table if the batch is kept).
    view = (ctypes.c_uint8 * numel).from_address(buffer.data_ptr())
    view.lease = _Lease(ring._state, worker * ring.slots + slot)
    view.buffer = buffer
    images = torch.from_numpy(np.frombuffer(view, dtype=np.uint8, count=numel)).view(shape)
    return images.permute(0, 3, 1, 2) if hwc else images
