"""The fused expected-free-energy loss (DESIGN.md §2)."""

from qwenrl.loss.efe import BACKENDS, EFEFunction, EFELoss, efe_loss, resolve_backend
from qwenrl.loss.reference import efe_loss_reference, stats_from_sums

__all__ = [
    "BACKENDS",
    "EFEFunction",
    "EFELoss",
    "efe_loss",
    "efe_loss_reference",
    "resolve_backend",
    "stats_from_sums",
]
