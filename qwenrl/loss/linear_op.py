"""``torch.compile`` support for :func:`~qwenrl.loss.linear.linear_efe_loss`: two custom ops.

Dynamo cannot trace the chunk loop's kernels, so under ``torch.compile`` the loss is one opaque
op, ``qwenrl::linear_efe_fused`` (the loss and the gradients of the reduced loss, computed in
the forward), whose registered backward scales those gradients; for ``'none'`` it calls
``qwenrl::linear_efe_rows_backward``, which runs the chunks again with the per-row upstream
gradient. Both schemas take :class:`~qwenrl.loss.options.EFEOptions`' fields by name
(:func:`~qwenrl.loss.options.op_schema`), so an option added there reaches these ops as is,
and after the settings, with defaults, ``row_weight`` and the distillation teacher's tensors
and temperature. The per-token outputs are the fused op's last output (empty unless the
``per_token`` option asks for them). Under ``torch.compile`` the weight gradient is always a
fresh tensor.
"""

from __future__ import annotations

import torch

from qwenrl.loss import chunks
from qwenrl.loss.dispatch import grad_dtype, outputs_like, resolve_backend
from qwenrl.loss.distill import Teacher
from qwenrl.loss.linear_function import upstream_grads
from qwenrl.loss.options import EFEOptions, op_schema

_INPUTS = "Tensor hidden, Tensor weight, Tensor? bias, Tensor? target, Tensor? hard_mask"
_SETTINGS = "str backend, SymInt chunk_size, bool[] needs"
# After the settings, with defaults: the per-row weights and a distillation teacher.
_EXTRA = (
    "Tensor? row_weight=None, Tensor? teacher_hidden=None, Tensor? teacher_weight=None, "
    "Tensor? teacher_bias=None, float temperature=1.0"
)


def _problem(
    hidden, weight, bias, target, hard_mask, backend, chunk_size, options, extra, per_token=None
):
    """``extra``: (row_weight, teacher_hidden, teacher_weight, teacher_bias, temperature)."""
    _, forward_fn = resolve_backend(backend, hidden.device)
    settings = chunks.ChunkSettings(forward_fn, options, chunk_size)
    row_weight, t_hidden, t_weight, t_bias, temperature = extra
    teacher = None if t_hidden is None else Teacher(t_hidden, t_weight, t_bias, temperature)
    return chunks.LinearProblem(
        hidden, weight, bias, target, hard_mask, settings, row_weight, teacher, per_token
    )


def _empty_for_none(hidden, grads) -> tuple:
    # A fresh empty tensor per missing gradient: a custom op's outputs may not alias.
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@torch.library.custom_op(
    "qwenrl::linear_efe_fused",
    mutates_args=(),
    schema=op_schema(
        f"{_INPUTS}, {_SETTINGS}, {_EXTRA}", "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def linear_efe_fused(
    hidden, weight, bias, target, hard_mask, backend, chunk_size, needs, row_weight=None,
    teacher_hidden=None, teacher_weight=None, teacher_bias=None, temperature=1.0, **options,
):  # fmt: skip
    """The chunk loop as an opaque op for ``torch.compile`` (flattened inputs).

    Returns (loss, sums, grad_hidden, grad_weight, grad_bias, per_token); a gradient not asked
    for in ``needs`` (hidden, weight, bias) is an empty tensor, and so is ``per_token`` unless
    the ``per_token`` option asks for it ([4, N] float32). For ``'none'`` no gradient is
    computed here: :func:`linear_efe_rows_backward` does it in the backward.
    """
    opts = EFEOptions(**options)
    extra = (row_weight, teacher_hidden, teacher_weight, teacher_bias, temperature)
    tok = chunks.per_token_buffer(hidden.shape[0], hidden, opts)
    p = _problem(hidden, weight, bias, target, hard_mask, backend, chunk_size, opts, extra, tok)
    if opts.reduction == "none" or not any(needs):
        loss, sums = chunks.chunked_loss(p)
        grads = (None, None, None)
    else:
        loss, sums, *grads = chunks.chunked_loss_and_grads(p, tuple(needs))
    if tok is None:
        tok = hidden.new_empty(0, dtype=torch.float32)
    return (loss, sums, *_empty_for_none(hidden, grads), tok)


def _grad_shapes(hidden, weight, needs, reduction):
    n, d = hidden.shape
    v = weight.shape[0]
    dt = grad_dtype(hidden.dtype)
    shapes = ((n, d), (v, d), (v,))
    return tuple(
        hidden.new_empty(s, dtype=dt) if (need and reduction != "none") else hidden.new_empty(0)
        for s, need in zip(shapes, needs)
    )


@linear_efe_fused.register_fake
def _linear_efe_fused_fake(hidden, weight, bias, target, hard_mask, backend, chunk_size, needs,
                           *extra, reduction, per_token, **_options):  # fmt: skip
    loss, sums, tok = outputs_like(hidden, reduction, per_token)  # one row per hidden row
    return (loss, sums, *_grad_shapes(hidden, weight, needs, reduction), tok)


@torch.library.custom_op(
    "qwenrl::linear_efe_rows_backward",
    mutates_args=(),
    schema=op_schema(
        f"{_INPUTS}, Tensor grad_loss, {_SETTINGS}, {_EXTRA}", "(Tensor, Tensor, Tensor)"
    ),
)
def linear_efe_rows_backward(
    hidden, weight, bias, target, hard_mask, grad_loss, backend, chunk_size, needs,
    row_weight=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
    temperature=1.0, **options,
):  # fmt: skip
    """The ``'none'`` backward: the chunks again, each row's gradient times ``grad_loss`` [N]."""
    opts = EFEOptions(**options).replace(validate=False, per_token=False)
    extra = (row_weight, teacher_hidden, teacher_weight, teacher_bias, temperature)
    p = _problem(hidden, weight, bias, target, hard_mask, backend, chunk_size, opts, extra)
    grads = chunks.chunked_grads(p, tuple(needs), grad_loss.float())
    return _empty_for_none(hidden, grads)


@linear_efe_rows_backward.register_fake
def _rows_backward_fake(hidden, weight, bias, target, hard_mask, grad_loss, backend, chunk_size,
                        needs, *_extra, **_options):  # fmt: skip
    return _grad_shapes(hidden, weight, needs, "sum")


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    # Every argument, defaults included: the tensors, the settings, then row_weight, the
    # teacher's tensors and the temperature.
    hidden, weight, bias, target, hard_mask, backend, chunk_size, needs, *extra = inputs
    *row_and_teacher, ctx.temperature = extra
    ctx.kw = keyword_only_inputs
    ctx.rest = (backend, chunk_size, needs)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.n_inputs = len(inputs)
    if keyword_only_inputs["reduction"] == "none":
        ctx.save_for_backward(hidden, weight, bias, target, hard_mask, *row_and_teacher)
    else:
        ctx.save_for_backward(*output[2:5])


def _backward(ctx, grad_loss, _grad_sums, *_grad_rest):
    needs = ctx.rest[2]
    if ctx.kw["reduction"] == "none":
        hidden, weight, bias, target, hard_mask, *extra = ctx.saved_tensors
        kw = dict(ctx.kw, per_token=False)
        grads = linear_efe_rows_backward(
            hidden, weight, bias, target, hard_mask, grad_loss, *ctx.rest, *extra,
            ctx.temperature, **kw,
        )  # fmt: skip
        grads = tuple(g.to(dt) if need else None for g, dt, need in zip(grads, ctx.dtypes, needs))
    else:
        options = EFEOptions(**ctx.kw)
        saved = [g if need else None for g, need in zip(ctx.saved_tensors, needs)]
        # The saved buffers are the op's outputs: never scaled in place.
        grads = upstream_grads(saved, grad_loss, options, ctx.dtypes, eager=False)
    # No gradient for the rest: target, hard_mask, the settings, row_weight and the teacher.
    return (*grads, *(None,) * (ctx.n_inputs - 3))


linear_efe_fused.register_autograd(_backward, setup_context=_setup_context)
