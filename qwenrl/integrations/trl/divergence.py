"""DistillationTrainer's chunked divergence, computed by :func:`qwenrl.linear_efe_loss` with
a teacher, for the trainers given to :func:`~qwenrl.integrations.trl.use_qwenrl`."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from qwenrl.integrations.trl._options import (
    _DIVERGENCE_OPTIONS,
    check_options,
)
from qwenrl.integrations.trl.head import _full
from qwenrl.loss.linear import linear_efe_loss


def divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Tensor | int | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    options: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``trl.trainer.distillation_trainer._chunked_divergence_loss`` computed by
    :func:`qwenrl.linear_efe_loss` with the teacher's hidden states and head: the same
    arguments and results (the loss, the sum of the student's per-token entropy, the number of
    valid positions). ``beta`` must be 0, the forward KL(teacher ‖ student); in the default
    cross-entropy mode the loss is TRL's. ``options``: :data:`OPTIONS` (checked)."""
    options = check_options(options or {})
    if beta != 0.0:
        raise NotImplementedError(
            f"use_qwenrl: DistillationTrainer with beta={beta}; qwenrl's distillation loss is "
            "the forward KL(teacher || student), TRL's beta=0.0"
        )
    if student_final_logit_softcapping is not None or teacher_final_logit_softcapping is not None:
        raise NotImplementedError(
            "use_qwenrl: the student or the teacher caps its logits (final_logit_softcapping); "
            "qwenrl's loss has no softcap"
        )
    student_weight, student_bias = _full(student_lm_head_weight), _full(student_lm_head_bias)
    teacher_weight, teacher_bias = _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.size(-1))[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1))[valid]
    h_s, student_bias = _scaled(h_s, student_bias, student_logit_scale / temperature)
    h_t, teacher_bias = _scaled(h_t, teacher_bias, teacher_logit_scale / temperature)
    h_s = h_s.to(student_weight.dtype)
    h_t = h_t.to(teacher_weight.dtype)
    if h_s.shape[0] == 0:
        loss, entropy_sum = h_s.sum() * 0.0, h_s.new_zeros((), dtype=torch.float32)
    else:
        # The teacher's softmax is the target; every row passed is valid (target None). The
        # temperature is folded into both hidden states above: TRL's divergence has no T².
        loss, per_token = linear_efe_loss(
            h_s,
            student_weight,
            None,
            bias=student_bias,
            teacher_hidden=h_t,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            reduction="sum",
            return_per_token=True,
            **options,
        )
        entropy_sum = per_token["entropy"].sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy_sum, n_valid


def _scaled(hidden: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


def _install_divergence_dispatch() -> None:
    """Replaces ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (once) by a
    dispatcher: qwenrl's :func:`divergence_loss` while a trainer given to :func:`use_qwenrl`
    computes its loss, TRL's own function otherwise."""
    from trl.trainer import distillation_trainer

    current = distillation_trainer._chunked_divergence_loss
    if getattr(current, "_qwenrl_dispatch", False):
        return

    @functools.wraps(current)
    def dispatch(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        options = _DIVERGENCE_OPTIONS.get()
        if options is None:
            return current(*args, **kwargs)
        return divergence_loss(*args, options=options, **kwargs)

    dispatch._qwenrl_dispatch = True
    dispatch._trl_function = current
    distillation_trainer._chunked_divergence_loss = dispatch
