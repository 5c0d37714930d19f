"""Optimizers and learning-rate schedules (stepped once per optimizer step, not per epoch)."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from mixcls.config import OptimConfig, SchedConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD; biases and norm weights get no weight decay (timm's grouping)."""
    groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise ValueError(f"unknown optimizer {cfg.name!r}; use adamw, adam or sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, *, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule over `steps_per_epoch * epochs` optimizer steps."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    base_lr = optimizer.param_groups[0]["lr"]
    floor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    if cfg.name == "cosine":
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.name == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(1, cfg.t0 * steps_per_epoch), T_mult=cfg.t_mult, eta_min=cfg.min_lr)
    if cfg.name == "onecycle":
        pct = warmup / total if warmup else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=base_lr, total_steps=total,
                                                   pct_start=min(max(pct, 1e-3), 0.99))
    if cfg.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown scheduler {cfg.name!r}")
