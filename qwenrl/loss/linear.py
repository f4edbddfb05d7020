"""Fused linear + EFE loss: the loss of ``hidden @ weight.T + bias`` without the full logits.

For a language model the logits are the expensive part, not the loss: at a 151,936-token
vocabulary, 8k tokens of float32 logits and their gradient take 10 GB. :func:`linear_efe_loss`
never holds more than one chunk of rows of them. Per chunk of rows, in the forward:

1. ``logits = h_c @ W.T (+ b)``                               [c, V], one matmul;
2. the fused EFE kernel (C++ on the CPU, Triton on CUDA) writes the gradient of the chunk's
   summed loss over those logits, in place;
3. ``grad_h_c = g @ W``, ``grad_W += g.T @ h_c``, ``grad_b += g.sum(0)``.

The backward then only scales the three gradients by the loss's upstream gradient (and skips
that for an upstream gradient of exactly 1 on the CPU). ``'mean'`` divides by the number of
valid rows of the whole batch: the chunks sum, and the accumulated gradients are scaled once.
``reduction='none'`` is the exception: a per-row upstream gradient cannot be applied to an
already summed ``grad_W``, so its backward runs the chunks again (as torch's own chunked
``F.linear_cross_entropy`` does).

When the weight's ``.grad`` already exists (gradient accumulation, ``zero_grad(set_to_none=
False)``), the eager path does not build a fresh [V, D] float32 weight gradient for autograd to
add into it: the forward computes only the loss, and the backward runs the chunks again and adds
each chunk's weight gradient straight into ``weight.grad`` (see :class:`LinearEFEFunction`).

Rows whose class target is ``ignore_index`` are dropped before the first matmul on the CPU;
on CUDA that would need a host sync (``nonzero``), so there they go through the matmul and
the kernel gives them a zero gradient. Weight and bias gradients that nobody needs (frozen
parameters) are not computed.

Precision: bfloat16/float16 inputs accumulate ``grad_W``, ``grad_b`` and ``grad_h`` in float32.
On the CPU, whose low-precision matmuls are emulated, the matmuls themselves run in float32 on
an upcast copy of the weight. On CUDA the logits and their gradient stay in the input dtype
(cuBLAS accumulates in float32), except that float16's gradient goes through a float32 buffer
and a power-of-two scale (``FP16_GRAD_SCALE``) so that small q - p values stay above float16's
subnormal range.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from qwenrl.loss.dispatch import (
    BACKENDS,
    ForwardFn,
    apply_upstream,
    check_target_range,
    grad_dtype,
    resolve_backend,
)
from qwenrl.loss.efe import OptionsModule, _check_inputs
from qwenrl.loss.options import EFEOptions
from qwenrl.loss.reference import stats_from_sums

# Multiplies a float16 chunk gradient before its cast to float16: |g| ≤ w·(1 + β·(1 + log V)),
# so with β up to ~30 the largest value stays below float16's 65504, while values down to
# 2.4e-7 (about 1/V at V = 151,936 is 6.6e-6) keep a normal float16 exponent.
FP16_GRAD_SCALE = 256.0
# Fewest rows per chunk: below this the matmuls stop being compute-bound (every chunk reads
# and writes all of grad_W, [V, D] in float32).
MIN_CHUNK_ROWS = {"cpu": 128, "cuda": 256}
# A chunk may use up to this many bytes of logits even where the hidden-size rule gives fewer
# rows: the logits matmul is short and wide ([c, D] @ [D, V]), and on a 2-core AVX-512 CPU at
# D = 1024 it runs at 114 GFLOP/s with 128 rows against 161 with 512 (the knee); 64 MiB is 512
# rows at V = 32,000 and stays at the floor for V = 151,936.
CHUNK_LOGITS_BYTES = 64 * 2**20


def _pow2_at_most(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def default_chunk_size(
    n_rows: int, dim: int, vocab: int, device: torch.device, elem_bytes: int = 4
) -> int:
    """Rows per chunk: at least as many as make a chunk's logits about as large as the hidden
    states (``next_pow2(ceil(N / ceil(V / D)))``, the rule Liger and
    ``torch.nn.LinearCrossEntropy`` use) and as many as fit in ``CHUNK_LOGITS_BYTES`` (a
    power of two), at least ``MIN_CHUNK_ROWS`` and at most N."""
    rows = -(-n_rows // max(1, -(-vocab // max(dim, 1))))
    rows = 1 << max(0, math.ceil(math.log2(max(rows, 1))))
    rows = max(rows, _pow2_at_most(CHUNK_LOGITS_BYTES // max(1, vocab * elem_bytes)))
    rows = max(rows, MIN_CHUNK_ROWS.get(device.type, 256))
    return max(1, min(rows, n_rows))


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with acc float32 and a, b possibly bfloat16/float16 (CUDA)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:  # cuBLAS's mixed-precision GEMM: low-precision inputs, float32 accumulator
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def chunked_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    hard_mask: Tensor | None,
    forward_fn: ForwardFn,
    options: EFEOptions,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
    row_weight: Tensor | None = None,
    drop_ignored: bool | None = None,
    grad_w_into: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop behind :func:`linear_efe_loss` (flattened inputs, options checked).

    Args:
        hidden: [N, D]. weight: [V, D]. bias: [V] or None. target: [N] int64 or [N, V] float.
        hard_mask: [N] bool or None. forward_fn: a fused backend (``dispatch.ForwardFn``).
        chunk_size: rows per chunk; 0 picks :func:`default_chunk_size`.
        needs: which of (hidden, weight, bias) get a gradient.
        row_weight: the loss's upstream gradient, for a backward that runs the chunks again:
            [N] for ``'none'`` (the gradients are those of Σ_i row_weight_i · loss_i), a 0-dim
            tensor for ``'sum'``/``'mean'`` (the gradients of row_weight · loss).
        drop_ignored: take rows with ``ignore_index`` out before the matmuls; default: on the
            CPU only (on CUDA it would sync the host).
        grad_w_into: a float32 [V, D] tensor (the weight's own ``.grad``) that the weight
            gradient is added into, chunk by chunk, instead of a fresh buffer; needs
            ``row_weight`` (every scale is applied to the chunk before its matmul) and float32
            inputs. The returned grad_weight is then None.

    Returns:
        (loss fp32 [N] or [], sums fp32 [5], grad_hidden [N, D], grad_weight [V, D],
        grad_bias [V]): the gradients of the reduced loss (None where not needed), in
        :func:`grad_dtype` of the inputs' dtype (float32 for float16 inputs).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    reduction = options.reduction
    need_h, need_w, need_b = needs
    any_grad = need_h or need_w or need_b
    per_row = row_weight is not None and row_weight.dim() == 1
    if row_weight is not None and (reduction == "none") != per_row:
        raise ValueError(
            "row_weight must be [N] for reduction='none' and 0-dim for 'sum'/'mean', got "
            f"shape {tuple(row_weight.shape)} with reduction={reduction!r}"
        )

    low = dtype in (torch.float16, torch.bfloat16)
    acc_dtype = torch.float32 if low else dtype
    # CPU matmuls in bfloat16/float16 are emulated (tens of times slower): run them in float32.
    mm_dtype = acc_dtype if device.type == "cpu" else dtype
    gbuf_dtype = grad_dtype(mm_dtype)
    g_scale = FP16_GRAD_SCALE if gbuf_dtype != mm_dtype else 1.0
    if grad_w_into is not None and (row_weight is None or dtype != torch.float32 or not need_w):
        raise ValueError("grad_w_into needs float32 inputs, row_weight and a weight gradient")

    if options.validate and not options.soft:
        check_target_range(target, v, options.ignore_index)
    kernel_options = options.replace(reduction="none" if reduction == "none" else "sum")
    kernel_options = kernel_options.replace(validate=False)

    # Rows that count. On the CPU, rows with ignore_index are dropped here (a cheap nonzero);
    # on CUDA that is a host sync, so they stay and the kernel gives them zero gradient.
    rows: Tensor | None = None
    if drop_ignored is None:
        drop_ignored = device.type == "cpu"
    if options.soft:
        n_valid: Tensor | float = float(n)
    elif drop_ignored:
        keep = target != options.ignore_index
        n_keep = int(keep.sum())
        n_valid = float(n_keep)
        if n_keep < n:
            rows = keep.nonzero().squeeze(1)
    else:
        n_valid = (target != options.ignore_index).sum().to(torch.float32)  # stays on the device

    h_all = hidden if rows is None else hidden.index_select(0, rows)
    t_all = target if rows is None else target.index_select(0, rows)
    m_all = hard_mask if (rows is None or hard_mask is None) else hard_mask.index_select(0, rows)
    w_all = row_weight if (rows is None or not per_row) else row_weight.index_select(0, rows)
    n_rows = h_all.shape[0]
    if h_all.dtype != mm_dtype:
        h_all = h_all.to(mm_dtype)
    w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
    b_mm = None if bias is None else (bias if bias.dtype == mm_dtype else bias.to(mm_dtype))
    chunk = chunk_size or default_chunk_size(n_rows, d, v, device, mm_dtype.itemsize)

    # One scale for what the chunks sum: 1/N_valid ('mean') and the float16 chunk scale. A
    # reduced loss's upstream gradient (row_weight 0-dim) scales each chunk before its matmuls,
    # and 1/N_valid with it, so that nothing is scaled after the loop (grad_w_into holds more
    # than this loss's gradient).
    scale: Tensor | float = 1.0 / g_scale
    denom = n_valid.clamp(min=1.0) if isinstance(n_valid, Tensor) else max(n_valid, 1.0)
    if reduction == "mean":
        if row_weight is not None:
            w_all = row_weight / denom
        else:
            scale = scale / denom

    grad_h = torch.empty((n_rows, d), dtype=acc_dtype, device=device) if need_h else None
    if grad_w_into is not None:
        grad_w = grad_w_into
    else:
        grad_w = torch.zeros((v, d), dtype=acc_dtype, device=device) if need_w else None
    grad_b = torch.zeros((v,), dtype=acc_dtype, device=device) if need_b else None
    loss_rows = (
        torch.zeros(n_rows, dtype=torch.float32, device=device) if reduction == "none" else None
    )
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    sums = torch.zeros(5, dtype=torch.float32, device=device)

    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        loss_c, sums_c = _one_chunk(
            h_all[start:stop],
            w_mm,
            b_mm,
            t_all[start:stop],
            None if m_all is None else m_all[start:stop],
            None if w_all is None else (w_all[start:stop] if per_row else w_all),
            forward_fn,
            kernel_options,
            gbuf_dtype if any_grad else None,
            g_scale,
            None if grad_h is None else grad_h[start:stop],
            grad_w,
            grad_b,
        )
        sums += sums_c
        if loss_rows is not None:
            loss_rows[start:stop] = loss_c
        else:
            loss_sum += loss_c

    if grad_w_into is not None:
        grad_w = None  # added into the caller's tensor, already scaled
    out_dtype = grad_dtype(dtype)
    grads = []
    for g in (grad_h, grad_w, grad_b):
        if g is not None:
            if isinstance(scale, Tensor) or scale != 1.0:
                g.mul_(scale)
            if g.dtype != out_dtype:
                g = g.to(out_dtype)
        grads.append(g)
    grad_h, grad_w, grad_b = grads
    if rows is not None and grad_h is not None:  # the dropped (ignored) rows: zero gradient
        grad_h = grad_h.new_zeros((n, d)).index_copy_(0, rows, grad_h)

    if reduction == "none":
        loss = loss_rows if rows is None else loss_rows.new_zeros(n).index_copy_(0, rows, loss_rows)
    elif reduction == "sum":
        loss = loss_sum
    else:
        loss = loss_sum / denom
    return loss, sums, grad_h, grad_w, grad_b


def _one_chunk(
    h_c: Tensor,
    w_mm: Tensor,
    b_mm: Tensor | None,
    t_c: Tensor,
    m_c: Tensor | None,
    rw_c: Tensor | None,  # [c] or 0-dim
    forward_fn: ForwardFn,
    options: EFEOptions,
    gbuf_dtype: torch.dtype | None,
    g_scale: float,
    grad_h_c: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One chunk of rows: matmul, fused kernel, gradient matmuls. Its [c, V] buffers die on
    return, before the next chunk allocates its own."""
    # [c, V]: the only logits alive; the kernel overwrites them with their gradient.
    logits = torch.mm(h_c, w_mm.t()) if b_mm is None else torch.addmm(b_mm, h_c, w_mm.t())
    grad = None
    if gbuf_dtype is not None:
        grad = logits if gbuf_dtype == logits.dtype else torch.empty_like(logits, dtype=gbuf_dtype)
    loss_c, sums_c = forward_fn(logits, t_c, m_c, grad, options)
    if grad is None:
        return loss_c, sums_c
    del logits
    if rw_c is not None:  # a backward's upstream gradient: per row ('none') or one scalar
        grad.mul_((rw_c[:, None] if rw_c.dim() else rw_c).to(grad.dtype))
    if grad.dtype != w_mm.dtype:  # float16 on CUDA: scaled into float16's normal range
        grad = grad.mul_(g_scale).to(w_mm.dtype)
    if grad_h_c is not None:
        if grad_h_c.dtype == grad.dtype:
            torch.mm(grad, w_mm, out=grad_h_c)
        else:
            grad_h_c.copy_(torch.mm(grad, w_mm))
    if grad_w is not None:
        _accumulate_mm(grad_w, grad.t(), h_c)
    if grad_b is not None:
        grad_b += grad.sum(0, dtype=grad_b.dtype)
    return loss_c, sums_c


# --- autograd: eager Function and the torch.compile custom op -----------------------------


def _upstream_grads(grads, grad_loss: Tensor, options: EFEOptions, dtypes, *, eager: bool):
    """Scales the forward's gradients by the loss's (scalar) upstream gradient."""
    return tuple(
        None if g is None else apply_upstream(g, grad_loss, options, dt, eager=eager)
        for g, dt in zip(grads, dtypes)
    )


def writable_grad(weight: Tensor) -> Tensor | None:
    """``weight.grad``, if a backward may add the weight gradient straight into it; else None.

    That is the case for a plain float32 leaf whose ``.grad`` already exists as a dense,
    contiguous float32 tensor of its shape (a previous step's gradient kept by
    ``zero_grad(set_to_none=False)``, or the micro-batches of gradient accumulation), and that
    has no tensor hooks (they would see the gradient only through ``.grad``).
    """
    if type(weight) not in (Tensor, torch.nn.Parameter) or not weight.is_leaf:
        return None
    if not weight.requires_grad or weight.dtype != torch.float32 or weight._backward_hooks:
        return None
    g = weight.grad
    if (
        type(g) is not Tensor
        or g.layout != torch.strided
        or g.shape != weight.shape
        or g.device != weight.device
        or g.requires_grad
        or not g.is_contiguous()
    ):
        return None
    return g


def _engine_accumulates(weight: Tensor) -> bool:
    """Inside a backward: will autograd accumulate into ``weight.grad`` in this pass? Not under
    ``torch.autograd.grad`` (the gradient is returned, ``.grad`` untouched), not for a
    ``backward(inputs=...)`` without the weight, not with ``create_graph=True``."""
    if torch.is_grad_enabled():
        return False
    try:
        node = torch.autograd.graph.get_gradient_edge(weight).node
        return bool(torch._C._will_engine_execute_node(node))
    except (RuntimeError, AttributeError):  # autograd.grad() over a leaf raises here
        return False


class LinearEFEFunction(torch.autograd.Function):
    """Eager autograd for :func:`linear_efe_loss`, in one of two modes.

    * **Gradients in the forward** (while ``weight.grad`` is None, as after the default
      ``zero_grad()``, or with ``weight_grad_in_place=False``): the forward computes the
      gradients, the backward scales them in place. The buffers are handed to autograd as the result, so they
      can be consumed once: a second backward through the same loss raises instead of returning
      them scaled twice.
    * **Chunks again in the backward**, for ``'none'`` (a per-row upstream gradient cannot be
      applied to an already summed ``grad_W``) and when the weight's ``.grad`` already exists
      and is writable (:func:`writable_grad`) with ``weight_grad_in_place``: the forward only
      computes the loss, and the backward runs the chunks again with the upstream gradient
      applied to each chunk and adds the weight gradient straight into ``weight.grad``. No
      [V, D] buffer is allocated, and autograd gets None for the weight: it still runs the
      weight's accumulation node and its hooks (DDP's reducer, post-accumulate hooks), which
      find the finished ``.grad``. Where the engine will not accumulate into ``.grad`` in that
      pass (``torch.autograd.grad``, ``backward(inputs=...)`` without the weight) the backward
      returns a fresh gradient instead.

    There is no double backward: ``create_graph=True`` raises a ``RuntimeError`` naming it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, hard_mask, forward_fn, options, chunk_size,  # type: ignore[override]
                weight_grad_in_place):  # fmt: skip
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        ctx.options, ctx.forward_fn, ctx.chunk_size = options, forward_fn, chunk_size
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.needs = needs
        ctx.in_place = weight_grad_in_place and needs[1]
        ctx.rerun = options.reduction == "none" or (
            ctx.in_place and writable_grad(weight) is not None
        )
        ctx.consumed = False
        if ctx.rerun:
            loss, sums, *_ = chunked_forward(
                hidden, weight, bias, target, hard_mask, forward_fn, options, chunk_size,
                (False, False, False),
            )  # fmt: skip
            ctx.save_for_backward(hidden, weight, bias, target, hard_mask)
            ctx.grads = None
        else:
            loss, sums, *grads = chunked_forward(
                hidden, weight, bias, target, hard_mask, forward_fn, options, chunk_size, needs
            )
            ctx.grads = grads  # not saved_tensors: backward gives these very buffers away
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):  # type: ignore[override]
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
            hidden, weight, bias, target, hard_mask = ctx.saved_tensors
            into = None
            if ctx.in_place and _engine_accumulates(weight):
                into = writable_grad(weight)
            _, _, *grads = chunked_forward(
                hidden, weight, bias, target, hard_mask, ctx.forward_fn,
                ctx.options.replace(validate=False), ctx.chunk_size, ctx.needs,
                row_weight=grad_loss.float(), grad_w_into=into,
            )  # fmt: skip
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
            grads = _upstream_grads(grads, grad_loss, ctx.options, ctx.dtypes, eager=True)
        return (*grads, None, None, None, None, None, None)


@torch.library.custom_op("qwenrl::linear_efe_fused", mutates_args=())
def linear_efe_fused(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045  (the custom-op schema parser wants Optional)
    target: Tensor,
    hard_mask: Optional[Tensor],  # noqa: UP045
    backend: str,
    chunk_size: int,
    needs: list[bool],
    *,
    soft: bool,
    log_target: bool,
    tau: float,
    easy_weight: float,
    entropy_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    validate: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`chunked_forward` as an opaque op for ``torch.compile`` (flattened inputs).

    Returns (loss, sums, grad_hidden, grad_weight, grad_bias); a gradient not asked for in
    ``needs`` (hidden, weight, bias) is an empty tensor. For ``'none'`` no gradient is
    computed here: :func:`linear_efe_rows_backward` does it in the backward.
    """
    options = EFEOptions(
        soft=soft, log_target=log_target, tau=tau, easy_weight=easy_weight,
        entropy_weight=entropy_weight, label_smoothing=label_smoothing,
        ignore_index=ignore_index, reduction=reduction, validate=validate,
    )  # fmt: skip
    _, forward_fn = resolve_backend(backend, hidden.device)
    if reduction == "none":
        needs = [False, False, False]
    loss, sums, *grads = chunked_forward(
        hidden, weight, bias, target, hard_mask, forward_fn, options, chunk_size, tuple(needs)
    )
    # A fresh empty tensor per missing gradient: a custom op's outputs may not alias.
    return (loss, sums, *(hidden.new_empty(0) if g is None else g for g in grads))


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
                           *, reduction, **_options):  # fmt: skip
    n = hidden.shape[0]
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    sums = hidden.new_empty((5,), dtype=torch.float32)
    return (loss, sums, *_grad_shapes(hidden, weight, needs, reduction))


@torch.library.custom_op("qwenrl::linear_efe_rows_backward", mutates_args=())
def linear_efe_rows_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    target: Tensor,
    hard_mask: Optional[Tensor],  # noqa: UP045
    grad_loss: Tensor,
    backend: str,
    chunk_size: int,
    needs: list[bool],
    *,
    soft: bool,
    log_target: bool,
    tau: float,
    easy_weight: float,
    entropy_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    validate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``'none'`` backward: the chunks again, each row's gradient times ``grad_loss`` [N]."""
    options = EFEOptions(
        soft=soft, log_target=log_target, tau=tau, easy_weight=easy_weight,
        entropy_weight=entropy_weight, label_smoothing=label_smoothing,
        ignore_index=ignore_index, reduction=reduction, validate=False,
    )  # fmt: skip
    _, forward_fn = resolve_backend(backend, hidden.device)
    _, _, *grads = chunked_forward(
        hidden, weight, bias, target, hard_mask, forward_fn, options, chunk_size, tuple(needs),
        row_weight=grad_loss.float(),
    )  # fmt: skip
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_efe_rows_backward.register_fake
def _rows_backward_fake(hidden, weight, bias, target, hard_mask, grad_loss, backend, chunk_size,
                        needs, **_options):  # fmt: skip
    return _grad_shapes(hidden, weight, needs, "sum")


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    hidden, weight, bias, target, hard_mask, backend, chunk_size, needs = inputs
    ctx.kw = keyword_only_inputs
    ctx.rest = (backend, chunk_size, needs)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if keyword_only_inputs["reduction"] == "none":
        ctx.save_for_backward(hidden, weight, bias, target, hard_mask)
    else:
        ctx.save_for_backward(*output[2:])


def _backward(ctx, grad_loss, _grad_sums, *_grad_grads):
    needs = ctx.rest[2]
    if ctx.kw["reduction"] == "none":
        hidden, weight, bias, target, hard_mask = ctx.saved_tensors
        grads = linear_efe_rows_backward(
            hidden, weight, bias, target, hard_mask, grad_loss, *ctx.rest, **ctx.kw
        )
        grads = tuple(g.to(dt) if need else None for g, dt, need in zip(grads, ctx.dtypes, needs))
    else:
        options = EFEOptions(**ctx.kw)
        saved = [g if need else None for g, need in zip(ctx.saved_tensors, needs)]
        # The saved buffers are the op's outputs: never scaled in place.
        grads = _upstream_grads(saved, grad_loss, options, ctx.dtypes, eager=False)
    return (*grads, None, None, None, None, None)


linear_efe_fused.register_autograd(_backward, setup_context=_setup_context)


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


def linear_efe_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
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
    weight_grad_in_place: bool = True,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """:func:`qwenrl.efe_loss` of ``hidden @ weight.T + bias``, one chunk of rows at a time.

    Args:
        hidden: [..., D] fp32/bf16/fp16 (e.g. a language model's last hidden states).
        weight: [V, D] (e.g. ``lm_head.weight``), same dtype as ``hidden``.
        target: [...] int64/int32 class indices, or a [..., V] distribution.
        bias: optional [V].
        chunk_size: rows per chunk; None picks one from the shape (:func:`default_chunk_size`).
            Peak extra memory is about ``chunk_size × V`` logits plus the gradients.
        tau, easy_weight, entropy_weight, label_smoothing, ignore_index, reduction,
        log_target, hard_mask, backend, return_stats, validate: as in :func:`qwenrl.efe_loss`.
        weight_grad_in_place: when ``weight.grad`` already exists (float32; see
            :func:`writable_grad`), add the weight gradient straight into it during the
            backward, which then runs the chunks again (one more matmul per chunk), instead of
            building a fresh [V, D] float32 gradient for autograd to add: the loss then needs
            no memory of the weight's size. Eager mode only; under ``torch.compile`` the
            gradient is always a fresh tensor.

    Returns:
        The float32 loss ([...] for ``'none'``, else 0-dim), and the stats if asked
        ({mask_ratio, accuracy, risk, entropy, n_valid}, 0-dim tensors, no host sync).

    Gradients flow to ``hidden``, ``weight`` and ``bias``; they are computed in the forward for
    the inputs that require them (a frozen weight costs no matmul), or in the backward for
    ``'none'`` and for a weight gradient added in place.
    """
    _check_linear(hidden, weight, bias)
    v, d = weight.shape
    row_shape = hidden.shape[:-1]
    # The target checks of efe_loss, on a stand-in for the logits (a stride-0 view, no memory).
    logits_like = hidden.new_empty(()).expand(*row_shape, v)
    soft = _check_inputs(logits_like, target, hard_mask)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    options = EFEOptions(
        soft=soft,
        log_target=log_target,
        tau=tau,
        easy_weight=easy_weight,
        entropy_weight=entropy_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        validate=hidden.device.type == "cpu" if validate is None else validate,
    )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    h = hidden.reshape(-1, d)
    if soft:
        tgt = target.reshape(-1, v)
        tgt = (tgt.float() if tgt.dtype == torch.float64 else tgt).contiguous()
    else:
        tgt = target.reshape(-1)
        tgt = (tgt if tgt.dtype == torch.int64 else tgt.long()).contiguous()
    mask = hard_mask.reshape(-1).contiguous() if hard_mask is not None else None
    chunk = 0 if chunk_size is None else chunk_size
    if torch.compiler.is_compiling():  # Dynamo cannot trace the kernels: an opaque custom op
        grad_on = torch.is_grad_enabled()
        needs = [grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias)]
        loss, sums, *_ = linear_efe_fused(
            h, weight, bias, tgt, mask, backend, chunk, needs, **options.kernel_kwargs()
        )
    else:
        _, forward_fn = resolve_backend(backend, hidden.device)
        if torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (hidden, weight, bias)
        ):
            loss, sums = LinearEFEFunction.apply(
                h, weight, bias, tgt, mask, forward_fn, options, chunk, bool(weight_grad_in_place)
            )
        else:  # no_grad / inference_mode / frozen inputs: the loss alone, no gradient buffers
            loss, sums, *_ = chunked_forward(
                h, weight, bias, tgt, mask, forward_fn, options, chunk, (False, False, False)
            )
    if reduction == "none":
        loss = loss.reshape(row_shape)
    if return_stats:
        return loss, stats_from_sums(sums)
    return loss


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
        ignore_index: int = -100,
        reduction: str = "mean",
        log_target: bool = False,
        chunk_size: int | None = None,
        backend: str = "auto",
        validate: bool | None = None,
        weight_grad_in_place: bool = True,
    ) -> None:
        super().__init__()
        self._set_options(
            tau=tau,
            easy_weight=easy_weight,
            entropy_weight=entropy_weight,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            log_target=log_target,
            backend=backend,
            validate=validate,
        )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.weight_grad_in_place = bool(weight_grad_in_place)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        hard_mask: Tensor | None = None,
    ) -> Tensor:
        """hidden [..., D], weight [V, D], target [...] or [..., V], bias [V] → the loss."""
        loss, self.last_stats = linear_efe_loss(
            hidden,
            weight,
            target,
            bias=bias,
            chunk_size=self.chunk_size,
            weight_grad_in_place=self.weight_grad_in_place,
            hard_mask=hard_mask,
            return_stats=True,
            **self.options(),
        )
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, chunk_size={self.chunk_size}, "
            f"weight_grad_in_place={self.weight_grad_in_place}"
        )
