"""The pieces of one training step: the differentiable forward, its metrics, the schedules.

See docs/training.md for the step order and why it is that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwenrl.cache import CachePlan, EmbeddingCache
from qwenrl.data import DemoHints
from qwenrl.models import QwenRLModels

__all__ = [
    "METRIC_NAMES",
    "StepForward",
    "StepMetrics",
    "grad_norm",
    "lr_factor",
    "read_all",
    "tau_for_epoch",
]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps ((step+1)/warmup), then
    cosine decay from 1 to a floor of 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def tau_for_epoch(epoch: int, tau_start: float, tau_end: float, tau_epoch: int) -> float:
    """The τ curriculum: ``tau_start`` while ``epoch < tau_epoch``, then ``tau_end``."""
    return tau_start if epoch < tau_epoch else tau_end


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm (0-dim fp32 tensor, no host sync) of the gradients that exist; 0 if none.

    FSDP-sharded gradients (DTensors) give the norm of the full gradient: an all-reduce over
    the ranks, so under FSDP every rank must call this on the same steps.
    """
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    norm = torch.linalg.vector_norm(torch.stack(grads))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor → its value


# Order of StepMetrics.values; ``loss`` first.
METRIC_NAMES = ("loss", "reward", "qwen_grad", "mask_ratio", "accuracy", "rl_loss")


@dataclass
class StepMetrics:
    """One step's metrics, kept on the device until the log step reads them.

    ``values`` is a float32 [len(METRIC_NAMES)] tensor; :meth:`read` turns it into floats (a
    host sync, so the trainer reads all steps since the last log step at once).
    """

    values: torch.Tensor
    qwen_ran: bool
    skipped: bool = False
    _read: dict[str, Any] | None = field(default=None, repr=False)

    def read(self) -> dict[str, Any]:
        """{name: float} plus ``qwen_ran`` and ``skipped``; cached after the first call."""
        if self._read is None:
            self.set_read(self.values.tolist())
        assert self._read is not None
        return self._read

    def set_read(self, values: list[float]) -> None:
        self._read = {
            **dict(zip(METRIC_NAMES, values)),
            "qwen_ran": self.qwen_ran,
            "skipped": self.skipped,
        }

    def __getitem__(self, name: str) -> Any:
        return self.read()[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.read().get(name, default)


def read_all(steps: list[StepMetrics]) -> list[dict[str, Any]]:
    """Reads several steps' metrics with one host sync."""
    unread = [m for m in steps if m._read is None]
    if unread:
        for m, row in zip(unread, torch.stack([m.values for m in unread]).tolist()):
            m.set_read(row)
    return [m.read() for m in steps]


class StepForward(nn.Module):
    """The differentiable part of one step, as one module so DDP can wrap it (or FSDP shard
    it as the root).

    Qwen on the prompts the cache plan marks for computing, the cache for the others, then
    refiner → RL action → agent, up to the logits. Only tensors go through ``forward`` (DDP
    inspects its arguments); the step's cache plan is set on :attr:`context` just before.

    Its submodules are exactly what the main optimizer trains: ``encoder``, ``refiner``,
    ``steerer`` (the steering vectors) and ``agent``, the very modules of ``models``, so that
    ``parameters()`` is the main optimizer's set and DDP / FSDP need no ignore list. The RL
    action head, which has its own optimizer and averages its own gradients
    (``RefinementPolicy.update``), stays out: ``models`` is held as a plain attribute, not a
    submodule. The forward picks the action with it (no grad) through
    ``QwenRLModels.condition``.
    """

    models: QwenRLModels

    def __init__(self, models: QwenRLModels, cache: EmbeddingCache) -> None:
        super().__init__()
        self.encoder = models.encoder
        self.refiner = models.refiner
        self.steerer = models.policy.steerer
        self.agent = models.agent
        object.__setattr__(self, "models", models)  # not registered: see the class docstring
        self.cache = cache
        self.context: tuple[CachePlan, int, bool] | None = None  # (plan, step, anchor_only)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        query: torch.Tensor,
        hints: DemoHints | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [U, T] of the prompts to encode (or None), queries [B, 30, 30] →
        (logits [B, 900, C], refined prompt detached [B, dim], actions [B])."""
        if self.context is None:
            raise RuntimeError("set StepForward.context = (plan, step, anchor_only) first")
        plan, step, anchor_only = self.context
        fresh, anchor = None, None
        if input_ids is not None:
            fresh = self.encoder(input_ids, attention_mask).float()  # [U, dim]
            if anchor_only:
                # Qwen runs here only so that every rank takes part in its gradient collectives
                # on this step; 0·x adds a zero gradient and changes no value.
                anchor, fresh = 0.0 * fresh.sum(), None
            else:
                self.cache.write(plan, fresh, step)  # detached copy
        prompt = self.cache.gather(plan, fresh)  # [B, dim]: fresh rows differentiable
        if anchor is not None:
            # Into the refiner, as Qwen's output flows on the other ranks: under FSDP each rank's
            # backward must reach the sharded modules in the same order (each one's gradient
            # reduce-scatter is a collective).
            prompt = prompt + anchor
        conditioned, refined_detached, action = self.models.condition(prompt)
        logits = self.agent(query, conditioned, hints)  # [B, 900, C]
        return logits, refined_detached, action
