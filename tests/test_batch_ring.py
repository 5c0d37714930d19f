"""The workers' reused batch buffers (mixcls.batch_ring): same batches as torch's collate, never
overwritten while a view is alive, and really reused."""

from __future__ import annotations

import gc
import multiprocessing

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from mixcls.batch_ring import BatchRing
from mixcls.sampling import RING_SLOTS, collate_hwc, make_loader


class Photos(Dataset):
    """uint8 (3, H, W) views of random (H, W, 3) arrays, as ToTensorV2 gives, with their row;
    `sizes` gives the image size per block of `block` rows (default: one size)."""

    def __init__(self, n: int, size: int = 20, *, block: int = 0, sizes: tuple[int, ...] = (),
                 dtype=np.uint8):
        self.n, self.size, self.block, self.sizes, self.dtype = n, size, block, sizes, dtype

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int):
        size = self.sizes[(row // self.block) % len(self.sizes)] if self.sizes else self.size
        hwc = np.random.default_rng(row).integers(0, 256, (size, size, 3)).astype(self.dtype)
        return torch.from_numpy(hwc).permute(2, 0, 1), row


def _states(ring: BatchRing) -> list[int]:
    return list(ring._state)


def _ring_loader(dataset, *, hwc=False, workers=2, slots=3, batch_size=8, context=None):
    ring = BatchRing(workers=workers, slots=slots, hwc=hwc, context=context)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=ring,
                        persistent_workers=True, prefetch_factor=1, multiprocessing_context=context)
    return ring, loader


@pytest.mark.parametrize("hwc", [False, True])
def test_batches_equal_torchs_collate_over_epochs_and_buffers_are_reused(hwc):
    dataset = Photos(100)
    ring, loader = _ring_loader(dataset, hwc=hwc)
    reference = DataLoader(dataset, batch_size=8, collate_fn=collate_hwc if hwc else default_collate)
    batches = 0
    for _ in range(3):
        for (images, rows), (want, want_rows) in zip(loader, reference, strict=True):
            assert images.dtype == torch.uint8 and images.shape == want.shape
            assert images.stride() == want.stride()  # channels_last strides with hwc
            assert torch.equal(images, want) and torch.equal(rows, want_rows)
            batches += 1
    assert batches == 39
    # 39 batches from 2 workers of 3 slots: each buffer crossed once, then was reused
    assert 2 <= ring.buffers_received <= 2 * 3
    del images, want, loader
    gc.collect()
    assert _states(ring) == [0] * 6


def test_holding_every_batch_of_an_epoch_never_overwrites_one():
    dataset = Photos(120)
    ring, loader = _ring_loader(dataset)
    list(loader)  # the buffers exist and were sent
    held = [(images, rows) for images, rows in loader]  # 15 batches, 6 slots: the rest fall back
    assert _states(ring) == [1] * 6
    for images, rows in held:
        want = torch.stack([dataset[int(row)][0] for row in rows])
        assert torch.equal(images, want)
    del held, images, rows
    gc.collect()
    assert _states(ring) == [0] * 6


def test_a_view_of_a_batch_keeps_its_slot_leased():
    dataset = Photos(16)
    ring, loader = _ring_loader(dataset, workers=1, slots=2)
    iterator = iter(loader)
    images, _ = next(iterator)
    first_image = images[0, :, 2:5].clone()
    view = images[0, :, 2:5]  # a slice, no copy
    del images
    gc.collect()
    assert _states(ring).count(1) >= 1
    rest = list(iterator)  # the other batch, while the view lives
    for _ in range(3):  # epochs that could reuse a slot the view still reads
        rest = [(batch.clone(), rows) for batch, rows in loader]
    assert torch.equal(view, first_image)
    del view, rest
    gc.collect()
    assert _states(ring) == [0, 0]


def test_a_larger_batch_gets_a_new_buffer_and_other_dtypes_use_torchs_collate():
    dataset = Photos(48, block=8, sizes=(12, 24, 16))  # each batch of 8 has its own size
    ring, loader = _ring_loader(dataset, workers=1, slots=2)
    for _ in range(2):
        for images, rows in loader:
            assert torch.equal(images, torch.stack([dataset[int(r)][0] for r in rows]))
    # the worker's side of it: a slot's buffer is replaced (a new generation, sent again) only
    # when a batch does not fit it
    fresh = BatchRing(workers=1, slots=1)
    sizes = [(buffer.numel(), generation, first) for buffer, generation, first in
             (fresh._buffer(0, n) for n in (10, 8, 20, 15, 20))]
    assert sizes == [(10, 1, True), (10, 1, False), (20, 2, True), (20, 2, False), (20, 2, False)]
    floats = Photos(16, dtype=np.float32)
    _, loader = _ring_loader(floats, workers=1, slots=2)
    for images, rows in loader:
        assert images.dtype == torch.float32
        assert torch.equal(images, torch.stack([floats[int(r)][0] for r in rows]))


@pytest.mark.slow
def test_works_with_spawned_workers():
    dataset = Photos(40)
    context = multiprocessing.get_context("spawn")
    ring, loader = _ring_loader(dataset, workers=2, slots=2, context=context)
    reference = DataLoader(dataset, batch_size=8)
    for _ in range(2):
        for (images, _), (want, _) in zip(loader, reference, strict=True):
            assert torch.equal(images, want)
    assert ring.buffers_received <= 4


def test_make_loader_uses_the_ring_with_workers_only():
    dataset = Photos(8)
    with_workers = make_loader(dataset, batch_size=4, workers=2, sampler=None, drop_last=False,
                               device=torch.device("cpu"), seed=0)
    without = make_loader(dataset, batch_size=4, workers=0, sampler=None, drop_last=False,
                          device=torch.device("cpu"), seed=0)
    assert isinstance(with_workers.collate_fn, BatchRing)
    assert with_workers.collate_fn.slots == RING_SLOTS and not with_workers.collate_fn.hwc
    assert not isinstance(without.collate_fn, BatchRing)
    for (a, _), (b, _) in zip(with_workers, without, strict=True):
        assert torch.equal(a, b)
