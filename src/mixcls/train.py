"""k-fold training: one fold at a time, OOF probabilities in the original row order.

`fit_folds` settles the run (run_setup: table, folds, checks, batch plan, run folder) and gives
each fold its data; `fit_fold` builds the fold's model, loaders and optimizer and runs the
plain loop: per epoch, seed (sampling), train (engine), evaluate, keep the best, save last.pt
(resume). Under torchrun every rank trains on its own micro-batches (DistributedDataParallel)
and evaluates its share of the validation fold; rank 0 alone reads and writes the run folder.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from mixcls import distributed as dist
from mixcls import fold_extras
from mixcls.class_weights import parse_class_weights
from mixcls.config import Config, config_to_flat
from mixcls.data import TRAIN_ONLY_FOLD, TrainTable, load_image_cache
from mixcls.devices import resolve_device
from mixcls.distributed import DistContext
from mixcls.engine import (EpochStats, NonFiniteLossError, compile_seconds_so_far, evaluate,
                           train_one_epoch)
from mixcls.fold_parts import FoldParts, build_fold_parts, weights_finite
from mixcls.folds import folds_fingerprint
from mixcls.losses import build_loss
from mixcls.metrics import best_epoch_row, compute_metrics, epoch_score, macro_f1, merge_oof, oof_frame
from mixcls.pseudo import PseudoTable
from mixcls.resume import BatchLayout, FoldState, build_last_checkpoint, partial_stats, restore_checkpoint
from mixcls.run_setup import (BatchPlan, FoldData, build_image_cache, check_run_settings,
                              discard_begun_run, fold_rows, full_fit_rows, make_fold_data,
                              open_run_folder, prepare_table, previous_seconds, resolve_batch_plan,
                              valid_labels_of, with_batch_plan)
from mixcls.runs import atomic_write_csv, atomic_write_json, load_checkpoint, save_checkpoint
from mixcls.sampling import derive_seed, seed_everything, start_epoch_generators
from mixcls.swa import averaged_epochs, recompute_batchnorm, swa_summary
from mixcls.tblog import FoldBoard, open_board

# The full-data model's folder: RUN/full/best.pt beside RUN/fold_K/best.pt.
FULL_DIR = "full"

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


def fit_fold(cfg: Config, data: FoldData, *, fold: int, fold_dir: Path, device: torch.device,
             ctx: DistContext = DistContext(), progress: bool = True, resume: bool = False,
             board: FoldBoard | None = None, log: Callable[[str], None] = print) -> FoldResult:
    """Train one fold; write fold_dir/best.pt, last.pt, history.csv; return the best epoch's probs.

    `cfg.train.batch_size` is this process's micro-batch (a number: fit_folds resolves auto).
    """
    seed_everything(derive_seed(cfg.train.seed, fold))
    parts = build_fold_parts(cfg, data, fold=fold, device=device, ctx=ctx, log=log)
    layout = BatchLayout(ctx.world_size, int(cfg.train.batch_size), cfg.train.accum_steps)
    steps_per_epoch = -(-parts.n_batches // layout.accum_steps)
    sharpness = parts.sharpness
    two_passes = f"; {sharpness.label}: two passes per step" if sharpness is not None else ""
    log(f"fold {fold}: {layout.describe(n_train=len(data.train_paths), steps_per_epoch=steps_per_epoch)}"
        f"{two_passes}")
    last_path = Path(fold_dir) / "last.pt"
    state = _resumed_state(last_path, parts, fold=fold, layout=layout, ctx=ctx,
                           log=log) if resume else FoldState()
    state.last_path = last_path if ctx.is_main else None
    header = {"config": config_to_flat(cfg), "classes": list(data.classes), "fold": fold}

    def save_last(*, epoch: int, batch: int, mix_gen: torch.Generator | None = None,
                  epoch_stats: dict[str, Any] | None = None) -> None:
        # Never replace a good checkpoint with weights that already blew up.
        if ctx.is_main and weights_finite(parts.net.model):
            save_checkpoint(last_path, build_last_checkpoint(
                parts.net, state, header=header, layout=layout, epoch=epoch, batch=batch,
                mix_gen=mix_gen, epoch_stats=epoch_stats, device=device))

    averaged = averaged_epochs(cfg.train.epochs, cfg.train.swa_epochs)
    for epoch in range(state.epoch, cfg.train.epochs):
        if _patience_spent(cfg.train.patience, state):
            break  # decided before a resume
        start_batch = state.batch if epoch == state.epoch else 0
        on_lr = None if board is None else board.step_logger(first_step=epoch * steps_per_epoch)
        stats = _train_epoch(cfg, parts, state, fold=fold, epoch=epoch, start_batch=start_batch,
                             device=device, ctx=ctx, progress=progress, save_last=save_last,
                             num_classes=data.num_classes, on_lr=on_lr)
        if parts.net.swa is not None and epoch in averaged:
            parts.net.swa.update_parameters(parts.net.model)  # saved with this epoch's last.pt
        if data.valid_paths:
            probs, valid_loss, compile_seconds = _evaluate_fold(
                parts, device=device, num_classes=data.num_classes, channels_last=cfg.model.channels_last)
            stats = dataclasses.replace(stats, compile_seconds=stats.compile_seconds + compile_seconds)
        else:  # the full-data model: no validation rows, its last epoch is the one kept
            probs, valid_loss = None, float("nan")
        _end_epoch(parts, state, _history_row(epoch, stats, valid_loss, probs, parts.valid_labels),
                   probs, metric=cfg.train.select_metric, header=header, fold_dir=Path(fold_dir),
                   is_main=ctx.is_main, board=board)
        log(f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}: {_epoch_line(state.history[-1], stats)}")
        save_last(epoch=epoch + 1, batch=0)
        if _patience_spent(cfg.train.patience, state):
            log(f"fold {fold}: early stop after epoch {epoch + 1} "
                f"({cfg.train.patience} epochs without a better valid {cfg.train.select_metric})")
            break
    if parts.net.swa is not None:
        _finish_swa(cfg, parts, state, averaged, fold=fold, num_classes=data.num_classes,
                    fold_dir=Path(fold_dir), header=header, device=device, ctx=ctx, log=log)
    if board is not None and state.best_probs is not None:
        board.log_confusion(parts.valid_labels, state.best_probs, data.classes, state.best_epoch)
    return FoldResult(fold=fold, best_score=state.best_score, best_epoch=state.best_epoch,
                      valid_probs=state.best_probs, history=state.history)


def _resumed_state(last_path: Path, parts: FoldParts, *, fold: int, layout: BatchLayout,
                   ctx: DistContext, log: Callable[[str], None]) -> FoldState:
    """The fold's state from its last.pt (a fresh one when there is none); rank 0 reads the
    run folder and the other ranks receive its checkpoint."""
    ckpt = dist.run_on_main(lambda: load_checkpoint(last_path) if last_path.is_file() else None)
    if ckpt is None:
        return FoldState()
    state = restore_checkpoint(ckpt, parts.net, fold=fold, layout=layout, rank=ctx.rank)
    log(f"fold {fold}: resuming at epoch {state.epoch + 1}, batch {state.batch} of {parts.n_batches}")
    return state


def _patience_spent(patience: int | None, state: FoldState) -> bool:
    return patience is not None and state.bad_epochs >= patience


def _train_epoch(cfg: Config, parts: FoldParts, state: FoldState, *, fold: int, epoch: int,
                 start_batch: int, device: torch.device, ctx: DistContext, progress: bool,
                 num_classes: int, save_last: Callable[..., None],
                 on_lr: Callable[[int, float], None] | None) -> EpochStats:
    """One epoch (or its rest after a resume); the sums of every rank's images."""
    save_every, accum = cfg.train.save_every_steps, cfg.train.accum_steps
    resumed = start_batch > 0
    mix_gen = start_epoch_generators(cfg.train.seed, fold, epoch, device=device,
                                     rng=state.rng if resumed else None,
                                     mix_rng=state.mix_rng if resumed else None)
    parts.sampler.set_epoch(epoch, skip=start_batch * int(cfg.train.batch_size))

    def on_step(i: int, stats: EpochStats) -> None:
        if on_lr is not None:
            on_lr(stats.steps, stats.lr)
        if save_every and (i + 1) % accum == 0 and ((i + 1) // accum) % save_every == 0 \
                and i + 1 < parts.n_batches:
            save_last(epoch=epoch, batch=i + 1, mix_gen=mix_gen,
                      epoch_stats=partial_stats(stats.settle()))  # exact sums, read only here

    mixing = parts.mixer if epoch < cfg.train.epochs - cfg.mix.off_epochs else None
    bn_eval = parts.begin_epoch(epoch)  # --freeze-epochs / --freeze-bn: from the epoch number
    stopped = f"fold {fold}, epoch {epoch + 1}"
    try:
        stats = train_one_epoch(
            parts.train_model, parts.train_loader, parts.net.optimizer, loss_fn=parts.loss_fn,
            device=device, num_classes=num_classes, normalizer=parts.normalizer,
            scheduler=parts.net.scheduler, bn_eval=bn_eval, device_augment=parts.device_augment,
            mixer=mixing, generator=mix_gen, accum_steps=accum, scaler=parts.net.scaler,
            amp_dtype=parts.amp_dtype, grad_clip=cfg.train.grad_clip, ema=parts.net.ema,
            channels_last=cfg.model.channels_last, recomputed_bn=parts.recomputed_bn,
            sharpness=parts.sharpness, start_batch=start_batch,
            n_batches=parts.n_batches, start_stats=state.epoch_stats if resumed else None,
            on_step=on_step, progress=progress and ctx.is_main,
            desc=f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}")
    except NonFiniteLossError as exc:
        raise TrainingStopped(f"{stopped}: {exc}; {_stopped_hint(state, ctx.is_main)}") from None
    # One skipped step is a glitch (CPU bf16 kernels); an epoch of them is a diverged run.
    if stats.steps >= 2 and stats.skipped_steps == stats.steps:
        raise TrainingStopped(f"{stopped}: every optimizer step ({stats.steps}) had NaN or infinite "
                              f"gradients; {_stopped_hint(state, ctx.is_main)}")
    if not weights_finite(parts.net.model):
        raise TrainingStopped(f"{stopped}: the weights became NaN or infinite at the epoch's last "
                              f"step; {_stopped_hint(state, ctx.is_main)}")
    loss_sum, correct, images = dist.all_reduce_sum([stats.loss_sum, stats.correct, stats.images])
    return dataclasses.replace(stats, loss_sum=loss_sum, correct=int(correct), images=int(images))


def _stopped_hint(state: FoldState, is_main: bool) -> str:
    if not is_main:
        return "training stopped (rank 0 keeps the last good checkpoint)"
    if state.last_path is not None and state.last_path.is_file():
        return (f"training stopped, the last good checkpoint {state.last_path} is kept "
                "(try a lower --lr or --grad-clip)")
    return "training stopped before any checkpoint (try a lower --lr or --grad-clip)"


def _finish_swa(cfg: Config, parts: FoldParts, state: FoldState, averaged: range, *, fold: int,
                num_classes: int, fold_dir: Path, header: dict[str, Any], device: torch.device,
                ctx: DistContext, log: Callable[[str], None]) -> None:
    """--swa-epochs: the averaged weights get BatchNorm statistics of their own (not under
    --freeze-bn, whose statistics never moved), are validated, and become the fold's model:
    best.pt, the OOF probabilities (state.best_probs) and swa.json. Run again after a resume
    it gives the same model: the pass resets the statistics and reads the rows in order."""
    model = parts.net.swa.module
    if not cfg.model.freeze_bn:
        recompute_batchnorm(model, parts.bn_loader, device=device, normalizer=parts.normalizer,
                            channels_last=cfg.model.channels_last, amp_dtype=parts.amp_dtype)
    scores: dict[str, float] = {}
    if len(parts.valid_labels):
        probs, valid_loss, _ = _evaluate_fold(parts, device=device, num_classes=num_classes,
                                              channels_last=cfg.model.channels_last, model=model)
        scores = _valid_scores(valid_loss, probs, parts.valid_labels)
        state.best_probs, state.best_score = probs, epoch_score(scores, cfg.train.select_metric)
        best = best_epoch_row(pd.DataFrame(state.history), cfg.train.select_metric)
        state.best_epoch = averaged.stop  # as best.pt's "epoch": the average's last epoch
        log(f"fold {fold}: SWA of epochs {averaged.start + 1}-{averaged.stop}: valid_loss "
            f"{valid_loss:.4f} valid_acc {scores['valid_accuracy']:.4f} (the best single epoch, "
            f"{int(best['epoch'])}, picked on these rows: valid_loss {best['valid_loss']:.4f} "
            f"valid_acc {best['valid_accuracy']:.4f})")
    if ctx.is_main:
        summary = swa_summary(averaged, scores)
        save_checkpoint(fold_dir / "best.pt", dict(header, model=model.state_dict(),
                                                   epoch=averaged.stop, swa=summary,
                                                   score=state.best_score))
        atomic_write_json(fold_dir / "swa.json", summary)


def _evaluate_fold(parts: FoldParts, *, device: torch.device, num_classes: int,
                   channels_last: bool, model: torch.nn.Module | None = None
                   ) -> tuple[np.ndarray, float, float]:
    """Probabilities (n_valid, K) of every validation row and their mean CE loss, on every
    rank; and the seconds torch.compile took in it (--compile). `model` defaults to the one
    validation scores each epoch (the EMA when there is one)."""
    n_valid = len(parts.valid_labels)
    model = parts.net.eval_model() if model is None else model
    dist.broadcast_buffers(model)
    compile_start = compile_seconds_so_far()
    local, local_loss = evaluate(parts.inference_model(model), parts.valid_loader, device=device,
                                 loss_fn=build_loss("ce"), num_classes=num_classes,
                                 normalizer=parts.normalizer, amp_dtype=parts.amp_dtype,
                                 channels_last=channels_last)
    loss_sum, = dist.all_reduce_sum([float(local_loss) * len(local)])
    return (dist.gather_shards(local, n_valid), loss_sum / max(n_valid, 1),
            compile_seconds_so_far() - compile_start)


def _history_row(epoch: int, stats: EpochStats, valid_loss: float, probs: np.ndarray | None,
                 valid_labels: np.ndarray) -> dict[str, float]:
    """One row of history.csv; its valid_* scores (NaN without validation rows) are what
    --select-metric picks the best epoch by (metrics.SELECT_COLUMNS)."""
    return {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
            **_valid_scores(valid_loss, probs, valid_labels), "lr": stats.lr,
            "seconds": stats.seconds, "images_per_s": stats.images_per_s,
            "skipped_steps": stats.skipped_steps, "compile_seconds": stats.compile_seconds}


def _valid_scores(valid_loss: float, probs: np.ndarray | None,
                  valid_labels: np.ndarray) -> dict[str, float]:
    """valid_loss, valid_accuracy and valid_macro_f1 (NaN without validation rows)."""
    accuracy = float((probs.argmax(1) == valid_labels).mean()) if probs is not None else float("nan")
    f1 = macro_f1(valid_labels, probs) if probs is not None else float("nan")
    return {"valid_loss": valid_loss, "valid_accuracy": accuracy, "valid_macro_f1": f1}


def _compile_summary(run_dir: Path, chosen: list[int]) -> dict[str, float]:
    """{"compile_seconds": …} of the folds' histories with --compile (their epochs'
    `seconds` leave it out; metrics.json's `seconds` is the wall time and includes it)."""
    total = 0.0
    for fold in chosen:
        history = pd.read_csv(run_dir / f"fold_{fold}" / "history.csv")
        if "compile_seconds" in history.columns:
            total += float(history["compile_seconds"].sum())
    return {"compile_seconds": total} if total > 0 else {}


def _epoch_line(row: dict[str, float], stats: EpochStats) -> str:
    skipped = f", {stats.skipped_steps} of {stats.steps} steps skipped (non-finite gradients)" \
        if stats.skipped_steps else ""
    compiled = f", compile {stats.compile_seconds:.1f}s apart" if stats.compile_seconds else ""
    return (f"train_loss {row['train_loss']:.4f} valid_loss {row['valid_loss']:.4f} "
            f"valid_acc {row['valid_accuracy']:.4f} lr {row['lr']:.2e} "
            f"{row['images_per_s']:.0f} img/s ({row['seconds']:.1f}s{skipped}{compiled})")


def _end_epoch(parts: FoldParts, state: FoldState, row: dict[str, float], probs: np.ndarray | None,
               *, metric: str, header: dict[str, Any], fold_dir: Path, is_main: bool,
               board: FoldBoard | None) -> None:
    """History, best.pt and history.csv (rank 0) after an epoch's evaluation: best.pt is the
    first epoch with the best `metric`; without validation (probs None) every epoch replaces
    it, so it holds the last one."""
    state.history.append(row)
    score = epoch_score(row, metric)
    if probs is None or score > state.best_score:
        state.best_score, state.best_epoch, state.bad_epochs, state.best_probs = \
            score, row["epoch"], 0, probs
        if is_main and parts.net.swa is None:  # an SWA fold's best.pt is its average, at the end
            save_checkpoint(fold_dir / "best.pt", dict(header, model=parts.net.eval_model().state_dict(),
                                                       epoch=row["epoch"], score=score))
    else:
        state.bad_epochs += 1
    if is_main:
        atomic_write_csv(fold_dir / "history.csv", pd.DataFrame(state.history))
    if board is not None:
        board.log_epoch(row)


# ---------------------------------------------------------------- the run

def fit_folds(cfg: Config, run_dir: str | Path, *, progress: bool = True, resume: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the configured folds into `run_dir`; write oof.csv and metrics.json; return metrics.

    Under torchrun call it on every rank: rank 0 writes, every rank trains; every rank gets the
    metrics. Every check of the configuration comes before the run folder is written, and a new
    run that fails before its first checkpoint removes what it wrote.
    """
    run_dir, ctx = Path(run_dir), dist.context()
    log = log if ctx.is_main else _silent
    # Rank 0 checks the table and decodes every image once; the others receive the checked table.
    image_cache = build_image_cache(cfg)  # one decode per image: the check fills the cache
    table, folds = dist.run_on_main(lambda: prepare_table(cfg, image_cache=image_cache))
    device = dist.device_for(cfg.train.device) if ctx.world_size > 1 else resolve_device(cfg.train.device)
    chosen = cfg.train.train_folds if cfg.train.train_folds is not None else list(range(cfg.train.folds))
    pseudo = dist.run_on_main(lambda: fold_extras.check_teachers(cfg, table, folds, chosen))
    parse_class_weights(cfg.train.class_weights, table.num_classes)  # one per class, if a list
    lr_found = None
    if cfg.optim.lr == "auto":  # before the run folder, so config.yaml holds the lr trained with
        cfg, lr_found = dist.run_on_main(lambda: fold_extras.find_auto_lr(
            cfg, table, folds, device=device, world_size=ctx.world_size, log=log))
    plan, folds, finished = dist.run_on_main(lambda: _begin_run(
        cfg, table, folds, run_dir, device=device, world_size=ctx.world_size, resume=resume,
        chosen=chosen, log=log))
    cfg = with_batch_plan(cfg, plan)
    cache = load_image_cache(table.frame["path"].tolist(), image_cache=image_cache)
    extras = dist.run_on_main(lambda: fold_extras.run_extras(cfg, run_dir, table, pseudo, chosen,
                                                             lr_found))
    pseudo_cache = fold_extras.pseudo_image_cache(pseudo, image_cache) if cache is not None else None
    started = time.perf_counter()
    try:
        for fold in chosen:
            if fold in finished:
                log(f"fold {fold}: already finished, skipped")
                continue
            _fit_and_write_fold(cfg, table, folds, fold, run_dir=run_dir, device=device, ctx=ctx,
                                cache=cache, progress=progress, resume=resume, log=log,
                                pseudo=pseudo, pseudo_cache=pseudo_cache)
    except BaseException:
        if ctx.is_main and not resume and discard_begun_run(run_dir):
            log(f"the run stopped before its first checkpoint; removed what it had written to {run_dir}")
        raise
    metrics = dist.run_on_main(lambda: _write_summary(table, folds, run_dir, plan, chosen=chosen,
                                                      world_size=ctx.world_size, log=log,
                                                      seconds=time.perf_counter() - started
                                                      + previous_seconds(run_dir, resume),
                                                      extras=extras))
    if cfg.train.full_fit:  # every rank trains it, as it trains the folds
        metrics = _fit_full(cfg, table, run_dir, metrics, device=device, ctx=ctx, cache=cache,
                            progress=progress, resume=resume, log=log)
    return metrics


def _warn_split_copies(table: TrainTable, folds: np.ndarray, log: Callable[[str], None]) -> None:
    """Say so when byte-identical training images sit in different folds: CV then scores each
    with a model that trained on its copy. A warning, not an error: the run is valid, its CV
    optimistic by those rows."""
    from mixcls.duplicates import identical_files

    ids = table.frame["image_id"].tolist()
    split = [rows for rows in identical_files(table.frame["path"].tolist())
             if len({int(folds[i]) for i in rows}) > 1]
    if split:
        example = " and ".join(repr(ids[i]) for i in split[0][:2])
        log(f"warning: {len(split)} set(s) of byte-identical training images lie in more than one "
            f"fold (e.g. {example}), so CV scores them with a model that trained on the copy; "
            "mixcls duplicates groups them (and near-copies) for --group-col")


def _begin_run(cfg: Config, table: TrainTable, folds: np.ndarray, run_dir: Path, *,
               device: torch.device, world_size: int, resume: bool, chosen: list[int],
               log: Callable[[str], None]) -> tuple[BatchPlan, np.ndarray, list[int]]:
    """Rank 0: check the configuration, plan the batch, then open the run folder."""
    check_run_settings(cfg, device, world_size=world_size)
    train_only = int((folds == TRAIN_ONLY_FOLD).sum())
    if train_only:
        log(f"{train_only} train-only row(s) (fold {TRAIN_ONLY_FOLD}): in every fold's training "
            f"rows, never validated; the CV scores the other {len(folds) - train_only}")
    if cfg.data.group_col is not None:
        log(f"folds grouped by {cfg.data.group_col!r}: {table.frame['group'].nunique()} groups, "
            "each in one fold")
    else:
        _warn_split_copies(table, folds, log)
    plan = resolve_batch_plan(cfg, table.num_classes, device, world_size=world_size,
                              run_dir=run_dir, resume=resume, log=log)
    folds, finished = open_run_folder(cfg, table, folds, run_dir, resume=resume, chosen=chosen,
                                      plan=plan, log=log)
    return plan, folds, finished


def _fit_and_write_fold(cfg: Config, table: TrainTable, folds: np.ndarray, fold: int, *,
                        run_dir: Path, device: torch.device, ctx: DistContext,
                        cache: list[np.ndarray] | None, progress: bool, resume: bool,
                        log: Callable[[str], None], pseudo: PseudoTable | None = None,
                        pseudo_cache: dict[str, Any] | None = None) -> None:
    """One fold from the table: its data, its training, its oof.csv (rank 0)."""
    fold_dir = run_dir / f"fold_{fold}"
    if ctx.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    _, valid_rows = fold_rows(table, folds, fold)
    data = fold_extras.build_fold_data(cfg, table, folds, fold, run_dir=run_dir, device=device,
                                       cache=cache, pseudo=pseudo, pseudo_cache=pseudo_cache, log=log)
    board = open_board(run_dir, fold, enabled=cfg.train.log == "tensorboard" and ctx.is_main)
    try:
        result = fit_fold(cfg, data, fold=fold, fold_dir=fold_dir, device=device, ctx=ctx,
                          progress=progress, resume=resume, board=board, log=log)
    finally:
        if board is not None:
            board.close()
    if ctx.is_main:
        atomic_write_csv(fold_dir / "oof.csv", oof_frame(table.frame["image_id"].to_numpy(),
                                                         valid_labels_of(table), folds,
                                                         result.valid_probs, valid_rows))
    dist.barrier()


def _silent(message: str) -> None:
    """Only rank 0 speaks."""


def _write_summary(table: TrainTable, folds: np.ndarray, run_dir: Path, plan: BatchPlan, *,
                   chosen: list[int], world_size: int, seconds: float,
                   log: Callable[[str], None], extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """oof.csv (original row order) and metrics.json from the folds' own oof.csv files."""
    oof = merge_oof([pd.read_csv(run_dir / f"fold_{f}" / "oof.csv") for f in chosen],
                    table.frame["image_id"].tolist())
    atomic_write_csv(run_dir / "oof.csv", oof)
    metrics = compute_metrics(oof, table.classes)
    metrics.update(folds_trained=chosen, seconds=seconds, batch_size=plan.batch_size,
                   accum_steps=plan.accum_steps, world_size=world_size,
                   global_batch=world_size * plan.batch_size * plan.accum_steps,
                   folds_fingerprint=folds_fingerprint(table.frame["image_id"].tolist(), folds))
    metrics.update(_compile_summary(run_dir, chosen))
    metrics.update(extras or {})
    atomic_write_json(run_dir / "metrics.json", metrics)
    log(f"CV accuracy {metrics['cv_accuracy']:.4f}, macro F1 {metrics['cv_macro_f1']:.4f}, "
        f"log-loss {metrics['cv_logloss']:.4f} over {len(oof)} OOF rows")
    return metrics


# ---------------------------------------------------------------- the full-data refit

def full_fit_epochs(run_dir: Path, chosen: list[int], asked: int | None, *,
                    metric: str = "accuracy") -> int:
    """`--full-fit-epochs`, else the median best epoch (by `metric`) of the trained folds,
    rounded up.

    The folds' best epochs are what validation chose; a model on every row has no validation
    of its own, so it trains for the typical length the folds found best.
    """
    if asked is not None:
        return asked
    best = []
    for fold in chosen:
        history = pd.read_csv(run_dir / f"fold_{fold}" / "history.csv")
        best.append(int(best_epoch_row(history, metric)["epoch"]))
    return int(np.ceil(np.median(best)))


def _fit_full(cfg: Config, table: TrainTable, run_dir: Path, metrics: dict[str, Any], *,
              device: torch.device, ctx: DistContext, cache: list | None, progress: bool,
              resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """One more model on every training row (keep == 1), saved as RUN/full/best.pt."""
    chosen = metrics["folds_trained"]
    # An SWA fold's model is the average of a fixed tail, not a chosen epoch: the full-data
    # model trains as long as the folds did and averages the same tail.
    asked = cfg.train.full_fit_epochs or (cfg.train.epochs if cfg.train.swa_epochs else None)
    epochs = dist.run_on_main(lambda: full_fit_epochs(run_dir, chosen, asked,
                                                      metric=cfg.train.select_metric))
    full_dir = run_dir / FULL_DIR
    history = full_dir / "history.csv"
    if resume and dist.run_on_main(lambda: history.is_file() and len(pd.read_csv(history)) >= epochs):
        log(f"full fit: already finished ({epochs} epochs), skipped")
        return metrics
    if ctx.is_main:
        full_dir.mkdir(parents=True, exist_ok=True)
    rows = full_fit_rows(table)
    data = fold_extras.weigh_classes(make_fold_data(table, rows, np.array([], dtype=np.int64),
                                                    cache=cache),
                                     cfg.train.class_weights, what="full fit", log=log)
    full_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, patience=None))
    if cfg.train.full_fit_epochs:
        why = "--full-fit-epochs"
    elif cfg.train.swa_epochs:
        why = f"--epochs, averaging the last {cfg.train.swa_epochs} as the folds did"
    else:
        why = "median best epoch of the folds"
    log(f"full fit: {len(rows)} rows, {epochs} epochs ({why})")
    started = time.perf_counter()
    # Its seed follows the folds' (seed, fold) rule with the index one past the last fold.
    fit_fold(full_cfg, data, fold=cfg.train.folds, fold_dir=full_dir, device=device, ctx=ctx,
             progress=progress, resume=resume, log=log)
    metrics = dict(metrics, full_fit={"epochs": epochs, "rows": int(len(rows)),
                                      "seconds": time.perf_counter() - started})
    if ctx.is_main:
        atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics
