"""torch.distributed glue: one process per device under torchrun, nothing when run plainly."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


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

