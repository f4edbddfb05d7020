"""Public EFE loss API: input checks, backend dispatch and the autograd.Function.

Every fused backend shares one calling convention (see :data:`ForwardFn`): it takes
flattened, contiguous inputs, writes the gradient of the *reduced* loss w.r.t. the logits
into ``grad`` in the same pass (pre-scaled by w_i and, for ``mean``, by 1/N_valid), and
returns the float32 loss plus the float32 [5] stat sums. Backward is then one multiply.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qwenrl.loss.reference import REDUCTIONS, efe_loss_reference, stats_from_sums

BACKENDS = ("auto", "triton", "cpu", "reference")

# (logits [N, C], target [N] int64 | [N, C] float, hard_mask [N] bool | None,
#  grad [N, C] | None, **options) -> (loss fp32 [N] or [], sums fp32 [5])
ForwardFn = Callable[..., tuple[Tensor, Tensor]]

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@functools.cache
def _cpu_forward() -> ForwardFn | None:
    from qwenrl._ext import load_extension

    ext = load_extension()
    if ext is None:
        return None

    def forward(logits, target, hard_mask, grad, **opts):
        return tuple(
            ext.efe_forward(
                logits,
                target,
                hard_mask,
                grad,
                opts["soft"],
                opts["log_target"],
                opts["tau"],
                opts["easy_weight"],
                opts["entropy_weight"],
                opts["label_smoothing"],
                opts["ignore_index"],
                REDUCTIONS.index(opts["reduction"]),
            )
        )

    return forward


@functools.cache
def _triton_forward() -> ForwardFn | None:
    try:
        from qwenrl.kernels.efe import efe_forward_triton
    except Exception as exc:  # ImportError, or a Triton that cannot initialise here
        _triton_forward.error = exc  # type: ignore[attr-defined]
        return None
    return efe_forward_triton


def _reference_forward(logits, target, hard_mask, grad, **opts) -> tuple[Tensor, Tensor]:
    """The reference behind the fused calling convention (used when no kernel is at hand)."""
    opts = dict(opts)
    opts.pop("soft")
    with torch.enable_grad():
        z = logits.detach().float().requires_grad_(grad is not None)
        loss, sums = efe_loss_reference(z, target, hard_mask=hard_mask, **opts)
        if grad is not None:
            # For 'none' the convention is the gradient of each row's own loss.
            (g,) = torch.autograd.grad(loss.sum(), z)
            grad.copy_(g)
    return loss.detach(), sums


def resolve_backend(backend: str, device: torch.device) -> tuple[str, ForwardFn]:
    """Picks the forward function; a missing fused backend falls back with one warning."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        elif device.type == "cpu":
            backend = "cpu"
        else:
            return "reference", _reference_forward
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got a tensor on {device}")
        fn = _cpu_forward()
        if fn is None:
            from qwenrl._ext import extension_error

            _warn_once(
                "cpu",
                "qwenrl: the C++ extension qwenrl._C is not built "
                f"({extension_error()}); using the slower PyTorch reference loss. "
                "Build it with `pip install -e . --no-build-isolation`.",
            )
            return "reference", _reference_forward
        return "cpu", fn
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing qwenrl"
            )
        fn = _triton_forward()
        if fn is None:
            _warn_once(
                "triton",
                f"qwenrl: Triton kernels unavailable ({getattr(_triton_forward, 'error', '?')}); "
                "using the slower PyTorch reference loss.",
            )
            return "reference", _reference_forward
        return "triton", fn
    return "reference", _reference_forward


def _check_inputs(
    logits: Tensor,
    target: Tensor,
    hard_mask: Tensor | None,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    log_target: bool,
    validate: bool,
) -> bool:
    """Raises a clear error for bad input before any kernel runs; returns ``soft``."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be torch.Tensors")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., C] with C >= 1, got {tuple(logits.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    row_shape = logits.shape[:-1]
    soft = target.is_floating_point()
    if soft:
        if target.shape != logits.shape:
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
    else:
        if log_target:
            raise ValueError("log_target=True needs a floating [..., C] target distribution")
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"class targets must be int64 or int32, got dtype {target.dtype}")
        if target.shape != row_shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match logits shape "
                f"{tuple(logits.shape)} (expected {tuple(row_shape)})"
            )
        if validate:
            n_classes = logits.shape[-1]
            bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
            if bool(bad.any()):
                value = int(target[bad].flatten()[0])
                raise ValueError(
                    f"target value {value} is outside [0, {n_classes}) and is not "
                    f"ignore_index={ignore_index}"
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


def upstream_scale(grad_loss: torch.Tensor, dtype: torch.dtype, reduction: str) -> torch.Tensor:
    """The incoming gradient of the loss, shaped to scale the fused [N, C] gradient: one factor
    per row for ``'none'``, one scalar otherwise."""
    scale = grad_loss.to(dtype)
    return scale[:, None] if reduction == "none" else scale


class EFEFunction(torch.autograd.Function):
    """Fused forward+backward: forward writes the gradient, backward scales it in place.

    The gradient buffer is handed to autograd as the result (no copy, no second [N, C]
    allocation), so it can be consumed once: a second backward through the same loss (with
    ``retain_graph=True``) raises instead of returning a gradient scaled twice.
    """

    @staticmethod
    def forward(ctx, logits, target, hard_mask, forward_fn, opts, inplace):  # type: ignore[override]
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if inplace else torch.empty_like(logits)
        loss, sums = forward_fn(logits, target, hard_mask, grad, **opts)
        if inplace and grad is not None:
            # The logits now hold the gradient: bump their version so that any op which saved
            # them for its own backward raises instead of silently using the gradient.
            torch.autograd.graph.increment_version(logits)
        ctx.reduction = opts["reduction"]
        ctx.grad = grad  # not saved_tensors: backward gives this very buffer away
        ctx.mark_non_differentiable(sums)
        return loss.to(logits.dtype), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "efe_loss: the fused gradient was already consumed by an earlier backward; "
                "compute the loss again to backward twice"
            )
        grad.mul_(upstream_scale(grad_loss, grad.dtype, ctx.reduction))
        return grad, None, None, None, None, None


def efe_loss(
    logits: Tensor,
    target: Tensor,
    *,
    tau: float = 0.6,
    easy_weight: float = 0.5,
    entropy_weight: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    log_target: bool = False,
    hard_mask: Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    validate: bool | None = None,
    inplace: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Expected-free-energy loss focused on hard cells (DESIGN.md §2).

    Args:
        logits: [..., C] fp32/bf16/fp16 logits.
        target: [...] int64/int32 class indices, or a [..., C] distribution (log-probs if
            ``log_target``).
        tau: a row is *hard* when q[y] < tau. easy_weight: weight of the other rows.
        entropy_weight: β, weight of the ambiguity term H(q).
        label_smoothing: ε. ignore_index: class-target rows to skip.
        reduction: ``'mean'`` (over non-ignored rows), ``'sum'`` or ``'none'`` ([...]).
        hard_mask: optional [...] bool overriding the tau rule.
        backend: ``'auto'`` | ``'triton'`` | ``'cpu'`` | ``'reference'``.
        return_stats: also return {mask_ratio, accuracy, risk, entropy, n_valid}, each a
            0-dim tensor on the logits' device (no host sync).
        validate: check that class targets are in range; default True on CPU, False on
            CUDA (the check syncs the host).
        inplace: write the gradient over ``logits`` (saves memory; ``logits`` is then dirty).
    """
    if validate is None:
        validate = logits.device.type == "cpu"
    soft = _check_inputs(
        logits,
        target,
        hard_mask,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        log_target=log_target,
        validate=validate,
    )
    backend_name, forward_fn = resolve_backend(backend, logits.device)
    n_classes = logits.shape[-1]
    row_shape = logits.shape[:-1]
    z = logits.reshape(-1, n_classes)
    if not z.is_contiguous():
        z = z.contiguous()
    if inplace and z.data_ptr() != logits.data_ptr():
        raise ValueError("inplace=True needs contiguous logits")
    if soft:
        tgt = (
            target.reshape(-1, n_classes)
            .to(torch.float32 if target.dtype == torch.float64 else target.dtype)
            .contiguous()
        )
    else:
        tgt = target.reshape(-1).to(torch.int64).contiguous()
    mask = hard_mask.reshape(-1).contiguous() if hard_mask is not None else None
    opts: dict[str, Any] = dict(
        soft=soft,
        log_target=bool(log_target),
        tau=float(tau),
        easy_weight=float(easy_weight),
        entropy_weight=float(entropy_weight),
        label_smoothing=float(label_smoothing),
        ignore_index=int(ignore_index),
        reduction=reduction,
    )
    if torch.compiler.is_compiling():  # Dynamo cannot trace the fused kernels: a custom op
        from qwenrl.loss.compile import efe_compiled

        loss, sums = efe_compiled(z, tgt, mask, backend_name, backend, opts)
    else:
        loss, sums = EFEFunction.apply(z, tgt, mask, forward_fn, opts, inplace)
    if reduction == "none":
        loss = loss.reshape(row_shape)
    if return_stats:
        return loss, stats_from_sums(sums)
    return loss


class EFELoss(nn.Module):
    """Module form of :func:`efe_loss`; the stats of the last call are in ``last_stats``."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        options.pop("return_stats", None)
        self.options = options
        self.last_stats: dict[str, Tensor] | None = None

    @property
    def tau(self) -> float:
        return self.options.get("tau", 0.6)

    @tau.setter
    def tau(self, value: float) -> None:  # the trainer's curriculum moves tau
        self.options["tau"] = float(value)

    def forward(self, logits: Tensor, target: Tensor, hard_mask: Tensor | None = None) -> Tensor:
        opts = dict(self.options)
        if hard_mask is not None:
            opts["hard_mask"] = hard_mask
        loss, self.last_stats = efe_loss(logits, target, return_stats=True, **opts)
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
