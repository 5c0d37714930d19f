"""mixcls show-mix: the picture is written, its label weights are the masks' means, bad flags
stop before anything is written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixcls.cli import main
from mixcls.explain import make_examples, pick_pairs


@pytest.mark.parametrize("method", ["fmix", "cutmix:0.5,mixup:0.5"])
def test_show_mix_writes_a_grid_with_label_weights(tiny_data: Path, tmp_path: Path, method: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pictures" / "mix.png"
    code = main(["show-mix", "--data", str(tiny_data), "--method", method, "--alpha", "1",
                 "--out", str(out), "--seed", "3", "--n", "3", "--img-size", "32"])
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 3
    for line in lines:
        # "  fmix   class_0 0.63 · class_2 0.37": two classes whose weights add up to 1
        pairs = re.findall(r"(\d) (\d\.\d\d)", line)
        assert len(pairs) == 2 and pairs[0][0] != pairs[1][0]
        assert float(pairs[0][1]) + float(pairs[1][1]) == pytest.approx(1.0, abs=0.011)


def test_examples_weights_are_mask_means() -> None:
    generator = torch.Generator().manual_seed(0)
    images1, images2 = torch.rand(5, 3, 40, 30), torch.rand(5, 3, 40, 30)
    examples = make_examples(images1, images2, list("abcde"), list("fghij"),
                             weights={"fmix": 0.5, "cutmix": 0.3, "mixup": 0.2}, alpha=1.0,
                             generator=generator)
    for i, ex in enumerate(examples):
        mask = ex.mask.double()
        assert ex.weight == pytest.approx(float(mask.mean()), abs=1e-6)
        expected = mask * images1[i].double() + (1 - mask) * images2[i].double()
        assert float((ex.mixed.double() - expected).abs().max()) < 1e-6
        assert ex.label_text() == f"{ex.label1} {ex.weight:.2f} · {ex.label2} {1 - ex.weight:.2f}"


def test_pick_pairs_prefers_other_classes() -> None:
    labels = np.array([0] * 10 + [1] * 3)
    pairs = pick_pairs(labels, 6, torch.Generator().manual_seed(1))
    used = [i for pair in pairs for i in pair]
    assert len(set(used)) == 12
    assert sum(labels[i] != labels[j] for i, j in pairs) == 3   # only three of class 1 to go round


@pytest.mark.parametrize("flags, message", [
    (["--method", "cutout"], "unknown mix 'cutout'"),
    (["--alpha", "0"], "--alpha: 0.0 must be > 0"),
    (["--n", "0"], "--n: 0 must be >= 1"),
    (["--out-suffix", ".xyz"], "unknown picture format 'xyz'"),
])
def test_bad_flags_fail_before_writing(tiny_data: Path, tmp_path: Path, flags: list[str],
                                       message: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "mix.png"
    if flags[0] == "--out-suffix":
        out, flags = tmp_path / f"mix{flags[1]}", []
    assert main(["show-mix", "--data", str(tiny_data), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".mix*"))


def test_missing_data_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "mix.png"
    assert main(["show-mix", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err and not out.exists()
