"""A learning-rate range test (Smith 2015, as in fastai and pytorch-lr-finder).

Train for `steps` optimizer steps with the learning rate rising exponentially from `min_lr`
to `max_lr`, record the loss of every step, smooth it (an exponential moving average with bias
correction), stop once the smoothed loss has blown up, and put the model and the optimizer back
exactly as they were. The picture of smoothed loss against log lr shows where training starts
to work and where it breaks; `suggest_lr` reads a value off it.

Public API: `range_test` -> `LRFindResult`, `lr_schedule`, `smooth_losses`, `suggest_lr`,
`plot_lr_find`, `check_range_options`, `find_lr_for_config` (the whole pipeline from a Config).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mixcls.config import Config, ConfigError
from mixcls.data import ImageDataset, TrainTable
from mixcls.devices import amp_setup, resolve_device
from mixcls.engine import autocast_context, group_size, prepare_batch, sharpness_pass, should_step
from mixcls.models import batchnorm_modules, build_training_model, model_mean_std
from mixcls.optim import build_optimizer
from mixcls.run_setup import build_mixer, build_training_loss, resolve_batch_plan
from mixcls.sam import Sharpness, sharpness_settings
from mixcls.runs import RunError
from mixcls.heap import keep_freed_memory
from mixcls.sampling import build_collate, worker_init
from mixcls.device_augment import DeviceAugment, build_train_augment
from mixcls.transforms import DeviceColour, Normalizer

SUGGEST_RULES = ("steepest", "min10")
MIN_STEPS = 10  # fewer points than this give no curve to read a slope from


@dataclass
class LRFindResult:
    """What a range test saw, one entry per optimizer step taken (n <= steps).

    `lrs` (n,) the learning rate of each step; `losses` (n,) the training loss of the step's
    micro-batches (their mean, measured before the step); `smoothed` (n,) the bias-corrected
    moving average of `losses`; `stopped_early`: the test ended before its last lr because the
    smoothed loss passed `diverge_factor` times its minimum, or a loss became NaN or infinite
    (that step is not recorded).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    stopped_early: bool


def check_range_options(*, min_lr: float, max_lr: float, steps: int, beta: float = 0.98,
                        diverge_factor: float = 4.0) -> None:
    """ConfigError naming the first bad range-test option, before any work."""
    if not (np.isfinite(min_lr) and min_lr > 0):
        raise ConfigError(f"min_lr: {min_lr} must be a finite number > 0 (the lr grows by factors)")
    if not (np.isfinite(max_lr) and max_lr > min_lr):
        raise ConfigError(f"max_lr: {max_lr} must be a finite number > min_lr ({min_lr})")
    if not steps >= MIN_STEPS:
        raise ConfigError(f"steps: {steps} must be >= {MIN_STEPS} (a range test needs a curve)")
    if not 0 <= beta < 1:
        raise ConfigError(f"beta: {beta} must be in [0, 1)")
    if not diverge_factor > 1:
        raise ConfigError(f"diverge_factor: {diverge_factor} must be > 1")


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """(steps,) learning rates from min_lr to max_lr, a constant factor apart (both ends included)."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))


def smooth_losses(losses: Iterable[float], *, beta: float = 0.98) -> np.ndarray:
    """(n,) bias-corrected exponential moving average of (n,) losses.

    avg_i = beta * avg_{i-1} + (1 - beta) * loss_i (avg_{-1} = 0), smoothed_i = avg_i / (1 - beta^(i+1)):
    the division undoes the pull towards 0 of the starting value, so smoothed_0 = loss_0.
    """
    losses = np.asarray(list(losses), dtype=np.float64)
    smoothed = np.empty_like(losses)
    avg = 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        smoothed[i] = avg / (1 - beta ** (i + 1))
    return smoothed


def range_test(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
               loss_fn: Callable, device: torch.device, num_classes: int, min_lr: float,
               max_lr: float, steps: int, accum_steps: int = 1, mixer: Callable | None = None,
               generator: torch.Generator | None = None, amp_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None,
               channels_last: bool = False, beta: float = 0.98,
               diverge_factor: float = 4.0, normalizer: Normalizer | None = None,
               device_augment: DeviceColour | DeviceAugment | None = None,
               sharpness: Sharpness | None = None) -> LRFindResult:
    """Train `steps` optimizer steps at lrs rising exponentially from min_lr to max_lr; then restore.

    Each step is `accum_steps` micro-batches from `loader` (batches of images (B, C, H, W) and
    targets (B,) class indices or (B, K) soft targets; the loader is cycled when it runs out),
    treated as in `engine.train_one_epoch`: mixing, autocast, loss on soft targets, the loss
    divided by the group size, fp16 loss scaling with `scaler` (a step its scaler skips for an
    overflow is still recorded: its loss was measured), clipping to `grad_clip`, and with
    `sharpness` (--sam) the second pass at w + e(w) before each step. Every param
    group gets the step's lr (the optimizer's own lr and any scheduler play no part).
    Afterwards the model's parameters and buffers, its gradients and train/eval mode, the
    optimizer's state and param groups, the scaler's state and the global torch RNG are exactly
    what they were, also when the test stops with an exception.
    """
    check_range_options(min_lr=min_lr, max_lr=max_lr, steps=steps, beta=beta,
                        diverge_factor=diverge_factor)
    snapshot = _take_snapshot(model, optimizer, scaler)
    try:
        with torch.random.fork_rng(devices=_cuda_indices(device)):
            return _run_range(model, loader, optimizer, lrs=lr_schedule(min_lr, max_lr, steps),
                              loss_fn=loss_fn, device=device, num_classes=num_classes,
                              accum_steps=accum_steps, mixer=mixer, generator=generator,
                              amp_dtype=amp_dtype, scaler=scaler, grad_clip=grad_clip,
                              channels_last=channels_last, beta=beta, diverge_factor=diverge_factor,
                              normalizer=normalizer, device_augment=device_augment,
                              sharpness=sharpness)
    finally:
        _restore_snapshot(snapshot, model, optimizer, scaler)


def _run_range(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
               lrs: np.ndarray, loss_fn: Callable, device: torch.device, num_classes: int,
               accum_steps: int, mixer: Callable | None, generator: torch.Generator | None,
               amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None,
               grad_clip: float | None, channels_last: bool, beta: float,
               diverge_factor: float, normalizer: Normalizer | None = None,
               device_augment: DeviceColour | DeviceAugment | None = None,
               sharpness: Sharpness | None = None) -> LRFindResult:
    """The plain loop: one lr per accumulation group, one recorded loss per optimizer step."""
    model.train()
    group, bn_layers = [], batchnorm_modules(model) if sharpness is not None else []
    n_batches = len(lrs) * accum_steps
    batches = _cycle(loader)
    tried, losses, smoothed = [], [], np.zeros(0)
    step_loss, stopped = 0.0, False
    optimizer.zero_grad(set_to_none=True)
    for i in range(n_batches):
        images, targets = next(batches)
        lr = float(lrs[i // accum_steps])
        _set_lr(optimizer, lr)
        images, soft_targets, _ = prepare_batch(images, targets, device=device, num_classes=num_classes,
                                                normalizer=normalizer, channels_last=channels_last,
                                                mixer=mixer, generator=generator,
                                                device_augment=device_augment)
        with autocast_context(device, amp_dtype):
            logits = model(images)
            loss = loss_fn(logits, soft_targets)
        if not torch.isfinite(loss):
            stopped = True  # diverged for certain; a NaN would only spoil the curve
            break
        scaled = loss / group_size(i, n_batches, accum_steps)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += scaled.item()
        if sharpness is not None:
            group.append((images, soft_targets, None, group_size(i, n_batches, accum_steps)))
        if should_step(i, n_batches, accum_steps):
            if sharpness is not None:  # the trainer's second pass (engine.train_one_epoch)
                sharpness_pass(model, optimizer, group, sharpness=sharpness, loss_fn=loss_fn,
                               device=device, scaler=scaler, amp_dtype=amp_dtype, bn_layers=bn_layers)
                group.clear()
            _optimizer_step(model, optimizer, scaler=scaler, grad_clip=grad_clip)
            tried.append(lr)
            losses.append(step_loss)
            step_loss = 0.0
            smoothed = smooth_losses(losses, beta=beta)
            if smoothed[-1] > diverge_factor * smoothed.min():
                stopped = len(tried) < len(lrs)  # diverging at the very last lr is no early stop
                break
    return LRFindResult(lrs=np.asarray(tried, dtype=np.float64),
                        losses=np.asarray(losses, dtype=np.float64), smoothed=smoothed,
                        stopped_early=stopped)


def _cycle(loader: Iterable) -> Iterator:
    """The loader's batches again and again (a range test may want more than one epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the range test's loader yields no batches (fewer images than one batch "
                             "with drop_last?)")


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # --head-lr-mult / --layer-decay groups keep their ratios
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    scaler: torch.amp.GradScaler | None, grad_clip: float | None) -> None:
    """Unscale, clip, step. No skipping of non-finite gradients as in the trainer: here a NaN
    means the lr is past divergence, and the next loss shows it and ends the test."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class _Snapshot:
    """Deep copies of everything a range test changes."""

    model_state: dict[str, Any]
    optimizer_state: dict[str, Any]
    scaler_state: dict[str, Any] | None
    grads: list[torch.Tensor | None]
    training: dict[str, bool]


def _take_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None) -> _Snapshot:
    return _Snapshot(
        model_state=copy.deepcopy(model.state_dict()),
        optimizer_state=copy.deepcopy(optimizer.state_dict()),
        scaler_state=copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
        grads=[p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()],
        training={name: m.training for name, m in model.named_modules()})


def _restore_snapshot(snapshot: _Snapshot, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None) -> None:
    model.load_state_dict(snapshot.model_state)  # copies into the same tensors, in place
    # load_state_dict replaces the whole state: moments created by the test vanish when the
    # optimizer had none before, and param_groups (lr included) come back as they were.
    optimizer.load_state_dict(snapshot.optimizer_state)
    if scaler is not None:
        scaler.load_state_dict(snapshot.scaler_state)
    for p, grad in zip(model.parameters(), snapshot.grads):
        p.grad = grad
    for name, m in model.named_modules():
        m.training = snapshot.training[name]


def _cuda_indices(device: torch.device) -> list[int]:
    """The CUDA device whose RNG fork_rng must save (none on a CPU: no CUDA initialisation)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def suggest_lr(result: LRFindResult, *, rule: str = "steepest") -> float:
    """A learning rate read off a range test.

    "steepest": the lr where the smoothed loss falls fastest per unit of log lr (the most
    negative numpy.gradient of smoothed loss w.r.t. log lr), looked for only up to the
    minimum of the smoothed loss: at the minimum the loss has already stopped improving (the
    lr there is on the edge of too high, and the moving average lags the raw loss, so the true
    turn came earlier), and past it the curve climbs, so the steepest descent is the largest lr
    that still clearly trains well. "min10": the lr at the minimum divided by 10, the other
    common rule of thumb (fastai's `lr_min`).
    """
    if rule not in SUGGEST_RULES:
        raise ConfigError(f"suggest: {rule!r} is not one of {', '.join(SUGGEST_RULES)}")
    lrs, smoothed = np.asarray(result.lrs), np.asarray(result.smoothed)
    if len(lrs) == 0:
        raise RunError("the range test took no step (the first loss was NaN or infinite); "
                       "lower --min-lr")
    lowest = int(np.argmin(smoothed))
    if rule == "min10":
        return float(lrs[lowest] / 10)
    if lowest < 2:
        raise RunError(f"the smoothed loss never fell (lowest at the first steps, lr {lrs[lowest]:.3g}); "
                       "lower --min-lr, or check the data and the loss")
    slope = np.gradient(smoothed[:lowest + 1], np.log(lrs[:lowest + 1]))
    return float(lrs[int(np.argmin(slope))])


def plot_lr_find(result: LRFindResult, suggestion: float):
    """A matplotlib Figure: raw and smoothed loss against lr (log axis), the suggestion marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=1.8, label="smoothed loss")
    ax.set_xscale("log")
    at = float(np.interp(np.log(suggestion), np.log(result.lrs), result.smoothed))
    ax.axvline(suggestion, color="C3", linestyle="--", linewidth=1)
    ax.plot([suggestion], [at], "o", color="C3", label=f"suggested lr {suggestion:.2e}")
    finite = result.smoothed[np.isfinite(result.smoothed)]
    if len(finite):  # the last, diverging points would squash the useful part of the curve
        low, start = float(finite.min()), float(finite[0])
        ax.set_ylim(low - 0.1 * abs(start - low) - 1e-12, max(start, low) + 0.5 * abs(start - low) + 1e-12)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ending = "stopped: the loss diverged" if result.stopped_early else "reached the last lr"
    ax.set_title(f"lr range test, {len(result.lrs)} steps ({ending})", fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def find_lr_for_config(cfg: Config, *, rows: np.ndarray | None = None, device: str | torch.device | None = None,
                       steps: int = 100, min_lr: float = 1e-7, max_lr: float = 10.0,
                       rule: str = "steepest", beta: float = 0.98, diverge_factor: float = 4.0,
                       log: Callable[[str], None] = print) -> tuple[LRFindResult, float]:
    """A range test on the pipeline `cfg` trains with, and the suggested lr.

    `rows` (n,) are the table rows to draw batches from; None: fold 0's training rows (never a
    validation row, so an lr chosen here does not peek at what it will be scored on). `device`
    None means cfg.train.device. The model, loss, optimizer, mixing, AMP, micro-batch,
    accumulation and --sam are the trainer's; the schedule, warm-up and EMA are not (the test sets the lr
    itself, and the EMA does not change the training loss).
    """
    from mixcls.run_setup import fold_rows, prepare_table

    check_range_options(min_lr=min_lr, max_lr=max_lr, steps=steps, beta=beta,
                        diverge_factor=diverge_factor)
    if rule not in SUGGEST_RULES:
        raise ConfigError(f"suggest: {rule!r} is not one of {', '.join(SUGGEST_RULES)}")
    table, folds = prepare_table(cfg)
    if rows is None:
        rows, _ = fold_rows(table, folds, 0)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise ConfigError("lr-find: no training rows to draw batches from")
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's RNG
        torch.manual_seed(cfg.train.seed)
        parts = _build_pipeline(cfg, table, rows, device=device, log=log)
    sharpness = sharpness_settings(cfg.optim.sam, cfg.optim.sam_rho)
    log(f"lr range test: {cfg.model.name}, {len(rows)} training rows, micro-batch "
        f"{parts.batch_size} x {parts.accum_steps} accumulation steps, {steps} steps, "
        f"lr {min_lr:.1e} -> {max_lr:.1e}, on {parts.device}"
        + (f", {sharpness.label}" if sharpness is not None else ""))
    result = range_test(parts.model, parts.loader, parts.optimizer, loss_fn=parts.loss_fn,
                        device=parts.device, num_classes=table.num_classes, min_lr=min_lr,
                        max_lr=max_lr, steps=steps, accum_steps=parts.accum_steps,
                        mixer=parts.mixer, generator=parts.generator, amp_dtype=parts.amp_dtype,
                        scaler=parts.scaler, grad_clip=cfg.train.grad_clip,
                        channels_last=cfg.model.channels_last, beta=beta,
                        diverge_factor=diverge_factor, normalizer=parts.normalizer,
                        device_augment=parts.device_augment, sharpness=sharpness)
    return result, suggest_lr(result, rule=rule)


@dataclass
class _Pipeline:
    """What the trainer would train one fold with, built from a Config."""

    model: nn.Module
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    mixer: Callable | None
    generator: torch.Generator
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    batch_size: int
    accum_steps: int
    normalizer: Normalizer | None = None  # the model's mean and std for the uint8 batches
    # the augmentation steps on the device (--colour-on-device, --augment-on-device)
    device_augment: DeviceColour | DeviceAugment | None = None


def _build_pipeline(cfg: Config, table: TrainTable, rows: np.ndarray, *,
                    device: str | torch.device | None, log: Callable[[str], None]) -> _Pipeline:
    """Model, shuffled training loader of `rows`, optimizer, loss, mixer and AMP as `mixcls train` builds them."""
    device = resolve_device(str(device) if device is not None else cfg.train.device)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    plan = resolve_batch_plan(cfg, table.num_classes, device, world_size=1, run_dir=None,
                              resume=False, log=log)
    batch_size, accum_steps = plan.batch_size, plan.accum_steps
    model = build_training_model(cfg.model, table.num_classes, device)  # as the run trains it
    mean, std = model_mean_std(model)
    targets = table.soft_targets if table.soft_targets is not None else table.labels
    paths = table.frame["path"].tolist()
    transform, device_augment = build_train_augment(
        cfg.data.preset, cfg.data.img_size, mean=mean, colour_on_device=cfg.data.colour_on_device,
        augment_on_device=cfg.data.augment_on_device)
    dataset = ImageDataset([paths[i] for i in rows], targets[rows], transform)
    keep_freed_memory()  # before the workers fork (mixcls.heap)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=cfg.data.workers,
                        drop_last=len(dataset) > batch_size, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init,
                        collate_fn=build_collate(workers=cfg.data.workers, hwc=device.type == "cuda"),
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    mixer, loss_fn = build_mixer(cfg.mix), build_training_loss(cfg.loss)
    return _Pipeline(model=model, loader=loader, optimizer=build_optimizer(model, cfg.optim),
                     loss_fn=loss_fn, mixer=mixer,
                     generator=torch.Generator(device=device).manual_seed(cfg.train.seed),
                     device=device, amp_dtype=amp_dtype, scaler=scaler, batch_size=batch_size,
                     accum_steps=accum_steps, normalizer=Normalizer(mean, std),
                     device_augment=device_augment)
