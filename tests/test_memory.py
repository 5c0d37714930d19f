"""Measured memory of a training step (fresh CPU child processes), find_max_batch, plan_batch.

The measured settings run once per module (each child imports torch and timm: ~4 s); timm's
`test_resnet` at 48 px keeps every step small, so the batch size drives the activations.
"""

from __future__ import annotations

import math

import pytest

from mixcls import memory

MODEL, IMG_SIZE, NUM_CLASSES = "test_resnet", 48, 3
BATCHES = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def measured() -> dict[str, memory.MemoryResult]:
    results = memory.measure_memory(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, batch_sizes=BATCHES,
                                    accum=[(8, 8)], device="cpu")
    return {r.label: r for r in results}


@pytest.fixture(scope="module")
def param_tensors() -> list[tuple[int, int]]:
    """(numel, element_size) of each parameter, from the model built here in the parent."""
    import timm

    model = timm.create_model(MODEL, num_classes=NUM_CLASSES, pretrained=False)
    return [(p.numel(), p.element_size()) for p in model.parameters()]


def test_parts_come_from_tensor_sizes(measured, param_tensors):
    param_bytes = sum(n * size for n, size in param_tensors)
    # AdamW keeps exp_avg and exp_avg_sq like each parameter, and a float32 `step` per tensor.
    adamw_bytes = 2 * param_bytes + 4 * len(param_tensors)
    for r in measured.values():
        assert not r.oom
        assert r.params_mb == pytest.approx(param_bytes / 2**20, rel=1e-12)
        assert r.grads_mb == pytest.approx(param_bytes / 2**20, rel=1e-12)
        assert r.optimizer_mb == pytest.approx(adamw_bytes / 2**20, rel=1e-12)
        parts = r.params_mb + r.grads_mb + r.optimizer_mb + r.activations_mb
        assert r.peak_mb == pytest.approx(parts, rel=1e-9)
        assert r.process_peak_mb > r.peak_mb  # the process also holds Python, torch, timm


def test_larger_batch_needs_more_memory(measured):
    peaks = [measured[str(b)].peak_mb for b in BATCHES]
    assert all(a < b for a, b in zip(peaks, peaks[1:])), peaks
    # The growth is activations: 8x the images should cost well over 2x the activations.
    assert measured["64"].activations_mb > 2 * measured["8"].activations_mb


def test_accumulation_needs_less_than_the_full_batch(measured):
    accum = measured["8x8"]
    assert accum.effective_batch == 64 and accum.micro_batch == 8 and accum.accum_steps == 8
    assert accum.peak_mb < measured["64"].peak_mb
    # Accumulating holds one micro-batch's activations at a time, far below a batch of 32's.
    assert accum.activations_mb < measured["32"].activations_mb


def test_find_max_batch_respects_the_budget(measured):
    budget = (measured["16"].peak_mb + measured["32"].peak_mb) / 2
    found = memory.find_max_batch(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, budget_mb=budget,
                                  device="cpu", candidates=BATCHES)
    assert found == 16


def test_find_max_batch_says_when_nothing_fits(measured):
    budget = measured["8"].peak_mb / 2
    with pytest.raises(ValueError, match=r"does not fit .* even at batch 8 \(needs"):
        memory.find_max_batch(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, budget_mb=budget,
                              device="cpu", candidates=(8, 16))


def test_find_max_batch_rejects_bad_budgets():
    with pytest.raises(ValueError, match="budget_mb"):
        memory.find_max_batch(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, budget_mb=0.0)
    with pytest.raises(ValueError, match="candidates"):
        memory.find_max_batch(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, budget_mb=100.0,
                              candidates=())


def test_bad_settings_fail_before_any_child():
    with pytest.raises(ValueError, match="amp"):
        memory.measure_memory(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, batch_sizes=[8],
                              amp_modes=["none", "fp8"])
    with pytest.raises(ValueError, match="micro_batch"):
        memory.measure_step(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, micro_batch=1)


@pytest.mark.parametrize("effective, max_micro", [
    (64, 64), (64, 16), (64, 20), (97, 32), (100, 30), (1, 8), (7, 8), (129, 64), (1000, 7),
])
def test_plan_batch_against_brute_force(effective, max_micro):
    micro, steps = memory.plan_batch(effective, max_micro)
    assert 1 <= micro <= max_micro
    fewest_steps = min(s for s in range(1, effective + 1) if s * max_micro >= effective)
    assert steps == fewest_steps
    # The smallest micro-batch that reaches the effective batch at that step count.
    assert micro == min(m for m in range(1, max_micro + 1) if m * steps >= effective)
    assert effective <= micro * steps < effective + steps
    if effective % steps == 0:
        assert micro * steps == effective


def test_plan_batch_random_cases():
    import random

    rng = random.Random(2024)
    for _ in range(500):
        effective, max_micro = rng.randint(1, 4096), rng.randint(1, 512)
        micro, steps = memory.plan_batch(effective, max_micro)
        assert steps == math.ceil(effective / max_micro)
        assert micro <= max_micro and effective <= micro * steps < effective + steps
        if effective % max_micro == 0:
            assert (micro, steps) == (max_micro, effective // max_micro)


@pytest.mark.parametrize("effective, max_micro", [(0, 8), (8, 0), (-3, 4)])
def test_plan_batch_rejects_non_positive(effective, max_micro):
    with pytest.raises(ValueError, match="must be >= 1"):
        memory.plan_batch(effective, max_micro)


def test_default_budget_on_cpu_is_half_the_free_memory():
    with open("/proc/meminfo") as f:
        free_mb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
    assert 0.3 * free_mb < memory.default_budget_mb("cpu") <= 0.6 * free_mb


def test_table_has_one_row_per_setting(measured):
    table = memory.format_memory_table(list(measured.values()))
    lines = table.splitlines()
    assert len(lines) == 2 + len(measured)
    assert lines[-1].split()[0] == "8x8" and lines[-1].split()[1] == "64"


@pytest.mark.parametrize("mode", ["sam", "asam"])
def test_a_sam_step_holds_one_copy_of_the_weights_more(mode):
    # resnet18 at 32 px: 43 MiB of weights against little activation memory, so the copy that
    # --sam keeps through its second pass stands out of the resident set's noise (measured:
    # 41.9 MiB more for sam and 42.1 for asam, whose climb makes its temporaries one at a time)
    plain, sam = (memory.measure_step("resnet18", 32, num_classes=NUM_CLASSES, micro_batch=2,
                                      device="cpu", sam=m) for m in ("none", mode))
    assert sam.sam == mode and sam.label == f"2 {mode}" and plain.label == "2"
    assert sam.params_mb == plain.params_mb and sam.optimizer_mb == plain.optimizer_mb
    extra = sam.peak_mb - plain.peak_mb
    assert 0.8 * plain.params_mb < extra < 1.5 * plain.params_mb, (extra, plain.params_mb)


@pytest.mark.gpu
def test_cuda_step_is_measured_with_the_allocator():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    small, large = (memory.measure_step(MODEL, IMG_SIZE, num_classes=NUM_CLASSES, micro_batch=b,
                                        device="cuda") for b in (8, 64))
    assert small.peak_mb < large.peak_mb
    assert large.process_peak_mb >= large.peak_mb  # reserved >= allocated
