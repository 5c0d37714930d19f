"""The run configuration: dataclass defaults -> YAML file -> CLI flags -> validate -> save.

Every option has one flat key, the same in a YAML file and on the command line (`img_size`
in YAML is `--img-size` on the command line). Internally options are grouped by what uses them
(`cfg.optim` goes to `build_optimizer`), so each section stays small.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml


def _opt(default: Any, help: str, *, choices: list[str] | None = None, key: str | None = None,
         factory: Any = None) -> Any:
    """A dataclass field that carries its CLI help, its allowed values and its flat key."""
    meta = {"help": help, "choices": choices, "key": key}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# The names each registry knows, written out so that parsing flags does not import torch,
# albumentations or timm; tests/test_config.py checks each list against its registry
# (transforms.PRESETS / TTA_VIEWS, losses.LOSSES, mix.MIX_MODES, optim, devices.amp_dtype,
# metrics.SELECT_COLUMNS).
PRESETS = ["light", "cassava", "digits", "none"]
AMP_MODES = ["none", "bf16", "fp16"]
# torch's own for the first three; the rest through timm's optimizer factory (optim.TIMM_OPTIMIZERS)
OPTIMIZERS = ["adamw", "adam", "sgd", "radam", "nadamw", "lamb", "lion", "adan", "madgrad",
              "adabelief", "adamp", "sgdp", "lookahead_adamw", "lookahead_radam"]
SCHEDULERS = ["cosine", "cosine_restarts", "onecycle", "constant"]
LOSSES = ["ce", "label_smoothing", "bi_tempered", "symmetric_ce", "taylor_ce", "focal", "bce"]
TTA_VIEWS = ["orig", "hflip", "vflip", "transpose", "rot90", "rot180", "rot270", "transverse", "zoom"]
MIX_MODES = ["batch", "sample"]
CHECK_IMAGES = ["full", "header"]
CACHE_IMAGES = ["auto", "yes", "no", "disk"]
SELECT_METRICS = ["accuracy", "logloss", "macro_f1"]
SAM_MODES = ["none", "sam", "asam"]
# --sam-rho when unset: the radii the methods' authors use (davda54/sam's README: asam's is
# about 10x larger, its perturbation being scaled by |w|).
DEFAULT_SAM_RHO = {"sam": 0.05, "asam": 2.0}


@dataclass
class DataConfig:
    data: str | None = _opt(None, "competition folder (train.csv + train_images/) or class-per-folder tree")
    csv: str | None = _opt(None, "training table, when it is not DATA/train.csv")
    images: str | None = _opt(None, "training images folder, when it is not DATA/train_images")
    id_col: str = _opt("image_id", "column of image file names (relative to the images folder)")
    label_col: str = _opt("label", "column of labels (integers or strings)")
    group_col: str | None = _opt(None, "column of group ids (patient, plant, photo session, "
                                 "near-duplicate cluster from `mixcls duplicates`): the rows of a "
                                 "group share one fold (stratified group k-fold), and given folds "
                                 "that split a group are refused")
    train_only_col: str | None = _opt(None, "column of 0/1 flags: rows with 1 (extra data, e.g. "
                                      "an earlier competition's images) are trained on in every "
                                      "fold and never validated, so the CV scores the other rows "
                                      "only (fold -1 in folds.csv)")
    img_size: int = _opt(224, "square side in pixels the model sees")
    preset: str = _opt("light", "albumentations preset for training", choices=PRESETS)
    colour_on_device: bool = _opt(False, "run the preset's colour steps (HSV, brightness/contrast) "
                                  "on the batch on the device instead of in the loader: less CPU "
                                  "per image, for GPU machines")
    augment_on_device: bool = _opt(False, "run the whole training augmentation (geometry, colour, "
                                   "cutout) on the batch on the device: the loader only decodes "
                                   "or reads the cache, draws the parameters and stacks the "
                                   "source images; for GPU machines (includes colour_on_device)")
    workers: int = _opt(2, "DataLoader worker processes (0: load in the main process)")
    cache_images: str = _opt("auto", "where decoded images live between epochs: yes (RAM, full "
                             "size), disk (copies shrunk to a short side of cache_scale x img_size "
                             "in --cache-dir), no (decode every epoch), auto (RAM when the set "
                             "fits in 2 GiB, else disk)", choices=CACHE_IMAGES)
    cache_dir: str = _opt("~/.cache/mixcls/images/", "folder of the disk cache and of the index of "
                          "images already checked (a rerun skips unchanged files)")
    cache_scale: float = _opt(1.15, "short side of a disk-cached copy, in units of img_size "
                              "(>= 1; room for the crops of the presets; never upscaled)")
    check_images: str = _opt("full", "before training, decode every image (full) or only read headers",
                             choices=CHECK_IMAGES)


@dataclass
class ModelConfig:
    name: str = _opt("resnet18", "any timm model name", key="model")
    pretrained: bool = _opt(False, "load the timm hub weights of the model (needs the hub)")
    pretrained_file: str | None = _opt(None, "load weights from a local .pth/.safetensors file")
    drop_rate: float = _opt(0.0, "dropout before the classifier")
    drop_path_rate: float = _opt(0.0, "stochastic depth: each residual block's branch is dropped "
                                 "for a sample with a probability rising to this rate at the "
                                 "last block (timm's drop_path_rate; 0: off)")
    channels_last: bool = _opt(False, "use the channels_last memory format (faster on GPUs)")
    compile: bool = _opt(False, "torch.compile the model for training and evaluation (compile "
                         "time is reported apart from training time; on a CPU it needs a C++ compiler)")
    freeze_epochs: int = _opt(0, "fine-tuning: the first N epochs train only the classifier head "
                              "(the body's weights and BatchNorm statistics stay as loaded)")
    freeze_bn: bool = _opt(False, "keep every BatchNorm layer in eval mode (running statistics "
                           "frozen): the usual fix for small batches when fine-tuning")
    grad_checkpointing: bool = _opt(False, "recompute the model's blocks in the backward pass "
                                    "instead of keeping their activations (timm's "
                                    "set_grad_checkpointing): less memory per image, one more "
                                    "forward pass per step")


@dataclass
class OptimConfig:
    name: str = _opt("adamw", "optimizer", choices=OPTIMIZERS, key="optimizer")
    lr: float | str = _opt(1e-3, "peak learning rate, or 'auto' (mixcls train runs the lr range "
                           "test on fold 0's training rows first and trains with its suggestion)")
    weight_decay: float = _opt(1e-2, "weight decay, by the optimizer's own rule: decoupled in "
                               "adamw, L2 in adam and sgd (timm's optimizers: see timm.optim)")
    momentum: float = _opt(0.9, "SGD momentum")
    head_lr_mult: float = _opt(1.0, "the classifier head's learning rate is this times lr")
    layer_decay: float | None = _opt(None, "layer-wise lr decay: layer l of L trains at "
                                     "lr x D^(L - l) (timm's layer groups; unset: off)")
    sam: str = _opt("none", "sharpness-aware minimization: each step's gradient is taken at the "
                    "worst weights within --sam-rho of the current ones (sam), or within a "
                    "radius scaled by each weight's size (asam); two forward and backward passes "
                    "per step", choices=SAM_MODES)
    sam_rho: float | None = _opt(None, "with --sam: the neighbourhood's radius (unset: 0.05 for "
                                 "sam, 2.0 for asam)")


@dataclass
class SchedConfig:
    name: str = _opt("cosine", "learning-rate schedule, stepped once per optimizer step",
                     choices=SCHEDULERS, key="scheduler")
    warmup_epochs: float = _opt(0.0, "linear warm-up length in epochs (cosine, onecycle)")
    t0: int = _opt(10, "epochs of the first cosine cycle (cosine_restarts)")
    t_mult: int = _opt(1, "cycle length factor after each restart (cosine_restarts)")
    min_lr: float = _opt(1e-6, "floor of the cosine schedules")


@dataclass
class TrainConfig:
    epochs: int = _opt(10, "epochs per fold")
    batch_size: int | str = _opt(32, "micro-batch per optimizer call, or 'auto' (largest that fits)")
    effective_batch: int | None = _opt(None, "with --batch-size auto: accumulate to this batch")
    accum_steps: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    amp: str = _opt("none", "mixed precision: fp16 (CUDA, GradScaler) or bf16 (CPU and CUDA)",
                    choices=AMP_MODES)
    grad_clip: float | None = _opt(None, "clip the gradient norm to this value")
    select_metric: str = _opt("accuracy", "the validation score that picks each fold's best "
                              "epoch (best.pt, oof.csv), stops it early (--patience) and sets "
                              "the --full-fit length", choices=SELECT_METRICS)
    patience: int | None = _opt(None, "early stopping: epochs without a better --select-metric")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (timm ModelEmaV3)")
    ema_decay: float = _opt(0.999, "EMA decay per optimizer step")
    swa_epochs: int = _opt(0, "stochastic weight averaging: each fold's model (best.pt, oof.csv) "
                           "is the mean of its weights at the end of its last N epochs, with "
                           "BatchNorm statistics measured again on its training rows (0: off)")
    swa_lr: float | None = _opt(None, "with --swa-epochs: the averaged epochs train at this "
                                "constant learning rate and --scheduler runs over the epochs "
                                "before them (unset: the schedule runs over every epoch)")
    folds: int = _opt(5, "number of stratified folds")
    train_folds: list[int] | None = _opt(None, "train only these folds (default: all)")
    seed: int = _opt(42, "seed of folds, weights, augmentation, mixing and loader workers")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N")
    save_every_steps: int | None = _opt(None, "also checkpoint every N optimizer steps (resume)")
    sync_bn: bool = _opt(False, "convert BatchNorm to SyncBatchNorm under torchrun")
    max_memory_mb: float | None = _opt(None, "with --batch-size auto: memory budget in MiB")
    batch_size_global: int | None = _opt(
        None, "images per optimizer step over all processes; sets the micro-batch to "
        "N / (processes x accum_steps), so a run on N GPUs takes the steps of one")
    log: str = _opt("none", "also log scalars and the confusion matrix for TensorBoard "
                    "(RUN/tensorboard/fold_K/)", choices=["none", "tensorboard"])
    folds_from: str | None = _opt(None, "re-use the folds.csv of this run folder (runs to be "
                                  "blended must share folds); --folds follows it")
    full_fit: bool = _opt(False, "after the folds, train one more model on every row (RUN/full/) "
                          "for the median best epoch of the folds (with --swa-epochs: for "
                          "--epochs, averaging the same last epochs)")
    full_fit_epochs: int | None = _opt(None, "with --full-fit: train this many epochs instead")
    class_weights: str = _opt("none", "weights of the classes in the training loss: none, "
                              "balanced (n / (K x count), from each fold's training rows), or "
                              "one number > 0 per class, comma-separated")
    pseudo: str | None = _opt(None, "a pseudo-label table (mixcls pseudo): fold K trains also on the "
                              "rows that passed for fold K, labelled by the teacher's fold-K model "
                              "(needs --folds-from TEACHER)")
    pseudo_weight: float = _opt(1.0, "with --pseudo: weight of a pseudo row in the loss relative "
                                "to a labelled row (the batch loss is the weighted mean)")
    distill: str | None = _opt(None, "a teacher run: fold K's training targets become (1 - w) x "
                               "given + w x the teacher's fold-K probabilities (needs "
                               "--folds-from TEACHER)")
    distill_weight: float = _opt(0.3, "with --distill: w, the teacher's share of the target")
    distill_temperature: float = _opt(1.0, "with --distill: soften the teacher's probabilities, "
                                      "softmax(log p / T)")


@dataclass
class MixConfig:
    method: str = _opt("none", "none, mixup, cutmix, fmix, or weights like fmix:0.5,cutmix:0.5",
                       key="mix")
    alpha: float = _opt(1.0, "lambda ~ Beta(alpha, alpha)", key="mix_alpha")
    prob: float = _opt(1.0, "probability of mixing a batch at all", key="mix_prob")
    off_epochs: int = _opt(0, "no mixing in the last N epochs", key="mix_off_epochs")
    decay_power: float = _opt(3.0, "fmix spectrum decay 1/f^d", key="mix_decay_power")
    max_soft: float = _opt(0.0, "fmix soft edge width (0: binary mask)", key="mix_max_soft")
    mode: str = _opt("batch", "one lambda per batch or per sample", choices=MIX_MODES,
                     key="mix_mode")


@dataclass
class LossConfig:
    name: str = _opt("ce", "training loss (all take soft targets)", choices=LOSSES, key="loss")
    smoothing: float = _opt(0.0, "label smoothing applied to the targets")
    t1: float = _opt(0.8, "bi-tempered: temperature of the log (t1 < 1 bounds the loss)")
    t2: float = _opt(1.4, "bi-tempered: temperature of the exp (t2 > 1 gives heavy tails)")
    focal_gamma: float = _opt(2.0, "focal loss focusing power")
    sce_alpha: float = _opt(0.1, "symmetric CE: weight of cross entropy")
    sce_beta: float = _opt(1.0, "symmetric CE: weight of reverse cross entropy")
    taylor_order: int = _opt(2, "Taylor CE: order of the expansion")


@dataclass
class PredictConfig:
    tta: int = _opt(1, "number of TTA views (the original first)")
    tta_views: list[str] = _opt(None, "ordered TTA views to take the first --tta of",
                                factory=lambda: ["orig", "hflip", "vflip", "transpose"])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it."""


def iter_options() -> list[tuple[str, str, dataclasses.Field]]:
    """Every option as (flat key, section name, dataclass field)."""
    out = []
    for section, kind in _SECTION_TYPES.items():
        for f in dataclasses.fields(kind):
            out.append((f.metadata.get("key") or f.name, section, f))
    return out


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                  "sched": SchedConfig, "train": TrainConfig, "mix": MixConfig,
                  "loss": LossConfig, "predict": PredictConfig}


def _option_index() -> dict[str, tuple[str, dataclasses.Field]]:
    return {key: (section, f) for key, section, f in iter_options()}


def apply_overrides(cfg: Config, values: dict[str, Any], *, source: str) -> Config:
    """Set flat keys on `cfg` (in place); unknown keys raise naming `source` and close matches."""
    index = _option_index()
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in index:
            import difflib
            close = difflib.get_close_matches(norm, index, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        section, f = index[norm]
        setattr(getattr(cfg, section), f.name, _coerce(norm, value, f))
    return cfg


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Convert YAML/CLI values to the field's type; strings like '1e-4' become floats."""
    if value is None:
        return None
    kind = str(f.type)
    try:
        if key == "batch_size":
            return "auto" if str(value) == "auto" else int(value)
        if key == "lr" and str(value) == "auto":
            return "auto"  # mixcls train runs the lr range test first (lr_find)
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("list[int]"):
            items = value.split(",") if isinstance(value, str) else value
            return [int(v) for v in items]
        if kind.startswith("list[str]"):
            items = value.split(",") if isinstance(value, str) else value
            return [str(v).strip() for v in items]
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {kind.split(' |')[0]}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `overrides`; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        apply_overrides(cfg, values, source=str(path))
    if overrides:
        apply_overrides(cfg, overrides, source="command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first bad key and its allowed values."""
    for key, section, f in iter_options():
        value = getattr(getattr(cfg, section), f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    _check_positive(cfg)
    _check_ranges(cfg)
    for view in cfg.predict.tta_views:
        if view not in TTA_VIEWS:
            raise ConfigError(f"tta_views: {view!r} is not one of {', '.join(TTA_VIEWS)}")
    if cfg.predict.tta > len(cfg.predict.tta_views):
        raise ConfigError(f"tta: {cfg.predict.tta} is more than the {len(cfg.predict.tta_views)} "
                          f"tta_views {cfg.predict.tta_views}")
    if cfg.predict.tta_views and cfg.predict.tta_views[0] != "orig":
        raise ConfigError("tta_views: the first view must be 'orig' (the image as it is)")
    if cfg.train.train_folds is not None:
        bad = [k for k in cfg.train.train_folds if not 0 <= k < cfg.train.folds]
        if bad:
            raise ConfigError(f"train_folds: {bad} outside 0..{cfg.train.folds - 1}")
    if cfg.train.swa_epochs:
        _check_swa(cfg.train)
        if cfg.train.swa_lr is not None and cfg.sched.warmup_epochs > cfg.train.epochs - cfg.train.swa_epochs:
            raise ConfigError(f"warmup_epochs: {cfg.sched.warmup_epochs} is more than the "
                              f"{cfg.train.epochs - cfg.train.swa_epochs} epochs before the "
                              "--swa-lr tail, where the schedule runs")
    elif cfg.train.swa_lr is not None:
        raise ConfigError("swa_lr: it sets the learning rate of the averaged epochs; set "
                          "--swa-epochs too, or unset --swa-lr")
    if cfg.optim.sam_rho is not None and cfg.optim.sam == "none":
        raise ConfigError("sam_rho: it sets the radius of --sam; set --sam sam or --sam asam "
                          "too, or unset --sam-rho")
    if cfg.loss.name == "bi_tempered" and not (cfg.loss.t1 <= 1.0 <= cfg.loss.t2):
        raise ConfigError(f"t1, t2: bi-tempered needs t1 <= 1 <= t2, got {cfg.loss.t1}, {cfg.loss.t2}")
    if cfg.data.augment_on_device:
        from mixcls.device_augment import HostPlan  # local: it imports the presets
        from mixcls.transforms import preset_steps
        try:
            HostPlan(preset_steps(cfg.data.preset, cfg.data.img_size, (0.5, 0.5, 0.5)), cfg.data.img_size)
        except ValueError as exc:
            raise ConfigError(f"augment_on_device: preset {cfg.data.preset!r}: {exc}") from None
    from mixcls.mix import parse_mix_spec  # local: mix imports nothing from config
    try:
        parse_mix_spec(cfg.mix.method)
    except ValueError as exc:
        raise ConfigError(f"mix: {exc}") from None


def _check_swa(t: TrainConfig) -> None:
    """--swa-epochs averages a fixed tail of every fold: nothing may cut it short or average
    the weights another way."""
    if t.ema:
        raise ConfigError("swa_epochs: --ema keeps another average of the weights; use one of "
                          "--ema and --swa-epochs")
    if t.patience is not None:
        raise ConfigError("swa_epochs: --patience could stop a fold before the epochs it "
                          "averages; unset --patience (the average is not chosen by validation)")
    if t.full_fit and t.full_fit_epochs is not None and t.full_fit_epochs < t.swa_epochs:
        raise ConfigError(f"full_fit_epochs: {t.full_fit_epochs} is fewer than swa_epochs="
                          f"{t.swa_epochs}, the epochs the full-data model averages")


def _check_positive(cfg: Config) -> None:
    rules = {
        "img_size": (cfg.data.img_size, 8), "epochs": (cfg.train.epochs, 1),
        "accum_steps": (cfg.train.accum_steps, 1), "folds": (cfg.train.folds, 2),
        "tta": (cfg.predict.tta, 1), "workers": (cfg.data.workers, 0),
        "t0": (cfg.sched.t0, 1), "t_mult": (cfg.sched.t_mult, 1),
    }
    if cfg.train.batch_size != "auto":
        rules["batch_size"] = (cfg.train.batch_size, 1)
    for key, (value, low) in rules.items():
        if value < low:
            raise ConfigError(f"{key}: {value} must be >= {low}")
    floats = {"mix_alpha": cfg.mix.alpha}
    if cfg.optim.lr != "auto":
        floats["lr"] = cfg.optim.lr
    for key, value in floats.items():
        if not value > 0:
            raise ConfigError(f"{key}: {value} must be > 0")
    for key, value in {"mix_prob": cfg.mix.prob, "smoothing": cfg.loss.smoothing,
                       "ema_decay": cfg.train.ema_decay}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: {value} must be in [0, 1]")


_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_SEED_LIMIT = 2**32  # scikit-learn's random_state (the folds) takes seeds below 2**32
_FLOAT32_MAX = 3.4028234663852886e38


def _finite(low: float, *, above: bool = False, high: float | None = None,
            below: bool = False) -> Callable[[Any], bool]:
    """A test for a finite number in [low, high] (open ends when `above` / `below`)."""
    def test(value: Any) -> bool:
        if not math.isfinite(value) or value < low or (above and value == low):
            return False
        return high is None or value < high or (value == high and not below)
    return test


def _check_ranges(cfg: Config) -> None:
    """Bounds of the numeric options that _check_positive does not cover; None means 'off'."""
    t, o, s, m, lo = cfg.train, cfg.optim, cfg.sched, cfg.mix, cfg.loss
    rules = [  # key, value, test, the allowed values in words
        ("lr", o.lr, _finite(0, above=True, high=_FLOAT32_MAX),
         f"a finite number > 0 and <= {_FLOAT32_MAX:.3g} (the optimizers step in float32)"),
        ("weight_decay", o.weight_decay, _finite(0), "a finite number >= 0"),
        ("momentum", o.momentum, _finite(0, high=1, below=True), "in [0, 1)"),
        ("min_lr", s.min_lr, _finite(0), "a finite number >= 0"),
        ("warmup_epochs", s.warmup_epochs, _finite(0, high=t.epochs), f"in [0, epochs={t.epochs}]"),
        ("cache_scale", cfg.data.cache_scale, _finite(1, high=8), "in [1, 8]"),
        ("drop_rate", cfg.model.drop_rate, _finite(0, high=1, below=True), "in [0, 1)"),
        ("drop_path_rate", cfg.model.drop_path_rate, _finite(0, high=1, below=True), "in [0, 1)"),
        ("freeze_epochs", cfg.model.freeze_epochs, lambda v: 0 <= v <= t.epochs,
         f"an integer in [0, epochs={t.epochs}]"),
        ("head_lr_mult", o.head_lr_mult, _finite(0, above=True, high=1e6), "a finite number > 0"),
        ("layer_decay", o.layer_decay, _finite(0, above=True, high=1), "in (0, 1], or unset (off)"),
        ("sam_rho", o.sam_rho, _finite(0, above=True, high=100), "in (0, 100], or unset"),
        ("grad_clip", t.grad_clip, _finite(0, above=True), "a finite number > 0, or unset (no clipping)"),
        ("patience", t.patience, lambda v: v >= 1, "an integer >= 1, or unset (no early stopping)"),
        ("save_every_steps", t.save_every_steps, lambda v: v >= 1,
         "an integer >= 1, or unset (checkpoints at epoch ends only)"),
        ("effective_batch", t.effective_batch, lambda v: v >= 1, "an integer >= 1, or unset"),
        ("full_fit_epochs", t.full_fit_epochs, lambda v: v >= 1, "an integer >= 1, or unset"),
        ("batch_size_global", t.batch_size_global, lambda v: v >= 1 and t.batch_size != "auto",
         "an integer >= 1 with a numeric --batch-size (auto plans its own), or unset"),
        ("max_memory_mb", t.max_memory_mb, _finite(0, above=True), "a number of MiB > 0, or unset"),
        ("seed", t.seed, lambda v: 0 <= v < _SEED_LIMIT, f"an integer in [0, {_SEED_LIMIT - 1}]"),
        ("device", t.device, lambda v: _DEVICE_PATTERN.fullmatch(v) is not None,
         "one of auto, cpu, cuda, cuda:N"),
        ("swa_epochs", t.swa_epochs, lambda v: 0 <= v <= t.epochs, f"an integer in [0, epochs={t.epochs}]"),
        ("swa_lr", t.swa_lr, _finite(0, above=True, high=_FLOAT32_MAX), "a finite number > 0, or unset"),
        ("mix_off_epochs", m.off_epochs, lambda v: 0 <= v <= t.epochs, f"in [0, epochs={t.epochs}]"),
        ("mix_decay_power", m.decay_power, _finite(0, above=True), "a finite number > 0"),
        ("mix_max_soft", m.max_soft, _finite(0, high=0.5), "in [0, 0.5]"),
        ("focal_gamma", lo.focal_gamma, _finite(0), "a finite number >= 0"),
        ("sce_alpha", lo.sce_alpha, _finite(0), "a finite number >= 0"),
        ("sce_beta", lo.sce_beta, _finite(0), "a finite number >= 0"),
        ("taylor_order", lo.taylor_order, lambda v: v >= 1, "an integer >= 1"),
    ]
    rules += [
        ("pseudo_weight", t.pseudo_weight, _finite(0, above=True, high=100),
         "a finite number in (0, 100]"),
        ("distill_weight", t.distill_weight, _finite(0, high=1), "in [0, 1]"),
        ("distill_temperature", t.distill_temperature, _finite(0, above=True, high=100),
         "a finite number in (0, 100]"),
    ]
    from mixcls.class_weights import parse_class_weights  # its count is checked with the table
    parse_class_weights(t.class_weights)
    if o.lr == "auto":  # resolved by the range test before training
        rules = [rule for rule in rules if rule[0] != "lr"]
    for key, value, test, allowed in rules:
        if value is not None and not test(value):
            raise ConfigError(f"{key}: {value!r} is not allowed; use {allowed}")


def config_to_flat(cfg: Config) -> dict[str, Any]:
    """The flat key -> value mapping, as written to config.yaml and checkpoints."""
    return {key: getattr(getattr(cfg, section), f.name) for key, section, f in iter_options()}


def config_from_flat(values: dict[str, Any]) -> Config:
    """Rebuild a Config from `config_to_flat` output (checkpoints, run folders)."""
    cfg = apply_overrides(Config(), values, source="saved config")
    validate(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved config, keys in the order of the sections."""
    return yaml.safe_dump(config_to_flat(cfg), sort_keys=False)
