"""Data-parallel helpers: joining the torchrun group, averaging, agreeing, leaving.

One process per device (``torchrun``); gloo on CPUs, NCCL on GPUs. Outside torchrun
(``WORLD_SIZE`` unset or 1) every helper is a no-op, so the trainer has one code path.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "agree_any", "all_reduce_mean", "barrier", "init_distributed", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)`` (shares differ in size by at most 1)."""
        return range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)


def init_distributed(device: str) -> DistInfo:
    """Joins the torchrun group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Averages ``t`` over the ranks, in place; returns it (no host sync)."""
    if info.enabled:
        dist.all_reduce(t)
        t /= info.world_size
    return t


def agree_any(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (a host sync under DDP)."""
    if not info.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leaves the group once every rank is done with it."""
    if info.enabled and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


def exit_without_teardown() -> None:
    """Ends a finished torchrun worker without the interpreter's teardown.

    gloo's work objects can outlive the interpreter's finalisation and abort the process after
    all work is done, failing a finished torchrun job (pytorch/pytorch#179291).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
