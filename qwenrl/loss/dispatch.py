"""Backend dispatch for the fused EFE loss: which kernel runs, and the one calling convention.

Every backend is a :data:`ForwardFn`::

    forward(logits [N, C], target [N] int64 | [N, C] float, hard_mask [N] bool | None,
            row_weight [N] float32 | None, grad [N, C] | None, options: EFEOptions)
        -> (loss fp32 [N] or [], sums fp32 [5], per_token fp32 [4, N] or empty)

It validates class targets when ``options.validate`` (before any gradient is written), and in
the same pass as the loss writes into ``grad`` the gradient of the *reduced* loss w.r.t. the
logits: pre-scaled by r_i·w_i and, for ``'mean'``, by 1/N_valid (for ``'none'``, each row's own
loss), and with ``options.per_token`` the per-row outputs (``PER_TOKEN_FIELDS``, into a
:func:`new_per_token_buffer`). ``grad`` has the dtype :func:`grad_dtype` gives. Backward is
then at most one multiply (:func:`apply_upstream`), and none at all for ``loss.backward()`` on
the CPU.

The convention is one dispatcher op, ``qwenrl::efe_forward`` (:func:`efe_forward`), declared
once with :class:`EFEOptions`' fields as keyword arguments. Its CPU kernel is the C++
extension ``qwenrl._C``, its CUDA kernel the Triton launcher (``qwenrl.kernels.efe``), and its
default kernel and fake are the reference (plain PyTorch, :mod:`qwenrl.loss.reference`).
``backend`` names a kernel against the device's choice: ``'reference'`` anywhere, ``'triton'``
on CPU tensors under ``TRITON_INTERPRET=1``. ``'auto'`` keeps the device's kernel; if its module
is missing it warns once and uses the reference. A backend asked for by name that cannot load
raises.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from qwenrl.loss.options import PER_TOKEN_FIELDS, SUM_FIELDS, EFEOptions, op_schema
from qwenrl.loss.reference import efe_loss_reference

BACKENDS = ("auto", "triton", "cpu", "reference")

ForwardFn = Callable[
    [Tensor, Tensor, "Tensor | None", "Tensor | None", "Tensor | None", EFEOptions], tuple
]


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


def new_per_token_buffer(like: Tensor, n_rows: int, per_token: bool) -> Tensor:
    """The float32 per-row outputs of ``n_rows`` rows on ``like``'s device: uninitialised
    [4, N] (``PER_TOKEN_FIELDS``) when ``per_token`` asks for them, else empty."""
    shape = (len(PER_TOKEN_FIELDS), n_rows) if per_token else (0,)
    return like.new_empty(shape, dtype=torch.float32)


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


def _cpu_forward(logits, target, hard_mask, row_weight, grad, options: EFEOptions):
    from qwenrl._ext import load_extension

    ext = load_extension()
    return tuple(
        ext.efe_forward(logits, target, hard_mask, row_weight, grad, **options.kernel_kwargs())
    )


def _triton_forward(logits, target, hard_mask, row_weight, grad, options: EFEOptions):
    from qwenrl.kernels.efe import efe_forward_triton

    if options.validate and not options.soft:
        check_target_range(target, logits.shape[1], options.ignore_index)
    kwargs = options.kernel_kwargs()
    del kwargs["validate"]
    # The kernels write the per-row outputs into a buffer of ours, like the gradient.
    per_token = kwargs.pop("per_token")
    per_token_out = new_per_token_buffer(logits, logits.shape[0], per_token)
    loss, sums = efe_forward_triton(
        logits,
        target,
        hard_mask,
        grad,
        row_weight=row_weight,
        per_token_out=per_token_out if per_token else None,
        **kwargs,
    )
    return loss, sums, per_token_out


def reference_forward(logits, target, hard_mask, row_weight, grad, options: EFEOptions):
    """The reference behind the fused calling convention (the fallback, and the op's kernel
    when ``backend='reference'``)."""
    if options.validate and not options.soft:
        check_target_range(target, logits.shape[1], options.ignore_index)

    def loss_of(z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        loss, sums, per_token = efe_loss_reference(
            z,
            target,
            hard_mask=hard_mask,
            row_weight=row_weight,
            return_per_token=True,
            **options.loss_kwargs(),
        )
        # For 'none' the convention is the gradient of each row's own loss.
        return loss.sum(), (loss, sums, per_token)

    z = logits.detach().float()
    if grad is None:
        _, (loss, sums, per_token) = loss_of(z)
    else:
        # torch.func.grad, not torch.autograd.grad: the op's kernel runs below autograd
        # (torch.compile, or the op called eagerly), where no graph is recorded.
        g, (loss, sums, per_token) = torch.func.grad(loss_of, has_aux=True)(z)
        grad.copy_(g)
    if not options.per_token:
        per_token = per_token.new_empty(0)
    return loss.detach().float(), sums, per_token


@functools.cache
def _load(name: str) -> str | None:
    """Imports a fused backend's module once; returns why it is missing (None if loaded).

    Only an ImportError counts as missing: any other failure is a bug to see, not to hide.
    """
    try:
        if name == "cpu":
            from qwenrl._ext import require_extension

            ext = require_extension("the C++ EFE loss backend")
            for name, fields in (
                ("SUM_FIELDS", SUM_FIELDS),
                ("PER_TOKEN_FIELDS", PER_TOKEN_FIELDS),
            ):
                if tuple(getattr(ext, name, ())) != fields:
                    raise ImportError(
                        f"qwenrl._C's {name} is {getattr(ext, name, 'missing')}, not {fields}: "
                        "a stale build; rebuild it with `make ext`"
                    )
        else:
            import qwenrl.kernels.efe  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


# --- the op: one schema, a kernel per device ---------------------------------------------------
#
# ``qwenrl::efe_forward`` is the fused forward as a dispatcher op. The dispatcher picks its
# kernel from the device: the C++ extension on the CPU, the Triton launcher on CUDA, the
# reference anywhere else (its default kernel). ``backend`` overrides that choice by name:
# ``'reference'`` on any device, ``'triton'`` on CPU tensors (the interpreter). The eager loss,
# every chunk of the linear loss and the ``torch.compile`` ops all call it.

_DEVICE_BACKEND = {"cpu": "cpu", "cuda": "triton"}


torch.library.define(
    "qwenrl::efe_forward",
    op_schema(
        "Tensor logits, Tensor target, Tensor? hard_mask, Tensor? row_weight, Tensor(a!)? grad, "
        "str backend",
        "(Tensor, Tensor, Tensor)",
    ),
)


def efe_forward(
    logits, target, hard_mask, row_weight, grad, backend, **options
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused forward (the :data:`ForwardFn` convention, options by name): returns (loss,
    sums, per_token) and writes the gradient into ``grad`` when given. ``backend`` as in
    :data:`BACKENDS`; the device picks the kernel (see above)."""
    return torch.ops.qwenrl.efe_forward.default(
        logits, target, hard_mask, row_weight, grad, backend, **options
    )


@torch.library.impl("qwenrl::efe_forward", "default")
def _efe_forward_default(logits, target, hard_mask, row_weight, grad, backend, **options):
    return reference_forward(logits, target, hard_mask, row_weight, grad, EFEOptions(**options))


@torch.library.impl("qwenrl::efe_forward", "cpu")
def _efe_forward_cpu(logits, target, hard_mask, row_weight, grad, backend, **options):
    forward = {"triton": _triton_forward, "reference": reference_forward}.get(backend, _cpu_forward)
    return forward(logits, target, hard_mask, row_weight, grad, EFEOptions(**options))


@torch.library.impl("qwenrl::efe_forward", "cuda")
def _efe_forward_cuda(logits, target, hard_mask, row_weight, grad, backend, **options):
    forward = reference_forward if backend == "reference" else _triton_forward
    return forward(logits, target, hard_mask, row_weight, grad, EFEOptions(**options))


def outputs_like(logits: Tensor, reduction: str, per_token: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Empty (loss, sums, per_token) with the shapes and dtypes every backend returns: the fake
    kernels' answer."""
    n = logits.shape[0]
    f32 = torch.float32
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=f32)
    sums = logits.new_empty((len(SUM_FIELDS),), dtype=f32)
    return loss, sums, new_per_token_buffer(logits, n, per_token)


@torch.library.register_fake("qwenrl::efe_forward")
def _efe_forward_fake(
    logits, target, hard_mask, row_weight, grad, backend, *, reduction, per_token, **_options
):
    return outputs_like(logits, reduction, per_token)


def _op_forward(backend: str) -> ForwardFn:
    def forward(logits, target, hard_mask, row_weight, grad, options: EFEOptions):
        return efe_forward(
            logits, target, hard_mask, row_weight, grad, backend, **options.kernel_kwargs()
        )

    return forward


_warned: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> tuple[str, ForwardFn]:
    """Checks ``backend`` for tensors on ``device``: (the backend that will run, a
    :data:`ForwardFn` that calls :func:`efe_forward` with it).

    ``'auto'`` leaves the choice to the dispatcher (the device's fused kernel), after checking
    that kernel's module loads: if it does not, it warns once and asks for the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    requested = backend
    if backend == "auto":
        backend = _DEVICE_BACKEND.get(device.type, "reference")
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
    return backend, _op_forward(backend)
