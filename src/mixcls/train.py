"""k-fold training: one fold at a time, OOF probabilities in the original row order.

Randomness is derived from (seed, fold, epoch) at each epoch start, and each image's
augmentation from (epoch seed, row), so a run resumed after a crash, or run with another
number of loader workers, sees exactly the same batches. A resume from a step checkpoint in
the middle of an epoch restores the python / numpy / torch / mixing generator states saved
with it and skips the rows already trained on, so it continues the same arithmetic.

Under torchrun every rank trains on its share of each epoch (DistributedDataParallel) and
evaluates its share of the validation fold; rank 0 alone reads and writes the run folder.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn
from torch.utils.data import DataLoader, Sampler

from mixcls import distributed as dist
from mixcls.config import Config, ConfigError, config_to_flat, dump_config
from mixcls.devices import amp_setup, resolve_device
from mixcls.data import (DataError, ImageDataset, TrainTable, check_class_counts,
                         load_image_cache, load_train_table, prob_columns)
from mixcls.engine import EpochStats, NonFiniteLossError, evaluate, train_one_epoch
from mixcls.folds import make_folds
from mixcls.losses import build_loss
from mixcls.models import build_model, model_mean_std
from mixcls.optim import build_optimizer, build_scheduler
from mixcls.runs import (RunError, atomic_write_csv, atomic_write_json, atomic_write_text,
                         check_writable, load_checkpoint, read_json, remove_stale_temporaries,
                         save_checkpoint)
from mixcls.transforms import build_train_transform, build_valid_transform

# Disk kept free beyond the checkpoints: CSVs, the report, the page cache of a busy machine.
DISK_MARGIN_MB = 50.0


class TrainingStopped(RuntimeError):
    """A fold stopped on a non-finite loss; the last good checkpoint is kept."""

    user_facing = True


@dataclass
class FoldResult:
    fold: int
    best_score: float
    best_epoch: int
    valid_probs: np.ndarray  # (n_valid, K), from the best epoch
    history: list[dict[str, float]] = field(default_factory=list)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_states(device: torch.device) -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) generator states, as weights_only-loadable types."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Inverse of `capture_rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def check_distributed_options(cfg: Config, device: torch.device, world_size: int) -> None:
    """Options that only some set-ups support, refused with the reason before anything runs."""
    if cfg.train.sync_bn and world_size > 1 and device.type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm needs CUDA devices (DistributedDataParallel "
                          "refuses it on the CPU); drop --sync-bn or train on GPUs")


class EpochSampler(Sampler):
    """Yields (row, item_seed) pairs of one epoch's permutation, from `skip` on.

    The permutation and the item seeds depend only on `seed` and the epoch, never on state
    carried across epochs. Under torchrun each rank takes every world_size-th item of the
    permutation (padded by wrapping, like DistributedSampler), so with world_size ranks of
    batch B, step s covers the same rows as step s of one process with batch world_size * B.
    `skip` counts this rank's items, i.e. batches already done * batch size.

    The sampler runs in the main process even with persistent loader workers (they receive
    indices only), so `set_epoch` takes effect at the next `iter(loader)`.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _order(self) -> list[int]:
        epoch_seed = derive_seed(self.seed, self.epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            per_rank = -(-self.n // self.world_size)
            order = (order * 2)[:per_rank * self.world_size][self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        return max(0, -(-self.n // self.world_size) - self.skip)

    def __iter__(self):
        epoch_seed = derive_seed(self.seed, self.epoch)
        for row in self._order()[self.skip:]:
            yield row, (epoch_seed * 1_000_003 + row) % 2**32


def _worker_init(worker_id: int) -> None:
    import cv2
    cv2.setNumThreads(0)  # one decode thread per worker; the workers are the parallelism


def _make_loader(dataset: ImageDataset, *, batch_size: int, workers: int, sampler: Sampler | None,
                 drop_last: bool, device: torch.device, seed: int) -> DataLoader:
    # Its own generator: creating an iterator draws a worker base seed, which must not move
    # the global torch RNG (a resumed epoch creates one iterator more than an unbroken one).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(seed))


def prepare_table(cfg: Config) -> tuple[TrainTable, np.ndarray]:
    """The checked table and each row's fold (the table's own `fold` column if it has one)."""
    table = load_train_table(cfg.data.data, csv=cfg.data.csv, images=cfg.data.images,
                             id_col=cfg.data.id_col, label_col=cfg.data.label_col,
                             check_images=cfg.data.check_images)
    frame, source = table.frame, table.csv_path or table.images_dir
    if table.num_classes < 2:
        raise DataError(f"{source}: a classifier needs at least 2 classes, the table has only "
                        f"{table.classes}")
    if "fold" in frame.columns:
        folds = frame["fold"].to_numpy(dtype=np.int64)
        present = sorted(set(folds.tolist()))
        if present != list(range(cfg.train.folds)):
            hint = (f"set --folds {max(present) + 1}" if present == list(range(max(present) + 1))
                    else f"number the folds 0 … {cfg.train.folds - 1}")
            raise ConfigError(f"folds: the fold column of {source} holds folds "
                              f"{_short(present)}, but folds is {cfg.train.folds}; {hint}")
    else:
        check_class_counts(table, cfg.train.folds)
        folds = make_folds(table.labels, cfg.train.folds, cfg.train.seed)
    return table, folds


def _short(values: list[int], limit: int = 10) -> str:
    return str(values) if len(values) <= limit else f"{values[:limit]} … ({len(values)} values)"


def fold_rows(table: TrainTable, folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows (other folds, keep == 1) and validation rows (this fold, all of them)."""
    keep = table.frame["keep"].to_numpy() == 1 if "keep" in table.frame.columns else True
    train_rows = np.flatnonzero((folds != fold) & keep)
    valid_rows = np.flatnonzero(folds == fold)
    return train_rows, valid_rows


def valid_labels_of(table: TrainTable) -> np.ndarray:
    """Validation is scored on the labels as given, never on cleaned ones."""
    if "label_given" in table.frame.columns:
        return table.frame["label_given"].to_numpy(dtype=np.int64)
    return table.labels


@dataclass
class _Fold:
    """Everything one fold trains with; `model` is the bare model, `train_model` maybe DDP."""

    model: nn.Module
    train_model: nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    sampler: EpochSampler
    train_loader: DataLoader
    valid_loader: DataLoader  # this rank's shard of the validation rows
    n_batches: int
    loss_fn: Callable
    mixer: Callable | None
    valid_labels: np.ndarray  # (n_valid,) every validation row, for scoring


def _build_model(cfg: Config, num_classes: int, device: torch.device, world_size: int) -> nn.Module:
    model = build_model(cfg.model, num_classes).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1 and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _build_fold(cfg: Config, table: TrainTable, *, fold: int, train_rows: np.ndarray,
                valid_rows: np.ndarray, device: torch.device,
                cache: list[np.ndarray] | None) -> _Fold:
    ctx = dist.context()
    model = _build_model(cfg, table.num_classes, device, ctx.world_size)
    mean, std = model_mean_std(model)
    batch_size = int(cfg.train.batch_size)
    targets = table.soft_targets if table.soft_targets is not None else table.labels
    paths = table.frame["path"].tolist()

    def dataset(rows: np.ndarray, row_targets: np.ndarray, transform: Callable) -> ImageDataset:
        return ImageDataset([paths[i] for i in rows], row_targets, transform,
                            cache=[cache[i] for i in rows] if cache is not None else None)

    train_ds = dataset(train_rows, targets[train_rows],
                       build_train_transform(cfg.data.preset, cfg.data.img_size, mean=mean, std=std))
    valid_labels = valid_labels_of(table)[valid_rows]
    # Each rank evaluates every world_size-th validation row and the probabilities are gathered:
    # with 8 GPUs and a 4,000-image fold (times the TTA views) evaluating the whole fold on
    # every rank would cost 8x the evaluation time for the same numbers.
    shard = dist.shard_indices(len(valid_rows))
    valid_ds = dataset(valid_rows[shard], valid_labels[shard],
                       build_valid_transform(cfg.data.img_size, mean=mean, std=std))
    sampler = EpochSampler(len(train_ds), seed=derive_seed(cfg.train.seed, fold, 1),
                           rank=ctx.rank, world_size=ctx.world_size)
    train_loader = _make_loader(train_ds, batch_size=batch_size, workers=cfg.data.workers,
                                sampler=sampler, drop_last=len(sampler) > batch_size, device=device,
                                seed=derive_seed(cfg.train.seed, fold, 2))
    valid_loader = _make_loader(valid_ds, batch_size=batch_size * 2, workers=cfg.data.workers,
                                sampler=None, drop_last=False, device=device,
                                seed=derive_seed(cfg.train.seed, fold, 3))
    n_batches = len(train_loader)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, epochs=cfg.train.epochs,
                                steps_per_epoch=-(-n_batches // cfg.train.accum_steps))
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    mixer = None
    if cfg.mix.method != "none":
        from mixcls.mix import Mixer
        mixer = Mixer(cfg.mix.method, alpha=cfg.mix.alpha, prob=cfg.mix.prob,
                      decay_power=cfg.mix.decay_power, max_soft=cfg.mix.max_soft, mode=cfg.mix.mode)
    loss_fn = build_loss(cfg.loss.name, smoothing=cfg.loss.smoothing, t1=cfg.loss.t1, t2=cfg.loss.t2,
                         focal_gamma=cfg.loss.focal_gamma, sce_alpha=cfg.loss.sce_alpha,
                         sce_beta=cfg.loss.sce_beta, taylor_order=cfg.loss.taylor_order)
    train_model = dist.wrap_ddp(model, device) if ctx.world_size > 1 else model
    return _Fold(model=model, train_model=train_model, ema=ema, optimizer=optimizer,
                 scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, sampler=sampler,
                 train_loader=train_loader, valid_loader=valid_loader, n_batches=n_batches,
                 loss_fn=loss_fn, mixer=mixer, valid_labels=valid_labels)


def _eval_model(parts: _Fold) -> nn.Module:
    return parts.ema.module if parts.ema is not None else parts.model


def _weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _fresh_state() -> dict[str, Any]:
    return {"epoch": 0, "batch": 0, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0,
            "history": [], "best_probs": None, "epoch_stats": None, "rng": None, "mix_rng": None}


def _last_checkpoint(cfg: Config, table: TrainTable, parts: _Fold, state: dict[str, Any], *,
                     fold: int, epoch: int, batch: int, mix_gen: torch.Generator | None,
                     epoch_stats: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """last.pt: what a resume needs to continue the same arithmetic (only weights_only types).

    `model` holds the weights predict would use (the EMA when there is one, as in best.pt);
    `train_model` then holds the raw weights the optimizer works on.
    """
    probs = state["best_probs"]
    return {
        "model": _eval_model(parts).state_dict(), "config": config_to_flat(cfg),
        "classes": list(table.classes), "fold": fold, "epoch": epoch, "batch": batch,
        "train_model": parts.model.state_dict() if parts.ema is not None else None,
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "best_score": state["best_score"], "best_epoch": state["best_epoch"],
        "bad_epochs": state["bad_epochs"], "history": state["history"],
        "best_probs": torch.from_numpy(probs) if probs is not None else None,
        "rng": capture_rng_states(device) if batch else None,
        "mix_rng": mix_gen.get_state() if mix_gen is not None and batch else None,
        "epoch_stats": epoch_stats if batch else None,
        "world_size": dist.context().world_size, "batch_size": int(cfg.train.batch_size),
        "accum_steps": cfg.train.accum_steps,
    }


def _restore(ckpt: dict[str, Any], parts: _Fold, *, cfg: Config, fold: int) -> dict[str, Any]:
    """Load last.pt into the fold's objects; return the loop state it continues from."""
    _check_resumable(ckpt, cfg=cfg, fold=fold)
    parts.model.load_state_dict(ckpt["train_model"] if ckpt.get("train_model") is not None
                                else ckpt["model"])
    if parts.ema is not None:
        parts.ema.module.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    if parts.scaler is not None and ckpt.get("scaler") is not None:
        parts.scaler.load_state_dict(ckpt["scaler"])
    best = ckpt.get("best_probs")
    stats = ckpt.get("epoch_stats")
    return {"epoch": ckpt["epoch"], "batch": ckpt["batch"], "best_score": ckpt["best_score"],
            "best_epoch": ckpt["best_epoch"], "bad_epochs": ckpt["bad_epochs"],
            "history": list(ckpt["history"]), "best_probs": best.numpy() if best is not None else None,
            "epoch_stats": _rank_stats(stats) if stats is not None else None,
            "rng": ckpt.get("rng"), "mix_rng": ckpt.get("mix_rng")}


def _partial_stats(stats: EpochStats) -> dict[str, Any]:
    """A step checkpoint's record of its epoch so far: the common fields and every rank's sums.

    Each rank continues its own sums after a resume, so the epoch's totals are added in the
    same order as in an unbroken run.
    """
    sums = dist.all_gather_floats([stats.loss_sum, stats.correct, stats.images])
    return dict(stats.to_dict(), rank_sums=sums)


def _rank_stats(saved: dict[str, Any]) -> EpochStats:
    """This rank's part of a step checkpoint's partial epoch."""
    loss_sum, correct, images = saved["rank_sums"][dist.context().rank]
    common = {k: v for k, v in saved.items() if k != "rank_sums"}
    return EpochStats(**dict(common, loss_sum=loss_sum, correct=int(correct), images=int(images)))


def _check_resumable(ckpt: dict[str, Any], *, cfg: Config, fold: int) -> None:
    """A step checkpoint can only be continued by the same ranks with the same batches."""
    if ckpt.get("fold") != fold:
        raise RunError(f"fold {fold}: its last.pt belongs to fold {ckpt.get('fold')}")
    now = {"world_size": dist.context().world_size, "batch_size": int(cfg.train.batch_size),
           "accum_steps": cfg.train.accum_steps}
    changed = {k: (ckpt.get(k), v) for k, v in now.items() if ckpt.get(k, v) != v}
    if changed and ckpt["batch"]:
        said = ", ".join(f"{k} was {old}, is {new}" for k, (old, new) in changed.items())
        raise ConfigError(f"fold {fold}: last.pt was saved in the middle of epoch "
                          f"{ckpt['epoch'] + 1} ({said}); resume with the same number of processes "
                          "and batch size to continue that epoch")


def _start_epoch(cfg: Config, parts: _Fold, state: dict[str, Any], *, fold: int, epoch: int,
                 start_batch: int, device: torch.device) -> torch.Generator:
    """Seed (or restore) every generator for `epoch`; return the mixing generator."""
    epoch_seed = derive_seed(cfg.train.seed, fold, epoch)
    mix_gen = torch.Generator(device=device).manual_seed(derive_seed(epoch_seed, 1))
    if start_batch:
        restore_rng_states(state["rng"], device)
        if state["mix_rng"] is not None:
            mix_gen.set_state(state["mix_rng"])
    else:
        seed_everything(epoch_seed)
    parts.sampler.set_epoch(epoch, skip=start_batch * int(cfg.train.batch_size))
    return mix_gen


def _evaluate_fold(parts: _Fold, *, cfg: Config, device: torch.device,
                   num_classes: int) -> tuple[np.ndarray, float]:
    """Probabilities (n_valid, K) of every validation row and their mean CE loss, on every rank."""
    n_valid = len(parts.valid_labels)
    dist.broadcast_buffers(_eval_model(parts))
    local, local_loss = evaluate(_eval_model(parts), parts.valid_loader, device=device,
                                 loss_fn=build_loss("ce"), num_classes=num_classes,
                                 amp_dtype=parts.amp_dtype, channels_last=cfg.model.channels_last)
    loss_sum, = dist.all_reduce_sum([float(local_loss) * len(local)])
    return dist.gather_shards(local, n_valid), loss_sum / max(n_valid, 1)


def _train_epoch(cfg: Config, parts: _Fold, state: dict[str, Any], *, fold: int, epoch: int,
                 start_batch: int, mix_gen: torch.Generator, device: torch.device, progress: bool,
                 save_last: Callable[..., None], num_classes: int) -> EpochStats:
    """One epoch (or its rest after a resume); the sums of every rank's images."""
    save_every, accum = cfg.train.save_every_steps, cfg.train.accum_steps

    def on_step(i: int, stats: EpochStats) -> None:
        if save_every and (i + 1) % accum == 0 and ((i + 1) // accum) % save_every == 0 \
                and i + 1 < parts.n_batches:
            save_last(epoch=epoch, batch=i + 1, mix_gen=mix_gen, epoch_stats=_partial_stats(stats))

    mixing = parts.mixer if epoch < cfg.train.epochs - cfg.mix.off_epochs else None
    try:
        stats = train_one_epoch(
            parts.train_model, parts.train_loader, parts.optimizer, loss_fn=parts.loss_fn,
            device=device, num_classes=num_classes, scheduler=parts.scheduler, mixer=mixing,
            generator=mix_gen, accum_steps=accum, scaler=parts.scaler, amp_dtype=parts.amp_dtype,
            grad_clip=cfg.train.grad_clip, ema=parts.ema, channels_last=cfg.model.channels_last,
            start_batch=start_batch, n_batches=parts.n_batches,
            start_stats=state["epoch_stats"] if start_batch else None, on_step=on_step,
            progress=progress and dist.context().is_main,
            desc=f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}")
    except NonFiniteLossError as exc:
        raise TrainingStopped(f"fold {fold}, epoch {epoch + 1}: {exc}; {_stopped_hint(state)}") from None
    # One skipped step is a glitch (CPU bf16 kernels); an epoch of them is a diverged run.
    if stats.steps >= 2 and stats.skipped_steps == stats.steps:
        raise TrainingStopped(f"fold {fold}, epoch {epoch + 1}: every optimizer step ({stats.steps}) "
                              f"had NaN or infinite gradients; {_stopped_hint(state)}")
    if not _weights_finite(parts.model):
        raise TrainingStopped(f"fold {fold}, epoch {epoch + 1}: the weights became NaN or infinite "
                              f"at the epoch's last step; {_stopped_hint(state)}")
    loss_sum, correct, images = dist.all_reduce_sum([stats.loss_sum, stats.correct, stats.images])
    return dataclasses.replace(stats, loss_sum=loss_sum, correct=int(correct), images=int(images))


def _stopped_hint(state: dict[str, Any]) -> str:
    if not dist.context().is_main:
        return "training stopped (rank 0 keeps the last good checkpoint)"
    path = state.get("last_path")
    if path is not None and Path(path).is_file():
        return f"training stopped, the last good checkpoint {path} is kept (try a lower --lr or --grad-clip)"
    return "training stopped before any checkpoint (try a lower --lr or --grad-clip)"


def fit_fold(cfg: Config, table: TrainTable, *, fold: int, train_rows: np.ndarray,
             valid_rows: np.ndarray, fold_dir: Path, device: torch.device, progress: bool = True,
             cache: list[np.ndarray] | None = None, resume: bool = False,
             log: Callable[[str], None] = print) -> FoldResult:
    """Train one fold; write fold_dir/best.pt, last.pt, history.csv; return the best epoch's probs."""
    ctx = dist.context()
    seed_everything(derive_seed(cfg.train.seed, fold))
    parts = _build_fold(cfg, table, fold=fold, train_rows=train_rows, valid_rows=valid_rows,
                        device=device, cache=cache)
    last_path = Path(fold_dir) / "last.pt"
    state = _fresh_state()
    if resume:  # rank 0 reads the run folder; the others receive its checkpoint
        ckpt = dist.run_on_main(lambda: load_checkpoint(last_path) if last_path.is_file() else None)
        if ckpt is not None:
            state = _restore(ckpt, parts, cfg=cfg, fold=fold)
            log(f"fold {fold}: resuming at epoch {state['epoch'] + 1}, batch {state['batch']} "
                f"of {parts.n_batches}")
    state["last_path"] = str(last_path) if ctx.is_main else None

    def save_last(*, epoch: int, batch: int, mix_gen: torch.Generator | None = None,
                  epoch_stats: dict[str, Any] | None = None) -> None:
        # Never replace a good checkpoint with weights that already blew up.
        if ctx.is_main and _weights_finite(parts.model):
            save_checkpoint(last_path, _last_checkpoint(
                cfg, table, parts, state, fold=fold, epoch=epoch, batch=batch, mix_gen=mix_gen,
                epoch_stats=epoch_stats, device=device))

    for epoch in range(state["epoch"], cfg.train.epochs):
        if _patience_spent(cfg, state):
            break  # decided before a resume
        start_batch = state["batch"] if epoch == state["epoch"] else 0
        mix_gen = _start_epoch(cfg, parts, state, fold=fold, epoch=epoch, start_batch=start_batch,
                               device=device)
        stats = _train_epoch(cfg, parts, state, fold=fold, epoch=epoch, start_batch=start_batch,
                             mix_gen=mix_gen, device=device, progress=progress, save_last=save_last,
                             num_classes=table.num_classes)
        probs, valid_loss = _evaluate_fold(parts, cfg=cfg, device=device, num_classes=table.num_classes)
        score = float((probs.argmax(1) == parts.valid_labels).mean())
        _end_epoch(cfg, table, parts, state, fold=fold, epoch=epoch, stats=stats, probs=probs,
                   valid_loss=valid_loss, score=score, fold_dir=Path(fold_dir), log=log)
        save_last(epoch=epoch + 1, batch=0)
        if _patience_spent(cfg, state):
            log(f"fold {fold}: early stop after epoch {epoch + 1} "
                f"({cfg.train.patience} epochs without a better valid accuracy)")
            break
    return FoldResult(fold=fold, best_score=state["best_score"], best_epoch=state["best_epoch"],
                      valid_probs=state["best_probs"], history=state["history"])


def _patience_spent(cfg: Config, state: dict[str, Any]) -> bool:
    return cfg.train.patience is not None and state["bad_epochs"] >= cfg.train.patience


def _end_epoch(cfg: Config, table: TrainTable, parts: _Fold, state: dict[str, Any], *, fold: int,
               epoch: int, stats: EpochStats, probs: np.ndarray, valid_loss: float, score: float,
               fold_dir: Path, log: Callable[[str], None]) -> None:
    """History row, log line, best.pt and history.csv (rank 0) after an epoch's evaluation."""
    state["history"].append({"epoch": epoch + 1, "train_loss": stats.loss,
                             "train_accuracy": stats.accuracy, "valid_loss": valid_loss,
                             "valid_accuracy": score, "lr": stats.lr, "seconds": stats.seconds,
                             "images_per_s": stats.images_per_s, "skipped_steps": stats.skipped_steps})
    skipped = f", {stats.skipped_steps} of {stats.steps} steps skipped (non-finite gradients)" \
        if stats.skipped_steps else ""
    log(f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}: train_loss {stats.loss:.4f} "
        f"valid_loss {valid_loss:.4f} valid_acc {score:.4f} lr {stats.lr:.2e} "
        f"{stats.images_per_s:.0f} img/s ({stats.seconds:.1f}s{skipped})")
    is_main = dist.context().is_main
    if score > state["best_score"]:
        state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_probs=probs)
        if is_main:
            save_checkpoint(fold_dir / "best.pt", {
                "model": _eval_model(parts).state_dict(), "config": config_to_flat(cfg),
                "classes": list(table.classes), "fold": fold, "epoch": epoch + 1, "score": score})
    else:
        state["bad_epochs"] += 1
    if is_main:
        atomic_write_csv(fold_dir / "history.csv", pd.DataFrame(state["history"]))


def write_run_header(cfg: Config, table: TrainTable, folds: np.ndarray, run_dir: Path) -> None:
    """config.yaml, classes.json, dataset.json, folds.csv: what every later step reads."""
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_json(run_dir / "classes.json", table.classes)
    atomic_write_json(run_dir / "dataset.json", {
        "csv": str(table.csv_path) if table.csv_path else None, "images": str(table.images_dir),
        "rows": len(table.frame), "integer_labels": table.integer_labels,
        "soft_targets": table.soft_targets is not None})
    atomic_write_csv(run_dir / "folds.csv", pd.DataFrame({"image_id": table.frame["image_id"], "fold": folds}))


def estimate_run_mb(cfg: Config, num_classes: int, n_folds: int) -> float:
    """Disk the run's checkpoints take: per fold best.pt + last.pt, plus one last.pt being replaced.

    The weights are counted on the meta device (no memory, no download); an architecture that
    cannot be built there counts as nothing and only the margin is asked for.
    """
    try:
        with torch.device("meta"):
            model = build_model(dataclasses.replace(cfg.model, pretrained=False, pretrained_file=None),
                                num_classes)
    except Exception:  # the real build reports the real problem later
        return DISK_MARGIN_MB
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    moments = {"adamw": 2, "adam": 2, "sgd": 1 if cfg.optim.momentum else 0}.get(cfg.optim.name, 2)
    last_mb = weights_mb * (1 + moments + (1 if cfg.train.ema else 0))
    return n_folds * (weights_mb + last_mb) + last_mb + DISK_MARGIN_MB


def open_run_folder(cfg: Config, table: TrainTable, folds: np.ndarray, run_dir: Path, *,
                    resume: bool, chosen: list[int],
                    log: Callable[[str], None]) -> tuple[np.ndarray, list[int]]:
    """Check and start (or reopen) the run folder; return the folds and the folds already finished.

    Runs on rank 0 only and before any training, so a refused run costs seconds, not epochs.
    """
    need_mb = estimate_run_mb(cfg, table.num_classes, len(chosen))
    if not resume:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise RunError(f"run folder {run_dir} already holds files; pass another --out, or "
                           f"--resume {run_dir} to continue it")
        check_writable(run_dir, min_free_mb=need_mb)
        write_run_header(cfg, table, folds, run_dir)
        return folds, []
    check_writable(run_dir, min_free_mb=need_mb)
    if not (run_dir / "folds.csv").is_file():
        raise RunError(f"--resume {run_dir}: no folds.csv there; the run stopped before it began, "
                       "start it again with --out")
    saved = pd.read_csv(run_dir / "folds.csv", dtype={"image_id": str}, keep_default_na=False)
    ids = table.frame["image_id"].tolist()
    if saved["image_id"].tolist() != ids:
        raise RunError(f"--resume {run_dir}: its folds.csv lists {len(saved)} images, the table now "
                       f"has {len(ids)} and they differ; the data changed since the run started")
    stale = remove_stale_temporaries(run_dir)
    if stale:
        log(f"removed {len(stale)} half-written file(s) of the interrupted run")
    finished = [k for k in chosen if (run_dir / f"fold_{k}" / "oof.csv").is_file()]
    return saved["fold"].to_numpy(dtype=np.int64), finished


def _oof_frame(table: TrainTable, folds: np.ndarray, rows: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"image_id": table.frame["image_id"].to_numpy()[rows],
                          "label": valid_labels_of(table)[rows], "fold": folds[rows],
                          "pred": probs.argmax(1)})
    frame[prob_columns(probs.shape[1])] = probs
    frame.index = rows
    return frame


def compute_metrics(oof: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """CV accuracy, macro F1, per-fold and per-class accuracy, confusion matrix from an OOF table."""
    labels, pred = oof["label"].to_numpy(), oof["pred"].to_numpy()
    k = len(classes)
    cm = confusion_matrix(labels, pred, labels=list(range(k)))
    per_class = {classes[i]: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i in range(k)}
    per_fold = {str(f): float((g["label"] == g["pred"]).mean()) for f, g in oof.groupby("fold")}
    return {"cv_accuracy": float((labels == pred).mean()),
            "cv_macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(k)),
                                          zero_division=0)),
            "fold_accuracy": per_fold, "class_accuracy": per_class, "confusion": cm.tolist(),
            "classes": classes, "rows": int(len(oof))}


def fit_folds(cfg: Config, run_dir: str | Path, *, progress: bool = True, resume: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the configured folds into `run_dir`; write oof.csv and metrics.json; return metrics.

    Under torchrun call it on every rank: rank 0 writes, every rank trains; every rank gets the
    metrics.
    """
    run_dir = Path(run_dir)
    ctx = dist.context()
    log = log if ctx.is_main else _silent
    # Rank 0 checks the table and decodes every image once; the others receive the checked table.
    table, folds = dist.run_on_main(lambda: prepare_table(cfg))
    device = dist.device_for(cfg.train.device) if ctx.world_size > 1 else resolve_device(cfg.train.device)
    check_distributed_options(cfg, device, ctx.world_size)
    chosen = cfg.train.train_folds if cfg.train.train_folds is not None else list(range(cfg.train.folds))
    folds, finished = dist.run_on_main(lambda: open_run_folder(
        cfg, table, folds, run_dir, resume=resume, chosen=chosen, log=log))
    if cfg.train.batch_size == "auto":
        planned = dist.run_on_main(lambda: _plan_auto_batch(cfg, table.num_classes, device, log))
        cfg.train.batch_size, cfg.train.accum_steps = planned
    cache = load_image_cache(table.frame["path"].tolist(), mode=cfg.data.cache_images)
    started = time.perf_counter()
    for fold in chosen:
        fold_dir = run_dir / f"fold_{fold}"
        if fold in finished:
            log(f"fold {fold}: already finished, skipped")
            continue
        if ctx.is_main:
            fold_dir.mkdir(parents=True, exist_ok=True)
        train_rows, valid_rows = fold_rows(table, folds, fold)
        result = fit_fold(cfg, table, fold=fold, train_rows=train_rows, valid_rows=valid_rows,
                          fold_dir=fold_dir, device=device, progress=progress, cache=cache,
                          resume=resume, log=log)
        if ctx.is_main:
            atomic_write_csv(fold_dir / "oof.csv", _oof_frame(table, folds, valid_rows, result.valid_probs))
        dist.barrier()
    return dist.run_on_main(lambda: _write_summary(cfg, table, run_dir, chosen=chosen, resume=resume,
                                                   seconds=time.perf_counter() - started, log=log))


def _silent(message: str) -> None:
    """Only rank 0 speaks."""


def _write_summary(cfg: Config, table: TrainTable, run_dir: Path, *, chosen: list[int], resume: bool,
                   seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """oof.csv (original row order) and metrics.json from the folds' own oof.csv files; the report."""
    oof = pd.concat([pd.read_csv(run_dir / f"fold_{f}" / "oof.csv") for f in chosen])
    order = {image_id: i for i, image_id in enumerate(table.frame["image_id"])}
    oof = oof.assign(_row=oof["image_id"].astype(str).map(order)).sort_values("_row").drop(columns="_row")
    atomic_write_csv(run_dir / "oof.csv", oof)
    metrics = compute_metrics(oof, table.classes)
    metrics["folds_trained"] = chosen
    metrics["seconds"] = seconds + _previous_seconds(run_dir, resume)
    metrics["batch_size"], metrics["accum_steps"] = cfg.train.batch_size, cfg.train.accum_steps
    metrics["world_size"] = dist.context().world_size
    atomic_write_json(run_dir / "metrics.json", metrics)
    log(f"CV accuracy {metrics['cv_accuracy']:.4f}, macro F1 {metrics['cv_macro_f1']:.4f} "
        f"over {len(oof)} OOF rows")
    _write_report_if_possible(run_dir, log)
    return metrics


def _previous_seconds(run_dir: Path, resume: bool) -> float:
    if not resume or not (run_dir / "metrics.json").is_file():
        return 0.0
    return float(read_json(run_dir / "metrics.json").get("seconds", 0.0))


def _plan_auto_batch(cfg: Config, num_classes: int, device: torch.device,
                     log: Callable[[str], None]) -> tuple[int, int]:
    """(micro-batch, accumulation steps) from the largest micro-batch that fits on `device`."""
    from mixcls.memory import find_max_batch, plan_batch
    micro = find_max_batch(cfg.model.name, cfg.data.img_size, num_classes=num_classes,
                           budget_mb=cfg.train.max_memory_mb, device=str(device), amp=cfg.train.amp)
    effective = cfg.train.effective_batch or micro
    batch, accum = plan_batch(effective, micro)
    log(f"batch size auto: micro-batch {batch} x {accum} accumulation steps "
        f"(largest fitting micro-batch {micro}, effective batch {batch * accum})")
    return batch, accum


def _write_report_if_possible(run_dir: Path, log: Callable[[str], None]) -> None:
    """The report is a view of files already written: if it fails, the run still stands."""
    from mixcls.report import write_report

    try:
        path = write_report(run_dir)
    except Exception as exc:  # matplotlib, PIL and file errors alike must not undo a finished run
        log(f"report not written ({exc.__class__.__name__}: {exc}); retry with: mixcls report {run_dir}")
        return
    log(f"report: {path}")
