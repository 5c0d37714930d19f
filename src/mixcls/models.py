"""Models: any timm architecture by name, pretrained from the hub or from a local file."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from mixcls.config import ModelConfig


class ModelError(ValueError):
    """A model name or weights file that cannot be used; the message names it."""


class SmallCNN(nn.Module):
    """A small VGG-style CNN for tiny images on CPUs (digits, Fashion-MNIST benchmarks).

    timm's smallest ImageNet models still cost ~0.5 GFLOP at 224 px and are built for large
    inputs; the benchmarks here train dozens of models on 2 CPU cores, so they need a model
    two orders of magnitude cheaper. It follows timm's classifier interface
    (forward_features / forward_head(pre_logits=True) / get_classifier / reset_classifier).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128),
                 drop_rate: float = 0.0, **kwargs: Any):
        super().__init__()
        layers, prev = [], in_chans
        for width in widths:
            layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc = nn.Linear(prev, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                               "classifier": "fc"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """timm's layer groups (layer-wise lr decay): one per convolution with its BatchNorm,
        or one per stage when `coarse`; the classifier is the last group."""
        per_stage = 7  # conv, bn, relu, conv, bn, relu, pool

        def ordinal(name: str) -> tuple[float, ...]:
            parts = name.split(".")
            if parts[0] != "features":
                return (float("inf"),)
            index = int(parts[1])
            stage, second = divmod(index, per_stage)
            return (float(stage),) if coarse else (float(2 * stage + (second >= 3)),)
        return ordinal

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


def register_models() -> None:
    """Register mixcls's small CNNs in timm's registry, so every `--model` path can name them.

    Called by `build_model` and `check_model_name` (and by whoever lists or creates models by
    name, e.g. a child process of the memory planner); a second call changes nothing.
    """
    from timm.models import register_model

    def small(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
        return SmallCNN(widths=(32, 64, 128), **kwargs)

    def tiny(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
        return SmallCNN(widths=(16, 32, 64), **kwargs)

    small.__name__, tiny.__name__ = "mixcls_cnn_small", "mixcls_cnn_tiny"
    small.__module__ = tiny.__module__ = __name__
    for fn in (small, tiny):
        if not timm.is_model(fn.__name__):
            register_model(fn)


def _unknown_model(name: str) -> ModelError:
    close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
    return ModelError(f"model: {name!r} is not a timm model"
                      + (f"; close names: {', '.join(close)}" if close else ""))


def check_model_name(name: str) -> None:
    """ModelError naming `name` (and close names) when timm, with mixcls's own CNNs registered,
    has no such model; for checks made before any work."""
    register_models()
    if not timm.is_model(name):
        raise _unknown_model(name)


# How long the hub may take to accept a connection before it counts as unreachable: timm's
# own download retries an unreachable hub for about a minute before it fails.
HUB_CONNECT_SECONDS = 2.0


def hub_reachable(url: str, *, seconds: float = HUB_CONNECT_SECONDS) -> bool:
    """Whether the host of `url` accepts a TCP connection within `seconds`.

    HF_HUB_OFFLINE=1 (huggingface_hub's own switch, which timm's download obeys) counts as
    unreachable without trying.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=seconds):
            return True
    except OSError:
        return False


def _cached_weights(name: str) -> tuple[bool, str]:
    """(weights of `name` already on disk, the address they would be downloaded from)."""
    from timm.models import get_pretrained_cfg

    check_model_name(name)
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # an architecture registered without any pretrained config
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(f"model: {name!r} has no pretrained weights in timm; drop --pretrained "
                         "or pass --pretrained-file FILE")
    if cfg.file:
        return Path(cfg.file).is_file(), str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        found = any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str)
                    for n in names)
        return found, f"{constants.ENDPOINT}/{repo}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
    return cached.is_file(), cfg.url


def check_pretrained_available(name: str, *,
                               reachable: Callable[[str], bool] = hub_reachable) -> None:
    """ModelError at once when the hub weights of `name` are neither cached nor downloadable.

    Made before any work, so an offline machine hears it in seconds instead of after timm's
    minute of retries and after the run folder was begun.
    """
    cached, source = _cached_weights(name)
    if cached or reachable(source):
        return
    raise ModelError(f"pretrained: the weights of {name!r} are not in the local cache and "
                     f"{urlparse(source).hostname or source} cannot be reached (offline, or "
                     "HF_HUB_OFFLINE=1); download them once and pass --pretrained-file FILE, "
                     "or drop --pretrained")


def build_model(cfg: ModelConfig, num_classes: int, *,
                log: Callable[[str], None] | None = None) -> nn.Module:
    """timm.create_model(cfg.name, num_classes=…), with hub or local-file pretrained weights;
    `log` hears which weights were loaded (describe_weights)."""
    register_models()
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained and not cfg.pretrained_file,
                                  num_classes=num_classes, drop_rate=cfg.drop_rate,
                                  **_drop_path_kwargs(cfg))
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        raise _unknown_model(cfg.name) from None
    except Exception as exc:  # the hub raises network errors of many types
        if cfg.pretrained:
            raise ModelError(f"pretrained weights of {cfg.name!r} could not be fetched from the hub "
                             f"({exc.__class__.__name__}: {exc}); download them once and pass "
                             "--pretrained-file FILE") from None
        raise
    loaded = load_pretrained_file(model, cfg.pretrained_file) if cfg.pretrained_file else None
    line = describe_weights(cfg, model, loaded) if log is not None else None
    if line is not None:
        log(line)
    return model


def describe_weights(cfg: ModelConfig, model: nn.Module, loaded: dict[str, Any] | None) -> str | None:
    """The log line of a run that starts from pretrained weights (None from scratch): which
    weights, from where, and how many of the model's tensors they set."""
    total = len(_weights(model.state_dict()))
    if cfg.pretrained_file:
        skipped = loaded["skipped_classifier"]
        note = f" (classifier {', '.join(skipped)} left new: other class count)" if skipped else ""
        return f"pretrained weights: {cfg.pretrained_file}, {loaded['loaded']} tensors loaded{note}"
    if not cfg.pretrained:
        return None
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    source = pcfg.get("hf_hub_id") or pcfg.get("url") or pcfg.get("file") or "timm hub"
    tag = pcfg.get("tag")
    # timm loads every tensor, except the classifier when the class count differs
    new_head = pcfg.get("num_classes") != getattr(model, "num_classes", None)
    classifier = [k for k in _classifier_keys(model) if k in _weights(model.state_dict())]
    matched = total - len(classifier) if new_head else total
    return (f"pretrained weights: {cfg.name}{'.' + tag if tag else ''} from {source}, "
            f"{matched} of {total} tensors" + (" (the classifier is new for these classes)"
                                               if new_head and classifier else ""))


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters (timm's `get_classifier()`)."""
    if not hasattr(model, "get_classifier"):
        raise ModelError(f"model {type(model).__name__} has no get_classifier(); "
                         "--freeze-epochs and --head-lr-mult need one")
    return list(model.get_classifier().parameters())


def set_body_trainable(model: nn.Module, trainable: bool) -> None:
    """requires_grad of every parameter outside the classifier head. A frozen parameter gets
    no gradient, so the optimizer skips it entirely: no step, no weight decay, no state."""
    head = {id(p) for p in head_parameters(model)}
    for param in model.parameters():
        if id(param) not in head:
            param.requires_grad_(trainable)


def batchnorm_modules(model: nn.Module, *, body_only: bool = False) -> list[nn.Module]:
    """Every BatchNorm (and SyncBatchNorm) module; with `body_only`, those outside the head."""
    head = {id(m) for m in model.get_classifier().modules()} if body_only else set()
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head]


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """timm's `set_grad_checkpointing(True)`; ModelError naming the model when it has none (or,
    as some timm models do, asserts that it cannot)."""
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is not None:
        try:
            setter(True)
            return
        except AssertionError:
            pass
    raise ModelError(f"model {name!r} has no gradient checkpointing (timm's "
                     "set_grad_checkpointing); unset --grad-checkpointing for it")


def build_training_model(cfg: ModelConfig, num_classes: int, device: torch.device, *,
                         log: Callable[[str], None] | None = None) -> nn.Module:
    """build_model on `device`, as a training process runs it: gradient checkpointing
    (--grad-checkpointing) and the memory format (--channels-last) set. Prediction builds the
    model without them (build_model): it has no backward pass."""
    model = build_model(cfg, num_classes, log=log).to(device)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.name)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _drop_path_kwargs(cfg: ModelConfig) -> dict[str, float]:
    """timm's drop_path_rate, passed only when set: not every architecture takes it."""
    return {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate > 0 else {}


def drop_path_rates(model: nn.Module) -> list[float]:
    """The drop probability of each of timm's DropPath layers, in module order."""
    from timm.layers import DropPath

    return [float(m.drop_prob) for m in model.modules() if isinstance(m, DropPath)]


def check_model_options(cfg: ModelConfig, *, layer_decay: float | None,
                        head_lr_mult: float) -> None:
    """ModelError before any work when the model lacks what an option needs: a classifier
    (`get_classifier`) for --freeze-epochs / --head-lr-mult, timm's group_matcher for
    --layer-decay, set_grad_checkpointing for --grad-checkpointing, stochastic-depth layers for
    --drop-path-rate. The model is built on the meta device: no weights, no time."""
    needs_head = cfg.freeze_epochs > 0 or head_lr_mult != 1.0
    if not (needs_head or layer_decay is not None or cfg.grad_checkpointing
            or cfg.drop_path_rate > 0):
        return
    register_models()
    with torch.device("meta"):
        try:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=2,
                                      **_drop_path_kwargs(cfg))
        except TypeError as exc:  # a constructor without drop_path_rate
            if "drop_path_rate" not in str(exc):
                raise
            model = None
    # Some constructors take any keyword and ignore it, so the layers themselves are the test.
    if cfg.drop_path_rate > 0 and (model is None or not any(drop_path_rates(model))):
        raise ModelError(f"drop_path_rate: model {cfg.name!r} has no stochastic-depth layers "
                         "(timm's DropPath); unset --drop-path-rate for it")
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.name)
    if needs_head and not hasattr(model, "get_classifier"):
        raise ModelError(f"model {cfg.name!r} has no get_classifier(); --freeze-epochs and "
                         "--head-lr-mult need a classifier head")
    if layer_decay is not None and not hasattr(model, "group_matcher"):
        raise ModelError(f"layer_decay: model {cfg.name!r} has no group_matcher (timm's layer "
                         "groups); unset --layer-decay for this model")


def find_compiler(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` (None when it can): on a CPU inductor
    compiles C++ and needs a compiler (g++, clang++ or $CXX)."""
    if device.type != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own error types when none is found
        return f"torch.compile on a CPU needs a C++ compiler (g++ or clang++): {exc}"
    return None


def check_compile(device: torch.device) -> None:
    """ModelError before any work when --compile cannot run here."""
    reason = find_compiler(device)
    if reason is not None:
        raise ModelError(f"compile: {reason}; install one or drop --compile")


def model_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation the architecture's pretrained weights expect."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"pretrained file {path} cannot be loaded safely: {exc}") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"pretrained file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained_file(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights from a local file into `model`; returns what was loaded and skipped.

    Keys are matched by name when the file comes from timm; otherwise (e.g. a port of the same
    architecture with other names) tensors are matched in order, each pair checked for shape.
    A classifier whose shape differs (other number of classes) is left freshly initialised.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"pretrained file {path} does not exist")
    source = _read_state_dict(path)
    target = model.state_dict()
    by_name = {k: v for k, v in source.items() if k in target}
    if len(by_name) >= 0.9 * len(_weights(target)):
        mapped = by_name
    else:
        mapped = _map_in_order(source, target, path)
    classifier = _classifier_keys(model)
    loadable, skipped = {}, []
    for key, tensor in mapped.items():
        if target[key].shape == tensor.shape:
            loadable[key] = tensor
        elif key in classifier:
            skipped.append(key)
        else:
            raise ModelError(f"pretrained file {path}: {key} has shape {tuple(tensor.shape)}, "
                             f"the model needs {tuple(target[key].shape)}")
    missing = [k for k in _weights(target) if k not in loadable and k not in classifier]
    if missing:
        raise ModelError(f"pretrained file {path} lacks {len(missing)} weights of the model, "
                         f"e.g. {', '.join(missing[:5])}")
    model.load_state_dict(loadable, strict=False)
    return {"loaded": len(loadable), "skipped_classifier": skipped}


def _weights(state: dict[str, torch.Tensor]) -> list[str]:
    """Float tensors only: BatchNorm's integer step counters carry no learned value."""
    return [k for k, v in state.items() if v.is_floating_point()]


def _map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                  path: Path) -> dict[str, torch.Tensor]:
    src_keys, dst_keys = _weights(source), _weights(target)
    if len(src_keys) != len(dst_keys):
        raise ModelError(f"pretrained file {path}: its {len(src_keys)} tensors match neither the "
                         f"names nor the count of the model's {len(dst_keys)}")
    mapped = {}
    for i, (src, dst) in enumerate(zip(src_keys, dst_keys)):
        last = i >= len(dst_keys) - 2  # the classifier may differ in its class count
        if source[src].shape != target[dst].shape and not last:
            raise ModelError(f"pretrained file {path}: tensor {i} ({src}, {tuple(source[src].shape)}) "
                             f"does not fit {dst} {tuple(target[dst].shape)} when matched in order")
        mapped[dst] = source[src]
    return mapped


def _classifier_keys(model: nn.Module) -> set[str]:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "")
    names = name if isinstance(name, (list, tuple)) else [name]
    return {k for k in model.state_dict() for n in names if n and k.startswith(n + ".")}
