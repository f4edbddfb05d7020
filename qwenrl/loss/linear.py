"""Fused linear + EFE loss: the loss of ``hidden @ weight.T + bias`` without the full logits.

For a language model the logits are the expensive part, not the loss: at a 151,936-token
vocabulary, 8k tokens of float32 logits and their gradient take 10 GB. :func:`linear_efe_loss`
never holds more than one chunk of rows of them. The parts, one concern each:

* :mod:`qwenrl.loss.chunks`: the chunk rule and the chunk loop, with one entry point per
  memory mode (loss only; loss and gradients in the forward; gradients in the backward);
* :mod:`qwenrl.loss.linear_function`: the eager autograd Function, which picks the mode;
* :mod:`qwenrl.loss.grad_engine`: the reads of autograd internals the in-place mode needs;
* :mod:`qwenrl.loss.linear_op`: the custom ops ``torch.compile`` sees;
* :mod:`qwenrl.loss.distill`: a teacher's soft target, chunk by chunk, and its checks;
* this module: the API, :func:`linear_efe_loss` and :class:`LinearEFELoss`.

The backward only scales the three gradients by the loss's upstream gradient (and skips that
for an upstream gradient of exactly 1 on the CPU). ``'mean'`` divides by the number of valid
rows of the whole batch: the chunks sum, and the accumulated gradients are scaled once.
``reduction='none'`` is the exception: a per-row upstream gradient cannot be applied to an
already summed ``grad_W``, so its backward runs the chunks again (as torch's own chunked
``F.linear_cross_entropy`` does).

When the weight's ``.grad`` already exists (gradient accumulation, ``zero_grad(set_to_none=
False)``), the eager path does not build a fresh [V, D] float32 weight gradient for autograd to
add into it: the forward computes only the loss, and the backward runs the chunks again and adds
each chunk's weight gradient straight into ``weight.grad`` (see
:class:`~qwenrl.loss.linear_function.LinearEFEFunction`). Weight and bias gradients that nobody
needs (frozen parameters) are not computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qwenrl.loss import chunks
from qwenrl.loss.chunks import ChunkSettings, LinearProblem
from qwenrl.loss.dispatch import BACKENDS, resolve_backend
from qwenrl.loss.distill import Teacher, check_teacher
from qwenrl.loss.efe import OptionsModule, _check_inputs, check_row_weight, loss_outputs
from qwenrl.loss.linear_function import LinearEFEFunction
from qwenrl.loss.linear_op import linear_efe_fused
from qwenrl.loss.options import EFEOptions, caller_options

__all__ = [
    "LinearEFEFunction",
    "LinearEFELoss",
    "linear_efe_loss",
]


# --- public API ---------------------------------------------------------------------------


def _check_linear(hidden, weight, bias) -> None:
    if not all(isinstance(x, Tensor) for x in (hidden, weight)):
        raise TypeError("hidden and weight must be torch.Tensors")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor, got dtype {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., D], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match hidden's last dimension "
            f"D={hidden.shape[-1]} (expected [V, {hidden.shape[-1]}])"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_weight_grad_in_place(value: object) -> None:
    """``TypeError`` unless ``value`` is True, False or None (``weight_grad_in_place``)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"weight_grad_in_place must be True, False or None, got {value!r}")


def _in_place(weight_grad_in_place: bool | None, options: EFEOptions) -> bool:
    """``weight_grad_in_place`` resolved for a call with ``options`` (``None``: in place where
    the backward runs the chunks again anyway, i.e. for ``'none'``)."""
    check_weight_grad_in_place(weight_grad_in_place)
    if weight_grad_in_place is None:
        return options.reduction == "none"
    return weight_grad_in_place


def linear_efe_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor | None,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
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
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    return_stats: bool = False,
    return_per_token: bool = False,
    validate: bool | None = None,
    weight_grad_in_place: bool | None = None,
) -> Tensor | tuple:
    """:func:`qwenrl.efe_loss` of ``hidden @ weight.T + bias``, one chunk of rows at a time.

    Args:
        hidden: [..., D] fp32/bf16/fp16 (e.g. a language model's last hidden states).
        weight: [V, D] (e.g. ``lm_head.weight``), same dtype as ``hidden``.
        target: [...] int64/int32 class indices, or a [..., V] distribution. With a teacher:
            [...] class indices that only mark the rows to skip (``ignore_index``), or None
            (every row counts).
        bias: optional [V].
        chunk_size: rows per chunk; None picks one from the shape (:func:`~qwenrl.loss.chunks.default_chunk_size`).
            Peak extra memory is about ``chunk_size × V`` logits plus the gradients.
        tau, easy_weight, entropy_weight, label_smoothing, z_loss, ignore_index, reduction,
        log_target, hard_mask, row_weight, backend, return_stats, return_per_token, validate:
            as in :func:`qwenrl.efe_loss`; ``row_weight`` [...] is applied inside the kernel,
            and the per-token outputs come from the same pass (no logits are kept).
        teacher_hidden, teacher_weight, teacher_bias, temperature: distillation without the
            teacher's logits (:mod:`qwenrl.loss.distill`). ``teacher_hidden`` [..., D_t] (the
            student's rows), ``teacher_weight`` [V, D_t], ``teacher_bias`` [V] (any float dtype,
            on hidden's device), T = ``temperature`` > 0. Per chunk the soft target is
            ``p = softmax((teacher_hidden @ teacher_weight.T + teacher_bias) / T)`` and the
            loss is T² times the soft-target EFE of the student's logits divided by T (the
            stats and per-token outputs are those of the tempered distributions, unscaled).
            The teacher gets no gradient.
        weight_grad_in_place: when ``weight.grad`` already exists (float32; see
            :func:`~qwenrl.loss.grad_engine.writable_grad`), whether to add the weight gradient
            straight into it during the backward instead of building a fresh [V, D] float32
            gradient for autograd to add. ``True``: always, so the loss needs no memory of the
            weight's size; for ``'mean'``/``'sum'`` the backward then runs the chunks again
            (one more matmul per chunk). ``False``: never. ``None`` (the default): where it
            costs no matmul, i.e. for ``'none'``, whose backward runs the chunks again anyway;
            ``'mean'``/``'sum'`` compute the gradients in the forward, the fastest path
            (docs/loss.md has the numbers). Eager mode only; under ``torch.compile`` the
            gradient is always a fresh tensor.

    Returns:
        The float32 loss ([...] for ``'none'``, else 0-dim), then the stats if asked
        ({mask_ratio, accuracy, risk, entropy, n_valid}, 0-dim tensors, no host sync), then
        the per-token outputs if asked ({logprob, entropy, correct, lse}, each [...], 0 on
        ignored rows): the order of :func:`qwenrl.efe_loss`.

    Gradients flow to ``hidden``, ``weight`` and ``bias``; they are computed in the forward for
    the inputs that require them (a frozen weight costs no matmul), or in the backward for
    ``'none'`` and for a weight gradient added in place.
    """
    _check_linear(hidden, weight, bias)
    v, d = weight.shape
    row_shape = hidden.shape[:-1]
    distil = check_teacher(
        hidden, weight, target, teacher_hidden, teacher_weight, teacher_bias, temperature,
        log_target,
    )  # fmt: skip
    # The target checks of efe_loss, on stand-ins for the logits (and, with a teacher, for a
    # class target): stride-0 views, no memory.
    logits_like = hidden.new_empty(()).expand(*row_shape, v)
    if distil:
        soft = True  # the kernel's target is the teacher's softmax
        _check_inputs(
            logits_like, hidden.new_empty((), dtype=torch.long).expand(row_shape), hard_mask
        )
    elif target is None:
        raise TypeError(
            "target is None: only a distillation call (teacher_hidden and teacher_weight) may "
            "leave it out"
        )
    else:
        soft = _check_inputs(logits_like, target, hard_mask)
    weights = check_row_weight(row_weight, row_shape, hidden.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
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
        validate=hidden.device.type == "cpu" if validate is None else validate,
        per_token=return_per_token,
    )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    in_place = _in_place(weight_grad_in_place, options)
    h = hidden.reshape(-1, d)
    if target is None:
        tgt = None
    elif soft and not distil:
        tgt = target.reshape(-1, v)
        tgt = (tgt.float() if tgt.dtype == torch.float64 else tgt).contiguous()
    else:
        tgt = target.reshape(-1)
        tgt = (tgt if tgt.dtype == torch.int64 else tgt.long()).contiguous()
    mask = hard_mask.reshape(-1).contiguous() if hard_mask is not None else None
    t_hidden = None
    if distil:
        t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    temperature = float(temperature)
    extra = (weights, t_hidden, teacher_weight, teacher_bias, temperature)
    chunk = 0 if chunk_size is None else chunk_size
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    if torch.compiler.is_compiling():  # Dynamo cannot trace the kernels: an opaque custom op
        loss, sums, *_, per_token = linear_efe_fused(
            h, weight, bias, tgt, mask, backend, chunk, needs, *extra, **options.kernel_kwargs()
        )
    else:
        _, forward_fn = resolve_backend(backend, hidden.device)
        settings = ChunkSettings(forward_fn, options, chunk)
        if any(needs):
            loss, sums, per_token = LinearEFEFunction.apply(
                h, weight, bias, tgt, mask, settings, in_place, *extra
            )
        else:  # no_grad / inference_mode / frozen inputs: the loss alone, no gradient buffers
            per_token = chunks.per_token_buffer(h.shape[0], h, options)
            teacher = None if t_hidden is None else Teacher(*extra[1:])
            problem = LinearProblem(
                h, weight, bias, tgt, mask, settings, weights, teacher, per_token
            )
            loss, sums = chunks.chunked_loss(problem)
    if reduction == "none":
        loss = loss.reshape(row_shape)
    return loss_outputs(loss, sums, per_token, row_shape, return_stats, return_per_token)


class LinearEFELoss(OptionsModule):
    """Module form of :func:`linear_efe_loss`: ``crit(hidden, weight, target, bias=None)``.

    The stats of the last call are in ``last_stats``; ``tau`` may change between calls.
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
        chunk_size: int | None = None,
        backend: str = "auto",
        validate: bool | None = None,
        weight_grad_in_place: bool | None = None,
    ) -> None:
        super().__init__()
        self._set_options(backend=backend, validate=validate, **caller_options(locals()))
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        check_weight_grad_in_place(weight_grad_in_place)  # now, not at the first call
        self.weight_grad_in_place = weight_grad_in_place

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        hard_mask: Tensor | None = None,
        row_weight: Tensor | None = None,
    ) -> Tensor:
        """hidden [..., D], weight [V, D], target [...] or [..., V], bias [V], hard_mask [...]
        bool, row_weight [...] float → the loss."""
        loss, self.last_stats = linear_efe_loss(
            hidden,
            weight,
            target,
            bias=bias,
            chunk_size=self.chunk_size,
            weight_grad_in_place=self.weight_grad_in_place,
            hard_mask=hard_mask,
            row_weight=row_weight,
            return_stats=True,
            **self.options(),
        )
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, chunk_size={self.chunk_size}, "
            f"weight_grad_in_place={self.weight_grad_in_place}"
        )
