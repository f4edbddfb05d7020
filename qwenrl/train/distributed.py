"""Data-parallel helpers: joining the torchrun group, averaging, agreeing, leaving; FSDP2
sharding (:func:`shard_models`) and the sharded state dicts its checkpoints hold.

One process per device (``torchrun``); gloo on CPUs, NCCL on GPUs. Outside torchrun
(``WORLD_SIZE`` unset or 1) every group helper is a no-op, so the trainer has one code path.
docs/distributed.md says when to use DDP or FSDP and what each costs.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from qwenrl.models import QwenRLModels

__all__ = [
    "DistInfo",
    "agree_any",
    "all_reduce_mean",
    "barrier",
    "full_value",
    "init_distributed",
    "load_sharded_state_dict",
    "local_bytes",
    "local_tensor",
    "rank_memory",
    "rename_parameters",
    "shard_models",
    "sharded_state_dict",
    "shutdown",
]


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


# --- FSDP2: sharded models, their gradient norm, their state dicts ----------------------------


def shard_models(
    models: QwenRLModels,
    root: nn.Module,
    device: torch.device,
    *,
    bf16: bool,
) -> None:
    """Shards ``models`` in place with FSDP2 ``fully_shard`` over all ranks (a 1-D mesh).

    Units, innermost first: each Qwen decoder layer, the encoder (Qwen's embeddings and final
    norm, the projection), the refiner, the agent, then ``root`` (the module whose forward
    runs every training step, ``StepForward``; it owns what is left: the steering vectors, its
    ``steerer``, the module ``models.policy`` steers with). The RL action head is not in
    ``root`` and stays a replicated plain parameter on every rank: it has its own optimizer,
    and it averages its gradients itself (``RefinementPolicy.update``). With ``bf16``,
    parameters are all-gathered and used in bf16 while gradients are reduced and kept in fp32,
    next to fp32 master weights.

    Every rank must call each unit the same number of times per step (each call all-gathers
    the unit's parameters), so the encoder runs its prompts as one padded batch instead of
    length buckets (docs/distributed.md).

    The models may be on the CPU: each unit's parameters move to ``device`` as it is sharded,
    one unit at a time, and the full tensors are freed, so no rank keeps a full copy.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    models.policy.to(device)  # the RL head is not FSDP's to move
    for layer in models.encoder.qwen.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    models.encoder.pad_slack = math.inf  # one Qwen call per encoder call (see above)
    for unit in (models.encoder, models.refiner, models.agent):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    # FSDP takes the first sharded module to run forward as the root (torch's
    # fsdp/_fully_shard/_fsdp_state.py, FSDPState._lazy_init); fixing it now lets validation
    # call the encoder, refiner and agent directly before any training step.
    root._get_fsdp_state()._lazy_init()  # type: ignore[operator]


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter or gradient; a plain tensor as it is."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The full value of a sharded tensor (a collective: every rank must call it); a plain
    tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank stores for ``tensors`` (the local shard of a sharded one)."""
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def rank_memory(models: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes this rank holds in parameters and in optimizer state (Adam's moments, step).

    Under DDP or one process that is the whole model; under FSDP about 1/world_size of it
    (plus the replicated RL head).
    """
    state = [
        v
        for opt in optimizers
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    ]
    return {
        "param_bytes": local_bytes(models.parameters()),
        "optimizer_bytes": local_bytes(state),
    }


def sharded_state_dict(
    models: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, Any]]:
    """``{"model": ..., "optimizer": ...}`` keyed by parameter name, values sharded as FSDP
    holds them: what ``torch.distributed.checkpoint`` saves (each rank writes its shards)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(models, optimizer)
    return {"model": model, "optimizer": optim}


def rename_parameters(state: dict[str, dict[str, Any]], names: Mapping[str, str]) -> None:
    """Renames parameters (``names``: from → to) in place in what :func:`sharded_state_dict`
    returned: the ``model`` keys and, where there is one, the optimizer's per-parameter
    ``state`` and the names its ``param_groups`` list."""
    optim = state.get("optimizer", {})
    for old, new in names.items():
        for part in (state["model"], optim.get("state", {})):
            if old in part:
                part[new] = part.pop(old)
        for group in optim.get("param_groups", []):
            group["params"] = [new if name == old else name for name in group["params"]]


def load_sharded_state_dict(
    models: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, dict[str, Any]]
) -> None:
    """Loads what :func:`sharded_state_dict` returned (after ``dcp.load`` filled it)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        models, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
