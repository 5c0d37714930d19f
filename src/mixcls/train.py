"""k-fold training: one fold at a time, OOF probabilities in the original row order.

Randomness is derived from (seed, fold, epoch) at each epoch start, and each image's
augmentation from (epoch seed, row), so a run resumed after a crash, or run with another
number of loader workers, sees exactly the same batches.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch.utils.data import DataLoader, Sampler

from mixcls import distributed as dist
from mixcls.config import Config, ConfigError, config_to_flat, dump_config
from mixcls.data import (ImageDataset, TrainTable, check_class_counts, load_image_cache,
                         load_train_table)
from mixcls.engine import NonFiniteLossError, evaluate, train_one_epoch
from mixcls.folds import make_folds
from mixcls.losses import build_loss
from mixcls.models import build_model, model_mean_std
from mixcls.optim import build_optimizer, build_scheduler
from mixcls.runs import (RunError, atomic_write_csv, atomic_write_json, atomic_write_text,
                         check_writable, load_checkpoint, read_json, save_checkpoint)
from mixcls.transforms import build_train_transform, build_valid_transform


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available here; use cpu")
    return device


def amp_setup(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype and GradScaler: fp16 needs a scaler (and CUDA), bf16 needs none."""
    if amp == "none":
        return None, None
    if amp == "bf16":
        return torch.bfloat16, None
    if device.type != "cuda":
        raise ConfigError("amp: fp16 needs CUDA (its GradScaler guards fp16 gradients); "
                          "use --amp bf16 on the CPU")
    return torch.float16, torch.amp.GradScaler("cuda")


class EpochSampler(Sampler):
    """Yields (row, item_seed) pairs of one epoch's permutation, from `skip` on.

    The permutation and the item seeds depend only on `seed` and the epoch, never on state
    carried across epochs. Under torchrun each rank takes every world_size-th item of the
    permutation (padded by wrapping, like DistributedSampler).
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
        return -(-self.n // self.world_size) - self.skip

    def __iter__(self):
        epoch_seed = derive_seed(self.seed, self.epoch)
        for row in self._order()[self.skip:]:
            yield row, (epoch_seed * 1_000_003 + row) % 2**32


def _worker_init(worker_id: int) -> None:
    import cv2
    cv2.setNumThreads(0)  # one decode thread per worker; the workers are the parallelism


def _make_loader(dataset: ImageDataset, *, batch_size: int, workers: int, sampler: Sampler | None,
                 drop_last: bool, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=_worker_init)


def prepare_table(cfg: Config) -> tuple[TrainTable, np.ndarray]:
    """The checked table and each row's fold (the table's own `fold` column if it has one)."""
    table = load_train_table(cfg.data.data, csv=cfg.data.csv, images=cfg.data.images,
                             id_col=cfg.data.id_col, label_col=cfg.data.label_col,
                             check_images=cfg.data.check_images)
    frame = table.frame
    if "fold" in frame.columns:
        folds = frame["fold"].to_numpy(dtype=np.int64)
        present = sorted(set(folds.tolist()))
        if present != list(range(cfg.train.folds)):
            raise ConfigError(f"folds: the table's fold column holds folds {present}, but folds is "
                              f"{cfg.train.folds}; set --folds {max(present) + 1}")
    else:
        check_class_counts(table, cfg.train.folds)
        folds = make_folds(table.labels, cfg.train.folds, cfg.train.seed)
    return table, folds


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


def _checkpoint_state(model: torch.nn.Module, ema: Any, cfg: Config, classes: list[str],
                      **extra: Any) -> dict[str, Any]:
    weights = (ema.module if ema is not None else model).state_dict()
    return {"model": weights, "config": config_to_flat(cfg), "classes": list(classes), **extra}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def fit_fold(cfg: Config, table: TrainTable, *, fold: int, train_rows: np.ndarray,
             valid_rows: np.ndarray, fold_dir: Path, device: torch.device, progress: bool = True,
             cache: list[np.ndarray] | None = None, resume: bool = False,
             log: Callable[[str], None] = print) -> FoldResult:
    """Train one fold; write fold_dir/best.pt, last.pt, history.csv; return the best epoch's probs."""
    ctx = dist.context()
    seed_everything(derive_seed(cfg.train.seed, fold))
    model = build_model(cfg.model, table.num_classes).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.world_size > 1 and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    mean, std = model_mean_std(model)
    batch_size = int(cfg.train.batch_size)
    targets = table.soft_targets if table.soft_targets is not None else table.labels
    paths = table.frame["path"].tolist()
    train_ds = ImageDataset([paths[i] for i in train_rows], targets[train_rows],
                            build_train_transform(cfg.data.preset, cfg.data.img_size, mean=mean, std=std),
                            cache=[cache[i] for i in train_rows] if cache is not None else None)
    valid_labels = valid_labels_of(table)[valid_rows]
    valid_ds = ImageDataset([paths[i] for i in valid_rows], valid_labels,
                            build_valid_transform(cfg.data.img_size, mean=mean, std=std),
                            cache=[cache[i] for i in valid_rows] if cache is not None else None)
    sampler = EpochSampler(len(train_ds), seed=derive_seed(cfg.train.seed, fold, 1),
                           rank=ctx.rank, world_size=ctx.world_size)
    drop_last = len(sampler) > batch_size
    train_loader = _make_loader(train_ds, batch_size=batch_size, workers=cfg.data.workers,
                                sampler=sampler, drop_last=drop_last, device=device)
    valid_loader = _make_loader(valid_ds, batch_size=batch_size * 2, workers=cfg.data.workers,
                                sampler=None, drop_last=False, device=device)
    n_batches = len(train_loader)
    steps_per_epoch = -(-n_batches // cfg.train.accum_steps)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, steps_per_epoch=steps_per_epoch,
                                epochs=cfg.train.epochs)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    train_model = dist.wrap_ddp(model, device) if ctx.world_size > 1 else model
    loss_fn = build_loss(cfg.loss.name, smoothing=cfg.loss.smoothing, t1=cfg.loss.t1, t2=cfg.loss.t2,
                         focal_gamma=cfg.loss.focal_gamma, sce_alpha=cfg.loss.sce_alpha,
                         sce_beta=cfg.loss.sce_beta, taylor_order=cfg.loss.taylor_order)
    eval_loss = build_loss("ce")
    mixer = None
    if cfg.mix.method != "none":
        from mixcls.mix import Mixer
        mixer = Mixer(cfg.mix.method, alpha=cfg.mix.alpha, prob=cfg.mix.prob,
                      decay_power=cfg.mix.decay_power, max_soft=cfg.mix.max_soft, mode=cfg.mix.mode)

    state = {"epoch": 0, "batch": 0, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0,
             "history": [], "best_probs": None}
    last_path = fold_dir / "last.pt"
    if resume and last_path.is_file():
        state = _restore(last_path, model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=scaler, ema=ema, device=device)
        log(f"fold {fold}: resuming at epoch {state['epoch']} batch {state['batch']}")

    def save_last(epoch: int, batch: int, mix_gen: torch.Generator | None) -> None:
        if not ctx.is_main:
            return
        save_checkpoint(last_path, _checkpoint_state(
            _unwrap(train_model), ema, cfg, table.classes, fold=fold, epoch=epoch, batch=batch,
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            ema_state=ema.state_dict() if ema is not None else None,
            best_score=state["best_score"], best_epoch=state["best_epoch"],
            bad_epochs=state["bad_epochs"], history=state["history"],
            best_probs=torch.from_numpy(state["best_probs"]) if state["best_probs"] is not None else None,
            torch_rng=torch.get_rng_state(),
            mix_rng=mix_gen.get_state() if mix_gen is not None else None,
            epoch_stats=state.get("epoch_stats")))

    for epoch in range(state["epoch"], cfg.train.epochs):
        start_batch = state["batch"] if epoch == state["epoch"] else 0
        epoch_seed = derive_seed(cfg.train.seed, fold, epoch)
        mix_gen = torch.Generator(device=device).manual_seed(epoch_seed)
        if start_batch and state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
            if state.get("mix_rng") is not None:
                mix_gen.set_state(state["mix_rng"])
        else:
            torch.manual_seed(epoch_seed)
        sampler.set_epoch(epoch, skip=start_batch * batch_size)
        mixing = mixer if epoch < cfg.train.epochs - cfg.mix.off_epochs else None
        save_every = cfg.train.save_every_steps

        def on_step(i: int, _epoch: int = epoch, _gen: torch.Generator = mix_gen) -> None:
            step_index = (i + 1) // cfg.train.accum_steps
            if save_every and (i + 1) % cfg.train.accum_steps == 0 and step_index % save_every == 0 \
                    and i + 1 < n_batches:
                save_last(_epoch, i + 1, _gen)

        try:
            stats = train_one_epoch(
                train_model, train_loader, optimizer, loss_fn=loss_fn, device=device,
                num_classes=table.num_classes, scheduler=scheduler, mixer=mixing, generator=mix_gen,
                accum_steps=cfg.train.accum_steps, scaler=scaler, amp_dtype=amp_dtype,
                grad_clip=cfg.train.grad_clip, ema=ema, channels_last=cfg.model.channels_last,
                start_batch=start_batch, n_batches=n_batches, on_step=on_step,
                progress=progress and ctx.is_main, desc=f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}")
        except NonFiniteLossError as exc:
            raise TrainingStopped(f"fold {fold}, epoch {epoch + 1}: {exc}; training stopped, the last "
                                  f"good checkpoint is {last_path if last_path.exists() else 'none'}") from None
        eval_model = ema.module if ema is not None else _unwrap(train_model)
        probs, valid_loss = evaluate(eval_model, valid_loader, device=device, loss_fn=eval_loss,
                                     num_classes=table.num_classes, amp_dtype=amp_dtype,
                                     channels_last=cfg.model.channels_last)
        score = float((probs.argmax(1) == valid_labels).mean())
        seconds = stats.seconds * (n_batches / max(1, n_batches - start_batch))
        state["history"].append({"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                                 "valid_loss": valid_loss, "valid_accuracy": score, "lr": stats.lr,
                                 "seconds": stats.seconds, "images_per_s": stats.images_per_s * ctx.world_size})
        log(f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}: train_loss {stats.loss:.4f} "
            f"valid_loss {valid_loss:.4f} valid_acc {score:.4f} lr {stats.lr:.2e} "
            f"{stats.images_per_s * ctx.world_size:.0f} img/s ({seconds:.1f}s)")
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_probs=probs)
            if ctx.is_main:
                save_checkpoint(fold_dir / "best.pt", _checkpoint_state(
                    _unwrap(train_model), ema, cfg, table.classes, fold=fold, epoch=epoch + 1, score=score))
        else:
            state["bad_epochs"] += 1
        if ctx.is_main:
            atomic_write_csv(fold_dir / "history.csv", pd.DataFrame(state["history"]))
        stop = cfg.train.patience is not None and state["bad_epochs"] >= cfg.train.patience
        save_last(epoch + 1, 0, None)
        if stop:
            log(f"fold {fold}: early stop after epoch {epoch + 1} "
                f"({cfg.train.patience} epochs without a better valid accuracy)")
            break
    return FoldResult(fold=fold, best_score=state["best_score"], best_epoch=state["best_epoch"],
                      valid_probs=state["best_probs"], history=state["history"])


def _restore(path: Path, *, model, optimizer, scheduler, scaler, ema, device) -> dict[str, Any]:
    ckpt = load_checkpoint(path, map_location=device)
    model.load_state_dict(ckpt["model"] if ema is None else ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema_state") is not None:
        ema.load_state_dict(ckpt["ema_state"])
    best = ckpt.get("best_probs")
    return {"epoch": ckpt["epoch"], "batch": ckpt["batch"], "best_score": ckpt["best_score"],
            "best_epoch": ckpt["best_epoch"], "bad_epochs": ckpt["bad_epochs"],
            "history": list(ckpt["history"]), "best_probs": best.numpy() if best is not None else None,
            "torch_rng": ckpt.get("torch_rng").cpu() if ckpt.get("torch_rng") is not None else None,
            "mix_rng": ckpt.get("mix_rng")}


def write_run_header(cfg: Config, table: TrainTable, folds: np.ndarray, run_dir: Path) -> None:
    """config.yaml, classes.json, dataset.json, folds.csv: what every later step reads."""
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_json(run_dir / "classes.json", table.classes)
    atomic_write_json(run_dir / "dataset.json", {
        "csv": str(table.csv_path) if table.csv_path else None, "images": str(table.images_dir),
        "rows": len(table.frame), "integer_labels": table.integer_labels,
        "soft_targets": table.soft_targets is not None})
    atomic_write_csv(run_dir / "folds.csv", pd.DataFrame({"image_id": table.frame["image_id"], "fold": folds}))


def _oof_frame(table: TrainTable, folds: np.ndarray, rows: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"image_id": table.frame["image_id"].to_numpy()[rows],
                          "label": valid_labels_of(table)[rows], "fold": folds[rows],
                          "pred": probs.argmax(1)})
    for k in range(probs.shape[1]):
        frame[f"prob_{k}"] = probs[:, k]
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
    """Train the configured folds into `run_dir`; write oof.csv and metrics.json; return metrics."""
    run_dir = Path(run_dir)
    ctx = dist.context()
    table, folds = prepare_table(cfg)
    if ctx.is_main:
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            raise RunError(f"run folder {run_dir} already holds files; pass another --out, or "
                           f"--resume {run_dir} to continue it")
        check_writable(run_dir)
        write_run_header(cfg, table, folds, run_dir)
    device = dist.device_for(cfg.train.device) if ctx.world_size > 1 else resolve_device(cfg.train.device)
    if cfg.train.batch_size == "auto":
        cfg = _plan_auto_batch(cfg, table.num_classes, device, log)
    cache = load_image_cache(table.frame["path"].tolist(), mode=cfg.data.cache_images)
    started = time.perf_counter()
    chosen = cfg.train.train_folds if cfg.train.train_folds is not None else list(range(cfg.train.folds))
    for fold in chosen:
        fold_dir = run_dir / f"fold_{fold}"
        if (fold_dir / "oof.csv").is_file() and resume:
            log(f"fold {fold}: already finished, skipped")
            continue
        if ctx.is_main:
            fold_dir.mkdir(parents=True, exist_ok=True)
        train_rows, valid_rows = fold_rows(table, folds, fold)
        result = fit_fold(cfg, table, fold=fold, train_rows=train_rows, valid_rows=valid_rows,
                          fold_dir=fold_dir, device=device, progress=progress, cache=cache,
                          resume=resume, log=log if ctx.is_main else (lambda msg: None))
        if ctx.is_main:
            atomic_write_csv(fold_dir / "oof.csv", _oof_frame(table, folds, valid_rows, result.valid_probs))
        dist.barrier()
    if not ctx.is_main:
        return {}
    parts = [pd.read_csv(run_dir / f"fold_{f}" / "oof.csv") for f in chosen]
    oof = pd.concat(parts)
    order = {image_id: i for i, image_id in enumerate(table.frame["image_id"])}
    oof = oof.assign(_row=oof["image_id"].astype(str).map(order)).sort_values("_row").drop(columns="_row")
    atomic_write_csv(run_dir / "oof.csv", oof)
    metrics = compute_metrics(oof, table.classes)
    metrics["folds_trained"] = chosen
    metrics["seconds"] = time.perf_counter() - started + _previous_seconds(run_dir, resume)
    metrics["batch_size"], metrics["accum_steps"] = cfg.train.batch_size, cfg.train.accum_steps
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
                     log: Callable[[str], None]) -> Config:
    from mixcls.memory import find_max_batch, plan_batch
    micro = find_max_batch(cfg.model.name, cfg.data.img_size, num_classes=num_classes,
                           budget_mb=cfg.train.max_memory_mb, device=str(device), amp=cfg.train.amp)
    effective = cfg.train.effective_batch or micro
    batch, accum = plan_batch(effective, micro)
    log(f"batch size auto: micro-batch {batch} x {accum} accumulation steps "
        f"(largest fitting micro-batch {micro}, effective batch {batch * accum})")
    cfg.train.batch_size, cfg.train.accum_steps = batch, accum
    return cfg


def _write_report_if_possible(run_dir: Path, log: Callable[[str], None]) -> None:
    try:
        from mixcls.report import write_report
    except ImportError:
        return
    path = write_report(run_dir)
    log(f"report: {path}")
