"""Where a run computes and in what precision: one rule for every command.

Training, evaluation, prediction, the active-learning simulation and the memory planner all
turn a device name and an AMP name into torch objects here, so that a refusal (fp16 on a CPU,
CUDA on a machine without it) is the same everywhere and comes before any work.
"""

from __future__ import annotations

import torch

from mixcls.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; ConfigError for a name torch does not know or
    for CUDA asked for on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available here; use cpu")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an AMP name on `device` (None: full precision)."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp != "fp16":
        raise ConfigError(f"amp: {amp!r} is not one of none, bf16, fp16")
    if device.type != "cuda":
        raise ConfigError("amp: fp16 needs CUDA (its GradScaler guards fp16 gradients); "
                          "use --amp bf16 on the CPU")
    return torch.float16


def amp_setup(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype and GradScaler for training: fp16 needs a scaler (and CUDA), bf16 none."""
    dtype = amp_dtype(amp, device)
    return dtype, (torch.amp.GradScaler("cuda") if dtype is torch.float16 else None)
