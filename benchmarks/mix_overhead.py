"""What mixing costs: mixup / cutmix / fmix per batch against a timm resnet18 training step, and
batched fmix masks against the official FMix recipe (numpy, one image at a time).

For batch 64 at 224 px and batch 16 at 512 px, with one λ per image (mode="sample", the dearer
mode): ms to draw a batch's plan (λ, partners, masks) and ms to apply it, as medians over
repetitions after a warm-up; a resnet18 step (forward + backward + AdamW, 5 classes as in
Cassava) on the same batch; and the same per-image fmix masks made by the reference below.

The headline fmix speedup is core for core: the reference is numpy on one core, so it is
compared with our masks on one torch thread, by the CPU time of that thread (which, unlike
wall-clock time, does not grow while a shared machine runs other jobs). Wall-clock times, and
ours with all of torch's threads, are printed beside it.

    python benchmarks/mix_overhead.py [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mixcls.mix import MIX_METHODS, Mixer, apply_mix, fmix_masks

CASES = [(64, 224), (16, 512)]
NUM_CLASSES = 5


def reference_fmix_mask(rng: np.random.Generator, height: int, width: int, decay_power: float,
                        lam: float) -> np.ndarray:
    """One mask the way the official FMix code makes it: full-size spectrum 1/f^d with random
    complex Gaussian coefficients, irfftn, min-max normalise, argsort, top round(λ·H·W) = 1."""
    freq = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    scale = 1.0 / np.maximum(freq, 1.0 / max(height, width)) ** decay_power
    spectrum = scale * (rng.standard_normal(freq.shape) + 1j * rng.standard_normal(freq.shape))
    grey = np.fft.irfftn(spectrum, s=(height, width), axes=(0, 1))
    grey = (grey - grey.min()) / (grey.max() - grey.min())
    order = grey.ravel().argsort()[::-1]
    mask = np.zeros(height * width, dtype=np.float32)
    mask[order[:round(lam * height * width)]] = 1.0
    return mask.reshape(height, width)


def median_ms(fn: Callable[[], object], *, reps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def resnet18_step_ms(images: torch.Tensor, soft_targets: torch.Tensor, *, reps: int) -> float:
    import timm
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=NUM_CLASSES).to(images.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = -(soft_targets * F.log_softmax(model(images), dim=1)).sum(1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_ms(step, reps=reps, warmup=1, device=images.device)


def edge_density(masks: np.ndarray) -> float:
    """Share of neighbouring pixel pairs that straddle the mask's boundary (its length)."""
    return float((np.abs(np.diff(masks, axis=-1)).mean() + np.abs(np.diff(masks, axis=-2)).mean()) / 2)


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock ms, this thread's CPU ms) of one call of `fn`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - wall), 1000 * (time.thread_time() - cpu)


def fmix_side_by_side(batch: int, size: int, device: torch.device, *, reps: int) -> dict:
    """Median (wall ms, CPU ms) for a batch of per-image fmix masks, by the reference and by
    ours (torch's threads; on a CPU also one thread), run in alternation so all see the same
    machine load. On one thread the CPU time is all the work and ignores other processes."""
    generator = torch.Generator(device=device).manual_seed(1)
    rng = np.random.default_rng(1)
    lam = torch.from_numpy(rng.beta(1.0, 1.0, size=batch)).float()
    threads = torch.get_num_threads()

    def ours() -> torch.Tensor:
        return fmix_masks(batch, size, size, lam, generator=generator, device=device)

    def ours_one_thread() -> torch.Tensor:
        torch.set_num_threads(1)
        try:
            return ours()
        finally:
            torch.set_num_threads(threads)

    def reference() -> list:
        return [reference_fmix_mask(rng, size, size, 3.0, float(v)) for v in lam]

    runs = {"reference": reference, "ours": ours}
    if device.type == "cpu":
        runs["ours_1t"] = ours_one_thread if threads > 1 else ours
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()                                           # warm-up
    for _ in range(reps):
        for name, fn in runs.items():
            times[name].append(timed_call(fn, device))
    return {name: tuple(statistics.median(t[i] for t in values) for i in range(2))
            for name, values in times.items()}


def measure_case(batch: int, size: int, device: torch.device, *, reps: int, step_reps: int,
                 ref_reps: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device)
    soft = F.one_hot(torch.arange(batch, device=device) % NUM_CLASSES, NUM_CLASSES).float()
    rows = {}
    for method in MIX_METHODS:
        mixer = Mixer(method, mode="sample")
        plan = mixer.sample_plan(batch, size, size, generator, device=device)
        rows[method] = {
            "mask_ms": median_ms(lambda: mixer.sample_plan(batch, size, size, generator, device=device),
                                 reps=reps, warmup=2, device=device),
            "apply_ms": median_ms(lambda: apply_mix(images, soft, plan), reps=reps, warmup=2,
                                  device=device)}
    fmix = fmix_side_by_side(batch, size, device, reps=ref_reps)
    # fidelity: the mask means, and the boundary length against the reference's at λ = 0.5
    plan = Mixer("fmix", mode="sample").sample_plan(batch, size, size, generator, device=device)
    lam_error = float((plan.masks.mean(dim=(1, 2, 3)) - plan.lam).abs().max())
    rng = np.random.default_rng(2)
    half = fmix_masks(batch, size, size, 0.5, generator=generator, device=device)[:, 0].cpu().numpy()
    reference = np.stack([reference_fmix_mask(rng, size, size, 3.0, 0.5) for _ in range(batch)])
    step_ms = resnet18_step_ms(images, soft, reps=step_reps)
    return {"rows": rows, "fmix": fmix, "step_ms": step_ms, "lam_error": lam_error,
            "edge_ratio": edge_density(half) / edge_density(reference)}


def print_overheads(results: dict) -> list[float]:
    """Each case's mask and apply milliseconds against a resnet18 step; the percentages."""
    print()
    print(f"{'batch':>5} {'px':>4} {'method':>7} {'masks ms':>9} {'apply ms':>9} {'total ms':>9} "
          f"{'step ms':>9} {'% step':>7}")
    overheads = []
    for (batch, size), res in zip(CASES, results.values()):
        for method, row in res["rows"].items():
            total = row["mask_ms"] + row["apply_ms"]
            pct = 100 * total / res["step_ms"]
            overheads.append(pct)
            print(f"{batch:>5} {size:>4} {method:>7} {row['mask_ms']:>9.2f} {row['apply_ms']:>9.2f} "
                  f"{total:>9.2f} {res['step_ms']:>9.1f} {pct:>7.2f}")
    return overheads


def print_fmix(results: dict, device: torch.device) -> dict[int, float]:
    """Our FMix masks against the one-image numpy reference; the speed-up by image size."""
    print()
    threads = torch.get_num_threads()
    print(f"{'batch':>5} {'px':>4} {'reference':>16} {'ours, 1 thread':>16} {'speedup':>8} "
          f"{f'ours, {threads} thr.' if device.type == 'cpu' else 'ours, ' + device.type:>14} "
          f"{'speedup':>8} {'max |mean-λ|':>13} {'edge ours/ref':>14}")
    print(f"{'':>10} {'wall/CPU ms':>16} {'wall/CPU ms':>16} {'(CPU)':>8} {'wall ms':>14} {'(wall)':>8}")
    speedups = {}
    for (batch, size), res in zip(CASES, results.values()):
        fmix = res["fmix"]
        ref_wall, ref_cpu = fmix["reference"]
        wall_speedup = ref_wall / fmix["ours"][0]
        if device.type == "cpu":
            # core for core: the reference runs on one core, so the headline compares one thread
            one_wall, one_cpu = fmix["ours_1t"]
            speedups[size] = ref_cpu / one_cpu
            one_text = f"{one_wall:>7.1f}/{one_cpu:>8.1f} {speedups[size]:>7.1f}x"
        else:
            speedups[size] = wall_speedup
            one_text = f"{'-':>16} {'-':>8}"
        print(f"{batch:>5} {size:>4} {ref_wall:>7.1f}/{ref_cpu:>8.1f} {one_text} "
              f"{fmix['ours'][0]:>14.1f} {wall_speedup:>7.1f}x {res['lam_error']:>13.4f} "
              f"{res['edge_ratio']:>14.3f}")
    return speedups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (when available)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, step_reps, ref_reps = (5, 1, 5) if args.quick else (9, 2, 9)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"device {device} ({torch.get_num_threads()} torch threads), torch {torch.__version__}; "
          f"medians of {reps} (mixing), {step_reps} (resnet18 step), {ref_reps} (reference) runs; "
          f"mode=sample (one λ and mask per image); resnet18 with {NUM_CLASSES} classes, AdamW")
    results = {}
    for batch, size in CASES:
        results[size] = measure_case(batch, size, device, reps=reps, step_reps=step_reps,
                                     ref_reps=ref_reps)
    overheads = print_overheads(results)
    speedups = print_fmix(results, device)
    print("reference: numpy, one image at a time, one core (full-size irfftn + argsort); ours: "
          "mixcls.mix.fmix_masks for the batch. They alternate, so both see the same load; the "
          "CPU time of one thread does not count time spent waiting for a core. edge ours/ref: "
          "boundary length of our masks over the reference's at λ = 0.5.")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print()
    print(f"fmix_speedup_vs_ref_224={speedups[224]:.1f} max_overhead_pct={max(overheads):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
