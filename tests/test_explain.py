"""The explain pictures: the maths they draw, checked against scipy and the textbook formulas,
and the `mixcls explain` commands writing real pictures or failing cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import integrate, stats

from mixcls import explain
from mixcls.cli import main

SEEDS = [11, 23, 37, 52, 71]


# ------------------------------------------------------------------------------- Beta(α, α)


@pytest.mark.parametrize("seed", SEEDS)
def test_beta_density_matches_scipy_at_random_points(seed):
    rng = np.random.default_rng(seed)
    for alpha in np.exp(rng.uniform(np.log(0.05), np.log(300.0), size=6)):
        theta = rng.uniform(0, 1, size=50)
        np.testing.assert_allclose(explain.beta_density(theta, alpha),
                                   stats.beta.pdf(theta, alpha, alpha), rtol=1e-9,
                                   err_msg=f"alpha={alpha}")


@pytest.mark.parametrize("seed", SEEDS)
def test_beta_density_integrates_to_one(seed):
    rng = np.random.default_rng(seed)
    for alpha in np.exp(rng.uniform(np.log(0.05), np.log(100.0), size=4)):
        total, _ = integrate.quad(explain.beta_density, 0, 1, args=(alpha,), limit=200)
        assert total == pytest.approx(1.0, abs=1e-6), f"alpha={alpha}"


def test_beta_density_support_and_ends():
    assert explain.beta_density(np.array([-0.1, 1.2]), 2.0).tolist() == [0.0, 0.0]
    assert explain.beta_density(np.array([0.0, 1.0]), 1.0).tolist() == [1.0, 1.0]
    assert explain.beta_density(np.array([0.0, 1.0]), 3.0).tolist() == [0.0, 0.0]
    assert np.isinf(explain.beta_density(0.0, 0.3))


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_beta_mass_matches_scipy_cdf(seed):
    rng = np.random.default_rng(seed)
    alpha = float(np.exp(rng.uniform(np.log(0.1), np.log(20.0))))
    low, high = np.sort(rng.uniform(0, 1, size=2))
    expected = stats.beta.cdf(high, alpha, alpha) - stats.beta.cdf(low, alpha, alpha)
    assert explain.beta_mass(low, high, alpha) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_beta_density_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        explain.beta_density(0.5, alpha)


# ------------------------------------------------------------------------ 2-D Fourier transform


def _slow_dft(image: np.ndarray, sign: int) -> np.ndarray:
    """Σ_x Σ_y f(x, y) e^(sign·j2π(ux/M + vy/N)), the note's formula, as float64 loops."""
    m, n = image.shape
    out = np.zeros((m, n), dtype=np.complex128)
    for u in range(m):
        for v in range(n):
            total = 0j
            for x in range(m):
                for y in range(n):
                    total += image[x, y] * np.exp(sign * 2j * np.pi * (u * x / m + v * y / n))
            out[u, v] = total
    return out


@pytest.mark.parametrize("shape", [(6, 5), (4, 7)])
def test_spectrum_and_inverse_follow_the_formulas(shape):
    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    image = rng.uniform(0, 1, size=shape)
    spectrum = explain.centred_spectrum(image)
    np.testing.assert_allclose(np.fft.ifftshift(spectrum), _slow_dft(image, -1), atol=1e-10)
    slow_back = _slow_dft(np.fft.ifftshift(spectrum), +1) / image.size
    np.testing.assert_allclose(explain.inverse_spectrum(spectrum), slow_back.real, atol=1e-10)
    assert explain.centred_spectrum(image)[shape[0] // 2, shape[1] // 2] == pytest.approx(image.sum())


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_fft_round_trip_reconstructs_the_image(seed):
    rng = np.random.default_rng(seed)
    for image in (rng.uniform(0, 1, size=(37, 64)).astype(np.float32),
                  explain.make_digits_image(size=64, seed=seed).astype(np.float32)):
        back = explain.inverse_spectrum(explain.centred_spectrum(image))
        assert np.abs(back - image).max() < 1e-4


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_lowpass_error_falls_as_radius_grows(seed):
    rng = np.random.default_rng(seed)
    image = np.clip(explain.make_digits_image(size=64, seed=seed)
                    + rng.normal(0, 0.05, size=(64, 64)), 0, 1)
    radii = [1, 2, 4, 8, 16, 32]
    errors = [np.sqrt(np.mean((explain.lowpass_reconstruct(image, r) - image) ** 2)) for r in radii]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Parseval: the squared error is the energy of the dropped frequencies / (M N).
    spectrum = explain.centred_spectrum(image)
    for r in radii:
        dropped = np.abs(spectrum[~explain.lowpass_mask(64, 64, r)]) ** 2
        squared = np.sum((explain.lowpass_reconstruct(image, r) - image) ** 2)
        assert squared == pytest.approx(dropped.sum() / image.size, rel=1e-9)
    full = explain.lowpass_reconstruct(image, 64 * 2**0.5)
    assert np.abs(full - image).max() < 1e-12


@pytest.mark.parametrize("shape", [(16, 16), (15, 21), (20, 9)])
def test_lowpass_spectrum_is_conjugate_symmetric(shape):
    image = np.random.default_rng(sum(shape)).uniform(0, 1, size=shape)
    kept = explain.centred_spectrum(image) * explain.lowpass_mask(*shape, 3.5)
    complex_back = np.fft.ifft2(np.fft.ifftshift(kept))
    assert np.abs(complex_back.imag).max() < 1e-12


def test_digits_image_and_grey_conversion():
    image = explain.make_digits_image(size=96, seed=3)
    assert image.shape == (96, 96) and 0.0 <= image.min() and image.max() <= 1.0
    assert image.max() > 0.9 and image.min() == 0.0  # strokes on a black margin
    np.testing.assert_array_equal(image, explain.make_digits_image(size=96, seed=3))
    assert not np.array_equal(image, explain.make_digits_image(size=96, seed=4))
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(explain.to_grey(rgb), expected, atol=1e-12)


def test_radial_profile_averages_rings():
    v, u = np.indices((33, 33))
    distance = np.hypot(v - 16, u - 16)
    freqs, profile = explain.radial_profile(distance)
    assert freqs.tolist() == list(range(1, 16))
    np.testing.assert_allclose(profile, freqs, atol=0.5)  # each ring holds distances f ± 0.5
    _, flat = explain.radial_profile(np.full((20, 20), 3.0))
    np.testing.assert_allclose(flat, 3.0)


def test_fmix_picture_pairs_each_mask_with_its_grey_image():
    """The picture draws fmix_grey and fmix_masks from one seed: the mask must be the top λ of
    that very grey image, or the red edge and the mask panel would show different things."""
    import torch

    from mixcls.mix import fmix_grey, fmix_masks

    for seed, decay, lam in ((0, 3.0, 0.4), (5, 1.0, 0.7)):
        grey = fmix_grey(1, 48, 48, decay, generator=torch.Generator().manual_seed(seed))[0]
        mask = fmix_masks(1, 48, 48, lam, decay_power=decay,
                          generator=torch.Generator().manual_seed(seed))[0, 0]
        top = grey >= torch.quantile(grey.flatten(), 1 - lam)
        assert (top == mask.bool()).float().mean() > 0.99


# ------------------------------------------------------------------------------- commands


def _assert_png(path: Path, *, min_bytes: int = 20_000) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} has only {len(data)} bytes"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= 300 and len(np.unique(np.asarray(image.convert("L")))) > 20


def test_explain_beta_writes_png(tmp_path, capsys):
    out = tmp_path / "beta.png"
    assert main(["explain", "beta", "--alpha", "0.3,1,5", "--samples", "5000", "--out", str(out)]) == 0
    _assert_png(out)
    assert "beta.png" in capsys.readouterr().out


def test_explain_fft_on_default_and_given_image(tmp_path):
    out = tmp_path / "fft.png"
    assert main(["explain", "fft", "--out", str(out)]) == 0
    _assert_png(out)
    picture = tmp_path / "photo.png"
    rgb = np.random.default_rng(1).integers(0, 256, size=(40, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(picture)
    out2 = tmp_path / "fft_photo.png"
    assert main(["explain", "fft", "--image", str(picture), "--radii", "2,5,9",
                 "--max-side", "32", "--out", str(out2)]) == 0
    _assert_png(out2)


def test_explain_fmix_writes_png(tmp_path):
    out = tmp_path / "fmix.png"
    assert main(["explain", "fmix", "--lam", "0.3", "--decay", "2,4", "--size", "48",
                 "--out", str(out)]) == 0
    _assert_png(out)


@pytest.mark.parametrize("argv, flag", [
    (["beta", "--alpha", "0.5,0"], "--alpha"),
    (["beta", "--alpha", "-1"], "--alpha"),
    (["beta", "--alpha", "one"], "--alpha"),
    (["beta", "--alpha", "1,inf"], "--alpha"),
    (["fft", "--radii", "4,0"], "--radii"),
    (["fft", "--image", "missing.png"], "missing.png"),
    (["fmix", "--lam", "1.5"], "--lam"),
    (["fmix", "--decay", "3,-1"], "--decay"),
    (["memory", "--model", "no_such_net"], "no_such_net"),
    (["memory", "--accum", "8by8"], "--accum"),
    (["memory", "--amp", "fp8"], "--amp"),
    (["memory", "--batch", "1"], "--batch"),
])
def test_bad_flags_give_clear_error_and_no_file(tmp_path, capsys, argv, flag):
    out = tmp_path / "picture.png"
    assert main(["explain", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcls: error:") and flag in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_out_suffix_is_refused(tmp_path, capsys):
    assert main(["explain", "beta", "--out", str(tmp_path / "beta.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unreadable_image_is_named(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert main(["explain", "fft", "--image", str(bad), "--out", str(tmp_path / "f.png")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.slow
def test_explain_memory_prints_table_and_writes_png(tmp_path, capsys):
    out = tmp_path / "memory.png"
    assert main(["explain", "memory", "--model", "test_resnet", "--img-size", "16",
                 "--num-classes", "3", "--batch", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    _assert_png(out, min_bytes=10_000)
    printed = capsys.readouterr().out
    assert "act+work" in printed and "test_resnet at 16 px on cpu" in printed
