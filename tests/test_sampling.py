"""Seeds, the epoch sampler and the per-process batch of a torchrun group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixcls.config import ConfigError
from mixcls.sampling import (EpochSampler, capture_rng_states, derive_seed, per_process_batch,
                             restore_rng_states, seed_everything)


def _steps_per_epoch(n: int, *, world_size: int, batch_size: int, accum_steps: int) -> int:
    """Optimizer steps of one epoch as the trainer takes them (drop_last, a short last group)."""
    per_rank = len(EpochSampler(n, seed=0, world_size=world_size))
    batches = per_rank // batch_size if per_rank > batch_size else 1
    return -(-batches // accum_steps)


@pytest.mark.parametrize("world_size, accum_steps", [(1, 1), (2, 1), (4, 2), (8, 1), (3, 4)])
def test_a_global_batch_gives_every_world_size_the_steps_of_one_process(world_size, accum_steps):
    rng = np.random.default_rng(world_size * 10 + accum_steps)
    micro = int(rng.integers(1, 9))
    global_batch = world_size * accum_steps * micro
    # A multiple of world_size: the sampler pads the ranks to equal lengths, which adds rows
    n = global_batch * int(rng.integers(3, 12)) + world_size * int(rng.integers(0, accum_steps * micro))
    assert per_process_batch(global_batch, world_size=world_size, accum_steps=accum_steps) == micro
    single = per_process_batch(global_batch, world_size=1, accum_steps=accum_steps)
    assert _steps_per_epoch(n, world_size=world_size, batch_size=micro, accum_steps=accum_steps) == \
        _steps_per_epoch(n, world_size=1, batch_size=single, accum_steps=accum_steps)
    # Without it each process takes the whole --batch-size: world_size times fewer steps.
    if world_size > 1:
        assert _steps_per_epoch(n, world_size=world_size, batch_size=single, accum_steps=accum_steps) < \
            _steps_per_epoch(n, world_size=1, batch_size=single, accum_steps=accum_steps)


@pytest.mark.parametrize("global_batch, world_size, accum_steps", [(10, 4, 1), (12, 2, 4), (3, 4, 1)])
def test_a_global_batch_that_does_not_divide_is_refused_naming_the_numbers(global_batch, world_size,
                                                                          accum_steps):
    with pytest.raises(ConfigError) as info:
        per_process_batch(global_batch, world_size=world_size, accum_steps=accum_steps)
    message = str(info.value)
    assert f"batch_size_global: {global_batch}" in message
    assert f"{world_size} process(es) x {accum_steps} accumulation step(s)" in message


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_the_epoch_permutation_and_skip_resumes_it(world_size):
    n = int(np.random.default_rng(world_size).integers(20, 40))
    samplers = [EpochSampler(n, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(2)
    rows = [[row for row, _ in s] for s in samplers]
    covered = sorted({row for part in rows for row in part})
    assert covered == list(range(n))
    assert len({len(part) for part in rows}) == 1  # padded to equal lengths
    samplers[0].set_epoch(2, skip=4)
    assert [row for row, _ in samplers[0]] == rows[0][4:]
    samplers[0].set_epoch(3)
    assert [row for row, _ in samplers[0]] != rows[0]  # another epoch, another order


def test_rng_states_round_trip_and_derive_seed_is_stable():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    seed_everything(11)
    states = capture_rng_states(torch.device("cpu"))
    first = (np.random.rand(3), torch.rand(3))
    restore_rng_states(states, torch.device("cpu"))
    again = (np.random.rand(3), torch.rand(3))
    np.testing.assert_array_equal(first[0], again[0])
    assert torch.equal(first[1], again[1])
