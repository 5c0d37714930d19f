"""mixcls.mix: every mixed image and target is checked against an independent float64 / numpy /
scipy computation on random inputs, over several seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from mixcls import mix
from mixcls.mix import (FMIX_MEAN_TOLERANCE, Mixer, apply_mix, cutmix_boxes, cutmix_masks,
                        fmix_grey, fmix_masks, make_masks, sample_lam)

SEEDS = [11, 2024, 777]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[labels]


# ---------------------------------------------------------------- the mixed batch

@pytest.mark.parametrize("method", ["mixup", "cutmix", "fmix", "fmix:0.5,cutmix:0.3,mixup:0.2"])
@pytest.mark.parametrize("mode", ["batch", "sample"])
@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_batch_equals_mask_formula(method: str, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch, num_classes, height, width = 7, 5, 19 + seed % 5, 26
    images = torch.from_numpy(rng.normal(size=(batch, 3, height, width)).astype(np.float32))
    labels = rng.integers(0, num_classes, size=batch)
    mixer = Mixer(method, alpha=float(rng.uniform(0.3, 3)), mode=mode, num_classes=num_classes)
    plan = mixer.sample_plan(batch, height, width, _gen(seed))
    mixed, soft, lam_eff = mixer(images, torch.from_numpy(labels), _gen(seed))

    perm = plan.perm.numpy()
    assert sorted(perm.tolist()) == list(range(batch))
    masks = np.broadcast_to(plan.masks.double().numpy(), (batch, 1, height, width))
    x = images.double().numpy()
    np.testing.assert_allclose(mixed.double().numpy(), masks * x + (1 - masks) * x[perm],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lam_eff.numpy(), masks.mean(axis=(1, 2, 3)), atol=1e-6)
    expected = (lam_eff.double().numpy()[:, None] * _one_hot(labels, num_classes)
                + (1 - lam_eff.double().numpy()[:, None]) * _one_hot(labels[perm], num_classes))
    np.testing.assert_allclose(soft.double().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(soft.sum(1).numpy(), 1.0, atol=1e-6)
    if mode == "batch":
        assert plan.masks.shape[0] == 1 and plan.lam.shape == (1,)
    else:
        assert plan.masks.shape[0] == batch and plan.lam.shape == (batch,)
    if plan.method != "mixup":
        assert set(np.unique(masks)) <= {0.0, 1.0}


def test_soft_targets_in_compose_with_label_smoothing() -> None:
    rng = np.random.default_rng(5)
    batch, num_classes = 9, 4
    labels = rng.integers(0, num_classes, size=batch)
    smoothing = 0.1
    soft_in = torch.from_numpy(_one_hot(labels, num_classes) * (1 - smoothing) + smoothing / num_classes)
    images = torch.rand(batch, 3, 12, 12, dtype=torch.float64)
    mixer = Mixer("cutmix", mode="sample")
    plan = mixer.sample_plan(batch, 12, 12, _gen(3))
    mixed, soft, lam_eff = mixer(images, soft_in, _gen(3))
    w = lam_eff.double().numpy()[:, None]
    expected = w * soft_in.numpy() + (1 - w) * soft_in.numpy()[plan.perm.numpy()]
    np.testing.assert_allclose(soft.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(soft.sum(1).numpy(), 1.0, atol=1e-12)
    assert soft.dtype == torch.float64 and mixed.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["mixup", "fmix"])
def test_half_precision_batch(dtype: torch.dtype, method: str) -> None:
    images32 = torch.randn(6, 3, 24, 20, generator=_gen(1))
    images = images32.to(dtype)
    mixer = Mixer(method, mode="sample", num_classes=3, max_soft=0.1 if method == "fmix" else 0.0)
    plan = mixer.sample_plan(6, 24, 20, _gen(8))
    mixed, soft, lam_eff = mixer(images, torch.tensor([0, 1, 2, 0, 1, 2]), _gen(8))
    assert mixed.dtype == dtype and soft.dtype == torch.float32
    applied = plan.masks.to(dtype).double()      # the weights really used, rounded to `dtype`
    x = images.double()
    expected = applied * x + (1 - applied) * x[plan.perm]
    tol = 2 * torch.finfo(dtype).eps * (x.abs().max() + 1)
    assert float((mixed.double() - expected).abs().max()) <= float(tol)
    np.testing.assert_allclose(lam_eff.numpy(), applied.mean(dim=(1, 2, 3)).numpy(), atol=1e-6)
    np.testing.assert_allclose(soft.sum(1).numpy(), 1.0, atol=1e-6)


# ---------------------------------------------------------------- cutmix

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", [(32, 32), (17, 40), (45, 9)])
def test_cutmix_boxes_inside_and_lam_from_clipped_area(seed: int, size: tuple[int, int]) -> None:
    height, width = size
    lam = sample_lam(1.0, 400, _gen(seed))
    boxes = cutmix_boxes(lam, height, width, _gen(seed + 1)).numpy()
    y0, y1, x0, x1 = boxes.T
    assert (0 <= y0).all() and (y0 <= y1).all() and (y1 <= height).all()
    assert (0 <= x0).all() and (x0 <= x1).all() and (x1 <= width).all()
    masks = cutmix_masks(torch.from_numpy(boxes), height, width).numpy()
    clipped = 0
    for i, (a, b, c, d) in enumerate(boxes):
        expected = np.ones((height, width))
        expected[a:b, c:d] = 0.0
        np.testing.assert_array_equal(masks[i, 0], expected)
        area = (b - a) * (d - c)
        assert masks[i].mean() == pytest.approx(1 - area / (height * width), abs=1e-7)
        # before clipping the box has sides round(sqrt(1 - λ) · side)
        side = np.sqrt(1 - float(lam[i]))
        full = round(side * height) * round(side * width)
        assert area <= full
        clipped += area < full
    assert clipped > 50, "no box was clipped: the test would not see clipping"
    # The unclipped area is (1 − λ)·H·W up to the rounding of each side.
    side = np.sqrt(1 - lam.double().numpy())
    np.testing.assert_allclose(np.round(side * height) * np.round(side * width),
                               (1 - lam.double().numpy()) * height * width,
                               atol=0.5 * (height + width) + 0.25)


def test_cutmix_lam_eff_exceeds_lam_when_clipped() -> None:
    mixer = Mixer("cutmix", alpha=1.0, mode="sample", num_classes=2)
    images = torch.zeros(64, 1, 30, 30)
    plan = mixer.sample_plan(64, 30, 30, _gen(4))
    _, _, lam_eff = apply_mix(images, torch.eye(2)[torch.zeros(64, dtype=torch.long)], plan)
    side = torch.sqrt(1 - plan.lam.double())
    unclipped_lam = 1 - torch.round(side * 30) ** 2 / 900
    assert (lam_eff.double() >= unclipped_lam - 1e-6).all()
    assert (lam_eff.double() > unclipped_lam + 1e-3).sum() > 5


# ---------------------------------------------------------------- fmix

@pytest.mark.parametrize("size", [(16, 16), (31, 47), (64, 64), (97, 131), (128, 80), (224, 224)])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_fmix_mask_mean_is_lam(size: tuple[int, int], seed: int) -> None:
    height, width = size
    lam = torch.cat([torch.rand(60, generator=_gen(seed)), torch.tensor([0.0, 1.0, 0.001, 0.999])])
    masks = fmix_masks(len(lam), height, width, lam, generator=_gen(seed + 1))
    assert masks.shape == (len(lam), 1, height, width) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    error = (masks.double().mean(dim=(1, 2, 3)) - lam.double()).abs()
    assert float(error.max()) <= 0.005
    assert float(error.max()) <= max(FMIX_MEAN_TOLERANCE, 0.5 / (height * width)) + 4 / (height * width)
    assert masks[-4].sum() == 0 and masks[-3].sum() == height * width


@pytest.mark.parametrize("size", [(97, 131), (200, 72)])
def test_fmix_exact_threshold_keeps_the_top_round_lam_pixels(size: tuple[int, int]) -> None:
    height, width = size
    lam = torch.rand(16, generator=_gen(6))
    field = mix._fmix_field(16, height, width, 3.0, _gen(7), None)
    masks = mix._binary_fmix(field, lam, height, width, tolerance=0.0)[:, 0].numpy()  # all exact
    grey = mix._resize(field, (height, width))[:, 0].numpy()
    for i in range(16):
        wanted = round(float(lam[i]) * height * width)
        kth = np.sort(grey[i].ravel())[::-1][wanted - 1]
        # the pixels at or above the wanted-th largest value (more only where values are equal)
        np.testing.assert_array_equal(masks[i], (grey[i] >= kth).astype(np.float32))
        assert 0 <= masks[i].sum() - wanted <= 16


def test_kth_largest_matches_numpy_sort() -> None:
    rng = np.random.default_rng(12)
    values = rng.normal(size=(30, 257)).astype(np.float32)
    k = rng.integers(0, 258, size=30)
    k[:3] = [0, 257, 1]
    got = mix._kth_largest(torch.from_numpy(values), torch.from_numpy(k)).numpy()
    ordered = -np.sort(-values, axis=1)
    for i in range(30):
        if k[i] == 0:
            assert got[i] > values[i].max()
        else:
            assert got[i] == ordered[i, k[i] - 1]
            assert (values[i] >= got[i]).sum() == k[i]


@pytest.mark.parametrize("seed", SEEDS)
def test_estimated_kth_largest_is_within_a_bin(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = torch.from_numpy(rng.standard_t(3, size=(40, 3000)).astype(np.float32))
    k = torch.from_numpy(rng.integers(1, 3001, size=40))
    bins = 256
    estimate = mix._estimate_kth_largest(values, k, bins=bins)
    for row, kk, t in zip(values.numpy(), k.numpy(), estimate.numpy()):
        counts, _ = np.histogram(row, bins=bins)
        exact = np.sort(row)[::-1][kk - 1]
        # off by at most the values of one bin, and never outside the row's range
        assert abs(int((row >= t).sum()) - kk) <= counts.max()
        assert row.min() <= t <= row.max() + (row.max() - row.min()) / bins
        assert abs(t - exact) <= 2 * (row.max() - row.min()) / bins


@pytest.mark.parametrize("seed", SEEDS)
def test_fmix_masks_keep_the_top_pixels_of_fmix_grey(seed: int) -> None:
    lam = torch.rand(8, generator=_gen(seed))
    grey = fmix_grey(8, 70, 90, 3.0, _gen(seed + 5))
    masks = fmix_masks(8, 70, 90, lam, 3.0, 0.0, _gen(seed + 5))[:, 0]
    assert float(grey.min()) == 0.0 and float(grey.max()) == 1.0
    for g, m in zip(grey, masks):
        if 0 < m.sum() < m.numel():
            assert float(g[m == 1].min()) >= float(g[m == 0].max()) - 1e-6


def _low_frequency_share(masks: np.ndarray, radius: float = 4.0) -> float:
    """Mean share of the (mean-removed) power spectrum at <= `radius` cycles per image."""
    centred = masks - masks.mean(axis=(-2, -1), keepdims=True)
    power = np.abs(np.fft.fft2(centred)) ** 2
    height, width = masks.shape[-2:]
    cycles = np.hypot(*np.meshgrid(np.fft.fftfreq(height) * height, np.fft.fftfreq(width) * width,
                                   indexing="ij"))
    return float((power[..., cycles <= radius].sum(-1) / power.sum(axis=(-2, -1))).mean())


def test_fmix_power_is_at_low_frequencies_and_more_so_with_decay() -> None:
    shares = []
    for decay in [1.0, 2.0, 3.0]:
        masks = fmix_masks(64, 64, 64, 0.5, decay_power=decay, generator=_gen(21))[:, 0].numpy()
        shares.append(_low_frequency_share(masks))
    shuffled = np.random.default_rng(0).permuted(masks.reshape(64, -1), axis=1).reshape(masks.shape)
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > 0.7
    assert _low_frequency_share(shuffled) < 0.05
    greys = [_low_frequency_share(fmix_grey(32, 64, 64, d, _gen(22)).numpy()) for d in [1, 2, 3, 4]]
    assert greys == sorted(greys) and greys[-1] > 0.99


def _reference_fmix(rng: np.random.Generator, height: int, width: int, decay: float,
                    lam: float) -> np.ndarray:
    """The FMix recipe at full size in float64, one image at a time: 1/f^d spectrum, irfft2,
    keep the top round(λ·H·W) pixels."""
    freq = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    scale = 1.0 / np.maximum(freq, 1.0 / max(height, width)) ** decay
    spectrum = (rng.standard_normal(freq.shape) + 1j * rng.standard_normal(freq.shape)) * scale
    grey = np.fft.irfft2(spectrum, s=(height, width))
    mask = np.zeros(height * width)
    mask[np.argsort(grey.ravel())[::-1][:round(lam * height * width)]] = 1.0
    return mask.reshape(height, width)


def _edge_density(masks: np.ndarray) -> float:
    """Share of neighbouring pixel pairs on different sides of the mask's boundary."""
    return float((np.abs(np.diff(masks, axis=-1)).mean() + np.abs(np.diff(masks, axis=-2)).mean()) / 2)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_fmix_shapes_match_the_full_size_reference(seed: int) -> None:
    """The low-resolution field + upsampling makes masks like the full-size recipe's."""
    rng = np.random.default_rng(seed)
    height, width, lam = 96, 80, 0.4
    reference = np.stack([_reference_fmix(rng, height, width, 3.0, lam) for _ in range(256)])
    ours = fmix_masks(256, height, width, lam, generator=_gen(seed))[:, 0].double().numpy()
    assert _edge_density(ours) == pytest.approx(_edge_density(reference), rel=0.10)
    assert _low_frequency_share(ours, 3) == pytest.approx(_low_frequency_share(reference, 3), abs=0.02)


def test_fmix_soft_edges() -> None:
    lam = torch.cat([torch.rand(30, generator=_gen(2)), torch.tensor([0.0, 1.0])])
    max_soft = 0.1
    masks = fmix_masks(len(lam), 48, 64, lam, max_soft=max_soft, generator=_gen(3))
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    means = masks.double().mean(dim=(1, 2, 3))
    soft = torch.minimum(lam, 1 - lam).clamp(max=max_soft).double()
    # pixels above the (λ − s) quantile are 1 and below the (λ + s) one 0, so the mean lies between
    assert ((means - lam.double()).abs() <= soft + 0.005).all()
    inside = ((masks > 0) & (masks < 1)).double().mean(dim=(1, 2, 3))[:-2]
    assert (inside > 0.5 * soft[:-2]).all() and (inside < 2 * soft[:-2] + 0.01).all()
    assert masks[-2].sum() == 0 and masks[-1].min() == 1


def test_same_seed_same_masks_other_seed_other_masks() -> None:
    for method in ["cutmix", "fmix"]:
        a = make_masks(method, torch.rand(4, generator=_gen(0)), 40, 40, generator=_gen(1))
        b = make_masks(method, torch.rand(4, generator=_gen(0)), 40, 40, generator=_gen(1))
        c = make_masks(method, torch.rand(4, generator=_gen(0)), 40, 40, generator=_gen(2))
        assert torch.equal(a, b) and not torch.equal(a, c)
    mixer = Mixer("fmix:0.5,cutmix:0.5", mode="sample", num_classes=3)
    images, labels = torch.randn(8, 3, 20, 20), torch.arange(8) % 3
    first, second, other = (mixer(images, labels, _gen(s)) for s in (5, 5, 6))
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_seeded_global_rng_and_untouched_global_state() -> None:
    torch.manual_seed(3)
    a = fmix_masks(2, 30, 30, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, fmix_masks(2, 30, 30, 0.5))
    images = torch.rand(4, 3, 8, 8)
    state = torch.get_rng_state()
    sample_lam(0.5, 10, _gen(1))
    for method in ["mixup", "cutmix", "fmix:0.5,mixup:0.5"]:
        Mixer(method, mode="sample", num_classes=2)(images, torch.tensor([0, 1, 0, 1]), _gen(1))
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- λ and method draws

@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_lam_is_beta_distributed(alpha: float, seed: int) -> None:
    samples = sample_lam(alpha, 3000, _gen(seed)).double().numpy()
    assert samples.shape == (3000,) and ((samples >= 0) & (samples <= 1)).all()
    assert stats.kstest(samples, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    # the same test rejects a neighbouring distribution, so it can fail
    assert stats.kstest(samples, stats.beta(alpha * 1.6, alpha * 1.6).cdf).pvalue < 1e-3


def test_weighted_spec_chooses_methods_with_its_frequencies() -> None:
    weights = {"fmix": 0.6, "cutmix": 0.3, "mixup": 0.1}
    mixer = Mixer("fmix:0.6,cutmix:0.3,mixup:0.1")
    generator = _gen(9)
    # the draw sample_plan makes first; a whole plan per draw would only add mask making
    chosen = [mixer._choose_method(generator) for _ in range(2000)]
    observed = [chosen.count(name) for name in weights]
    assert sum(observed) == 2000
    assert stats.chisquare(observed, [2000 * w for w in weights.values()]).pvalue > 1e-3
    assert stats.chisquare(observed, [2000 / 3] * 3).pvalue < 1e-6   # the check has power
    plans = [mixer.sample_plan(2, 8, 8, generator) for _ in range(40)]
    assert {p.method for p in plans} <= set(weights) and len({p.method for p in plans}) >= 2
    for plan in plans:
        is_mixup = plan.masks.shape[-2:] == (1, 1)
        assert is_mixup == (plan.method == "mixup")


def test_prob_and_enabled_switch_mixing_off() -> None:
    images, labels = torch.randn(4, 3, 10, 10), torch.tensor([0, 1, 2, 1])
    never = Mixer("fmix", prob=0.0, num_classes=3)
    for seed in range(100):
        mixed, soft, lam_eff = never(images, labels, _gen(seed))
        assert mixed is images and torch.equal(lam_eff, torch.ones(4))
        assert torch.equal(soft, torch.eye(3)[labels])
    sometimes = Mixer("mixup", prob=0.3, num_classes=3)
    generator = _gen(1)
    mixed_count = sum(sometimes.sample_plan(4, 10, 10, generator).masks is not None for _ in range(500))
    assert stats.binomtest(mixed_count, 500, 0.3).pvalue > 1e-3
    off = Mixer("cutmix", num_classes=3)
    off.enabled = False
    generator = _gen(2)
    state = generator.get_state()
    assert off(images, labels, generator)[0] is images
    assert torch.equal(state, generator.get_state())          # switched off: draws nothing


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="alpha"):
        Mixer("mixup", alpha=0)
    with pytest.raises(ValueError, match="prob"):
        Mixer("mixup", prob=1.5)
    with pytest.raises(ValueError, match="'elem'"):
        Mixer("mixup", mode="elem")
    with pytest.raises(ValueError, match="max_soft"):
        Mixer("fmix", max_soft=0.7)
    with pytest.raises(ValueError, match="unknown mix 'cutout'"):
        Mixer("cutout")
    mixer = Mixer("mixup", num_classes=3)
    with pytest.raises(ValueError, match="target 7"):
        mixer(torch.rand(2, 3, 4, 4), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="floating-point"):
        mixer(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        Mixer("mixup")(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lam must lie"):
        fmix_masks(2, 8, 8, torch.tensor([0.5, 1.2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixer_on_gpu_with_gpu_generator() -> None:
    images = torch.randn(16, 3, 64, 48, device="cuda")
    labels = torch.randint(0, 5, (16,), device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for method in ["mixup", "cutmix", "fmix"]:
        mixer = Mixer(method, mode="sample", num_classes=5)
        mixed, soft, lam_eff = mixer(images, labels, generator)
        assert mixed.device.type == soft.device.type == lam_eff.device.type == "cuda"
        torch.testing.assert_close(soft.sum(1), torch.ones(16, device="cuda"))
    lam = torch.rand(32)
    masks = fmix_masks(32, 224, 224, lam, generator=generator, device="cuda")
    assert masks.device.type == "cuda"
    assert float((masks.mean(dim=(1, 2, 3)).cpu() - lam).abs().max()) <= 0.005


# ---------------------------------------------------------------- the README's example

def _readme_mix_example() -> str:
    """The python block of README.md's "Mixed-sample augmentation" section, as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Mixed-sample augmentation", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_mixer_example_runs_as_written():
    names: dict = {}
    exec(compile(_readme_mix_example(), "README.md (Mixed-sample augmentation)", "exec"), names)
    images, labels = names["images"], names["labels"]
    mixed, soft_targets, lam_eff = names["mixed"], names["soft_targets"], names["lam_eff"]
    batch, num_classes = labels.shape[0], names["mixer"].num_classes
    assert mixed.shape == images.shape and soft_targets.shape == (batch, num_classes)
    assert lam_eff.shape == (batch,) and bool(((lam_eff >= 0) & (lam_eff <= 1)).all())
    torch.testing.assert_close(soft_targets.sum(1), torch.ones(batch))
    # Each row keeps lam_eff of its own label and gives the rest to one partner's label.
    own = soft_targets[torch.arange(batch), labels]
    assert bool((own >= lam_eff - 1e-6).all())
    rest = soft_targets.clone()
    rest[torch.arange(batch), labels] = 0
    assert bool(((rest > 1e-6).sum(1) <= 1).all())
    torch.testing.assert_close(names["mixed_targets"].sum(1), torch.ones(batch))
    assert names["again"].shape == images.shape
    masks = names["masks"]
    assert masks.shape == (batch, 1, *images.shape[-2:])
    assert torch.allclose(masks.mean(dim=(1, 2, 3)), torch.tensor(0.3), atol=FMIX_MEAN_TOLERANCE)


def test_class_indices_without_num_classes_say_what_to_pass():
    with pytest.raises(ValueError, match=r"num_classes=K"):
        Mixer("mixup")(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), _gen(0))
