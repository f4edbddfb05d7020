"""torch.compile support for the fused EFE loss.

Dynamo cannot trace a Triton launch or a C++ extension call made inside an
``autograd.Function``, so under ``torch.compile`` :func:`qwenrl.efe_loss` goes through
``qwenrl::efe_fused`` instead: an opaque custom op with a fake implementation (shapes only, for
tracing) and an autograd formula that scales the gradient the kernel already wrote. The graph
around the loss is compiled and the fused kernel still runs once, forward and backward in one
launch. The reference fallback needs no op: it is plain PyTorch and compiles like any model code.

Under ``torch.compile`` ``inplace=True`` is ignored (the gradient goes to a fresh buffer): a
custom op may not write behind autograd's back into a tensor it returns a gradient for.
"""

from typing import Any, Optional

import torch
from torch import Tensor

from qwenrl.loss.efe import resolve_backend, upstream_scale
from qwenrl.loss.reference import efe_loss_reference


@torch.library.custom_op("qwenrl::efe_fused", mutates_args=())
def efe_fused(
    logits: Tensor,
    target: Tensor,
    hard_mask: Optional[Tensor],  # noqa: UP045  (the custom-op schema parser wants Optional)
    backend: str,
    needs_grad: bool,
    soft: bool,
    log_target: bool,
    tau: float,
    easy_weight: float,
    entropy_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward on flattened inputs (logits [N, C]).

    Returns (loss fp32 [N] or [], sums fp32 [5], grad [N, C] in the logits' dtype, or an empty
    tensor when ``needs_grad`` is False).
    """
    _, forward_fn = resolve_backend(backend, logits.device)
    grad = torch.empty_like(logits) if needs_grad else None
    loss, sums = forward_fn(
        logits,
        target,
        hard_mask,
        grad,
        soft=soft,
        log_target=log_target,
        tau=tau,
        easy_weight=easy_weight,
        entropy_weight=entropy_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss, sums, grad if grad is not None else logits.new_empty(0)


@efe_fused.register_fake
def _efe_fused_fake(logits, target, hard_mask, backend, needs_grad, *options):
    reduction = options[-1]
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    sums = logits.new_empty((5,), dtype=torch.float32)
    grad = torch.empty_like(logits) if needs_grad else logits.new_empty(0)
    return loss, sums, grad


def _setup_context(ctx, inputs, output) -> None:
    ctx.reduction = inputs[-1]
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_loss, _grad_sums, _grad_grad):
    (grad,) = ctx.saved_tensors
    return (grad * upstream_scale(grad_loss, grad.dtype, ctx.reduction),) + (None,) * 12


efe_fused.register_autograd(_backward, setup_context=_setup_context)


def efe_compiled(
    logits: Tensor,
    target: Tensor,
    hard_mask: Tensor | None,
    backend_name: str,
    backend: str,
    opts: dict[str, Any],
) -> tuple[Tensor, Tensor]:
    """What :func:`qwenrl.efe_loss` runs while ``torch.compile`` traces it.

    ``backend_name`` is the backend ``resolve_backend`` picked, ``backend`` the one asked for
    (the op resolves it again when it runs). Returns (loss in the logits' dtype, sums fp32 [5]).
    """
    if backend_name == "reference":
        ref_opts = {k: v for k, v in opts.items() if k != "soft"}
        loss, sums = efe_loss_reference(logits, target, hard_mask=hard_mask, **ref_opts)
        return loss.to(logits.dtype), sums
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, sums, _ = efe_fused(logits, target, hard_mask, backend, needs_grad, **opts)
    return loss.to(logits.dtype), sums
