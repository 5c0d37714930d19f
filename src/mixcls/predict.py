"""Inference from a run folder: fold ensemble x TTA views -> probabilities -> submission."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from mixcls.config import Config, config_from_flat
from mixcls.data import DataError, ImageDataset, list_image_files, prob_columns, read_image
from mixcls.engine import evaluate
from mixcls.models import build_model, model_mean_std
from mixcls.runs import RunError, RunFolder, atomic_write_csv, load_checkpoint
from mixcls.devices import amp_dtype, resolve_device
from mixcls.transforms import build_valid_transform


@dataclass
class FoldModel:
    fold: int
    model: torch.nn.Module
    config: Config


def load_fold_models(run_dir: str | Path, device: torch.device) -> list[FoldModel]:
    """The best checkpoint of every trained fold, in fold order, in eval mode on `device`."""
    run = RunFolder(Path(run_dir))  # not .open(): the checkpoints carry their configs, no config.yaml needed
    paths = [d / "best.pt" for d in run.fold_dirs.values() if (d / "best.pt").is_file()]
    if not paths:
        raise RunError(f"{run.path}: no fold_*/best.pt checkpoints; is this a finished mixcls run?")
    classes = run.classes
    models = []
    for path in paths:
        ckpt = load_checkpoint(path)
        cfg = config_from_flat(ckpt["config"])
        cfg.model.pretrained, cfg.model.pretrained_file = False, None  # weights come from ckpt
        model = build_model(cfg.model, len(classes))
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        models.append(FoldModel(fold=int(ckpt.get("fold", len(models))), model=model, config=cfg))
    return models


def _loader(paths: Sequence[str], cfg: Config, model: torch.nn.Module, *, batch_size: int,
            workers: int) -> DataLoader:
    mean, std = model_mean_std(model)
    dataset = ImageDataset(paths, None, build_valid_transform(cfg.data.img_size, mean=mean, std=std))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)


def predict_fold_probs(run_dir: str | Path, paths: Sequence[str], *, tta: int | None = None,
                       device: str = "auto", batch_size: int = 64, workers: int = 0,
                       amp: str = "none") -> np.ndarray:
    """Per-fold probabilities (F, N, K), each the mean over the first `tta` TTA views."""
    dev = resolve_device(device)
    folds = load_fold_models(run_dir, dev)
    dtype = amp_dtype(amp, dev)  # the trainer's rule: fp16 is refused on a CPU
    out = []
    for fm in folds:
        views = fm.config.predict.tta_views[: tta or fm.config.predict.tta]
        if tta is not None and tta > len(fm.config.predict.tta_views):
            raise DataError(f"tta: {tta} views asked for, the run knows "
                            f"{len(fm.config.predict.tta_views)}: {fm.config.predict.tta_views}")
        loader = _loader(paths, fm.config, fm.model, batch_size=batch_size, workers=workers)
        probs, _ = evaluate(fm.model, loader, device=dev, amp_dtype=dtype, tta_views=views,
                            channels_last=fm.config.model.channels_last)
        out.append(probs)
    return np.stack(out)


def predict_run(run_dir: str | Path, paths: Sequence[str], **kwargs) -> np.ndarray:
    """Fold-ensembled probabilities (N, K): the mean of `predict_fold_probs` over folds."""
    return predict_fold_probs(run_dir, paths, **kwargs).mean(axis=0)


@torch.inference_mode()
def extract_features(run_dir: str | Path, paths: Sequence[str], *, device: str = "auto",
                     batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """Penultimate features (N, D): the pooled input of each fold's classifier, mean over folds."""
    dev = resolve_device(device)
    per_fold = []
    for fm in load_fold_models(run_dir, dev):
        feats = []
        for images, _ in _loader(paths, fm.config, fm.model, batch_size=batch_size, workers=workers):
            x = fm.model.forward_features(images.to(dev))
            feats.append(fm.model.forward_head(x, pre_logits=True).float().cpu().numpy())
        per_fold.append(np.concatenate(feats))
    return np.mean(per_fold, axis=0)


def resolve_images(images: str | Path, ids_csv: str | Path | None, id_col: str = "image_id"
                   ) -> tuple[list[str], list[str]]:
    """(image_ids, absolute paths) from a folder, optionally restricted to the ids of a CSV."""
    images = Path(images)
    if ids_csv is None:
        ids = list_image_files(images)
        if not ids:
            raise DataError(f"images folder {images} holds no image files")
    else:
        frame = pd.read_csv(ids_csv, dtype=str, keep_default_na=False)
        if id_col not in frame.columns:
            raise DataError(f"{ids_csv}: missing column {id_col}; columns are {', '.join(frame.columns)}")
        ids = frame[id_col].str.strip().tolist()
        if not ids:
            raise DataError(f"{ids_csv} has no rows")
        missing = [i for i in ids if not (images / i).is_file()]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:20])
            raise DataError(f"{ids_csv}: {len(missing)} image(s) not found in {images}: {shown}")
        outside = [i for i in ids if Path(i).is_absolute() or ".." in Path(i).parts]
        if outside:
            raise DataError(f"{ids_csv}: image ids that point outside {images}: {outside[:20]}")
    paths = [str((images / i).resolve()) for i in ids]
    bad = []
    for image_id, path in zip(ids, paths):
        try:
            read_image(path)
        except Exception as exc:  # PIL raises several types for broken files
            bad.append(f"{image_id!r}: {exc.__class__.__name__}")
    if bad:
        raise DataError(f"{len(bad)} image(s) cannot be decoded: {', '.join(bad[:20])}")
    return ids, paths


def write_submission(path: str | Path, image_ids: Sequence[str], probs: np.ndarray, *,
                     run_dir: str | Path, with_probs: bool = False, label_names: bool = False) -> Path:
    """image_id,label (the run's label format: integer or class name), optionally prob_k."""
    run = RunFolder.open(run_dir)
    classes, integer = run.classes, run.integer_labels
    pred = probs.argmax(1)
    labels = [classes[k] for k in pred] if (label_names or not integer) else pred
    frame = pd.DataFrame({"image_id": list(image_ids), "label": labels})
    if with_probs:
        frame[prob_columns(probs.shape[1])] = probs
    return atomic_write_csv(path, frame)
