"""A fold's loop state and its last.pt: save what a resume needs, check it, restore it.

A step checkpoint (saved in the middle of an epoch) holds every generator state and the
epoch's running sums, so the resumed run continues the same arithmetic; it can only be
continued by the same number of processes with the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixcls import distributed as dist
from mixcls.config import ConfigError
from mixcls.engine import EpochStats
from mixcls.runs import RunError
from mixcls.sampling import capture_rng_states


@dataclass
class FoldState:
    """Where a fold's loop stands: the next (epoch, batch), the best epoch so far, the history."""

    epoch: int = 0
    batch: int = 0
    best_score: float = float("-inf")  # higher is better (metrics.epoch_score)
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_probs: np.ndarray | None = None  # (n_valid, K) of the best epoch
    epoch_stats: EpochStats | None = None  # this rank's sums of a partly done epoch
    rng: dict[str, Any] | None = None  # generator states of a step checkpoint
    mix_rng: torch.Tensor | None = None
    last_path: Path | None = None  # rank 0's last.pt, for the message when training stops


@dataclass
class Trainables:
    """What the optimizer changes; `model` is the bare model (never DDP)."""

    model: nn.Module
    ema: Any  # timm ModelEmaV3 or None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    swa: Any = None  # torch AveragedModel of --swa-epochs, or None

    def eval_model(self) -> nn.Module:
        """The weights validation, best.pt and predict use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass(frozen=True)
class BatchLayout:
    """What a step checkpoint's batch index means: processes, micro-batch, accumulation."""

    world_size: int
    batch_size: int
    accum_steps: int

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over every process."""
        return self.world_size * self.batch_size * self.accum_steps

    def describe(self, *, n_train: int, steps_per_epoch: int) -> str:
        """A log line: the global batch and the optimizer steps per epoch."""
        return (f"{n_train} training images, global batch {self.global_batch} per optimizer step "
                f"({self.world_size} process(es) x micro-batch {self.batch_size} x "
                f"{self.accum_steps} accumulation), {steps_per_epoch} optimizer steps per epoch")


def build_last_checkpoint(net: Trainables, state: FoldState, *, header: dict[str, Any],
                          layout: BatchLayout, epoch: int, batch: int,
                          mix_gen: torch.Generator | None, epoch_stats: dict[str, Any] | None,
                          device: torch.device) -> dict[str, Any]:
    """last.pt: what a resume needs to continue the same arithmetic (only weights_only types).

    `header` holds config, classes and fold. `model` holds the weights predict would use (the
    EMA when there is one, as in best.pt); `train_model` then holds the raw weights the
    optimizer works on. `swa_model` holds the --swa-epochs average of the epochs ended so far.
    """
    probs = state.best_probs
    mid_epoch = batch > 0
    return dict(
        header, model=net.eval_model().state_dict(), epoch=epoch, batch=batch,
        train_model=net.model.state_dict() if net.ema is not None else None,
        optimizer=net.optimizer.state_dict(), scheduler=net.scheduler.state_dict(),
        scaler=net.scaler.state_dict() if net.scaler is not None else None,
        swa_model=net.swa.state_dict() if net.swa is not None else None,
        best_score=state.best_score, best_epoch=state.best_epoch, bad_epochs=state.bad_epochs,
        history=state.history, best_probs=torch.from_numpy(probs) if probs is not None else None,
        rng=capture_rng_states(device) if mid_epoch else None,
        mix_rng=mix_gen.get_state() if mix_gen is not None and mid_epoch else None,
        epoch_stats=epoch_stats if mid_epoch else None,
        world_size=layout.world_size, batch_size=layout.batch_size, accum_steps=layout.accum_steps)


def restore_checkpoint(ckpt: dict[str, Any], net: Trainables, *, fold: int, layout: BatchLayout,
                       rank: int) -> FoldState:
    """Load last.pt into the fold's objects; return the loop state it continues from."""
    check_resumable(ckpt, fold=fold, layout=layout)
    net.model.load_state_dict(ckpt["train_model"] if ckpt.get("train_model") is not None
                              else ckpt["model"])
    if net.ema is not None:
        net.ema.module.load_state_dict(ckpt["model"])
    net.optimizer.load_state_dict(ckpt["optimizer"])
    net.scheduler.load_state_dict(ckpt["scheduler"])
    if net.scaler is not None and ckpt.get("scaler") is not None:
        net.scaler.load_state_dict(ckpt["scaler"])
    if net.swa is not None:  # the run's options are checked unchanged, so it has one
        net.swa.load_state_dict(ckpt["swa_model"])
    best, stats = ckpt.get("best_probs"), ckpt.get("epoch_stats")
    return FoldState(epoch=ckpt["epoch"], batch=ckpt["batch"], best_score=ckpt["best_score"],
                     best_epoch=ckpt["best_epoch"], bad_epochs=ckpt["bad_epochs"],
                     history=list(ckpt["history"]),
                     best_probs=best.numpy() if best is not None else None,
                     epoch_stats=rank_stats(stats, rank) if stats is not None else None,
                     rng=ckpt.get("rng"), mix_rng=ckpt.get("mix_rng"))


def partial_stats(stats: EpochStats) -> dict[str, Any]:
    """A step checkpoint's record of its epoch so far: the common fields and every rank's sums.

    Each rank continues its own sums after a resume, so the epoch's totals are added in the
    same order as in an unbroken run. A collective: every rank calls it.
    """
    sums = dist.all_gather_floats([stats.loss_sum, stats.correct, stats.images])
    return dict(stats.to_dict(), rank_sums=sums)


def rank_stats(saved: dict[str, Any], rank: int) -> EpochStats:
    """Rank `rank`'s part of a step checkpoint's partial epoch."""
    loss_sum, correct, images = saved["rank_sums"][rank]
    common = {k: v for k, v in saved.items() if k != "rank_sums"}
    return EpochStats(**dict(common, loss_sum=loss_sum, correct=int(correct), images=int(images)))


def check_resumable(ckpt: dict[str, Any], *, fold: int, layout: BatchLayout) -> None:
    """A step checkpoint can only be continued by the same ranks with the same batches."""
    if ckpt.get("fold") != fold:
        raise RunError(f"fold {fold}: its last.pt belongs to fold {ckpt.get('fold')}")
    now = {"world_size": layout.world_size, "batch_size": layout.batch_size,
           "accum_steps": layout.accum_steps}
    changed = {k: (ckpt.get(k), v) for k, v in now.items() if ckpt.get(k, v) != v}
    if changed and ckpt["batch"]:
        said = ", ".join(f"{k} was {old}, is {new}" for k, (old, new) in changed.items())
        raise ConfigError(f"fold {fold}: last.pt was saved in the middle of epoch "
                          f"{ckpt['epoch'] + 1} ({said}); resume with the same number of processes "
                          "and batch size to continue that epoch")
