"""The options of :func:`~qwenrl.integrations.trl.use_qwenrl`, the TRL settings it reads, and
the state its wrappers share."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwenrl.loss.dispatch import BACKENDS
from qwenrl.loss.linear import check_weight_grad_in_place
from qwenrl.loss.options import CALLER_FIELDS, EFEOptions

# The options of the token loss: EFEOptions' caller fields but those the integration sets
# itself (labels are class indices, -100 is TRL's ignore index, the reduction is TRL's), with
# the cross-entropy values as defaults, so that TRL's numbers come out: every row weighs 1
# (easy_weight = 1, whatever tau) and every other term is off (EFEOptions' defaults).
_SET_BY_TRL = ("ignore_index", "reduction", "log_target")
_CROSS_ENTROPY = {"tau": 0.0, "easy_weight": 1.0}
LOSS_DEFAULTS = {
    name: _CROSS_ENTROPY.get(name, getattr(EFEOptions(), name))
    for name in CALLER_FIELDS
    if name not in _SET_BY_TRL
}
# Every option use_qwenrl accepts: the loss's, and how linear_efe_loss runs.
OPTIONS = (*LOSS_DEFAULTS, "chunk_size", "backend", "weight_grad_in_place")
# The FusedCausalLMOutput fields qwenrl's pass computes (log_probs always).
FIELDS = ("log_probs", "entropy", "is_top1")
# What use_qwenrl reads off TRL's _fused_forward (the variables of its closure).
_TRL_SETTINGS = (
    "original_forward",
    "temperature",
    "cast_lm_head_to_fp32",
    "outputs",
    "final_logit_softcapping",
    "logit_scale",
    "backbone_attr",
    "text_config",
)
# Set while SFTTrainer.compute_loss runs: the log_probs field then carries minus the
# per-token loss (the EFE loss, with EFE options).
_LOSS_AS_LOG_PROBS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "qwenrl_loss_as_log_probs", default=False
)
# The options of the DistillationTrainer whose _compute_loss is running, if it uses qwenrl.
_DIVERGENCE_OPTIONS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "qwenrl_divergence_options", default=None
)


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over the cross-entropy defaults, after a clear error for an unknown name
    or a bad value (now, not at the first step)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"use_qwenrl: unknown option(s) {unknown}; the options are {list(OPTIONS)} "
            "(the loss options of qwenrl.linear_efe_loss; the tensors, the reduction and the "
            "per-token outputs are set by the integration)"
        )
    merged = {**LOSS_DEFAULTS, **options}
    EFEOptions(**{name: merged[name] for name in LOSS_DEFAULTS})  # checks the values
    chunk_size = merged.get("chunk_size")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"use_qwenrl: chunk_size must be a positive int or None, got {chunk_size!r}"
        )
    if merged.get("backend", "auto") not in BACKENDS:
        raise ValueError(
            f"use_qwenrl: backend must be one of {BACKENDS}, got {merged['backend']!r}"
        )
    check_weight_grad_in_place(merged.get("weight_grad_in_place"))
    return merged


def is_cross_entropy(options: dict[str, Any]) -> bool:
    """Whether the per-token loss is exactly ``-log p(label)``: every option at its
    cross-entropy value (``tau`` aside: with ``easy_weight=1`` it weighs nothing)."""
    return all(
        float(options[name]) == float(value)
        for name, value in LOSS_DEFAULTS.items()
        if name != "tau"
    )


@dataclass
class _Head:
    """One model's fused head: TRL's settings and the qwenrl options."""

    trl_forward: Callable[..., Any]  # the TRL _fused_forward replaced (its non-fused path)
    temperature: float
    cast_lm_head_to_fp32: bool
    outputs: tuple[str, ...]
    logit_scale: float
    backbone_attr: str
    text_config: Any
    options: dict[str, Any]
    forward: Callable[..., Any] | None = None  # ours
