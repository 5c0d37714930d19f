"""One epoch of training and one pass of evaluation, written as plain loops.

What a batch does is readable top to bottom in `train_one_epoch`: mix, forward under autocast,
loss on soft targets, backward outside autocast, and one optimizer + scheduler step per
`accum_steps` micro-batches.
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixcls.losses import to_soft_targets
from mixcls.transforms import apply_tta_view


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class EpochStats:
    """Running sums of one epoch's training; sums (not means) so that parts add up exactly.

    A resumed epoch continues the sums saved at its last step checkpoint, and ranks under
    torchrun add theirs, so the reported loss is the mean over every image of the epoch.
    """

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    steps: int = 0
    skipped_steps: int = 0  # optimizer steps not taken: a gradient was NaN or infinite

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def should_step(i: int, n_batches: int, accum_steps: int) -> bool:
    """Step after every `accum_steps` micro-batches and after the epoch's last one."""
    return (i + 1) % accum_steps == 0 or i == n_batches - 1


def group_size(i: int, n_batches: int, accum_steps: int) -> int:
    """Micro-batches in the accumulation group of batch `i` (the epoch's last group may be short)."""
    start = (i // accum_steps) * accum_steps
    return min(accum_steps, n_batches - start)


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def prepare_batch(images: torch.Tensor, targets: torch.Tensor, *, device: torch.device,
                  num_classes: int, channels_last: bool = False, mixer: Callable | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch on `device` as the model trains on it: images (B, 3, H, W) in the
    memory format asked for, soft targets (B, K), mixed when a mixer is given."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    soft_targets = to_soft_targets(targets.to(device, non_blocking=True), num_classes)
    if mixer is not None:
        images, soft_targets, _ = mixer(images, soft_targets, generator=generator)
    return images, soft_targets


def train_one_epoch(model: nn.Module, loader: Sequence, optimizer: torch.optim.Optimizer, *,
                    loss_fn: Callable, device: torch.device, num_classes: int,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    mixer: Callable | None = None, generator: torch.Generator | None = None,
                    accum_steps: int = 1, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: torch.dtype | None = None, grad_clip: float | None = None,
                    ema: nn.Module | None = None, channels_last: bool = False,
                    start_batch: int = 0, n_batches: int | None = None,
                    start_stats: EpochStats | None = None,
                    on_step: Callable[[int, EpochStats], None] | None = None,
                    progress: bool = True, desc: str = "train") -> EpochStats:
    """Train over `loader`; batches before `start_batch` were done before a resume.

    `n_batches` is the epoch's full length when `loader` yields only the remaining batches, and
    `start_stats` the sums of the batches done before the resume (the result includes them).
    `on_step(i, stats)` runs after each optimizer step with the index of the last micro-batch
    and the sums so far (batch `i` included).
    """
    model.train()
    n_batches = n_batches if n_batches is not None else len(loader)
    stats = dataclasses.replace(start_stats) if start_stats is not None else EpochStats()
    start = time.perf_counter() - stats.seconds
    bar = tqdm(total=n_batches, initial=start_batch, desc=desc, disable=not progress,
               leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(loader, start=start_batch):
        images, soft_targets = prepare_batch(images, targets, device=device, num_classes=num_classes,
                                             channels_last=channels_last, mixer=mixer,
                                             generator=generator)
        step = should_step(i, n_batches, accum_steps)
        # Under DDP only the group's last micro-batch all-reduces the (accumulated) gradients.
        with _no_sync(model, sync=step), autocast_context(device, amp_dtype):
            logits = model(images)
            loss = loss_fn(logits, soft_targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at batch {i} of {n_batches}")
        scaled = loss / group_size(i, n_batches, accum_steps)
        with _no_sync(model, sync=step):
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        stats.loss_sum += loss.item() * images.shape[0]
        stats.correct += int((logits.argmax(1) == soft_targets.argmax(1)).sum().item())
        stats.images += images.shape[0]
        if step:
            stepped = _optimizer_step(model, optimizer, scaler=scaler, grad_clip=grad_clip)
            stats.skipped_steps += not stepped
            if scheduler is not None:  # on schedule even after a skipped step, as with GradScaler
                _scheduler_step(scheduler, after_skipped_step=not stepped)
            if ema is not None:
                ema.update(getattr(model, "module", model))  # the EMA copies the bare model, not DDP
            stats.steps += 1
            stats.lr = optimizer.param_groups[0]["lr"]
            stats.seconds = time.perf_counter() - start
            if on_step is not None:
                on_step(i, stats)
        bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.accuracy:.3f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        ips=f"{stats.images / max(time.perf_counter() - start, 1e-9):.0f}")
        bar.update(1)
    bar.close()
    stats.seconds = time.perf_counter() - start
    stats.lr = optimizer.param_groups[0]["lr"]
    return stats


_SKIPPED_STEP_WARNING = re.escape("Detected call of `lr_scheduler.step()`")


def _scheduler_step(scheduler: torch.optim.lr_scheduler.LRScheduler, *,
                    after_skipped_step: bool) -> None:
    with warnings.catch_warnings():
        if after_skipped_step:  # torch warns when no optimizer.step() came first; we count it
            warnings.filterwarnings("ignore", message=_SKIPPED_STEP_WARNING)
        scheduler.step()


def _no_sync(model: nn.Module, *, sync: bool):
    """DistributedDataParallel.no_sync() for a micro-batch that does not end its group."""
    return model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    scaler: torch.amp.GradScaler | None, grad_clip: float | None) -> bool:
    """One optimizer step; False when it was skipped because a gradient was NaN or infinite.

    fp16's GradScaler skips such steps itself. Without one (fp32, bf16) the same rule applies
    here: CPU bf16 kernels now and then return non-finite gradients for a finite loss (seen on
    a 1x1 convolution over a 1x1 map), and a single such step turns every weight into NaN.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = None
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    elif scaler is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
        stepped = True
    else:
        stepped = bool(torch.isfinite(norm))
        if stepped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Sequence, *, device: torch.device,
             loss_fn: Callable | None = None, num_classes: int | None = None,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             tta_views: Sequence[str] = ("orig",), features: bool = False, progress: bool = False,
             desc: str = "valid") -> tuple:
    """Class probabilities (N, K) averaged over `tta_views`, and the mean loss of the plain view.

    With `features`, also the penultimate features (N, D) of the plain view (the classifier's
    input: timm's forward_head(pre_logits=True)), from the same forward pass, so a caller that
    needs both reads the images once. Returns (probs, loss), or (probs, loss, features) with
    `features`; loss is None without `loss_fn`. Never mixes: validation and prediction see the
    images as they are (plus TTA views).
    """
    model.eval()
    all_probs, all_features, total_loss, seen = [], [], 0.0, 0
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        probs = None
        for view in tta_views:
            logits, pooled = _forward(model, apply_tta_view(images, view), amp_dtype=amp_dtype,
                                      channels_last=channels_last,
                                      features=features and view == "orig")
            probs = logits.softmax(1) if probs is None else probs + logits.softmax(1)
            if pooled is not None:
                all_features.append(pooled.cpu().numpy())
            if view == "orig" and loss_fn is not None:
                soft = to_soft_targets(targets.to(device), num_classes or logits.shape[1])
                total_loss += loss_fn(logits, soft).item() * images.shape[0]
        if features and "orig" not in tta_views:  # features are always those of the plain images
            all_features.append(_forward(model, images, amp_dtype=amp_dtype, channels_last=channels_last,
                                         features=True)[1].cpu().numpy())
        seen += images.shape[0]
        all_probs.append((probs / len(tta_views)).cpu().numpy())
    probs = np.concatenate(all_probs) if all_probs else np.zeros((0, num_classes or 0), np.float32)
    loss = total_loss / max(seen, 1) if loss_fn is not None else None
    if not features:
        return probs, loss
    width = getattr(model, "num_features", 0)
    return probs, loss, (np.concatenate(all_features) if all_features else np.zeros((0, width), np.float32))


def _forward(model: nn.Module, x: torch.Tensor, *, amp_dtype: torch.dtype | None,
             channels_last: bool, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits (B, K) float32, pooled features (B, D) float32 or None) of one batch.

    The features path splits the model where timm does (forward_features, then forward_head),
    so logits and features come from one pass over the backbone.
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_context(x.device, amp_dtype):
        if not features:
            return model(x).float(), None
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
        return model.forward_head(fmap).float(), pooled.float()
