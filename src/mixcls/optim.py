"""Optimizers and learning-rate schedules (stepped once per optimizer step, not per epoch)."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from mixcls.config import OptimConfig, SchedConfig


# Built by timm.optim.create_optimizer_v2 from the same parameter groups as torch's three: a
# `lookahead_` prefix wraps the base optimizer in timm's Lookahead (Zhang et al. 2019).
TIMM_OPTIMIZERS = ("radam", "nadamw", "lamb", "lion", "adan", "madgrad", "adabelief", "adamp",
                   "sgdp", "lookahead_adamw", "lookahead_radam")


class OptimError(ValueError):
    """An optimizer setting the model cannot follow; the message names the key and the model."""


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (torch's), or one of TIMM_OPTIMIZERS (timm's factory); biases and
    norm weights get no weight decay (timm's grouping).

    Every group's lr is `cfg.lr * group["lr_scale"]`: the scale is 1 unless `cfg.layer_decay`
    (timm's layer groups, layer l of L at D^(L - l)) or `cfg.head_lr_mult` (the classifier's
    parameters, `model.get_classifier()`, in groups of their own) set it. The schedule
    multiplies every group by the same factor, so the ratios hold throughout.
    """
    groups = build_param_groups(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                head_lr_mult=cfg.head_lr_mult, model_name=type(model).__name__)
    scaled = any(g["lr_scale"] != 1.0 for g in groups)
    for group in groups:
        if scaled:
            group["lr"] = cfg.lr * group["lr_scale"]
        else:  # no scales: groups as before the fine-tuning controls (bit-equal schedules)
            del group["lr_scale"]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.name in TIMM_OPTIMIZERS:
        from timm.optim import create_optimizer_v2

        # the groups carry their own weight decay; momentum reaches only those that take it
        return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.name!r}; use one of adamw, adam, sgd, "
                     f"{', '.join(TIMM_OPTIMIZERS)}")


def build_param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float | None = None,
                       head_lr_mult: float = 1.0, model_name: str = "the model") -> list[dict]:
    """Parameter groups with "params", "weight_decay" and "lr_scale" (the group's lr / lr)."""
    if layer_decay is not None:
        if not hasattr(model, "group_matcher"):
            raise OptimError(f"layer_decay: {model_name} has no group_matcher (timm's layer "
                             "groups); unset --layer-decay for this model")
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    else:
        groups = [dict(g, lr_scale=1.0)
                  for g in param_groups_weight_decay(model, weight_decay=weight_decay)]
    if head_lr_mult == 1.0:
        return groups
    if not hasattr(model, "get_classifier"):
        raise OptimError(f"head_lr_mult: {model_name} has no get_classifier() naming its head")
    head = {id(p) for p in model.get_classifier().parameters()}
    split = []
    for group in groups:  # each group in two: its body part, then its head part at M x the scale
        for in_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head) == in_head]
            if params:
                scale = group["lr_scale"] * (head_lr_mult if in_head else 1.0)
                split.append(dict(group, params=params, lr_scale=scale))
    return split


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's current lr for a scale-1 group: what `--lr` names, whatever the groups."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, *, steps_per_epoch: int,
                    epochs: int, tail_epochs: int = 0,
                    tail_lr: float | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule over `steps_per_epoch * epochs` optimizer steps.

    With `tail_lr` (--swa-lr), `cfg`'s schedule runs over the first `epochs - tail_epochs`
    epochs and the last `tail_epochs` train at the constant `tail_lr` (each group at tail_lr x
    its lr_scale, so the head's and the layers' ratios hold): torch's SequentialLR of the two.
    """
    if tail_lr is not None:
        main_epochs = epochs - tail_epochs
        # the main schedule first: OneCycleLR reads its peak from the groups' lr as it is built
        main = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch,
                               epochs=main_epochs) if main_epochs > 0 else None
        constant = _ConstantLR(optimizer, tail_lr)
        if main is None:
            return constant
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [main, constant],
                                                     milestones=[steps_per_epoch * main_epochs])
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    # The configured lr (a scale-1 group's): with lr_scale groups the floor is a fraction of it
    # for every group, so the groups keep their ratios down to the floor.
    base_lr = optimizer.defaults["lr"]
    floor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    if cfg.name == "cosine":
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.name == "cosine_restarts":
        # eta_min per group (min_lr x the group's scale): a single eta_min would pull every
        # group to the same floor and lose their ratios at the bottom of each cycle.
        eta_min = [cfg.min_lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        return _CosineRestarts(optimizer, T_0=max(1, cfg.t0 * steps_per_epoch), T_mult=cfg.t_mult,
                               eta_mins=eta_min)
    if cfg.name == "onecycle":
        pct = warmup / total if warmup else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=min(max(pct, 1e-3), 0.99))
    if cfg.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown scheduler {cfg.name!r}")


class _ConstantLR(torch.optim.lr_scheduler.LRScheduler):
    """Every group at `lr` x its lr_scale. torch's ConstantLR and LambdaLR scale each group's
    initial_lr instead, which OneCycleLR rewrites (to its peak / div_factor) when it is built."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float):
        self.lr = lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.lr * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]


class _CosineRestarts(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts):
    """torch's warm restarts with one eta_min per parameter group."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, T_0: int, T_mult: int,
                 eta_mins: list[float]):
        self.eta_mins = eta_mins
        super().__init__(optimizer, T_0=T_0, T_mult=T_mult, eta_min=eta_mins[0])

    def get_lr(self) -> list[float]:
        return [eta + (base - eta) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2
                for base, eta in zip(self.base_lrs, self.eta_mins)]
