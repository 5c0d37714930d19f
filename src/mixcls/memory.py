"""Measure the memory of one training step, and pick the batch size that fits a budget.

One step is forward + backward + AdamW step on random images (with `sam`, the trainer's second
pass at the moved weights before the AdamW step, and the copy of the weights it keeps). Each setting is measured in a
fresh child process, so nothing left over from an earlier setting (cached blocks, a larger
high-water mark, lazily built kernels) leaks into the next one:

- CUDA: `torch.cuda.max_memory_allocated` over the step, after `reset_peak_memory_stats`.
- CPU: the peak resident set (VmHWM in /proc/self/status) over the step, after resetting it
  through /proc/self/clear_refs, minus the resident set just before the step.

The measured step is the second one: a warm-up step at batch 2 runs first, so the step finds
the optimizer state already made (as every step after a trainer's first does) and one-off
costs (library code paged in, thread pools, kernel workspaces chosen) are not counted.

The peak is split into parameters, gradients and optimizer state, computed from the sizes of
those tensors, and "activations + workspace": the rest of the peak (saved activations, the
input batch, temporary buffers, autocast's low-precision weight copies).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from mixcls.config import AMP_MODES

_RESULT_MARK = "MIXCLS_MEMORY_RESULT "
_MIB = 2**20
_CHILD_CODE = "import sys; from mixcls.memory import _child_main; _child_main(sys.argv[1])"


class MeasureError(ValueError):
    """A setting whose step could not be measured; the message names it and the child's error."""


@dataclass(frozen=True)
class MemoryResult:
    """Memory of one training step at one setting, in MiB.

    peak_mb = params_mb + grads_mb + optimizer_mb + activations_mb: the memory the step needs
    on the device. process_peak_mb is the whole process (CPU: with the Python and library
    code; CUDA: the allocator's reserved peak), for context. `oom` is True when the step ran
    out of memory (CUDA out-of-memory error, or the child killed by the OS); the sizes are then
    NaN. `seconds` is the whole child process (start-up, warm-up step); `step_seconds` the
    measured step alone, one sample of the step time.
    """

    model: str
    img_size: int
    device: str
    amp: str
    micro_batch: int
    accum_steps: int
    params_mb: float
    grads_mb: float
    optimizer_mb: float
    activations_mb: float
    peak_mb: float
    process_peak_mb: float
    seconds: float
    oom: bool = False
    grad_checkpointing: bool = False
    step_seconds: float = float("nan")  # the measured step alone (seconds: the whole child)
    sam: str = "none"

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accum_steps

    @property
    def label(self) -> str:
        """Short name of the setting for tables and plots: '64', '8x8', '32 bf16', '32 ckpt'."""
        name = str(self.micro_batch) if self.accum_steps == 1 else f"{self.micro_batch}x{self.accum_steps}"
        name = name if self.amp == "none" else f"{name} {self.amp}"
        name = f"{name} ckpt" if self.grad_checkpointing else name
        return name if self.sam == "none" else f"{name} {self.sam}"


def measure_step(model_name: str, img_size: int, *, num_classes: int, micro_batch: int,
                 accum_steps: int = 1, amp: str = "none", device: str = "cpu", seed: int = 0,
                 grad_checkpointing: bool = False, sam: str = "none",
                 timeout_s: float = 600.0) -> MemoryResult:
    """Measure one step (accum_steps micro-batches of micro_batch images, one AdamW step), with
    the model's gradient checkpointing on when `grad_checkpointing`, and --sam's second pass
    when `sam` is sam or asam."""
    _check_setting(img_size=img_size, num_classes=num_classes, micro_batch=micro_batch,
                   accum_steps=accum_steps, amp=amp)
    spec = {"model": model_name, "img_size": img_size, "num_classes": num_classes,
            "micro_batch": micro_batch, "accum_steps": accum_steps, "amp": amp,
            "device": device, "seed": seed, "grad_checkpointing": grad_checkpointing, "sam": sam}
    what = (f"{model_name} at {img_size} px, batch {micro_batch}x{accum_steps}, amp {amp}, {device}"
            + (", gradient checkpointing" if grad_checkpointing else "")
            + (f", --sam {sam}" if sam != "none" else ""))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD_CODE, json.dumps(spec)],
                              capture_output=True, text=True, env=_child_env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"measuring {what} took over {timeout_s:.0f} s; stopped") from None
    seconds = time.perf_counter() - start
    if proc.returncode == -9:  # SIGKILL: on CPU, the kernel's out-of-memory killer
        return _oom_result(spec, seconds)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise MeasureError(f"measuring {what} failed (exit code {proc.returncode}): {tail}")
    values = json.loads(lines[-1][len(_RESULT_MARK):])
    if values.get("oom"):
        return _oom_result(spec, seconds)
    return MemoryResult(**values, seconds=seconds)


def measure_memory(model_name: str, img_size: int, *, num_classes: int,
                   batch_sizes: Sequence[int], amp_modes: Sequence[str] = ("none",),
                   accum: Sequence[tuple[int, int]] = (), device: str = "cpu", seed: int = 0,
                   grad_checkpointing: bool = False,
                   log: Callable[[str], None] | None = None) -> list[MemoryResult]:
    """Each batch size, then each (micro_batch, accum_steps) pair, under each amp mode.

    `log`, when given, receives one line per measured setting (each takes seconds).
    """
    settings = [(b, 1) for b in batch_sizes] + [tuple(pair) for pair in accum]
    for amp in amp_modes:  # check every setting before spending minutes measuring
        for micro_batch, steps in settings:
            _check_setting(img_size=img_size, num_classes=num_classes, micro_batch=micro_batch,
                           accum_steps=steps, amp=amp)
    results = []
    for amp in amp_modes:
        for micro_batch, steps in settings:
            result = measure_step(model_name, img_size, num_classes=num_classes,
                                  micro_batch=micro_batch, accum_steps=steps, amp=amp,
                                  device=device, seed=seed, grad_checkpointing=grad_checkpointing)
            if log is not None:
                peak = "out of memory" if result.oom else f"peak {result.peak_mb:.1f} MiB"
                log(f"{result.label}: {peak} ({result.seconds:.0f} s)")
            results.append(result)
    return results


def find_max_batch(model_name: str, img_size: int, *, num_classes: int, budget_mb: float | None,
                   device: str = "cpu", amp: str = "none",
                   candidates: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                   seed: int = 0, grad_checkpointing: bool = False, sam: str = "none") -> int:
    """The largest candidate micro-batch whose measured step peak_mb is at most budget_mb.

    Binary search over the sorted candidates, which assumes the peak grows with the batch
    (it does: activations are proportional to it); about log2(len(candidates)) measurements.
    budget_mb None means default_budget_mb(device). Raises ValueError when even the smallest
    candidate does not fit.
    """
    if budget_mb is None:
        budget_mb = default_budget_mb(device)
    ordered = sorted(set(int(c) for c in candidates))
    if not ordered or ordered[0] < 1:
        raise ValueError(f"candidates must be positive batch sizes, got {list(candidates)}")
    if not budget_mb > 0:
        raise ValueError(f"budget_mb must be > 0, got {budget_mb}")
    low, high, best, smallest_peak = 0, len(ordered) - 1, None, None
    while low <= high:
        mid = (low + high) // 2
        result = measure_step(model_name, img_size, num_classes=num_classes,
                              micro_batch=ordered[mid], amp=amp, device=device, seed=seed,
                              grad_checkpointing=grad_checkpointing, sam=sam)
        if mid == 0:
            smallest_peak = result.peak_mb
        if not result.oom and result.peak_mb <= budget_mb:
            best, low = ordered[mid], mid + 1
        else:
            high = mid - 1
    if best is None:
        needs = "runs out of memory" if math.isnan(smallest_peak) else f"needs {smallest_peak:.0f} MiB"
        raise ValueError(f"{model_name} at {img_size} px does not fit {budget_mb:.0f} MiB even at "
                         f"batch {ordered[0]} ({needs})")
    return best


def plan_batch(effective_batch: int, max_micro_batch: int) -> tuple[int, int]:
    """(micro_batch, accum_steps) to reach effective_batch with micro_batch <= max_micro_batch.

    Uses the fewest accumulation steps, ceil(E / max_micro_batch), because larger micro-batches
    run faster; then the smallest micro-batch at that step count, ceil(E / steps). The product
    equals E whenever steps divides E; otherwise it is the smallest product >= E at that step
    count, exceeding E by fewer than `steps` images (E=97, max 32 -> 25 x 4 = 100).
    """
    if effective_batch < 1 or max_micro_batch < 1:
        raise ValueError(f"effective_batch ({effective_batch}) and max_micro_batch "
                         f"({max_micro_batch}) must be >= 1")
    accum_steps = math.ceil(effective_batch / max_micro_batch)
    return math.ceil(effective_batch / accum_steps), accum_steps


def default_budget_mb(device: str) -> float:
    """A budget for find_max_batch when none is given: 85% of the GPU, or half the free RAM.

    The margin covers what peak_mb does not count: the CUDA context and allocator
    fragmentation on a GPU; the libraries and the data loader workers on a CPU.
    """
    import torch

    if device.startswith("cuda"):
        return 0.85 * torch.cuda.get_device_properties(torch.device(device)).total_memory / _MIB
    with open("/proc/meminfo") as f:
        free_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return 0.5 * free_kb / 1024


def format_memory_table(results: Sequence[MemoryResult]) -> str:
    """A plain-text table, one row per setting, sizes in MiB."""
    head = (f"{'setting':>12} {'eff.batch':>9} {'params':>8} {'grads':>8} {'optim':>8} "
            f"{'act+work':>9} {'peak':>8} {'process':>8} {'seconds':>8} {'step s':>7}")
    rows = [head, "-" * len(head)]
    for r in results:
        if r.oom:
            rows.append(f"{r.label:>12} {r.effective_batch:>9} {'out of memory':>44}")
            continue
        rows.append(f"{r.label:>12} {r.effective_batch:>9} {r.params_mb:>8.1f} {r.grads_mb:>8.1f} "
                    f"{r.optimizer_mb:>8.1f} {r.activations_mb:>9.1f} {r.peak_mb:>8.1f} "
                    f"{r.process_peak_mb:>8.1f} {r.seconds:>8.1f} {r.step_seconds:>7.2f}")
    return "\n".join(rows)


def _check_setting(*, img_size: int, num_classes: int, micro_batch: int, accum_steps: int,
                   amp: str) -> None:
    if amp not in AMP_MODES:
        raise ValueError(f"amp {amp!r} is not one of {', '.join(AMP_MODES)}")
    for name, value, low in (("img_size", img_size, 8), ("num_classes", num_classes, 2),
                             ("micro_batch", micro_batch, 2), ("accum_steps", accum_steps, 1)):
        # micro_batch >= 2: BatchNorm cannot normalise one value per channel in training mode
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")


def _oom_result(spec: dict, seconds: float) -> MemoryResult:
    nan = float("nan")
    return MemoryResult(model=spec["model"], img_size=spec["img_size"], device=spec["device"],
                        amp=spec["amp"], micro_batch=spec["micro_batch"],
                        accum_steps=spec["accum_steps"], params_mb=nan, grads_mb=nan,
                        optimizer_mb=nan, activations_mb=nan, peak_mb=nan, process_peak_mb=nan,
                        seconds=seconds, oom=True, grad_checkpointing=spec["grad_checkpointing"])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc hand every large free back to the OS at once, so the
    # resident set follows the live tensors instead of glibc's heap (which it keeps).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    # Not the trainer's heap tuning (mixcls.heap): a heap that keeps freed pages would hold the
    # warm-up step's memory, which the measured step then re-uses below the baseline, by an
    # amount that varies from child to child (resnet18, 96 px, batch 16: act+work 33.7 to 37.9
    # MiB over three children with it, within 0.2 MiB of each other without).
    env["MIXCLS_KEEP_HEAP"] = "0"
    src = str(Path(__file__).resolve().parents[1])  # the child imports this same mixcls
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


# ----------------------------------------------------------------------- the child process


def _child_main(spec_json: str) -> None:
    """Entry point of the child: measure the step described by spec_json, print the result."""
    import torch

    spec = json.loads(spec_json)
    try:
        values = _measure_in_process(**spec)
    except torch.OutOfMemoryError:
        values = {"oom": True}
    print(_RESULT_MARK + json.dumps(values), flush=True)


def _measure_in_process(*, model: str, img_size: int, num_classes: int, micro_batch: int,
                        accum_steps: int, amp: str, device: str, seed: int,
                        grad_checkpointing: bool, sam: str = "none") -> dict:
    import gc

    import timm
    import torch

    from mixcls.models import enable_grad_checkpointing, register_models

    register_models()  # mixcls_cnn_* by name in this child process too

    torch.manual_seed(seed)
    dev = torch.device(device)
    net = timm.create_model(model, num_classes=num_classes, pretrained=False).to(dev).train()
    if grad_checkpointing:
        enable_grad_checkpointing(net, model)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    # fp16: the loss scale does not change the memory; a scale of 1 keeps a step on random
    # images from overflowing, which would make GradScaler skip the optimizer step.
    scaler = torch.amp.GradScaler(dev.type, init_scale=1.0) if amp == "fp16" else None
    # The warm-up step creates the optimizer state, as every step after a trainer's first one
    # finds it; its gradients go, as with zero_grad(set_to_none=True) in the trainer.
    _train_step(net, optimizer, scaler, micro_batch=2, accum_steps=1, img_size=img_size,
                num_classes=num_classes, amp=amp, generator=generator, sam=sam)
    net.zero_grad(set_to_none=True)
    gc.collect()

    state_before = _state_bytes(optimizer)
    baseline = _reset_peak(dev)
    start = time.perf_counter()
    _train_step(net, optimizer, scaler, micro_batch=micro_batch, accum_steps=accum_steps,
                img_size=img_size, num_classes=num_classes, amp=amp, generator=generator, sam=sam)
    step_seconds = time.perf_counter() - start  # _train_step synchronises a CUDA device
    step_peak, process_peak = _read_peak(dev, baseline)

    params = sum(p.numel() * p.element_size() for p in net.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters()
                if p.grad is not None)
    state = _state_bytes(optimizer)
    # Parameters and the optimizer state were in memory before the step; it added the rest.
    peak = params + state_before + step_peak
    return {"model": model, "img_size": img_size, "device": device, "amp": amp,
            "micro_batch": micro_batch, "accum_steps": accum_steps,
            "grad_checkpointing": grad_checkpointing, "sam": sam,
            "params_mb": params / _MIB, "grads_mb": grads / _MIB, "optimizer_mb": state / _MIB,
            "activations_mb": (peak - params - grads - state) / _MIB, "peak_mb": peak / _MIB,
            "process_peak_mb": process_peak / _MIB, "step_seconds": step_seconds}


def _state_bytes(optimizer) -> int:
    import torch

    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if torch.is_tensor(t))


def _train_step(model, optimizer, scaler, *, micro_batch: int, accum_steps: int, img_size: int,
                num_classes: int, amp: str, generator, sam: str = "none") -> None:
    """accum_steps forward/backward passes on random images, then (with `sam`) the trainer's
    second pass over the kept micro-batches, then one optimizer step."""
    import torch
    import torch.nn.functional as F

    from mixcls.devices import amp_dtype  # the trainer's rule (fp16 only on CUDA)
    from mixcls.engine import sharpness_pass
    from mixcls.models import batchnorm_modules
    from mixcls.sam import sharpness_settings

    dev = next(model.parameters()).device
    dtype = amp_dtype(amp, dev)
    kept = []  # what the trainer keeps for --sam's second pass: each micro-batch, as it was
    for _ in range(accum_steps):
        images = torch.randn(micro_batch, 3, img_size, img_size, generator=generator).to(dev)
        labels = torch.randint(num_classes, (micro_batch,), generator=generator).to(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        # Loss in float32 outside autocast; divided so the summed gradients are the mean over
        # the effective batch, as in the trainer.
        loss = F.cross_entropy(logits.float(), labels) / accum_steps
        (scaler.scale(loss) if scaler else loss).backward()
        if sam != "none":
            kept.append((images, labels, None, accum_steps))
    if kept:
        sharpness_pass(model, optimizer, kept, sharpness=sharpness_settings(sam, None),
                       loss_fn=lambda out, labels: F.cross_entropy(out.float(), labels),
                       device=dev, scaler=scaler, amp_dtype=dtype, bn_layers=batchnorm_modules(model))
    if scaler:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:
            raise RuntimeError("the fp16 step overflowed and GradScaler skipped the optimizer "
                               "step, so its memory would be missing")
    else:
        optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev) -> int:
    """Start a new peak measurement; return the bytes in use now."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5" resets VmHWM to the current resident set (Linux >= 4.0)
    return _proc_status_kb("VmRSS") * 1024


def _read_peak(dev, baseline: int) -> tuple[int, int]:
    """(peak bytes of the step above the baseline, peak bytes of the whole process)."""
    import torch

    if dev.type == "cuda":
        return (torch.cuda.max_memory_allocated(dev) - baseline,
                torch.cuda.max_memory_reserved(dev))
    hwm = _proc_status_kb("VmHWM") * 1024
    return hwm - baseline, hwm


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise MeasureError(f"/proc/self/status has no {field}: peak memory on CPU needs Linux")

