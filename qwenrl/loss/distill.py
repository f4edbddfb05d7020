"""Distillation in :func:`~qwenrl.loss.linear.linear_efe_loss`: a teacher given by its hidden
states and head, never by its logits.

Per chunk of rows the teacher's logits ``h_t @ W_t.T + b_t`` [c, V] become the soft target
``p = softmax(teacher_logits / T)`` (float32, in one buffer that dies with the chunk); the
student's logits are divided by T and the fused kernel's soft mode scores them against p. The
loss is that soft-target EFE times T² (Hinton et al.'s scale, so that the gradient's size does
not depend on T), and its gradient w.r.t. the student's logits is T²·(1/T)·(the kernel's
gradient) = T·(the kernel's gradient): the chunk loop folds T into the one scale it applies
anyway (:mod:`qwenrl.loss.chunks`). The teacher gets no gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher of one call: hidden [N, D_t] (the student's rows, flattened), weight
    [V, D_t], bias [V] or None, and the temperature T > 0."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    temperature: float = 1.0

    def for_matmul(self, rows: Tensor | None, dtype: torch.dtype) -> Teacher:
        """This teacher with only ``rows`` of its hidden states (None: all), every tensor in
        the matmul dtype ``dtype``."""
        h = self.hidden if rows is None else self.hidden.index_select(0, rows)
        cast = lambda x: x if (x is None or x.dtype == dtype) else x.to(dtype)  # noqa: E731
        return Teacher(cast(h), cast(self.weight), cast(self.bias), self.temperature)


def soft_target(teacher: Teacher, hidden_c: Tensor) -> Tensor:
    """``softmax((hidden_c @ W_t.T + b_t) / T)`` as float32 [c, V], computed in place in the
    logits' own buffer (a float32 copy of it for low-precision teachers)."""
    w, b = teacher.weight, teacher.bias
    z = torch.mm(hidden_c, w.t()) if b is None else torch.addmm(b, hidden_c, w.t())
    if z.dtype != torch.float32:
        z = z.float()
    if teacher.temperature != 1.0:
        z.div_(teacher.temperature)
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True))


def check_teacher(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    temperature: float,
    log_target: bool,
) -> bool:
    """Whether the call distils (a teacher is given), after a clear error for every way the
    teacher's arguments can be wrong or clash with the student's."""
    if teacher_hidden is None and teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias was given without teacher_hidden and teacher_weight")
        if temperature != 1.0:
            raise ValueError(
                f"temperature={temperature} needs a teacher (teacher_hidden and teacher_weight)"
            )
        return False
    if teacher_hidden is None or teacher_weight is None:
        given, missing = (
            ("teacher_weight", "teacher_hidden")
            if teacher_hidden is None
            else ("teacher_hidden", "teacher_weight")
        )
        raise ValueError(f"{given} was given without {missing}: distillation needs both")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    for name, x in (
        ("teacher_hidden", teacher_hidden),
        ("teacher_weight", teacher_weight),
        ("teacher_bias", teacher_bias),
    ):
        if x is None:
            continue
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a floating tensor, got {kind}")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} does not have the student's "
            f"rows: hidden is {tuple(hidden.shape)}, so teacher_hidden must be "
            f"{(*hidden.shape[:-1], 'D_t')}"
        )
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"teacher_weight shape {tuple(teacher_weight.shape)} does not match teacher_hidden's "
            f"width D_t={teacher_hidden.shape[-1]} (expected [V, {teacher_hidden.shape[-1]}])"
        )
    v = weight.shape[0]
    if teacher_weight.shape[0] != v:
        raise ValueError(
            f"the teacher's vocabulary ({teacher_weight.shape[0]} rows of teacher_weight) differs "
            f"from the student's ({v} rows of weight)"
        )
    if teacher_bias is not None and teacher_bias.shape != (v,):
        raise ValueError(
            f"teacher_bias must have shape [V] = ({v},), got {tuple(teacher_bias.shape)}"
        )
    for name, x in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if x is not None and x.dtype != teacher_hidden.dtype:
            raise TypeError(
                f"{name} dtype {x.dtype} differs from teacher_hidden dtype {teacher_hidden.dtype}"
            )
    if log_target:
        raise ValueError("log_target=True has no meaning with a teacher (its target is p itself)")
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a tensor or None, got {type(target).__name__}")
        if target.is_floating_point():
            raise ValueError(
                "a soft target and a teacher were both given: with a teacher the soft target is "
                "softmax(teacher logits / T); target may only mark ignored rows (class indices "
                "with ignore_index) or be None"
            )
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"class targets must be int64 or int32, got dtype {target.dtype}")
        if target.shape != hidden.shape[:-1]:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match the rows of hidden "
                f"{tuple(hidden.shape[:-1])}"
            )
        if target.device != hidden.device:
            raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    return True
