"""One epoch of training and one pass of evaluation, written as plain loops.

What a batch does is readable top to bottom in `train_one_epoch`: mix, forward under autocast,
loss on soft targets, backward outside autocast, and one optimizer + scheduler step per
`accum_steps` micro-batches (with --sam, after a second pass at the worst nearby weights).
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixcls.device_augment import DeviceAugment, WarpBatch
from mixcls.losses import to_soft_targets
from mixcls.models import batchnorm_modules
from mixcls.optim import current_lr
from mixcls.sam import Sharpness, climb, come_back
from mixcls.transforms import DeviceColour, Normalizer, apply_tta_view

# The running loss and accuracy are read from the device (a synchronisation) at most this
# often, and at least every READ_EVERY_BATCHES batches (which bounds the per-batch losses
# kept for naming a NaN batch); never per micro-batch, which would empty the GPU's queue.
READ_SECONDS = 0.5
READ_EVERY_BATCHES = 64


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class EpochStats:
    """Running sums of one epoch's training; sums (not means) so that parts add up exactly.

    A resumed epoch continues the sums saved at its last step checkpoint, and ranks under
    torchrun add theirs, so the reported loss is the mean over every image of the epoch.
    While `train_one_epoch` runs, `loss_sum` and `correct` live on the device and are brought
    up to date by `settle()` (a synchronisation; `loss`, `accuracy` and `to_dict` settle
    themselves); what it returns is settled. `compile_seconds` is the time torch.compile took
    in the epoch, not counted in `seconds`.
    """

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    steps: int = 0
    skipped_steps: int = 0  # optimizer steps not taken: a gradient was NaN or infinite
    compile_seconds: float = 0.0

    def __post_init__(self) -> None:
        self._sums: _DeviceSums | None = None

    def settle(self) -> "EpochStats":
        """Read the device's sums into `loss_sum` and `correct`; NonFiniteLossError (naming
        the batch) when a loss since the last read was NaN or infinite."""
        if self._sums is not None:
            self._sums.read_into(self)
        return self

    @property
    def loss(self) -> float:
        return self.settle().loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        return self.settle().correct / max(self.images, 1)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self.settle())


class _DeviceSums:
    """An epoch's loss sum (float64) and correct count (int64) accumulated on the device.

    The float64 sum adds `loss * batch` one batch after the other, the very operations the
    host did with `loss.item() * batch` (float32 -> float64 is exact), so the result is
    bit-equal to the old per-batch reads whenever it is read. The batches' losses since the
    last read are kept to name the first non-finite one.
    """

    def __init__(self, stats: EpochStats, device: torch.device, *, n_batches: int):
        self.loss_sum = torch.tensor(stats.loss_sum, dtype=torch.float64, device=device)
        self.correct = torch.tensor(stats.correct, dtype=torch.int64, device=device)
        self.n_batches = n_batches
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, i: int, loss: torch.Tensor, logits: torch.Tensor, soft_targets: torch.Tensor) -> None:
        loss = loss.detach()
        self.loss_sum += loss.double() * logits.shape[0]
        self.correct += (logits.detach().argmax(1) == soft_targets.argmax(1)).sum()
        self.pending.append((i, loss))

    def read_into(self, stats: EpochStats) -> None:
        if self.pending:
            losses = torch.stack([loss.float() for _, loss in self.pending])
            finite = torch.isfinite(losses).cpu()
            if not bool(finite.all()):
                k = int((~finite).nonzero()[0, 0])
                raise NonFiniteLossError(f"loss is {losses[k].item()} at batch "
                                         f"{self.pending[k][0]} of {self.n_batches}")
            self.pending.clear()
        stats.loss_sum, stats.correct = self.loss_sum.item(), int(self.correct.item())


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


def prepare_images(images: torch.Tensor, *, device: torch.device,
                   normalizer: Normalizer | None = None, channels_last: bool = False,
                   device_augment: DeviceColour | DeviceAugment | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A loader's images as the model takes them, on `device`: uint8 batches normalised there
    by `normalizer` (the model's mean and std) into float32; then the memory format asked for.
    `device_augment` (training only) first runs the augmentation steps that moved to the device,
    drawing from `generator`: the colour steps (--colour-on-device, a DeviceColour), or the
    whole preset on a WarpBatch (--augment-on-device, a DeviceAugment). Without a normalizer the
    images are taken as they are (already float)."""
    if isinstance(images, WarpBatch):
        if not isinstance(device_augment, DeviceAugment):
            raise TypeError("a batch of source images and plans (--augment-on-device) needs the "
                            "DeviceAugment that finishes it")
        # the plans stay on the host: DeviceAugment reads their hole counts there first
        images = WarpBatch(images.images.to(device, non_blocking=True), images.plans)
    else:
        images = images.to(device, non_blocking=True)
    if device_augment is not None:
        if normalizer is None:
            raise TypeError("augmenting on the device needs a Normalizer (the model's mean and std)")
        images = normalizer.from_255(device_augment(images, generator))
    elif normalizer is not None:
        images = normalizer(images)
    elif images.dtype == torch.uint8:
        raise TypeError("uint8 images need a Normalizer (the model's mean and std)")
    return to_memory_format(images, channels_last=channels_last)


def to_memory_format(images: torch.Tensor, *, channels_last: bool) -> torch.Tensor:
    """channels_last or contiguous (a no-op when already so): batches collated channels_last
    (sampling.collate_hwc) get their channel split here, on the device."""
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def prepare_batch(images: torch.Tensor, targets: torch.Tensor, *, device: torch.device,
                  num_classes: int, normalizer: Normalizer | None = None,
                  channels_last: bool = False, mixer: Callable | None = None,
                  generator: torch.Generator | None = None,
                  device_augment: DeviceColour | DeviceAugment | None = None,
                  weights: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A loader's batch on `device` as the model trains on it: images (B, 3, H, W) float,
    augmented by `device_augment` when it is given and normalised (prepare_images), soft targets (B, K),
    mixed when a mixer is given (mixing sees the normalised images), and the row weights (B,)
    float32 or None. The device augmentation and mixing draw from `generator`, in that order.

    A mixed row's weight is mixed like its target, λ_eff·w + (1 − λ_eff)·w[perm]: the weights
    ride through the mixer as one more target column, so they take the very same λ and partner.
    """
    images = prepare_images(images, device=device, normalizer=normalizer, channels_last=channels_last,
                            device_augment=device_augment, generator=generator)
    soft_targets = to_soft_targets(targets.to(device, non_blocking=True), num_classes)
    if weights is not None:
        weights = weights.to(device, non_blocking=True).to(soft_targets.dtype)
    if mixer is not None:
        if weights is None:
            images, soft_targets, _ = mixer(images, soft_targets, generator=generator)
        else:
            images, mixed, _ = mixer(images, torch.cat([soft_targets, weights[:, None]], dim=1),
                                     generator=generator)
            soft_targets, weights = mixed[:, :num_classes], mixed[:, num_classes]
    return images, soft_targets, weights


def batch_parts(batch: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, targets, row weights or None) of a loader's batch: ImageDataset yields
    (image, target) items, or (image, target, weight) when it was given weights."""
    images, targets, *rest = batch
    return images, targets, (rest[0] if rest else None)


def set_train_mode(model: nn.Module, *, bn_eval: Sequence[nn.Module] = ()) -> None:
    """model.train(), except the BatchNorm modules in `bn_eval`, kept in eval mode (frozen
    running statistics: --freeze-bn, or the body while --freeze-epochs trains the head)."""
    model.train()
    for module in bn_eval:
        module.eval()


@contextmanager
def _running_stats_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """The BatchNorm running statistics of `modules` as they were on entry, once the block ends.

    A checkpointed segment's forward runs again inside backward(), in training mode, so each
    of its BatchNorm layers would take a second momentum update from the same batch (timm and
    torch.utils.checkpoint leave this to the caller). The buffers are small: a copy per layer.
    """
    saved = [(buffer, buffer.clone()) for m in modules
             for buffer in (m.running_mean, m.running_var, m.num_batches_tracked) if buffer is not None]
    yield
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _finish_step(model: nn.Module, optimizer: torch.optim.Optimizer, stats: EpochStats, *,
                 scaler: torch.amp.GradScaler | None, grad_clip: float | None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 ema: nn.Module | None) -> None:
    """The optimizer step of an accumulation group, then the schedule and the EMA, counted."""
    stepped = _optimizer_step(model, optimizer, scaler=scaler, grad_clip=grad_clip)
    stats.skipped_steps += not stepped
    if scheduler is not None:  # on schedule even after a skipped step, as with GradScaler
        _scheduler_step(scheduler, after_skipped_step=not stepped)
    if ema is not None:
        ema.update(unwrap_model(model))  # the EMA copies the bare model, not DDP or compile
    stats.steps += 1
    stats.lr = current_lr(optimizer)


def _show(bar: tqdm, stats: EpochStats, clock: _Clock) -> None:
    """The progress bar's loss, accuracy, lr and images/s (the sums just settled)."""
    bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.accuracy:.3f}", lr=f"{stats.lr:.2e}",
                    ips=f"{stats.images / max(clock.elapsed(), 1e-9):.0f}", refresh=False)


def train_one_epoch(model: nn.Module, loader: Sequence, optimizer: torch.optim.Optimizer, *,
                    loss_fn: Callable, device: torch.device, num_classes: int,
                    normalizer: Normalizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    mixer: Callable | None = None, generator: torch.Generator | None = None,
                    accum_steps: int = 1, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: torch.dtype | None = None, grad_clip: float | None = None,
                    ema: nn.Module | None = None, channels_last: bool = False,
                    bn_eval: Sequence[nn.Module] = (),
                    recomputed_bn: Sequence[nn.Module] = (),
                    sharpness: Sharpness | None = None,
                    device_augment: DeviceColour | DeviceAugment | None = None,
                    start_batch: int = 0, n_batches: int | None = None,
                    start_stats: EpochStats | None = None,
                    on_step: Callable[[int, EpochStats], None] | None = None,
                    progress: bool = True, desc: str = "train") -> EpochStats:
    """Train over `loader`; batches before `start_batch` were done before a resume.

    `n_batches` is the epoch's full length when `loader` yields only the remaining batches, and
    `start_stats` the sums of the batches done before the resume (the result includes them).
    `recomputed_bn` are BatchNorm layers that the backward pass runs again (gradient
    checkpointing): their running statistics are put back after each backward, so they hold the
    forward pass's one update per micro-batch, as without checkpointing.
    `sharpness` (--sam) takes each step's gradient at the worst nearby weights: the group's
    micro-batches are kept, as mixed and augmented, for the second pass (sharpness_pass).
    `on_step(i, stats)` runs after each optimizer step with the index of the last micro-batch
    and the sums so far (batch `i` included; call `stats.settle()` before reading `loss_sum`
    or `correct`). A NaN or infinite loss raises NonFiniteLossError naming its batch when the
    sums are next read (at most READ_SECONDS later, and at the epoch's end).
    """
    set_train_mode(model, bn_eval=bn_eval)
    n_batches = n_batches if n_batches is not None else len(loader)
    stats = dataclasses.replace(start_stats) if start_stats is not None else EpochStats()
    stats._sums = sums = _DeviceSums(stats, device, n_batches=n_batches)
    clock = _Clock(stats)
    last_read = time.perf_counter()
    bar = tqdm(total=n_batches, initial=start_batch, desc=desc, disable=not progress,
               leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    group: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]] = []
    bn_layers = batchnorm_modules(model) if sharpness is not None else ()
    for i, batch in enumerate(loader, start=start_batch):
        images, targets, weights = batch_parts(batch)
        images, soft_targets, weights = prepare_batch(
            images, targets, device=device, num_classes=num_classes, normalizer=normalizer,
            channels_last=channels_last, mixer=mixer, generator=generator,
            device_augment=device_augment, weights=weights)
        step = should_step(i, n_batches, accum_steps)
        # Under DDP only the group's last micro-batch all-reduces the (accumulated) gradients.
        with _no_sync(model, sync=step), autocast_context(device, amp_dtype):
            logits = model(images)
            loss = loss_fn(logits, soft_targets, *(() if weights is None else (weights,)))
        divisor = group_size(i, n_batches, accum_steps)
        with _no_sync(model, sync=step), _running_stats_kept(recomputed_bn):
            (scaler.scale(loss / divisor) if scaler is not None else loss / divisor).backward()
        sums.add(i, loss, logits, soft_targets)
        stats.images += images.shape[0]
        if sharpness is not None:
            group.append((images, soft_targets, weights, divisor))
        if step:
            if sharpness is not None:
                sharpness_pass(model, optimizer, group, sharpness=sharpness, loss_fn=loss_fn,
                               device=device, scaler=scaler, amp_dtype=amp_dtype,
                               bn_layers=bn_layers)
                group.clear()
            _finish_step(model, optimizer, stats, scaler=scaler, grad_clip=grad_clip,
                         scheduler=scheduler, ema=ema)
            clock.update(stats)
            if on_step is not None:
                on_step(i, stats)
        if time.perf_counter() - last_read >= READ_SECONDS or len(sums.pending) >= READ_EVERY_BATCHES:
            stats.settle()
            last_read = time.perf_counter()
            if progress:
                _show(bar, stats, clock)
        bar.update(1)
    bar.close()
    stats.settle()
    stats._sums = None
    clock.update(stats)
    stats.lr = current_lr(optimizer)
    return stats


def sharpness_pass(model: nn.Module, optimizer: torch.optim.Optimizer,
                   group: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]], *,
                   sharpness: Sharpness, loss_fn: Callable, device: torch.device,
                   scaler: torch.amp.GradScaler | None, amp_dtype: torch.dtype | None,
                   bn_layers: Sequence[nn.Module]) -> None:
    """SAM's second pass over an accumulation group: its gradients, taken at w + e(w), replace
    the first pass's, and the weights are w again when it returns.

    `group` holds each micro-batch's images, soft targets, row weights and the divisor of its
    loss, as the first pass used them. Under DDP the first pass's gradients were all-reduced,
    so every rank climbs to the same w + e(w) (e from the step's whole batch), and the second
    pass all-reduces at its last micro-batch. The BatchNorm running statistics keep the first
    pass's update only: the second sees the same images again.
    """
    moved = climb(list(model.parameters()), sharpness)
    optimizer.zero_grad(set_to_none=True)
    for j, (images, soft_targets, weights, divisor) in enumerate(group):
        sync = j == len(group) - 1
        with _running_stats_kept(bn_layers):
            with _no_sync(model, sync=sync), autocast_context(device, amp_dtype):
                loss = loss_fn(model(images), soft_targets, *(() if weights is None else (weights,)))
            with _no_sync(model, sync=sync):
                (scaler.scale(loss / divisor) if scaler is not None else loss / divisor).backward()
    come_back(moved)


def compile_seconds_so_far() -> float:
    """Seconds torch.compile has spent in this process so far (dynamo and inductor, forward
    and backward graphs); 0.0 where torch does not record them."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a torch without dynamo's metrics: compile time stays in `seconds`
        return 0.0
    return float(sum(sum(compilation_time_metrics.get(key, ())) for key in _COMPILE_PHASES))


# The outermost timed phases of a compilation: dynamo's frame compile (tracing plus the
# forward graph's inductor compile) and the backward graph compiled at its first use.
_COMPILE_PHASES = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


class _Clock:
    """An epoch's training seconds and compile seconds, continuing a resumed epoch's."""

    def __init__(self, stats: EpochStats):
        self.start = time.perf_counter()
        self.compile_start = compile_seconds_so_far()
        self.seconds, self.compile_seconds = stats.seconds, stats.compile_seconds

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.start

    def update(self, stats: EpochStats) -> None:
        compiled = compile_seconds_so_far() - self.compile_start
        stats.compile_seconds = self.compile_seconds + compiled
        stats.seconds = self.elapsed() - compiled


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
             normalizer: Normalizer | None = None,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             tta_views: Sequence[str] = ("orig",), features: bool = False, progress: bool = False,
             desc: str = "valid", per_view: bool = False) -> tuple:
    """Class probabilities (N, K) averaged over `tta_views`, and the mean loss of the plain view.

    The loader's images go through `prepare_images` as in training (uint8 normalised on the
    device by `normalizer`); the TTA views act on the normalised batch.

    With `features`, also the penultimate features (N, D) of the plain view (the classifier's
    input: timm's forward_head(pre_logits=True)), from the same forward pass, so a caller that
    needs both reads the images once. Returns (probs, loss), or (probs, loss, features) with
    `features`; loss is None without `loss_fn`. With `per_view`, probs is (V, N, K) instead: one
    table per view in `tta_views` order (their mean is the (N, K) table), so a caller scoring
    the first 1, 2, … views runs each view once. Never mixes: validation and prediction see the
    images as they are (plus TTA views).
    """
    model.eval()
    all_probs, all_features, total_loss, seen = [], [], 0.0, 0
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = prepare_images(images, device=device, normalizer=normalizer, channels_last=channels_last)
        view_probs = []
        for view in tta_views:
            logits, pooled = _forward(model, apply_tta_view(images, view), amp_dtype=amp_dtype,
                                      channels_last=channels_last,
                                      features=features and view == "orig")
            view_probs.append(logits.softmax(1))
            if pooled is not None:
                all_features.append(pooled.cpu().numpy())
            if view == "orig" and loss_fn is not None:
                soft = to_soft_targets(targets.to(device), num_classes or logits.shape[1])
                total_loss += loss_fn(logits, soft).item() * images.shape[0]
        if features and "orig" not in tta_views:  # features are always those of the plain images
            all_features.append(_forward(model, images, amp_dtype=amp_dtype, channels_last=channels_last,
                                         features=True)[1].cpu().numpy())
        seen += images.shape[0]
        stacked = torch.stack(view_probs)  # (V, B, K)
        all_probs.append((stacked if per_view else stacked.mean(0)).cpu().numpy())
    empty_shape = (len(tta_views), 0, num_classes or 0) if per_view else (0, num_classes or 0)
    probs = (np.concatenate(all_probs, axis=-2) if all_probs
             else np.zeros(empty_shape, np.float32))
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
    x = to_memory_format(x, channels_last=channels_last)  # after the view, which may permute
    with autocast_context(x.device, amp_dtype):
        if not features:
            return model(x).float(), None
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
        return model.forward_head(fmap).float(), pooled.float()
