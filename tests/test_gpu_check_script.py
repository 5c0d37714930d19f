"""benchmarks/gpu_check.py, the one script a lent GPU runs, kept working without one: its
--smoke-cpu mode takes every step (fit, mixcls tta and export, gradient checkpointing, the three
cassava placements, the device augmentation, DDP over gloo) on tiny images, and the final line
must agree with the table (~16 s)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import final_figures

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*flags: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_gpu_check_smoke_cpu_takes_every_step_and_its_line_matches_the_table():
    out = _run("--smoke-cpu")
    lines = out.strip().splitlines()
    figures = final_figures(lines)
    table = {line[:47].strip(): line[47:].strip() for line in lines[:-1] if len(line) > 47}
    assert figures["device"] == "cpu_(smoke)" and figures["ddp_ok"] == "1"
    # two gloo ranks measured the SWA model's BatchNorm statistics (test_resnet has BatchNorm)
    assert figures["ddp_swa_ok"] == "1" and table["ddp 2 ranks: SWA model validated"] == "True"
    assert figures["fp16_loss_finite"] == "1" and figures["nccl_ok"] == "n/a"
    for key in ("images_per_s", "cassava_loader_ips", "cassava_device_colour_ips",
                "cassava_device_augment_ips", "device_augment_512_ips", "ddp_images_per_s"):
        value = float(figures[key])
        assert math.isfinite(value) and value > 0, key
    assert table["single: train images/s"] == figures["images_per_s"]
    assert table["ddp 2 ranks: images/s"] == figures["ddp_images_per_s"]
    assert table["cassava, all augmentation on device: images/s"] == figures["cassava_device_augment_ips"]
    assert table["single: losses finite"] == "True"
    # mixcls tta re-scores the training setting as training scored it; the export predicts the same
    assert figures["export_same"] == "1" and table["export: predicts exactly as the run"] == "True"
    assert float(figures["tta_oof_max_diff"]) < 1e-5 and float(figures["tta_rescore_ips"]) > 0
    assert table["tta: re-scoring images/s (8 forwards per row)"] == figures["tta_rescore_ips"]
    # the same run with --grad-checkpointing: on a CPU the same numbers, so the same accuracy
    assert table["grad checkpointing: train images/s"] == figures["ckpt_images_per_s"]
    assert float(figures["ckpt_images_per_s"]) > 0
    assert table["grad checkpointing: valid accuracy"] == table["single: valid accuracy"]
    # the same run with --sam sam: its own line, finite losses
    assert table["sam: train images/s"] == figures["sam_images_per_s"]
    assert float(figures["sam_images_per_s"]) > 0 and figures["sam_loss_finite"] == "1"


def test_gpu_check_without_cuda_measures_nothing_and_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would measure")
    out = _run()
    assert "no CUDA device here" in out and out.strip().splitlines()[-1] == "cuda=none"
