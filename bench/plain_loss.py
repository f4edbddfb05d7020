"""The EFE loss as a user writes it in plain PyTorch: the speed baseline of the benchmarks.

Not the float64 reference (``qwenrl.loss.reference``, the tests' correctness oracle): this is
the ten-line version someone would train with, eager or under ``torch.compile``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def plain_efe(z, target, tau=0.6, easy_weight=0.5, entropy_weight=0.0, label_smoothing=0.0):
    """The EFE loss as a user writes it in plain PyTorch (class or soft targets)."""
    log_q = torch.log_softmax(z.float(), -1)
    if target.is_floating_point():
        p = target
        valid = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        y = p.argmax(-1)
    else:
        valid = target != -100
        y = torch.where(valid, target, 0)
        p = F.one_hot(y, z.shape[-1]).float()
    if label_smoothing:
        p = (1 - label_smoothing) * p + label_smoothing / z.shape[-1]
    risk = (torch.xlogy(p, p) - p * log_q).sum(-1)
    loss_rows = risk
    if entropy_weight:
        loss_rows = loss_rows - entropy_weight * (log_q.exp() * log_q).sum(-1)
    hard = log_q.gather(1, y[:, None]).squeeze(1).detach().exp() < tau
    w = easy_weight + (1 - easy_weight) * hard.float()
    return (w * loss_rows * valid).sum() / valid.sum().clamp(min=1)


_compiled: dict[tuple, object] = {}


def compiled_plain_efe(key: tuple, **opts):
    """``torch.compile(plain_efe)`` for one case: its own compiled function per shape and
    option set, so that no case runs into another's recompilation limit."""
    if key not in _compiled:
        _compiled[key] = torch.compile(functools.partial(plain_efe, **opts), dynamic=False)
    return _compiled[key]
