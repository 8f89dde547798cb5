"""Multi-process training under ``torchrun``: process group, DDP wrapping, rank-0 duties.

gloo on CPU, NCCL on GPUs. Without torchrun's environment everything is a no-op, so the same
code runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leanseg.methods.backrazor import FrozenStatsBatchNorm2d


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size and its local device index."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_kind != "cpu"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def current() -> DistInfo:
    """The DistInfo of an already initialised process group (or a single process)."""
    if not dist.is_available() or not dist.is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each process drives its own GPU."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def wrap_model(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """DistributedDataParallel (+ SyncBatchNorm on GPUs) when distributed; else the model.

    torch's SyncBatchNorm runs only on GPUs, so on CPU (gloo) each process keeps its own
    BatchNorm statistics, as the per-GPU BN recipes (VainF, chenxi) do.
    """
    if not info.enabled:
        return model
    if device.type == "cuda":
        model = sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm``, except for BatchNorms frozen by BackRazor.

    A frozen BN (``backrazor.bn=frozen``) trains on its running statistics: there is nothing to
    synchronise, and a SyncBatchNorm in its place would go back to batch statistics.
    """
    if isinstance(module, FrozenStatsBatchNorm2d):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child))
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the run directory)."""
    if not info.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``flag`` (a bool tensor) OR-ed over all ranks, so that every rank takes the same branch."""
    if not info.enabled:
        return flag
    value = flag.to(torch.int32).reshape(1)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value[0].bool().cpu()
