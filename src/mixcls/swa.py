"""Stochastic weight averaging (--swa-epochs N): each fold's model is the equal-weight mean of
its weights at the end of its last N epochs (torch.optim.swa_utils.AveragedModel), with its
BatchNorm statistics measured again on the fold's training rows (torch's update_bn), since the
statistics of averaged weights are not the average of the statistics.

The averaged model is not chosen by validation: every fold's is the same N epochs, so its OOF
probabilities are as honest as the folds themselves. The validation rows of each epoch still
score the epoch's own weights in history.csv; swa.json beside them scores the average.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from mixcls import distributed as dist
from mixcls.engine import autocast_context, prepare_images
from mixcls.transforms import Normalizer


def build_averager(model: nn.Module) -> AveragedModel:
    """The running mean of `model`'s parameters (its buffers are measured, not averaged).

    The copy never trains, so timm's gradient checkpointing is turned off in it: the BatchNorm
    pass and validation run it without a backward pass.
    """
    averaged = AveragedModel(model, use_buffers=False)
    if getattr(averaged.module, "set_grad_checkpointing", None) is not None:
        try:
            averaged.module.set_grad_checkpointing(False)
        except AssertionError:  # a model that cannot checkpoint never turned it on
            pass
    return averaged


def averaged_epochs(epochs: int, swa_epochs: int) -> range:
    """The 0-based epochs whose end weights go into the average: the last `swa_epochs`."""
    return range(max(epochs - swa_epochs, 0), epochs)


def _images(loader: Sequence, *, device: torch.device, normalizer: Normalizer | None,
            channels_last: bool) -> Iterator[torch.Tensor]:
    for images, _ in loader:
        yield prepare_images(images, device=device, normalizer=normalizer, channels_last=channels_last)


def recompute_batchnorm(model: nn.Module, loader: Sequence, *, device: torch.device,
                        normalizer: Normalizer | None, channels_last: bool = False,
                        amp_dtype: torch.dtype | None = None) -> None:
    """Measure `model`'s BatchNorm running statistics again over `loader` (this rank's rows).

    torch's update_bn resets each layer's statistics and averages the batches' (momentum None);
    every rank then holds the mean of the ranks' statistics (each rank runs as many batches
    of the same size, so that is the mean over every batch). A model without BatchNorm is left
    as it is.
    """
    with autocast_context(device, amp_dtype):
        update_bn(_images(loader, device=device, normalizer=normalizer,
                          channels_last=channels_last), model)
    dist.average_running_stats(model)


def swa_summary(epochs: range, scores: dict[str, Any]) -> dict[str, Any]:
    """swa.json: which epochs were averaged (1-based, as in history.csv) and the average's
    validation scores."""
    return dict({"first_epoch": epochs.start + 1, "last_epoch": epochs.stop,
                 "epochs_averaged": len(epochs)}, **scores)
