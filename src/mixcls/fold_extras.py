"""What a run adds to its folds beyond the table: pseudo-labelled rows and distilled targets
(both from the teacher's fold-g model for fold g, so fold g's validation rows never reach its
student), the class weights of the training loss (mixcls.class_weights), and the learning rate
`--lr auto` finds on fold 0's training rows.

The trainer (`train.fit_folds`) calls these in order: `check_teachers` and `find_auto_lr`
before the run folder is written, `pseudo_image_cache` once, `build_fold_data` per fold and
`run_extras` for metrics.json.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mixcls import distributed as dist
from mixcls.class_weights import weigh_fold_data
from mixcls.config import Config, ConfigError
from mixcls.data import TrainTable, load_image_cache, read_image
from mixcls.pseudo import (PseudoTable, check_pseudo_folds, check_pseudo_images, passed_paths,
                           pseudo_rows_for_fold, read_pseudo, summarize_pseudo)
from mixcls.run_setup import FoldData, add_train_rows, check_run_settings, fold_rows, make_fold_data
from mixcls.runs import atomic_write_json, read_json
from mixcls.teachers import check_teacher, distill_targets, load_or_predict_teacher, soften

# `--lr auto`: steps of the range test (issue 15: "a few hundred" for lr-find; 100 keeps a
# run's start short and still spans the 1e-7 .. 10 range at ~1.17x per step).
AUTO_LR_STEPS = 100


def check_teachers(cfg: Config, table: TrainTable, folds: np.ndarray,
                    chosen: list[int]) -> PseudoTable | None:
    """Rank 0, before any output: the pseudo table (read and checked) and the distillation
    teacher; both must have been trained on this run's folds."""
    t, ids = cfg.train, table.frame["image_id"].tolist()
    if (t.pseudo is not None or t.distill is not None) and t.full_fit:
        raise ConfigError("--full-fit with --pseudo or --distill is not supported: the full-data "
                          "model has no fold whose teacher it could learn from")
    if t.distill is not None:
        check_teacher(t.distill, ids, folds, chosen)
    if t.pseudo is None:
        return None
    pseudo = read_pseudo(t.pseudo, classes=table.classes)
    check_pseudo_folds(pseudo, ids, folds, chosen)
    check_pseudo_images(pseudo, table.frame["path"].tolist())
    return pseudo


def find_auto_lr(cfg: Config, table: TrainTable, folds: np.ndarray, *, device: torch.device,
                  world_size: int, log: Callable[[str], None]) -> tuple[Config, float]:
    """`--lr auto`: the range test on fold 0's training rows only (never a validation row);
    returns the config with the suggested lr and the suggestion."""
    from mixcls.lr_find import find_lr_for_config

    probe = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3))
    check_run_settings(probe, device, world_size=world_size)  # refuse a bad run before the test
    train_rows, _ = fold_rows(table, folds, 0)
    _, lr = find_lr_for_config(probe, rows=train_rows, device=device, steps=AUTO_LR_STEPS, log=log)
    log(f"lr auto: {lr:.3g} (range test on fold 0's {len(train_rows)} training rows)")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=float(lr))), float(lr)


def run_extras(cfg: Config, run_dir: Path, table: TrainTable, pseudo: PseudoTable | None,
                chosen: list[int], lr_found: float | None) -> dict[str, Any]:
    """Rank 0: what metrics.json says beyond the scores: the found lr (kept in lr_find.json so
    a resume still reports it), the pseudo rows each fold trains on and the teacher."""
    saved = run_dir / "lr_find.json"
    if lr_found is not None:
        atomic_write_json(saved, {"lr_found": lr_found, "steps": AUTO_LR_STEPS, "rows": "fold 0 training"})
    elif saved.is_file():
        lr_found = float(read_json(saved)["lr_found"])
    extras: dict[str, Any] = {} if lr_found is None else {"lr_found": lr_found}
    if pseudo is not None:
        extras["pseudo"] = {**summarize_pseudo(pseudo, chosen, table.classes),
                            "weight": cfg.train.pseudo_weight}
    if cfg.train.distill is not None:
        extras["distill"] = {"teacher": str(Path(cfg.train.distill).resolve()),
                             "weight": cfg.train.distill_weight,
                             "temperature": cfg.train.distill_temperature}
    return extras


def pseudo_image_cache(pseudo: PseudoTable | None, image_cache) -> dict[str, Any] | None:
    """Decoded pseudo images by path (the folds' images are cached, so these must be too)."""
    if pseudo is None:
        return None
    paths = passed_paths(pseudo)
    items = load_image_cache(paths, image_cache=image_cache) if paths else []
    if items is None:  # the cache declined these images: decode them once here
        items = [read_image(p) for p in paths]
    return dict(zip(paths, items))


def build_fold_data(cfg: Config, table: TrainTable, folds: np.ndarray, fold: int, *, run_dir: Path,
               device: torch.device, cache: list | None, pseudo: PseudoTable | None,
               pseudo_cache: dict[str, Any] | None, log: Callable[[str], None]) -> FoldData:
    """Fold `fold`'s rows, with distilled targets from the teacher's fold-`fold` model and the
    pseudo rows that passed for `fold` added to the training part (never to validation)."""
    train_rows, valid_rows = fold_rows(table, folds, fold)
    data = make_fold_data(table, train_rows, valid_rows, cache=cache)
    t = cfg.train
    if t.distill is not None:
        ids = table.frame["image_id"].to_numpy()[train_rows].tolist()
        probs = dist.run_on_main(lambda: load_or_predict_teacher(
            run_dir, t.distill, fold, ids, data.train_paths, device=str(device),
            batch_size=2 * int(t.batch_size), workers=cfg.data.workers, log=log))
        data = dataclasses.replace(data, train_targets=distill_targets(
            data.train_targets, soften(probs, t.distill_temperature), weight=t.distill_weight,
            num_classes=data.num_classes))
    if pseudo is not None:
        paths, targets = pseudo_rows_for_fold(pseudo, fold, num_classes=data.num_classes)
        data = add_train_rows(data, paths, targets, weight=t.pseudo_weight,
                              cache=None if pseudo_cache is None else [pseudo_cache[p] for p in paths])
        log(f"fold {fold}: {len(paths)} pseudo-labelled rows added to its training part"
            + (f", each of weight {t.pseudo_weight:g} in the loss" if t.pseudo_weight != 1.0 else ""))
    return weigh_classes(data, cfg.train.class_weights, what=f"fold {fold}", log=log)


def weigh_classes(data: FoldData, spec: str, *, what: str, log: Callable[[str], None]) -> FoldData:
    """`data` with --class-weights on its training rows (the last change to them), logged."""
    data, weights = weigh_fold_data(data, spec)
    if weights is not None:
        log(f"{what}: class weights {', '.join(f'{c} {w:.3g}' for c, w in zip(data.classes, weights))}"
            + (" (balanced on its training rows)" if spec == "balanced" else ""))
    return data
