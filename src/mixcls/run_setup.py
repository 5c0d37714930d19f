"""Everything a run settles before its first epoch: the table and its folds, every check that
can refuse the configuration, the batch plan, and the run folder's first files.

The order is the point: a run is refused (bad data, fp16 on a CPU, an unknown model, weights
that cannot be fetched, a full disk) before anything is written, so the corrected command
finds no half-begun folder in its way.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from mixcls.config import Config, ConfigError, LossConfig, MixConfig, dump_config
from mixcls.data import (TRAIN_ONLY_FOLD, DataError, TrainTable, check_class_counts, format_listing,
                         load_train_table)
from mixcls.devices import amp_setup
from mixcls.distributed import check_distributed_options
from mixcls.folds import empty_folds, find_split_groups, make_folds
from mixcls.image_cache import ImageCache
from mixcls.losses import build_loss
from mixcls.models import (ModelError, build_model, check_compile, check_model_options,
                           check_model_name, check_pretrained_available)
from mixcls.runs import (RunError, atomic_write_csv, atomic_write_json, atomic_write_text,
                         check_writable, read_json, remove_stale_temporaries)
from mixcls.sampling import per_process_batch

# Disk kept free beyond the checkpoints: CSVs, the report, the page cache of a busy machine.
DISK_MARGIN_MB = 50.0
HEADER_FILES = ("config.yaml", "classes.json", "dataset.json", "folds.csv", "batch_plan.json",
                "lr_find.json")


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batch per process and accumulation steps; `source` says how they were chosen."""

    batch_size: int
    accum_steps: int
    source: str = "config"  # "config", "auto" (measured once, saved) or "global"


# ---------------------------------------------------------------- the table and its folds

def prepare_table(cfg: Config, *, image_cache: ImageCache | None = None) -> tuple[TrainTable, np.ndarray]:
    """The checked table and each row's fold (`--folds-from`, the table's own `fold` column, or
    stratified, grouped by `--group-col` when it is set). With `image_cache` the check's decode
    of each image also fills the cache, and files the cache's index already checked are not
    decoded again."""
    table = load_train_table(cfg.data.data, csv=cfg.data.csv, images=cfg.data.images,
                             id_col=cfg.data.id_col, label_col=cfg.data.label_col,
                             group_col=cfg.data.group_col, train_only_col=cfg.data.train_only_col,
                             check_images=cfg.data.check_images, image_cache=image_cache)
    frame, source = table.frame, table.csv_path or table.images_dir
    if table.num_classes < 2:
        raise DataError(f"{source}: a classifier needs at least 2 classes, the table has only "
                        f"{table.classes}")
    if "train_only" in frame.columns and frame["train_only"].all():
        raise DataError(f"train_only_col {cfg.data.train_only_col!r}: every row of {source} is "
                        "train-only; the CV needs rows to validate")
    if cfg.train.folds_from is not None:
        if "fold" in frame.columns:
            raise ConfigError(f"folds_from: {source} has its own fold column; drop --folds-from "
                              "or the column (one source of folds)")
        folds, where = read_shared_folds(cfg.train.folds_from, frame["image_id"].tolist()), \
            f"{Path(cfg.train.folds_from) / 'folds.csv'}"
    elif "fold" not in frame.columns:
        check_class_counts(table, cfg.train.folds)
        folds = _made_folds(table, cfg.train.folds, cfg.train.seed, cfg.data.group_col)
        if "group" in frame.columns and "train_only" in frame.columns:  # -1 is a fold here too
            _check_groups_kept(frame["group"].to_numpy(), folds, "the folds made", cfg.data.group_col)
        return table, folds
    else:
        folds, where = frame["fold"].to_numpy(dtype=np.int64), f"the fold column of {source}"
    if "train_only" in frame.columns:
        _check_train_only_agrees(frame, folds, where, cfg.data.train_only_col)
    present = sorted(set(folds.tolist()) - {TRAIN_ONLY_FOLD})
    if present != list(range(cfg.train.folds)):
        hint = (f"set --folds {max(present) + 1}" if present == list(range(max(present) + 1))
                else f"number the folds 0 … {cfg.train.folds - 1}")
        raise ConfigError(f"folds: {where} holds folds {_short(present)}, but folds is "
                          f"{cfg.train.folds}; {hint}")
    if "group" in frame.columns:
        _check_groups_kept(frame["group"].to_numpy(), folds, where, cfg.data.group_col)
    return table, folds


def _check_train_only_agrees(frame: pd.DataFrame, folds: np.ndarray, where: str, column: str) -> None:
    """Given folds and --train-only-col must name the same train-only rows (fold -1)."""
    flagged, minus = frame["train_only"].to_numpy(dtype=bool), folds == TRAIN_ONLY_FOLD
    differ = np.flatnonzero(flagged != minus)
    if len(differ):
        i = int(differ[0])
        raise DataError(f"train_only_col {column!r}: {len(differ)} row(s) are train-only in one "
                        f"of the column and {where} but not in the other (fold {TRAIN_ONLY_FOLD} "
                        f"means train-only), first {frame['image_id'].iloc[i]!r}; drop one of them")


def _made_folds(table: TrainTable, n_folds: int, seed: int, group_col: str | None) -> np.ndarray:
    """Stratified folds (grouped when the table has groups) of the validated rows, and
    TRAIN_ONLY_FOLD for the train-only rows; DataError when the groups are too few or too
    unequal to fill every fold."""
    validated = (~table.frame["train_only"].to_numpy(dtype=bool) if "train_only" in table.frame.columns
                 else np.ones(len(table.frame), bool))
    if validated.all():
        return _stratified_folds(table, n_folds, seed, group_col)
    sub = TrainTable(frame=table.frame[validated].reset_index(drop=True), classes=table.classes,
                     images_dir=table.images_dir, csv_path=table.csv_path,
                     integer_labels=table.integer_labels, soft_targets=None)
    folds = np.full(len(table.frame), TRAIN_ONLY_FOLD, np.int64)
    folds[validated] = _stratified_folds(sub, n_folds, seed, group_col)
    return folds


def _stratified_folds(table: TrainTable, n_folds: int, seed: int, group_col: str | None) -> np.ndarray:
    if group_col is None:
        return make_folds(table.labels, n_folds, seed)
    source, groups = table.csv_path, table.frame["group"].to_numpy()
    sizes = pd.Series(groups).value_counts()
    if len(sizes) < n_folds:
        raise DataError(f"group_col {group_col!r}: {source} has {len(sizes)} group(s), fewer than "
                        f"the {n_folds} folds; use --folds {max(len(sizes), 2)} or finer groups")
    folds = make_folds(table.labels, n_folds, seed, groups=groups)
    empty = empty_folds(folds, n_folds)
    if empty:
        raise DataError(f"group_col {group_col!r}: {n_folds} folds of whole groups leave fold(s) "
                        f"{_short(empty)} empty ({sizes.iloc[0]} of the {len(groups)} rows are in "
                        f"group {sizes.index[0]!r}); use fewer folds or finer groups")
    return folds


def _check_groups_kept(groups: np.ndarray, folds: np.ndarray, where: str, group_col: str) -> None:
    """Given folds must keep each group in one fold, or that group is validated by a model that
    trained on it."""
    split = find_split_groups(groups, folds)
    if split:
        listed = [f"group {g!r}: folds {', '.join(map(str, fs))}" for g, fs in split.items()]
        raise DataError(format_listing(f"group_col {group_col!r}: {where} puts a group's rows in "
                                       "more than one fold, so CV would validate on rows it "
                                       "trained on; groups", listed))


def read_shared_folds(run_dir: str | Path, image_ids: list[str]) -> np.ndarray:
    """Each row's fold (N,) from another run's folds.csv (`--folds-from`), matched by image_id.

    Runs that are to be blended must be scored on the same rows; RunError names the first ids
    that one table has and the other lacks (RUN's train-only rows, fold -1, may be missing).
    """
    from mixcls.runs import RunFolder

    saved = RunFolder(Path(run_dir)).read_folds()
    path = Path(run_dir) / "folds.csv"
    by_id = dict(zip(saved["image_id"].astype(str), saved["fold"].astype(np.int64)))
    missing = [i for i in image_ids if i not in by_id]
    # RUN's train-only rows may be left out: extra training data is each run's own choice
    extra = sorted(set(by_id) - set(image_ids) - {i for i, f in by_id.items() if f == TRAIN_ONLY_FOLD})
    if missing or extra or len(by_id) != len(saved):
        said = []
        if missing:
            said.append(f"{len(missing)} id(s) of the training table are not in it "
                        f"(first: {', '.join(missing[:5])})")
        if extra:
            said.append(f"{len(extra)} of its id(s) are not in the training table "
                        f"(first: {', '.join(extra[:5])})")
        if len(by_id) != len(saved):
            said.append("it lists an id twice")
        raise RunError(f"--folds-from {run_dir}: {path} does not match the training table: "
                       + "; ".join(said))
    return np.array([by_id[i] for i in image_ids], dtype=np.int64)


def count_shared_folds(run_dir: str | Path) -> int:
    """The number of folds in another run's folds.csv (what `--folds-from` sets --folds to)."""
    from mixcls.runs import RunFolder

    return int(RunFolder(Path(run_dir)).read_folds()["fold"].max()) + 1


def _short(values: list[int], limit: int = 10) -> str:
    return str(values) if len(values) <= limit else f"{values[:limit]} … ({len(values)} values)"


def _kept(table: TrainTable) -> np.ndarray:
    """(N,) bool: the rows trained on (a cleaned table's keep == 0 rows are not)."""
    if "keep" in table.frame.columns:
        return table.frame["keep"].to_numpy() == 1
    return np.ones(len(table.frame), dtype=bool)


def fold_rows(table: TrainTable, folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows (other folds, keep == 1) and validation rows (this fold, all of them)."""
    train_rows = np.flatnonzero((folds != fold) & _kept(table))
    valid_rows = np.flatnonzero(folds == fold)
    return train_rows, valid_rows


def full_fit_rows(table: TrainTable) -> np.ndarray:
    """Every row the full-data model trains on (keep == 1): all folds, no validation."""
    return np.flatnonzero(_kept(table))


def valid_labels_of(table: TrainTable) -> np.ndarray:
    """Validation is scored on the labels as given, never on cleaned ones."""
    if "label_given" in table.frame.columns:
        return table.frame["label_given"].to_numpy(dtype=np.int64)
    return table.labels


@dataclass
class FoldData:
    """What one fold trains and validates on, as the orchestrator chose it."""

    classes: list[str]
    train_paths: list[str]
    train_targets: np.ndarray  # (n_train,) labels or (n_train, K) soft targets
    valid_paths: list[str]
    valid_labels: np.ndarray  # (n_valid,) labels as given, for scoring
    train_cache: list[np.ndarray] | None = None  # decoded images, in the order of the paths
    valid_cache: list[np.ndarray] | None = None
    train_weights: np.ndarray | None = None  # (n_train,) weights in the loss; None: all 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def make_fold_data(table: TrainTable, train_rows: np.ndarray, valid_rows: np.ndarray, *,
                   cache: list[np.ndarray] | None = None) -> FoldData:
    """The table's rows `train_rows` (its targets) and `valid_rows` (labels as given)."""
    targets = table.soft_targets if table.soft_targets is not None else table.labels
    paths = table.frame["path"].tolist()

    def pick(items: list, rows: np.ndarray) -> list:
        return [items[i] for i in rows]

    return FoldData(list(table.classes), pick(paths, train_rows), targets[train_rows],
                    pick(paths, valid_rows), valid_labels_of(table)[valid_rows],
                    train_cache=pick(cache, train_rows) if cache is not None else None,
                    valid_cache=pick(cache, valid_rows) if cache is not None else None)


def add_train_rows(data: FoldData, paths: list[str], targets: np.ndarray, *,
                   cache: list[np.ndarray] | None = None, weight: float = 1.0) -> FoldData:
    """`data` with more training rows (pseudo-labelled images) after its own; validation is
    untouched. Labels and soft targets together become soft targets (n, K) float32. The added
    rows weigh `weight` in the loss, the others what they weighed (1 unless set before); with
    every weight 1 there are no weights (the plain mean, bit for bit).

    With no rows to add, `data` itself comes back, so such a run is the run without them.
    """
    if len(paths) == 0:
        return data
    mine, theirs = data.train_targets, np.asarray(targets)
    if mine.ndim != theirs.ndim:
        from mixcls.losses import to_soft_targets
        mine, theirs = (to_soft_targets(torch.as_tensor(t), data.num_classes).numpy()
                        for t in (mine, theirs))
    if data.train_cache is not None and cache is None:
        raise ValueError("add_train_rows: the fold's images are cached, the added ones must be too")
    weights = data.train_weights
    if weights is not None or weight != 1.0:
        old = weights if weights is not None else np.ones(len(data.train_paths), np.float32)
        weights = np.concatenate([old, np.full(len(paths), weight, np.float32)])
    return dataclasses.replace(
        data, train_paths=data.train_paths + list(paths),
        train_targets=np.concatenate([mine, theirs.astype(mine.dtype)]),
        train_cache=data.train_cache + list(cache) if data.train_cache is not None else None,
        train_weights=weights)


# ---------------------------------------------------------------- checks before any output

def build_training_loss(cfg: LossConfig) -> nn.Module:
    return build_loss(cfg.name, smoothing=cfg.smoothing, t1=cfg.t1, t2=cfg.t2,
                      focal_gamma=cfg.focal_gamma, sce_alpha=cfg.sce_alpha, sce_beta=cfg.sce_beta,
                      taylor_order=cfg.taylor_order)


def build_mixer(cfg: MixConfig) -> Callable | None:
    if cfg.method == "none":
        return None
    from mixcls.mix import Mixer
    return Mixer(cfg.method, alpha=cfg.alpha, prob=cfg.prob, decay_power=cfg.decay_power,
                 max_soft=cfg.max_soft, mode=cfg.mode)


def check_run_settings(cfg: Config, device: torch.device, *, world_size: int) -> None:
    """Every check of the configuration that a fold would otherwise fail on after the run
    folder was written: AMP on this device, the model and its weights, loss and mixing,
    the distributed options, the batch split and the TensorBoard package."""
    amp_setup(cfg.train.amp, device)
    check_model_name(cfg.model.name)
    check_model_options(cfg.model, layer_decay=cfg.optim.layer_decay,
                        head_lr_mult=cfg.optim.head_lr_mult)
    if cfg.model.compile:
        check_compile(device)
    if cfg.model.pretrained_file:
        if not Path(cfg.model.pretrained_file).is_file():
            raise ModelError(f"pretrained file {cfg.model.pretrained_file} does not exist")
    elif cfg.model.pretrained:
        check_pretrained_available(cfg.model.name)
    try:
        build_training_loss(cfg.loss)
        build_mixer(cfg.mix)
    except ValueError as exc:
        raise ConfigError(f"loss / mix: {exc}") from None
    check_distributed_options(sync_bn=cfg.train.sync_bn, device=device, world_size=world_size)
    if cfg.train.batch_size_global is not None:
        per_process_batch(cfg.train.batch_size_global, world_size=world_size,
                          accum_steps=cfg.train.accum_steps)
    if cfg.train.log == "tensorboard":
        from mixcls.tblog import check_tensorboard
        check_tensorboard()


# ---------------------------------------------------------------- the batch plan

def resolve_batch_plan(cfg: Config, num_classes: int, device: torch.device, *, world_size: int,
                       run_dir: Path | None, resume: bool, log: Callable[[str], None]) -> BatchPlan:
    """The micro-batch and accumulation the run trains with.

    `--batch-size auto` is measured once, when the run starts, and saved in batch_plan.json: a
    resume re-uses it, since a second measurement (memory figures are noisy) could give other
    numbers than the step checkpoints were saved with.
    """
    if cfg.train.batch_size == "auto":
        saved = run_dir / "batch_plan.json" if run_dir is not None else None
        if resume and saved is not None and saved.is_file():
            plan = BatchPlan(**read_json(saved))
            log(f"batch size auto: micro-batch {plan.batch_size} x {plan.accum_steps} accumulation "
                f"steps, as planned when the run started ({saved})")
            return plan
        return _plan_auto_batch(cfg, num_classes, device, log)
    if cfg.train.batch_size_global is not None:
        micro = per_process_batch(cfg.train.batch_size_global, world_size=world_size,
                                  accum_steps=cfg.train.accum_steps)
        return BatchPlan(micro, cfg.train.accum_steps, "global")
    return BatchPlan(int(cfg.train.batch_size), cfg.train.accum_steps)


def _plan_auto_batch(cfg: Config, num_classes: int, device: torch.device,
                     log: Callable[[str], None]) -> BatchPlan:
    """(micro-batch, accumulation steps) from the largest micro-batch that fits on `device`."""
    from mixcls.memory import find_max_batch, plan_batch
    micro = find_max_batch(cfg.model.name, cfg.data.img_size, num_classes=num_classes,
                           budget_mb=cfg.train.max_memory_mb, device=str(device), amp=cfg.train.amp,
                           grad_checkpointing=cfg.model.grad_checkpointing, sam=cfg.optim.sam)
    effective = cfg.train.effective_batch or micro
    batch, accum = plan_batch(effective, micro)
    log(f"batch size auto: micro-batch {batch} x {accum} accumulation steps "
        f"(largest fitting micro-batch {micro}, effective batch {batch * accum})")
    return BatchPlan(batch, accum, "auto")


def with_batch_plan(cfg: Config, plan: BatchPlan) -> Config:
    """A copy of `cfg` that trains with `plan` (what the checkpoints record)."""
    train = dataclasses.replace(cfg.train, batch_size=plan.batch_size, accum_steps=plan.accum_steps)
    return dataclasses.replace(cfg, train=train)


# ---------------------------------------------------------------- the run folder

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
    averages = (1 if cfg.train.ema else 0) + (1 if cfg.train.swa_epochs else 0)
    last_mb = weights_mb * (1 + moments + averages)
    return n_folds * (weights_mb + last_mb) + last_mb + DISK_MARGIN_MB


def write_run_header(cfg: Config, table: TrainTable, folds: np.ndarray, run_dir: Path,
                     plan: BatchPlan) -> None:
    """config.yaml, classes.json, dataset.json, folds.csv (+ batch_plan.json): what later steps read."""
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_json(run_dir / "classes.json", table.classes)
    atomic_write_json(run_dir / "dataset.json", {
        "csv": str(table.csv_path) if table.csv_path else None, "images": str(table.images_dir),
        "rows": len(table.frame), "integer_labels": table.integer_labels,
        "soft_targets": table.soft_targets is not None,
        "groups": int(table.frame["group"].nunique()) if "group" in table.frame.columns else None,
        "train_only_rows": int((folds == TRAIN_ONLY_FOLD).sum())})
    fold_table = pd.DataFrame({"image_id": table.frame["image_id"], "fold": folds})
    if "group" in table.frame.columns:  # so `mixcls clean` can give the cleaned table its groups
        fold_table["group"] = table.frame["group"].to_numpy()
    atomic_write_csv(run_dir / "folds.csv", fold_table)
    if plan.source == "auto":
        atomic_write_json(run_dir / "batch_plan.json", dataclasses.asdict(plan))


def open_run_folder(cfg: Config, table: TrainTable, folds: np.ndarray, run_dir: Path, *,
                    resume: bool, chosen: list[int], plan: BatchPlan,
                    log: Callable[[str], None]) -> tuple[np.ndarray, list[int]]:
    """Check and start (or reopen) the run folder; return the folds and the folds already finished.

    Runs on rank 0 only and after every check of the configuration, so a refused run costs
    seconds, not epochs, and leaves no folder behind.
    """
    need_mb = estimate_run_mb(cfg, table.num_classes, len(chosen))
    if not resume:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise RunError(f"run folder {run_dir} already holds files; pass another --out, or "
                           f"--resume {run_dir} to continue it")
        check_writable(run_dir, min_free_mb=need_mb)
        write_run_header(cfg, table, folds, run_dir, plan)
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


def discard_begun_run(run_dir: Path) -> bool:
    """Remove what a new run wrote before it failed, when it holds no checkpoint yet.

    Only the run's own files go (header, fold_K/ folders, tensorboard/); the folder itself
    goes only when it is then empty. With a checkpoint the folder stays, for --resume.
    """
    if not run_dir.is_dir() or any(run_dir.glob("fold_*/*.pt")):
        return False
    for name in HEADER_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in [*run_dir.glob("fold_*"), run_dir / "tensorboard", run_dir / "teacher"]:
        shutil.rmtree(folder, ignore_errors=True)
    remove_stale_temporaries(run_dir)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()
    return True


def previous_seconds(run_dir: Path, resume: bool) -> float:
    """Training seconds of the run before this resume (0 for a new run)."""
    if not resume or not (run_dir / "metrics.json").is_file():
        return 0.0
    return float(read_json(run_dir / "metrics.json").get("seconds", 0.0))


def build_image_cache(cfg: Config) -> ImageCache:
    """The run's image cache (RAM, disk copies or none, and the check index); a cache folder
    that cannot be written is refused here, before any image is read."""
    try:
        return ImageCache(cfg.data.cache_images, img_size=cfg.data.img_size,
                          cache_dir=cfg.data.cache_dir, cache_scale=cfg.data.cache_scale)
    except ValueError as exc:
        raise ConfigError(f"cache_images: {exc}") from None
