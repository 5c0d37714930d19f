"""torch.distributed glue: one process per device under torchrun, nothing when run plainly.

Rank 0 owns the run folder: it alone reads and writes it, and the other ranks receive what they
need (decisions, a checkpoint to resume from, errors) by broadcast. So a multi-node job needs
the run folder on node 0 only; the data folder must be at the same path on every node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from mixcls.config import ConfigError
from mixcls.models import batchnorm_modules

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> DistContext:
    """This process's place in the group (rank 0 of 1 without torchrun)."""
    if tdist.is_available() and tdist.is_initialized():
        return DistContext(tdist.get_rank(), tdist.get_world_size(),
                           int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def check_distributed_options(*, sync_bn: bool, device: torch.device, world_size: int) -> None:
    """Options that only some set-ups support, refused with the reason before anything runs."""
    if sync_bn and world_size > 1 and device.type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm needs CUDA devices (DistributedDataParallel "
                          "refuses it on the CPU); drop --sync-bn or train on GPUs")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_process_group(device: str) -> DistContext:
    """nccl for CUDA, gloo for CPU; the rendezvous comes from torchrun's environment."""
    if not launched_by_torchrun() or tdist.is_initialized():
        return context()
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group(backend="nccl" if cuda else "gloo")
    return context()


def destroy_process_group() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def device_for(device: str) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when on CUDA, else the CPU."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", context().local_rank)
    return torch.device("cpu")


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _collective_device() -> torch.device:
    """nccl moves only CUDA tensors; gloo only CPU ones."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled; for decisions and checkpoints, not per-batch data)."""
    if context().world_size == 1:
        return obj
    box = [obj if context().is_main else None]
    tdist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def run_on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result to every rank.

    An exception on rank 0 is raised on every rank too, so all of them stop with the same
    message instead of the others waiting forever at the next collective.
    """
    result, error = None, None
    if context().is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    if context().world_size > 1:
        result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, in place.

    DDP copies rank 0's buffers to the others before each training forward, but that forward
    then updates each rank's copy with its own part of the batch (and the EMA follows it). The
    ranks must evaluate with the buffers rank 0 saves, or each shard of the OOF probabilities
    would come from a slightly different model than best.pt.
    """
    if context().world_size == 1:
        return
    for buffer in module.buffers():
        tdist.broadcast(buffer, src=0)


def average_running_stats(module: torch.nn.Module) -> None:
    """Every rank's BatchNorm running means and variances replaced by their mean over ranks,
    in place (the statistics each rank measured on its own rows)."""
    if context().world_size == 1:
        return
    for layer in batchnorm_modules(module):
        if layer.running_mean is not None:  # track_running_stats=False keeps none
            for buffer in (layer.running_mean, layer.running_var):
                tdist.all_reduce(buffer, op=tdist.ReduceOp.SUM)
                buffer.div_(context().world_size)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sums over ranks (float64, so counts stay exact)."""
    if context().world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's `values`, in rank order (float64, so counts stay exact)."""
    ctx = context()
    if ctx.world_size == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    tdist.all_gather(parts, mine)
    return [part.cpu().tolist() for part in parts]


def shard_indices(n: int) -> np.ndarray:
    """This rank's rows of 0..n-1: every world_size-th from its rank (lengths differ by <= 1)."""
    ctx = context()
    return np.arange(ctx.rank, n, ctx.world_size)


def gather_shards(local: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `shard_indices`: every rank's (n_local, ...) rows back as (n, ...) in order.

    all_gather needs equal sizes, so each rank pads its shard to ceil(n / world_size) rows and
    the padding is cut off again; every rank receives the whole array.
    """
    ctx = context()
    if ctx.world_size == 1:
        return local
    per_rank = -(-n // ctx.world_size)
    padded = np.zeros((per_rank, *local.shape[1:]), dtype=local.dtype)
    padded[:len(local)] = local
    device = _collective_device()
    mine = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    tdist.all_gather(parts, mine)
    out = np.empty((n, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        rows = np.arange(rank, n, ctx.world_size)
        out[rows] = part.cpu().numpy()[:len(rows)]
    return out
