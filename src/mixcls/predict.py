"""Inference from a run folder: fold ensemble x TTA views -> probabilities -> submission."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from mixcls.config import Config, config_from_flat
from mixcls.data import (DataError, ImageDataset, list_image_files, prob_columns, read_image,
                         read_text_table)
from mixcls.engine import evaluate
from mixcls.models import build_model, model_mean_std
from mixcls.runs import RunError, RunFolder, atomic_write_csv, load_checkpoint
from mixcls.heap import keep_freed_memory
from mixcls.sampling import build_collate, worker_init
from mixcls.devices import amp_dtype, resolve_device
from mixcls.transforms import Normalizer, build_valid_transform

if TYPE_CHECKING:
    from mixcls.tta import InferenceSetting


@dataclass
class LoadedModel:
    """A trained model in eval mode with what its checkpoint says about it."""

    model: torch.nn.Module
    config: Config
    classes: list[str]
    fold: int


@dataclass
class FoldOutputs:
    """Per-model outputs on N images: probs (F, N, K) averaged over the TTA views, and with
    features the penultimate features (F, N, D) of the plain images (else None)."""

    probs: np.ndarray
    features: np.ndarray | None = None


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """A checkpoint (fold_K/best.pt or last.pt) -> its model in eval mode on `device`, with the
    config and classes saved beside the weights."""
    ckpt = load_checkpoint(path)
    missing = [key for key in ("model", "config", "classes") if key not in ckpt]
    if missing:
        raise RunError(f"checkpoint {path} lacks {', '.join(missing)}; is it a mixcls checkpoint?")
    cfg = config_from_flat(ckpt["config"])
    cfg.model.pretrained, cfg.model.pretrained_file = False, None  # the weights come from the file
    classes = [str(c) for c in ckpt["classes"]]
    model = build_model(cfg.model, len(classes))
    model.load_state_dict(ckpt["model"])
    return LoadedModel(model.to(device).eval(), cfg, classes, int(ckpt.get("fold", 0)))


# Which of a run's models predict: the fold models, the full-data model (--full-fit), or both.
MODEL_SETS = ("folds", "full", "all")


def load_fold_models(run_dir: str | Path, device: torch.device, *,
                     models: str = "folds") -> list[LoadedModel]:
    """The best checkpoint of every trained fold in fold order (`models="folds"`), the full-data
    model RUN/full/best.pt ("full"), or the folds then the full model ("all"; each model then
    counts once in the mean), in eval mode on `device`."""
    if models not in MODEL_SETS:
        raise ValueError(f"models: {models!r} is not one of {', '.join(MODEL_SETS)}")
    run = RunFolder(Path(run_dir))  # not .open(): the checkpoints carry their configs, no config.yaml needed
    paths = [d / "best.pt" for d in run.fold_dirs.values() if (d / "best.pt").is_file()] \
        if models != "full" else []
    if models == "folds" and not paths:
        raise RunError(f"{run.path}: no fold_*/best.pt checkpoints; is this a finished mixcls run?")
    if models != "folds":
        full = run.path / "full" / "best.pt"
        if not full.is_file():
            raise RunError(f"{run.path}: no full/best.pt; train the run with --full-fit to predict "
                           f"with --models {models}")
        paths.append(full)
    classes = run.classes
    models = [load_model(path, device) for path in paths]
    for path, loaded in zip(paths, models):
        if len(loaded.classes) != len(classes):
            raise RunError(f"{path}: {len(loaded.classes)} classes, {run.path / 'classes.json'} "
                           f"names {len(classes)}")
    return models


def predict_fold_outputs(models: Sequence[LoadedModel], paths: Sequence[str], *,
                         device: torch.device, views: Sequence[str] | None = None,
                         tta: int | None = None, batch_size: int = 64, workers: int = 0,
                         amp_dtype: torch.dtype | None = None, features: bool = False,
                         cache: list[np.ndarray] | None = None, img_size: int | None = None,
                         per_view: bool = False) -> FoldOutputs:
    """Run every model over the images at `paths` in one pass each (engine.evaluate).

    `views` are the TTA views; None takes the first `tta` of each model's configured views
    (all `predict.tta` of them when tta is None). `img_size` is the side the images are resized
    to (None: each model's training size). `cache` holds the decoded images of `paths`
    (data.load_image_cache) so they are not decoded again per model. With `per_view`, probs
    is (F, V, N, K): each view's table, not their mean.
    """
    probs, feats = [], []
    for loaded in models:
        cfg = loaded.config
        chosen = list(views) if views is not None else _tta_views(cfg, tta)
        size = img_size or cfg.data.img_size
        dataset = ImageDataset(paths, None, build_valid_transform(size), cache=cache)
        keep_freed_memory()  # before the workers fork (mixcls.heap)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                            pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                            collate_fn=build_collate(workers=workers, hwc=device.type == "cuda"))
        # features=True calls forward_features / forward_head, which torch.compile leaves eager
        model = torch.compile(loaded.model) if cfg.model.compile and not features else loaded.model
        try:
            out = evaluate(model, loader, device=device, amp_dtype=amp_dtype, tta_views=chosen,
                           normalizer=Normalizer(*model_mean_std(loaded.model)),
                           channels_last=cfg.model.channels_last, features=features,
                           per_view=per_view)
        except RuntimeError as exc:
            if size == cfg.data.img_size:
                raise
            # e.g. a ViT whose position embedding fixes the input size
            raise DataError(f"{cfg.model.name} (fold {loaded.fold}, trained at {cfg.data.img_size} "
                            f"px) cannot predict at {size} px: {exc}") from None
        probs.append(out[0])
        if features:
            feats.append(out[2])
    return FoldOutputs(np.stack(probs), np.stack(feats) if features else None)


def _tta_views(cfg: Config, tta: int | None) -> list[str]:
    """The first `tta` TTA views of a run's config (its own `predict.tta` when None)."""
    known = cfg.predict.tta_views
    if tta is not None and tta > len(known):
        raise DataError(f"tta: {tta} views asked for, the run knows {len(known)}: {known}")
    return list(known[: tta or cfg.predict.tta])


def predict_run_outputs(run_dir: str | Path, paths: Sequence[str], *, tta: int | None = None,
                        views: Sequence[str] | None = None, img_size: int | None = None,
                        device: str = "auto", batch_size: int = 64, workers: int = 0,
                        amp: str = "none", features: bool = False,
                        models: str = "folds", setting: InferenceSetting | None = None
                        ) -> FoldOutputs:
    """`predict_fold_outputs` of a run's models (`models`: see load_fold_models): probs
    (F, N, K) and, with `features`, features (F, N, D).

    The TTA views are `views`, else the first `tta` of the run's views, else the run's
    inference setting (mixcls.tta.inference_setting: what `mixcls tta --apply` chose, or the
    config's `predict.tta`); the image size is `img_size`, else the setting's. `setting` is that
    setting when the caller has read it already (mixcls predict prints what it used).
    """
    from mixcls.tta import inference_setting

    setting = setting or inference_setting(run_dir)
    if views is None and tta is None:
        views = setting.views
    dev = resolve_device(device)
    dtype = amp_dtype(amp, dev)  # the trainer's rule: fp16 is refused on a CPU
    return predict_fold_outputs(load_fold_models(run_dir, dev, models=models), paths, device=dev,
                                views=views, tta=tta, img_size=img_size or setting.img_size,
                                batch_size=batch_size, workers=workers, amp_dtype=dtype,
                                features=features)


def predict_fold_probs(run_dir: str | Path, paths: Sequence[str], *, tta: int | None = None,
                       views: Sequence[str] | None = None, img_size: int | None = None,
                       device: str = "auto", batch_size: int = 64, workers: int = 0,
                       amp: str = "none", models: str = "folds",
                       setting: InferenceSetting | None = None) -> np.ndarray:
    """Per-model probabilities (F, N, K), each the mean over the TTA views that
    `predict_run_outputs` resolves."""
    return predict_run_outputs(run_dir, paths, tta=tta, views=views, img_size=img_size,
                               device=device, batch_size=batch_size, workers=workers, amp=amp,
                               models=models, setting=setting).probs


def predict_run(run_dir: str | Path, paths: Sequence[str], **kwargs) -> np.ndarray:
    """Ensembled probabilities (N, K): the mean of `predict_fold_probs` over the models (the
    folds by default; `models="all"` gives the full-data model the weight of one fold)."""
    return predict_fold_probs(run_dir, paths, **kwargs).mean(axis=0)


def extract_features(run_dir: str | Path, paths: Sequence[str], *, device: str = "auto",
                     batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """Penultimate features (N, D): the pooled input of each fold's classifier on the plain
    images, mean over folds."""
    dev = resolve_device(device)
    outputs = predict_fold_outputs(load_fold_models(run_dir, dev), paths, device=dev, views=("orig",),
                                   batch_size=batch_size, workers=workers, features=True)
    return outputs.features.mean(axis=0)


def resolve_images(images: str | Path, ids_csv: str | Path | None, id_col: str = "image_id"
                   ) -> tuple[list[str], list[str]]:
    """(image_ids, absolute paths) from a folder, optionally restricted to the ids of a CSV."""
    images = Path(images)
    if ids_csv is None:
        ids = list_image_files(images)
        if not ids:
            raise DataError(f"images folder {images} holds no image files")
    else:
        frame = read_text_table(ids_csv, allow_empty=True)
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
