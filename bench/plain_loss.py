"""The EFE loss as a user writes it in plain PyTorch: the speed baseline of the benchmarks.

Not the float64 reference (``qwenrl.loss.reference``, the tests' correctness oracle): this is
the ten-line version someone would train with, eager or under ``torch.compile``.
"""

from __future__ import annotations

import functools
import math

import torch


def plain_efe(z, target, tau=0.6, easy_weight=0.5, entropy_weight=0.0, label_smoothing=0.0):
    """The EFE loss as a user writes it in plain PyTorch: log_softmax, a gather of the target's
    log-probability (class targets) or a sum against the distribution (soft targets),
    hard-row weights, mean over the valid rows."""
    log_q = torch.log_softmax(z.float(), -1)
    n_classes = z.shape[-1]
    if target.is_floating_point():
        p = (1 - label_smoothing) * target + label_smoothing / n_classes
        risk = (torch.xlogy(p, p) - p * log_q).sum(-1)
        valid = torch.ones_like(risk, dtype=torch.bool)
        y = target.argmax(-1)
    else:
        valid = target != -100
        y = torch.where(valid, target, 0)
        risk = -log_q.gather(1, y[:, None]).squeeze(1)
        if label_smoothing:
            eps, hi = label_smoothing, 1 - label_smoothing + label_smoothing / n_classes
            lo = eps / n_classes
            plogp = hi * math.log(hi) + (n_classes - 1) * lo * math.log(lo)
            risk = plogp + (1 - eps) * risk - lo * log_q.sum(-1)
    if entropy_weight:
        risk = risk - entropy_weight * (log_q.exp() * log_q).sum(-1)
    hard = log_q.gather(1, y[:, None]).squeeze(1).detach().exp() < tau
    w = easy_weight + (1 - easy_weight) * hard.float()
    return (w * risk * valid).sum() / valid.sum().clamp(min=1)


_compiled: dict[tuple, object] = {}


def compiled_plain_efe(key: tuple, **opts):
    """``torch.compile(plain_efe)`` for one case: its own compiled function per shape and
    option set, so that no case runs into another's recompilation limit."""
    if key not in _compiled:
        _compiled[key] = torch.compile(functools.partial(plain_efe, **opts), dynamic=False)
    return _compiled[key]
