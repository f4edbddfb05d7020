"""Backend dispatch for the fused EFE loss: which kernel runs, and the one calling convention.

Every backend is a :data:`ForwardFn`::

    forward(logits [N, C], target [N] int64 | [N, C] float, hard_mask [N] bool | None,
            grad [N, C] | None, options: EFEOptions) -> (loss fp32 [N] or [], sums fp32 [5])

It validates class targets when ``options.validate`` (before any gradient is written), and in
the same pass as the loss writes into ``grad`` the gradient of the *reduced* loss w.r.t. the
logits: pre-scaled by w_i and, for ``'mean'``, by 1/N_valid (for ``'none'``, each row's own
loss). ``grad`` has the dtype :func:`grad_dtype` gives. Backward is then at most one multiply
(:func:`apply_upstream`), and none at all for ``loss.backward()`` on the CPU.

Backends: ``'cpu'`` (the C++ extension ``qwenrl._C``), ``'triton'`` (``qwenrl.kernels.efe``; CUDA,
or CPU tensors under ``TRITON_INTERPRET=1``) and ``'reference'`` (plain PyTorch,
:mod:`qwenrl.loss.reference`). ``'auto'`` picks Triton on CUDA and C++ on the CPU; if that
backend's module is missing it warns once and uses the reference. A backend asked for by name
that cannot load raises.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from qwenrl.loss.options import SUM_FIELDS, EFEOptions
from qwenrl.loss.reference import efe_loss_reference

BACKENDS = ("auto", "triton", "cpu", "reference")

ForwardFn = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None", EFEOptions], tuple]


class BackendUnavailableError(ImportError):
    """A backend asked for by name cannot be loaded here."""


def grad_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the buffer a fused forward writes the gradient into.

    float16 gradients are kept in float32 until backward: pre-scaled by 1/N_valid they fall
    into float16's subnormal range (N_valid = 28,800 puts |q - p|/N below 6e-5) and lose their
    precision before a GradScaler's factor could lift them. bfloat16 has float32's exponent
    range and keeps its own dtype.
    """
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


def new_grad_buffer(logits: Tensor) -> Tensor:
    """An uninitialised buffer shaped like ``logits`` for the fused gradient (dtype
    :func:`grad_dtype`); on the CPU a large one is backed by huge pages (``qwenrl._C``)."""
    dtype = grad_dtype(logits.dtype)
    if logits.device.type == "cpu" and _load("cpu") is None:
        from qwenrl._ext import load_extension

        return load_extension().empty_grad(logits.shape, dtype)
    return logits.new_empty(logits.shape, dtype=dtype)


def check_target_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Raises ValueError if a class target lies outside [0, C) and is not ``ignore_index``.

    Reads one bool back to the host: the C++ backend does the same check inside its kernel.
    """
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target value {value} is outside [0, {n_classes}) and is not "
            f"ignore_index={ignore_index}"
        )


def apply_upstream(
    grad: Tensor, grad_loss: Tensor, options: EFEOptions, dtype: torch.dtype, *, eager: bool
) -> Tensor:
    """The logits' gradient from the fused buffer ``grad`` and the loss's incoming gradient.

    ``eager`` (the autograd.Function, whose buffer belongs to this loss call alone) scales
    ``grad`` in place, and skips the pass over [N, C] when the upstream gradient is exactly 1
    on the CPU (plain ``loss.backward()``). That check reads a value, so it is left out on
    CUDA (a host sync) and in a traced graph (the custom op's backward), which multiply out of
    place.
    """
    if options.reduction == "none":
        scale = grad_loss.to(grad.dtype)[:, None]
    elif eager and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        scale = None
    else:
        scale = grad_loss.to(grad.dtype)
    if scale is not None:
        grad = grad.mul_(scale) if eager else grad * scale
    return grad if grad.dtype == dtype else grad.to(dtype)


# --- the backends ------------------------------------------------------------------------------


def _cpu_forward(logits, target, hard_mask, grad, options: EFEOptions):
    from qwenrl._ext import load_extension

    ext = load_extension()
    return tuple(ext.efe_forward(logits, target, hard_mask, grad, **options.kernel_kwargs()))


def _triton_forward(logits, target, hard_mask, grad, options: EFEOptions):
    from qwenrl.kernels.efe import efe_forward_triton

    if options.validate and not options.soft:
        check_target_range(target, logits.shape[1], options.ignore_index)
    kwargs = options.kernel_kwargs()
    del kwargs["validate"]
    return efe_forward_triton(logits, target, hard_mask, grad, **kwargs)


def reference_forward(logits, target, hard_mask, grad, options: EFEOptions):
    """The reference behind the fused calling convention (the fallback, and the custom op's
    body when the reference is the backend under ``torch.compile``)."""
    if options.validate and not options.soft:
        check_target_range(target, logits.shape[1], options.ignore_index)

    def loss_of(z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        loss, sums = efe_loss_reference(z, target, hard_mask=hard_mask, **options.loss_kwargs())
        # For 'none' the convention is the gradient of each row's own loss.
        return loss.sum(), (loss, sums)

    z = logits.detach().float()
    if grad is None:
        _, (loss, sums) = loss_of(z)
    else:
        # torch.func.grad, not torch.autograd.grad: the custom op's body runs below autograd
        # (torch.compile, or the op called eagerly), where no graph is recorded.
        g, (loss, sums) = torch.func.grad(loss_of, has_aux=True)(z)
        grad.copy_(g)
    return loss.detach().float(), sums


@functools.cache
def _load(name: str) -> str | None:
    """Imports a fused backend's module once; returns why it is missing (None if loaded).

    Only an ImportError counts as missing: any other failure is a bug to see, not to hide.
    """
    try:
        if name == "cpu":
            from qwenrl._ext import require_extension

            ext = require_extension("the C++ EFE loss backend")
            if tuple(getattr(ext, "SUM_FIELDS", ())) != SUM_FIELDS:
                raise ImportError(
                    f"qwenrl._C returns its sums as {getattr(ext, 'SUM_FIELDS', 'unnamed')}, "
                    f"not {SUM_FIELDS}: a stale build; rebuild it with `make ext`"
                )
        else:
            import qwenrl.kernels.efe  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


_warned: set[str] = set()

_FORWARDS: dict[str, ForwardFn] = {
    "cpu": _cpu_forward,
    "triton": _triton_forward,
    "reference": reference_forward,
}


def resolve_backend(backend: str, device: torch.device) -> tuple[str, ForwardFn]:
    """Picks the backend for tensors on ``device``: (its name, its forward function)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    requested = backend
    if backend == "auto":
        backend = {"cuda": "triton", "cpu": "cpu"}.get(device.type, "reference")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got a tensor on {device}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing qwenrl"
        )
    if backend != "reference":
        missing = _load(backend)
        if missing is not None:
            if requested != "auto":
                raise BackendUnavailableError(
                    f"efe_loss backend={backend!r} cannot be loaded: {missing}"
                )
            if backend not in _warned:
                _warned.add(backend)
                warnings.warn(
                    f"qwenrl: the {backend!r} EFE loss backend is not available ({missing}); "
                    "using the slower PyTorch reference loss. For the C++ backend build the "
                    "extension with `python -m qwenrl.build_ext`.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            backend = "reference"
    return backend, _FORWARDS[backend]
