"""torch.compile support for the fused EFE loss: the custom op ``qwenrl::efe_fused``.

Dynamo cannot trace the ``autograd.Function`` that hands the fused gradient buffer to autograd,
so under ``torch.compile`` :func:`qwenrl.efe_loss` calls this functional op instead: it
allocates the gradient and calls the dispatcher op ``qwenrl::efe_forward``
(:mod:`qwenrl.loss.dispatch`), whose kernel the device picks. It has a fake implementation
(shapes only, for tracing) and an autograd formula that scales the gradient the kernel already
wrote: the graph around the loss is compiled and the kernel still runs once, forward and
backward in one launch. The op validates class targets
itself (``validate``), so the default options need no data-dependent branch in the graph and
compile with ``fullgraph=True``.

Under ``torch.compile`` ``inplace=True`` is ignored (the gradient goes to a fresh buffer): a
custom op may not write behind autograd's back into a tensor it returns a gradient for.
"""

import torch

from qwenrl.loss.dispatch import apply_upstream, grad_dtype, outputs_like, resolve_backend
from qwenrl.loss.options import EFEOptions, op_schema


@torch.library.custom_op(
    "qwenrl::efe_fused",
    mutates_args=(),
    schema=op_schema(
        "Tensor logits, Tensor target, Tensor? hard_mask, Tensor? row_weight, str backend, "
        "bool needs_grad",
        "(Tensor, Tensor, Tensor, Tensor)",
    ),
)
def efe_fused(logits, target, hard_mask, row_weight, backend, needs_grad, **options):
    """Fused forward on flattened inputs (logits [N, C]); ``options`` are :class:`EFEOptions`'
    fields, by name (the schema is :func:`op_schema`'s).

    Returns (loss fp32 [N] or [], sums fp32 [5], per_token fp32 [4, N] or empty, grad [N, C]
    in :func:`grad_dtype`, or an empty tensor when ``needs_grad`` is False).
    """
    _, forward_fn = resolve_backend(backend, logits.device)
    grad = logits.new_empty(logits.shape, dtype=grad_dtype(logits.dtype)) if needs_grad else None
    loss, sums, per_token = forward_fn(
        logits, target, hard_mask, row_weight, grad, EFEOptions(**options)
    )
    return loss, sums, per_token, grad if grad is not None else logits.new_empty(0)


@efe_fused.register_fake
def _efe_fused_fake(
    logits, target, hard_mask, row_weight, backend, needs_grad, *, reduction, per_token, **_opts
):
    loss, sums, rows = outputs_like(logits, reduction, per_token)
    if needs_grad:
        grad = logits.new_empty(logits.shape, dtype=grad_dtype(logits.dtype))
    else:
        grad = logits.new_empty(0)
    return loss, sums, rows, grad


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.options = EFEOptions(**keyword_only_inputs)
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_loss, _grad_sums, _grad_per_token, _grad_grad):
    (grad,) = ctx.saved_tensors
    # The saved buffer is the op's output: never scaled in place.
    grad = apply_upstream(grad, grad_loss, ctx.options, ctx.dtype, eager=False)
    return grad, None, None, None, None, None


efe_fused.register_autograd(_backward, setup_context=_setup_context)
