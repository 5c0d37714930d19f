"""What one fold trains with: the model, its loaders, optimizer, schedule, AMP, EMA, loss and
mixer, built from the config and the fold's data in an order that keeps runs repeatable (the
model's initial weights come first from the fold's seed)."""

from __future__ import annotations

from dataclasses import dataclass
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
from mixcls.models import build_model, model_mean_std
from mixcls.optim import build_optimizer, build_scheduler
from mixcls.resume import Trainables
from mixcls.run_setup import FoldData, build_mixer, build_training_loss
from mixcls.sampling import EpochSampler, derive_seed, make_loader
from mixcls.transforms import build_train_transform, build_valid_transform


@dataclass
class FoldParts:
    """Everything one fold trains with; `train_model` is `net.model`, maybe wrapped in DDP."""

    net: Trainables
    train_model: nn.Module
    amp_dtype: torch.dtype | None
    sampler: EpochSampler
    train_loader: DataLoader
    valid_loader: DataLoader  # this rank's shard of the validation rows
    n_batches: int
    loss_fn: Callable
    mixer: Callable | None
    valid_labels: np.ndarray  # (n_valid,) every validation row, for scoring


def build_fold_parts(cfg: Config, data: FoldData, *, fold: int, device: torch.device,
                     ctx: DistContext) -> FoldParts:
    """The fold's objects, on `device`; the caller seeds (seed, fold) first, so the model's
    initial weights are the same in every run and on every rank."""
    model = build_model(cfg.model, data.num_classes).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.world_size > 1 and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sampler, train_loader, valid_loader = _build_loaders(cfg, data, model_mean_std(model), fold=fold,
                                                         device=device, ctx=ctx)
    n_batches = len(train_loader)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, epochs=cfg.train.epochs,
                                steps_per_epoch=-(-n_batches // cfg.train.accum_steps))
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    mixer, loss_fn = build_mixer(cfg.mix), build_training_loss(cfg.loss)
    train_model = dist.wrap_ddp(model, device) if ctx.world_size > 1 else model
    return FoldParts(Trainables(model, ema, optimizer, scheduler, scaler), train_model, amp_dtype,
                     sampler, train_loader, valid_loader, n_batches, loss_fn, mixer, data.valid_labels)


def _build_loaders(cfg: Config, data: FoldData, mean_std: tuple, *, fold: int, device: torch.device,
                   ctx: DistContext) -> tuple[EpochSampler, DataLoader, DataLoader]:
    mean, std = mean_std
    batch_size, img_size = int(cfg.train.batch_size), cfg.data.img_size
    train_ds = ImageDataset(data.train_paths, data.train_targets,
                            build_train_transform(cfg.data.preset, img_size, mean=mean, std=std),
                            cache=data.train_cache)
    # Each rank evaluates every world_size-th validation row and the probabilities are gathered:
    # with 8 GPUs and a 4,000-image fold (times the TTA views) evaluating the whole fold on
    # every rank would cost 8x the evaluation time for the same numbers.
    shard = dist.shard_indices(len(data.valid_paths))
    valid_ds = ImageDataset([data.valid_paths[i] for i in shard], data.valid_labels[shard],
                            build_valid_transform(img_size, mean=mean, std=std),
                            cache=[data.valid_cache[i] for i in shard] if data.valid_cache is not None else None)
    sampler = EpochSampler(len(train_ds), seed=derive_seed(cfg.train.seed, fold, 1),
                           rank=ctx.rank, world_size=ctx.world_size)
    train_loader = make_loader(train_ds, batch_size=batch_size, workers=cfg.data.workers,
                               sampler=sampler, drop_last=len(sampler) > batch_size, device=device,
                               seed=derive_seed(cfg.train.seed, fold, 2))
    valid_loader = make_loader(valid_ds, batch_size=batch_size * 2, workers=cfg.data.workers,
                               sampler=None, drop_last=False, device=device,
                               seed=derive_seed(cfg.train.seed, fold, 3))
    return sampler, train_loader, valid_loader


def weights_finite(model: nn.Module) -> bool:
    """False once any weight is NaN or infinite (such weights are never checkpointed)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
