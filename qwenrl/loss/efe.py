"""Public EFE loss API: :func:`efe_loss`, :class:`EFELoss`, input checks, the autograd.Function.

The kernels behind it, and the calling convention they share, are in
:mod:`qwenrl.loss.dispatch`; the math is in ``docs/loss.md`` and :mod:`qwenrl.loss.reference`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qwenrl.loss.compile import efe_fused
from qwenrl.loss.dispatch import (
    BACKENDS,
    ForwardFn,
    apply_upstream,
    grad_dtype,
    new_grad_buffer,
    resolve_backend,
)
from qwenrl.loss.options import CALLER_FIELDS, EFEOptions, caller_options
from qwenrl.loss.reference import per_token_by_name, stats_from_sums


def check_row_weight(row_weight: Tensor | None, row_shape: torch.Size, device) -> Tensor | None:
    """``row_weight`` flattened to a contiguous float32 [N], after a clear error for a wrong
    type, dtype, shape or device, or one that requires grad (the loss is not differentiated
    w.r.t. it)."""
    if row_weight is None:
        return None
    if not isinstance(row_weight, Tensor) or not row_weight.is_floating_point():
        kind = row_weight.dtype if isinstance(row_weight, Tensor) else type(row_weight).__name__
        raise TypeError(f"row_weight must be a floating tensor, got {kind}")
    if row_weight.shape != row_shape:
        raise ValueError(
            f"row_weight shape {tuple(row_weight.shape)} does not match the rows of logits "
            f"{tuple(row_shape)}"
        )
    if row_weight.device != device:
        raise ValueError(f"row_weight is on {row_weight.device} but logits are on {device}")
    if row_weight.requires_grad:
        raise ValueError(
            "row_weight requires grad, but the loss is not differentiated w.r.t. it: "
            "pass row_weight.detach()"
        )
    return row_weight.reshape(-1).float().contiguous()


def per_token_outputs(per_token: Tensor, row_shape: torch.Size) -> dict[str, Tensor]:
    """The kernels' [4, N] per-row buffer as ``{logprob, entropy, correct, lse}``, each shaped
    like the rows (``correct`` bool)."""
    return {k: v.reshape(row_shape) for k, v in per_token_by_name(per_token).items()}


def _check_inputs(logits: Tensor, target: Tensor, hard_mask: Tensor | None) -> bool:
    """Raises a clear error for malformed input before any kernel runs; returns ``soft``.

    The range of class targets is checked by the backend itself (``EFEOptions.validate``), so
    that the check also runs inside a ``torch.compile``-d graph.
    """
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be torch.Tensors")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., C] with C >= 1, got {tuple(logits.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    row_shape = logits.shape[:-1]
    soft = target.is_floating_point()
    if soft and target.shape != logits.shape:
        if target.shape == row_shape:
            raise TypeError(
                f"class targets must be an integer tensor (int64 or int32), got dtype "
                f"{target.dtype}; use target.long(), or pass soft targets with the "
                f"logits' shape {tuple(logits.shape)}"
            )
        raise ValueError(
            f"soft target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}"
        )
    if not soft:
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"class targets must be int64 or int32, got dtype {target.dtype}")
        if target.shape != row_shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match logits shape "
                f"{tuple(logits.shape)} (expected {tuple(row_shape)})"
            )
    if hard_mask is not None:
        if hard_mask.dtype != torch.bool:
            raise TypeError(f"hard_mask must be a bool tensor, got dtype {hard_mask.dtype}")
        if hard_mask.shape != row_shape:
            raise ValueError(
                f"hard_mask shape {tuple(hard_mask.shape)} does not match the rows of logits "
                f"{tuple(row_shape)}"
            )
        if hard_mask.device != logits.device:
            raise ValueError(
                f"hard_mask is on {hard_mask.device} but logits are on {logits.device}"
            )
    return soft


class EFEFunction(torch.autograd.Function):
    """Fused forward+backward: forward writes the gradient, backward scales it in place.

    The gradient buffer is handed to autograd as the result (no copy, no second [N, C]
    allocation), so it can be consumed once: a second backward through the same loss (with
    ``retain_graph=True``) raises instead of returning a gradient scaled twice.
    """

    @staticmethod
    def forward(
        ctx, logits, target, hard_mask, row_weight, forward_fn: ForwardFn, options, inplace
    ):  # type: ignore[override]
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if inplace else new_grad_buffer(logits)
        loss, sums, per_token = forward_fn(logits, target, hard_mask, row_weight, grad, options)
        if inplace and grad is not None:
            # The logits now hold the gradient: bump their version so that any op which saved
            # them for its own backward raises instead of silently using the gradient.
            torch.autograd.graph.increment_version(logits)
        ctx.options = options
        ctx.dtype = logits.dtype
        ctx.grad = grad  # not saved_tensors: backward gives this very buffer away
        ctx.mark_non_differentiable(sums, per_token)
        return loss, sums, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_per_token):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "efe_loss: the fused gradient was already consumed by an earlier backward; "
                "compute the loss again to backward twice"
            )
        grad = apply_upstream(grad, grad_loss, ctx.options, ctx.dtype, eager=True)
        return grad, None, None, None, None, None, None


def efe_loss(
    logits: Tensor,
    target: Tensor,
    *,
    tau: float = 0.6,
    easy_weight: float = 0.5,
    entropy_weight: float = 0.0,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    log_target: bool = False,
    hard_mask: Tensor | None = None,
    row_weight: Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    return_per_token: bool = False,
    validate: bool | None = None,
    inplace: bool = False,
) -> Tensor | tuple:
    """Expected-free-energy loss focused on hard cells (``docs/loss.md``).

    Args:
        logits: [..., C] fp32/bf16/fp16 logits.
        target: [...] int64/int32 class indices, or a [..., C] distribution (log-probs if
            ``log_target``).
        tau: a row is *hard* when q[y] < tau. easy_weight: weight of the other rows.
        entropy_weight: β, weight of the ambiguity term H(q).
        label_smoothing: ε. ignore_index: class-target rows to skip.
        z_loss: λ, adds λ·lse² to each row's loss (lse = logsumexp of the row's logits).
        reduction: ``'mean'`` (over non-ignored rows), ``'sum'`` or ``'none'`` ([...]).
        hard_mask: optional [...] bool overriding the tau rule.
        row_weight: optional [...] float, multiplies each row's loss (any sign: advantages);
            not differentiated. ``'mean'`` still divides by the number of valid rows.
        backend: ``'auto'`` | ``'triton'`` | ``'cpu'`` | ``'reference'``.
        return_stats: also return {mask_ratio, accuracy, risk, entropy, n_valid}, each a
            0-dim tensor on the logits' device (no host sync).
        return_per_token: also return {logprob, entropy, correct, lse}, each [...] (0 on
            ignored rows; ``correct`` bool), computed in the same pass and not differentiable.
        validate: check that class targets are in range; default True on CPU, False on
            CUDA (the check syncs the host).
        inplace: write the gradient over ``logits`` (saves memory; ``logits`` is then dirty).
            Not for float16 logits, whose gradient is kept in float32 until backward.

    Returns:
        The float32 loss ([...] for ``'none'``, else 0-dim), then the stats if asked, then the
        per-token outputs if asked: ``loss``, ``(loss, stats)``, ``(loss, per_token)`` or
        ``(loss, stats, per_token)``.
    """
    soft = _check_inputs(logits, target, hard_mask)
    weight = check_row_weight(row_weight, logits.shape[:-1], logits.device)
    # Spelled out, not read from locals(): torch.compile traces this function.
    options = EFEOptions(
        soft=soft,
        log_target=log_target,
        tau=tau,
        easy_weight=easy_weight,
        entropy_weight=entropy_weight,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        ignore_index=ignore_index,
        reduction=reduction,
        validate=logits.device.type == "cpu" if validate is None else validate,
        per_token=return_per_token,
    )
    n_classes = logits.shape[-1]
    row_shape = logits.shape[:-1]
    z = logits.reshape(-1, n_classes)
    if not z.is_contiguous():
        z = z.contiguous()
    if inplace and (z.data_ptr() != logits.data_ptr() or grad_dtype(z.dtype) != z.dtype):
        raise ValueError(
            "inplace=True needs contiguous float32 or bfloat16 logits "
            f"(got {'non-contiguous ' if z.data_ptr() != logits.data_ptr() else ''}{z.dtype})"
        )
    if soft:
        tgt = target.reshape(-1, n_classes)
        if tgt.dtype == torch.float64:
            tgt = tgt.float()
        tgt = tgt.contiguous()
    else:
        tgt = target.reshape(-1)
        if tgt.dtype != torch.int64:
            tgt = tgt.long()
        tgt = tgt.contiguous()
    mask = hard_mask.reshape(-1).contiguous() if hard_mask is not None else None
    if torch.compiler.is_compiling():  # Dynamo cannot trace the kernels: an opaque custom op
        needs_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, sums, per_token, _ = efe_fused(
            z, tgt, mask, weight, backend, needs_grad, **options.kernel_kwargs()
        )
    else:
        _, forward_fn = resolve_backend(backend, logits.device)
        loss, sums, per_token = EFEFunction.apply(
            z, tgt, mask, weight, forward_fn, options, inplace
        )
    if reduction == "none":
        loss = loss.reshape(row_shape)
    return loss_outputs(loss, sums, per_token, row_shape, return_stats, return_per_token)


def loss_outputs(
    loss: Tensor,
    sums: Tensor,
    per_token: Tensor,
    row_shape: torch.Size,
    return_stats: bool,
    return_per_token: bool,
) -> Tensor | tuple:
    """``loss``, then the stats and the per-token outputs where asked for (one order for
    every loss function)."""
    out: list = [loss]
    if return_stats:
        out.append(stats_from_sums(sums))
    if return_per_token:
        out.append(per_token_outputs(per_token, row_shape))
    return out[0] if len(out) == 1 else tuple(out)


class OptionsModule(nn.Module):
    """What a loss module (``EFELoss``, ``LinearEFELoss``) stores: one :class:`EFEOptions`,
    checked when the module is built so that a bad value fails there, not at the first step,
    plus ``backend`` and ``validate`` (None: per device). Each option is also an attribute that
    reads and writes that one object: ``crit.tau = 0.3`` between calls (a curriculum) checks
    the new value and takes effect at the next call."""

    def _set_options(self, *, backend: str, validate: bool | None, **options: Any) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # Whether a target is soft is only known per call: soft=True lets log_target pass.
        self.efe_options = EFEOptions(soft=True, **options)
        self.backend = backend
        self.validate = validate
        self.last_stats: dict[str, Tensor] | None = None

    def options(self) -> dict[str, Any]:
        """The stored options as keyword arguments of :func:`efe_loss`."""
        return {
            **self.efe_options.loss_kwargs(),
            "backend": self.backend,
            "validate": self.validate,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


def _option_attribute(name: str) -> property:
    def get(self: OptionsModule) -> Any:
        return getattr(self.efe_options, name)

    def set_(self: OptionsModule, value: Any) -> None:
        self.efe_options = self.efe_options.replace(**{name: value})

    return property(get, set_, doc=f"This module's ``{name}`` (in ``efe_options``).")


for _name in CALLER_FIELDS:
    setattr(OptionsModule, _name, _option_attribute(_name))


class EFELoss(OptionsModule):
    """Module form of :func:`efe_loss`; the stats of the last call are in ``last_stats``.

    ``tau`` may be changed between calls (a curriculum). A ``hard_mask`` is given per call.
    """

    def __init__(
        self,
        *,
        tau: float = 0.6,
        easy_weight: float = 0.5,
        entropy_weight: float = 0.0,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        log_target: bool = False,
        backend: str = "auto",
        validate: bool | None = None,
    ) -> None:
        super().__init__()
        self._set_options(backend=backend, validate=validate, **caller_options(locals()))

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        hard_mask: Tensor | None = None,
        row_weight: Tensor | None = None,
    ) -> Tensor:
        """logits [..., C], target [...] or [..., C], hard_mask [...] bool, row_weight [...]
        float → the loss."""
        loss, self.last_stats = efe_loss(
            logits,
            target,
            hard_mask=hard_mask,
            row_weight=row_weight,
            return_stats=True,
            **self.options(),
        )
        return loss
