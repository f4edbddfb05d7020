"""Eager autograd for :func:`~qwenrl.loss.linear.linear_efe_loss`: one Function, two modes."""

from __future__ import annotations

import dataclasses

import torch

from qwenrl.loss import chunks, grad_engine
from qwenrl.loss.dispatch import apply_upstream
from qwenrl.loss.distill import Teacher
from qwenrl.loss.options import EFEOptions


def upstream_grads(grads, grad_loss, options: EFEOptions, dtypes, *, eager: bool) -> tuple:
    """Scales the forward's gradients by the loss's (scalar) upstream gradient."""
    return tuple(
        None if g is None else apply_upstream(g, grad_loss, options, dt, eager=eager)
        for g, dt in zip(grads, dtypes)
    )


def _teacher(hidden, weight, bias, temperature) -> Teacher | None:
    return None if hidden is None else Teacher(hidden, weight, bias, float(temperature))


class LinearEFEFunction(torch.autograd.Function):
    """Eager autograd for :func:`linear_efe_loss`, in one of two modes.

    * **Gradients in the forward** (while ``weight.grad`` is None, as after the default
      ``zero_grad()``, or with ``weight_grad_in_place`` false — as :func:`linear_efe_loss`
      resolves its default for ``'mean'``/``'sum'``): the forward computes the
      gradients (:func:`~qwenrl.loss.chunks.chunked_loss_and_grads`), the backward scales them
      in place. The buffers are handed to autograd as the result, so they can be consumed
      once: a second backward through the same loss raises instead of returning them scaled
      twice.
    * **Chunks again in the backward**, for ``'none'`` (a per-row upstream gradient cannot be
      applied to an already summed ``grad_W``) and when the weight's ``.grad`` already exists
      and is writable (:func:`~qwenrl.loss.grad_engine.writable_grad`) with
      ``weight_grad_in_place``: the forward only computes the loss
      (:func:`~qwenrl.loss.chunks.chunked_loss`), and the backward runs the chunks again
      (:func:`~qwenrl.loss.chunks.chunked_grads`) with the upstream gradient applied to each
      chunk, adding the weight gradient straight into ``weight.grad``. No [V, D] buffer is
      allocated, and autograd gets None for the weight: it still runs the weight's
      accumulation node and its hooks (DDP's reducer, post-accumulate hooks), which find the
      finished ``.grad``. Where the engine will not accumulate into ``.grad`` in that pass
      (``torch.autograd.grad``, ``backward(inputs=...)`` without the weight) the backward
      returns a fresh gradient instead.

    ``row_weight`` and a distillation teacher reach every chunk of both passes; neither gets
    a gradient. The per-token outputs come from the forward's pass alone.

    There is no double backward: ``create_graph=True`` raises a ``RuntimeError`` naming it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden,
        weight,
        bias,
        target,
        hard_mask,
        settings,
        weight_grad_in_place,
        row_weight=None,
        teacher_hidden=None,
        teacher_weight=None,
        teacher_bias=None,
        temperature=1.0,
    ):
        """``settings``: the call's :class:`~qwenrl.loss.chunks.ChunkSettings`; ``row_weight``
        [N] float32 or None; the teacher's tensors (no gradient) or None. Returns (loss, sums,
        per_token), the last [4, N] where ``settings.options.per_token`` asks for it, else
        empty."""
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        options = settings.options
        teacher = _teacher(teacher_hidden, teacher_weight, teacher_bias, temperature)
        per_token = chunks.per_token_buffer(hidden.shape[0], hidden, options)
        problem = chunks.LinearProblem(
            hidden, weight, bias, target, hard_mask, settings, row_weight, teacher, per_token
        )
        # The backward's chunks need no target check: the forward's did it.
        ctx.settings = dataclasses.replace(
            settings, options=options.replace(validate=False, per_token=False)
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.needs = needs
        ctx.temperature = temperature
        ctx.in_place = weight_grad_in_place and needs[1]
        ctx.rerun = options.reduction == "none" or (
            ctx.in_place and grad_engine.writable_grad(weight) is not None
        )
        ctx.consumed = False
        if ctx.rerun:
            loss, sums = chunks.chunked_loss(problem)
            ctx.save_for_backward(
                hidden, weight, bias, target, hard_mask, row_weight,
                teacher_hidden, teacher_weight, teacher_bias,
            )  # fmt: skip
            ctx.grads = None
        else:
            loss, sums, *grads = chunks.chunked_loss_and_grads(problem, needs)
            ctx.grads = grads  # not saved_tensors: backward gives these very buffers away
        if per_token is None:
            per_token = hidden.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(sums, per_token)
        return loss, sums, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_per_token):  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the gradients come from fused kernels, which have no
            # derivative of their own; a graph through them would be silently wrong.
            raise RuntimeError(
                "linear_efe_loss has no double backward: backward(create_graph=True) and "
                "torch.autograd.grad(..., create_graph=True) are not supported. For "
                "higher-order gradients compute the logits (hidden @ weight.T) and use "
                "qwenrl.efe_loss(..., backend='reference')"
            )
        if ctx.rerun:
            hidden, weight, bias, target, hard_mask, row_weight, *teacher = ctx.saved_tensors
            into = None
            if ctx.in_place and grad_engine.engine_accumulates(weight):
                into = grad_engine.writable_grad(weight)
            problem = chunks.LinearProblem(
                hidden, weight, bias, target, hard_mask, ctx.settings, row_weight,
                _teacher(*teacher, ctx.temperature),
            )  # fmt: skip
            grads = chunks.chunked_grads(problem, ctx.needs, grad_loss.float(), grad_w_into=into)
            # Added into weight.grad already, the weight's gradient is None here: autograd still
            # runs the weight's AccumulateGrad node and its hooks (DDP's, post-accumulate
            # hooks), which read the finished .grad, and adds nothing.
            grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        else:
            if ctx.consumed:
                raise RuntimeError(
                    "linear_efe_loss: the fused gradients were already consumed by an earlier "
                    "backward; compute the loss again to backward twice"
                )
            ctx.consumed = True
            grads, ctx.grads = ctx.grads, None
            grads = upstream_grads(grads, grad_loss, ctx.settings.options, ctx.dtypes, eager=True)
        # None for target, hard_mask, settings, the mode, row_weight and the teacher.
        return (*grads, *(None,) * 9)
