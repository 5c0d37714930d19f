"""What one fold trains with: the model, its loaders, optimizer, schedule, AMP, EMA, loss and
mixer, built from the config and the fold's data in an order that keeps runs repeatable (the
model's initial weights come first from the fold's seed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mixcls import distributed as dist
from mixcls.config import Config
from mixcls.data import ImageDataset
from mixcls.devices import amp_setup
from mixcls.distributed import DistContext
from mixcls.device_augment import DeviceAugment, build_train_augment
from mixcls.models import (batchnorm_modules, build_training_model, model_mean_std,
                           set_body_trainable)
from mixcls.optim import build_optimizer, build_scheduler
from mixcls.resume import Trainables
from mixcls.run_setup import FoldData, build_mixer, build_training_loss
from mixcls.sam import Sharpness, sharpness_settings
from mixcls.sampling import EpochSampler, derive_seed, make_loader
from mixcls.swa import build_averager
from mixcls.transforms import DeviceColour, Normalizer, build_valid_transform


@dataclass
class FoldParts:
    """Everything one fold trains with; `train_model` is `net.model` as the current epoch
    trains it (maybe wrapped in DDP and torch.compile): set by `begin_epoch`."""

    net: Trainables
    amp_dtype: torch.dtype | None
    sampler: EpochSampler
    train_loader: DataLoader
    valid_loader: DataLoader  # this rank's shard of the validation rows
    n_batches: int
    loss_fn: Callable
    mixer: Callable | None
    valid_labels: np.ndarray  # (n_valid,) every validation row, for scoring
    normalizer: Normalizer  # the model's mean and std: uint8 batches -> its input, on the device
    # the augmentation steps that run on the training batch on the device: the colour ones
    # (--colour-on-device) or the whole preset (--augment-on-device); None: all in the loader
    device_augment: DeviceColour | DeviceAugment | None
    wrap: Callable[[nn.Module], nn.Module]  # DDP and/or torch.compile around the bare model
    compile: bool = False
    freeze_epochs: int = 0
    freeze_bn: bool = False
    # --grad-checkpointing: the BatchNorm layers whose running statistics each backward pass
    # would update a second time (engine.train_one_epoch restores them)
    recomputed_bn: tuple[nn.Module, ...] = ()
    # --swa-epochs: this rank's training rows as validation sees them, for the BatchNorm pass
    bn_loader: DataLoader | None = None
    sharpness: Sharpness | None = None  # --sam's ascent (engine.train_one_epoch's second pass)
    train_model: nn.Module | None = None
    head_only: bool | None = None  # the phase train_model was built for
    _compiled_eval: dict[int, nn.Module] = field(default_factory=dict)

    def begin_epoch(self, epoch: int) -> tuple[nn.Module, ...]:
        """Set up `train_model` for `epoch` and return the BatchNorm modules it keeps in eval.

        The first `freeze_epochs` epochs train the head only: the body's parameters take no
        gradient (so the optimizer never touches them) and its BatchNorm layers stay in eval
        mode. The phase follows from the epoch number alone, so a resumed run is in the right
        one. DDP is rebuilt when the phase changes: it registers the parameters that need
        gradients when it is built.
        """
        head_only = epoch < self.freeze_epochs
        if head_only != self.head_only:
            if self.freeze_epochs:
                set_body_trainable(self.net.model, not head_only)
            self.train_model, self.head_only = self.wrap(self.net.model), head_only
        if self.freeze_bn:
            return tuple(batchnorm_modules(self.net.model))
        return tuple(batchnorm_modules(self.net.model, body_only=True)) if head_only else ()

    def inference_model(self, model: nn.Module | None = None) -> nn.Module:
        """The model validation runs (`model`, else the EMA when there is one, else the
        model), compiled with --compile."""
        model = self.net.eval_model() if model is None else model
        if not self.compile:
            return model
        if id(model) not in self._compiled_eval:
            self._compiled_eval[id(model)] = torch.compile(model)
        return self._compiled_eval[id(model)]


def build_fold_parts(cfg: Config, data: FoldData, *, fold: int, device: torch.device,
                     ctx: DistContext, log: Callable[[str], None] | None = None) -> FoldParts:
    """The fold's objects, on `device`; the caller seeds (seed, fold) first, so the model's
    initial weights are the same in every run and on every rank. `log` hears which
    pretrained weights were loaded."""
    model = build_training_model(cfg.model, data.num_classes, device, log=log)
    if ctx.world_size > 1 and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    recomputed_bn = tuple(batchnorm_modules(model)) if cfg.model.grad_checkpointing else ()
    mean, std = model_mean_std(model)
    # `mean` only colours the cassava preset's cutout
    train_transform, device_augment = build_train_augment(
        cfg.data.preset, cfg.data.img_size, mean=mean, colour_on_device=cfg.data.colour_on_device,
        augment_on_device=cfg.data.augment_on_device, rank=ctx.rank, world_size=ctx.world_size)
    sampler, train_loader, valid_loader = _build_loaders(cfg, data, train_transform, fold=fold,
                                                         device=device, ctx=ctx)
    n_batches = len(train_loader)
    optimizer = build_optimizer(model, cfg.optim)  # before any freezing: every parameter has a group
    scheduler = build_scheduler(optimizer, cfg.sched, epochs=cfg.train.epochs,
                                tail_epochs=cfg.train.swa_epochs, tail_lr=cfg.train.swa_lr,
                                steps_per_epoch=-(-n_batches // cfg.train.accum_steps))
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    swa = build_averager(model) if cfg.train.swa_epochs else None
    mixer, loss_fn = build_mixer(cfg.mix), build_training_loss(cfg.loss)

    def wrap(bare: nn.Module) -> nn.Module:
        # DDP inside torch.compile, as PyTorch recommends (DDPOptimizer splits the graph at
        # the gradient buckets); checkpoints save `bare`, so no `_orig_mod.` prefixes.
        wrapped = dist.wrap_ddp(bare, device) if ctx.world_size > 1 else bare
        return torch.compile(wrapped) if cfg.model.compile else wrapped

    bn_loader = _build_bn_loader(cfg, data, fold=fold, device=device, ctx=ctx) if swa else None
    return FoldParts(Trainables(model, ema, optimizer, scheduler, scaler, swa), amp_dtype, sampler,
                     train_loader, valid_loader, n_batches, loss_fn, mixer, data.valid_labels,
                     Normalizer(mean, std), device_augment, wrap, compile=cfg.model.compile,
                     freeze_epochs=cfg.model.freeze_epochs, freeze_bn=cfg.model.freeze_bn,
                     recomputed_bn=recomputed_bn, bn_loader=bn_loader,
                     sharpness=sharpness_settings(cfg.optim.sam, cfg.optim.sam_rho))


def _build_loaders(cfg: Config, data: FoldData, train_transform: Callable, *, fold: int,
                   device: torch.device, ctx: DistContext
                   ) -> tuple[EpochSampler, DataLoader, DataLoader]:
    """uint8 batches (or WarpBatches of sources and plans under --augment-on-device)."""
    batch_size = int(cfg.train.batch_size)
    train_ds = ImageDataset(data.train_paths, data.train_targets, train_transform,
                            cache=data.train_cache, weights=data.train_weights)
    # Each rank evaluates every world_size-th validation row and the probabilities are gathered:
    # with 8 GPUs and a 4,000-image fold (times the TTA views) evaluating the whole fold on
    # every rank would cost 8x the evaluation time for the same numbers.
    shard = dist.shard_indices(len(data.valid_paths))
    sampler = EpochSampler(len(train_ds), seed=derive_seed(cfg.train.seed, fold, 1),
                           rank=ctx.rank, world_size=ctx.world_size)
    train_loader = make_loader(train_ds, batch_size=batch_size, workers=cfg.data.workers,
                               sampler=sampler, drop_last=len(sampler) > batch_size, device=device,
                               seed=derive_seed(cfg.train.seed, fold, 2))
    valid_loader = _in_order_loader(cfg, data.valid_paths, data.valid_labels, data.valid_cache,
                                    shard, device=device, seed=derive_seed(cfg.train.seed, fold, 3))
    return sampler, train_loader, valid_loader


def _in_order_loader(cfg: Config, paths: list[str], labels: np.ndarray,
                     cache: list[np.ndarray] | None, rows: np.ndarray, *, device: torch.device,
                     seed: int) -> DataLoader:
    """`rows` of the images with the validation transform, in order, in batches of twice the
    training micro-batch (no backward pass): validation and the --swa-epochs BatchNorm pass."""
    dataset = ImageDataset([paths[i] for i in rows], labels[rows],
                           build_valid_transform(cfg.data.img_size),
                           cache=[cache[i] for i in rows] if cache is not None else None)
    return make_loader(dataset, batch_size=int(cfg.train.batch_size) * 2, workers=cfg.data.workers,
                       sampler=None, drop_last=False, device=device, seed=seed)


def _build_bn_loader(cfg: Config, data: FoldData, *, fold: int, device: torch.device,
                     ctx: DistContext) -> DataLoader:
    """The fold's training rows with the validation transform (no augmentation, no mixing:
    the statistics the averaged model will be validated and used with), in order. Each rank
    takes every world_size-th of the first world_size x floor(n / world_size) rows, so every
    rank runs as many batches of the same sizes (SyncBatchNorm would wait otherwise)."""
    n = len(data.train_paths) // ctx.world_size * ctx.world_size
    rows = np.arange(ctx.rank, n, ctx.world_size)
    no_labels = np.zeros(len(data.train_paths), np.int64)  # the pass reads only the images
    return _in_order_loader(cfg, data.train_paths, no_labels, data.train_cache, rows,
                            device=device, seed=derive_seed(cfg.train.seed, fold, 4))


def weights_finite(model: nn.Module) -> bool:
    """False once any weight is NaN or infinite (such weights are never checkpointed)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
