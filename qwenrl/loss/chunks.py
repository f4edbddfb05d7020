"""The chunk loop behind :func:`~qwenrl.loss.linear.linear_efe_loss`, and its chunk rule.

Per chunk of rows: ``logits = h_c @ W.T (+ b)`` [c, V]; the fused EFE kernel writes the
gradient of the chunk's summed loss over those logits, in place; then ``grad_h_c = g @ W``,
``grad_W += g.T @ h_c``, ``grad_b += g.sum(0)``. Only one chunk's logits are ever alive.

Three entry points, one per memory mode (the autograd layers choose among them):

* :func:`chunked_loss`: the loss and stat sums alone (no_grad, frozen inputs, and the
  forward of a mode whose gradients come in the backward);
* :func:`chunked_loss_and_grads`: the loss and the gradients of the reduced loss, computed in
  the forward;
* :func:`chunked_grads`: the gradients alone, for an upstream gradient known in the backward
  (per row for ``'none'``), optionally added straight into the weight's ``.grad``.

Rows whose class target is ``ignore_index`` are dropped before the first matmul on the CPU;
on CUDA that would need a host sync (``nonzero``), so there they go through the matmul and
the kernel gives them a zero gradient. A distillation call (:mod:`qwenrl.loss.distill`) drops
them on every device: the kernel's soft mode has no ignored rows. Whatever a row carries (its
hidden state, target, hard mask, ``row_weight``, the teacher's hidden state, the upstream
gradient) follows the same selection, and the per-row outputs (the loss for ``'none'``, the
per-token outputs) of dropped rows are 0.

Precision: bfloat16/float16 inputs accumulate ``grad_W``, ``grad_b`` and ``grad_h`` in float32.
On the CPU, whose low-precision matmuls are emulated, the matmuls themselves run in float32 on
an upcast copy of the weight. On CUDA the logits and their gradient stay in the input dtype
(cuBLAS accumulates in float32), except that float16's gradient goes through a float32 buffer
and a power-of-two scale (``FP16_GRAD_SCALE``) so that small q - p values stay above float16's
subnormal range.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from qwenrl.loss.dispatch import ForwardFn, check_target_range, grad_dtype, new_per_token_buffer
from qwenrl.loss.distill import Teacher, soft_target
from qwenrl.loss.options import EFEOptions

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

Needs = tuple[bool, bool, bool]  # which of (hidden, weight, bias) get a gradient
NO_GRADS: Needs = (False, False, False)


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


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """How one call runs, apart from its tensors: the fused backend, the checked options,
    ``chunk_size`` (0 picks :func:`default_chunk_size`) and ``drop_ignored`` (None: drop
    ``ignore_index`` rows before the matmuls on the CPU only)."""

    forward_fn: ForwardFn
    options: EFEOptions
    chunk_size: int = 0
    drop_ignored: bool | None = None


@dataclasses.dataclass(frozen=True)
class LinearProblem:
    """One call's flattened inputs: hidden [N, D]; weight [V, D]; bias [V] or None; target
    [N] int64 or [N, V] float (with a teacher: [N] int64 marking ignored rows, or None);
    hard_mask [N] bool or None; its :class:`ChunkSettings`; row_weight [N] float32 or None; the
    :class:`~qwenrl.loss.distill.Teacher` (the soft target) or None; and ``per_token_out``, a
    float32 [4, N] buffer that a forward pass (:func:`chunked_loss`,
    :func:`chunked_loss_and_grads`) fills with the per-row outputs (``PER_TOKEN_FIELDS``), or
    None for none."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    target: Tensor | None
    hard_mask: Tensor | None
    settings: ChunkSettings
    row_weight: Tensor | None = None
    teacher: Teacher | None = None
    per_token_out: Tensor | None = None


def per_token_buffer(n_rows: int, like: Tensor, options: EFEOptions) -> Tensor | None:
    """An uninitialised float32 [4, N] ``per_token_out`` where ``options.per_token`` asks for
    the per-row outputs, else None."""
    return new_per_token_buffer(like, n_rows, True) if options.per_token else None


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """What every chunk of one pass shares: the matmul operands, the kernel and the gradient
    accumulators (``grad_dtype`` None: no gradient, the kernel computes the loss alone)."""

    weight: Tensor  # [V, D] in the matmul dtype
    bias: Tensor | None
    forward_fn: ForwardFn
    options: EFEOptions  # the kernel's: reduction 'none' or 'sum', validate off
    grad_dtype: torch.dtype | None  # the kernel's gradient buffer
    grad_scale: float  # FP16_GRAD_SCALE for a float16 gradient through float32, else 1
    grad_weight: Tensor | None  # [V, D] accumulator
    grad_bias: Tensor | None  # [V] accumulator
    teacher: Teacher | None = None  # its weight and bias in the teacher's matmul dtype

    def run(
        self,
        h_c: Tensor,
        t_c: Tensor | None,
        m_c: Tensor | None,
        r_c: Tensor | None,
        th_c: Tensor | None,
        upstream_c: Tensor | None,
        grad_h_c: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk: matmul, fused kernel, gradient matmuls. Its [c, V] buffers die on return,
        before the next chunk allocates its own. ``r_c``: the rows' weights; ``th_c``: the
        teacher's hidden states (the target is then its soft target); ``upstream_c``: [c] or
        0-dim, or None. Returns the kernel's (loss, sums, per_token)."""
        w, b = self.weight, self.bias
        # [c, V]: the only logits alive; the kernel overwrites them with their gradient.
        logits = torch.mm(h_c, w.t()) if b is None else torch.addmm(b, h_c, w.t())
        if self.teacher is not None:  # the teacher's [c, V] soft target, the student's z / T
            t_c = soft_target(self.teacher, th_c)
            if self.teacher.temperature != 1.0:
                logits.div_(self.teacher.temperature)
        grad = None
        if self.grad_dtype is not None:
            same = self.grad_dtype == logits.dtype
            grad = logits if same else torch.empty_like(logits, dtype=self.grad_dtype)
        loss_c, sums_c, tok_c = self.forward_fn(logits, t_c, m_c, r_c, grad, self.options)
        if grad is None:
            return loss_c, sums_c, tok_c
        del logits, t_c
        if upstream_c is not None:  # a backward's upstream gradient: per row or one scalar
            grad.mul_((upstream_c[:, None] if upstream_c.dim() else upstream_c).to(grad.dtype))
        if grad.dtype != w.dtype:  # float16 on CUDA: scaled into float16's normal range
            grad = grad.mul_(self.grad_scale).to(w.dtype)
        if grad_h_c is not None:
            if grad_h_c.dtype == grad.dtype:
                torch.mm(grad, w, out=grad_h_c)
            else:
                grad_h_c.copy_(torch.mm(grad, w))
        if self.grad_weight is not None:
            _accumulate_mm(self.grad_weight, grad.t(), h_c)
        if self.grad_bias is not None:
            self.grad_bias.add_(grad.sum(0, dtype=self.grad_bias.dtype))
        return loss_c, sums_c, tok_c


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with acc float32 and a, b possibly bfloat16/float16 (CUDA)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:  # cuBLAS's mixed-precision GEMM: low-precision inputs, float32 accumulator
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


# --- the three entry points ----------------------------------------------------------------


def chunked_loss(p: LinearProblem) -> tuple[Tensor, Tensor]:
    """(loss fp32 [N] or [], sums fp32 [5]); no gradient buffer is allocated."""
    loss, sums, _ = _run(p, NO_GRADS, upstream=None, grad_w_into=None)
    return loss, sums


def chunked_loss_and_grads(
    p: LinearProblem, needs: Needs
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss, sums, grad_hidden, grad_weight, grad_bias): the gradients of the *reduced* loss
    (``'sum'``/``'mean'``), None where ``needs`` says so, in :func:`grad_dtype` of the inputs'
    dtype. ``'none'`` cannot sum its rows' gradients before knowing their upstream gradient:
    use :func:`chunked_grads` in the backward."""
    if p.settings.options.reduction == "none":
        raise ValueError("chunked_loss_and_grads needs reduction 'sum' or 'mean'")
    loss, sums, grads = _run(p, needs, upstream=None, grad_w_into=None)
    return (loss, sums, *grads)


def chunked_grads(
    p: LinearProblem, needs: Needs, upstream: Tensor, grad_w_into: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``Σ_i upstream_i · loss_i`` (``'none'``, ``upstream`` [N]) or of
    ``upstream · loss`` (``'sum'``/``'mean'``, ``upstream`` 0-dim), the chunks run again.

    ``grad_w_into``: a float32 [V, D] tensor (the weight's own ``.grad``) that the weight
    gradient is added into, chunk by chunk, instead of a fresh buffer (float32 inputs only;
    every scale is applied to the chunk before its matmul). The returned grad_weight is then
    None.
    """
    per_row = upstream.dim() == 1
    reduction = p.settings.options.reduction
    if (reduction == "none") != per_row:
        raise ValueError(
            "upstream must be [N] for reduction='none' and 0-dim for 'sum'/'mean', got "
            f"shape {tuple(upstream.shape)} with reduction={reduction!r}"
        )
    if grad_w_into is not None and (p.hidden.dtype != torch.float32 or not needs[1]):
        raise ValueError("grad_w_into needs float32 inputs and a weight gradient")
    _, _, grads = _run(p, needs, upstream=upstream, grad_w_into=grad_w_into)
    return grads


# --- the loop --------------------------------------------------------------------------------


def _matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 for bfloat16/float16 on the CPU, whose low-precision matmuls are emulated."""
    low = dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if (low and device.type == "cpu") else dtype


def _run(
    p: LinearProblem, needs: Needs, upstream: Tensor | None, grad_w_into: Tensor | None
) -> tuple[Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    n, d = p.hidden.shape
    v = p.weight.shape[0]
    device, dtype = p.hidden.device, p.hidden.dtype
    options = p.settings.options
    reduction = options.reduction
    per_row = upstream is not None and upstream.dim() == 1
    teacher = p.teacher
    # T² on the loss, T on the gradient (T²·(1/T) from d(z/T)/dz); 1 without a teacher.
    temp = 1.0 if teacher is None else teacher.temperature

    low = dtype in (torch.float16, torch.bfloat16)
    acc_dtype = torch.float32 if low else dtype
    mm_dtype = _matmul_dtype(dtype, device)
    gbuf_dtype = grad_dtype(mm_dtype)
    g_scale = FP16_GRAD_SCALE if gbuf_dtype != mm_dtype else 1.0

    # Which rows a class target marks as ignored (soft targets have none; a teacher's target
    # only marks them, or is None).
    class_rows = p.target is not None and not p.target.is_floating_point()
    if options.validate and class_rows and teacher is None:
        check_target_range(p.target, v, options.ignore_index)
    kernel_options = options.replace(
        reduction="none" if reduction == "none" else "sum",
        validate=False,
        per_token=p.per_token_out is not None,
        soft=options.soft or teacher is not None,  # a teacher's target is its softmax
    )

    # Rows that count. On the CPU, rows with ignore_index are dropped here (a cheap nonzero);
    # on CUDA that is a host sync, so they stay and the kernel gives them zero gradient, except
    # when distilling: the kernel's soft mode would count them.
    rows: Tensor | None = None
    drop_ignored = p.settings.drop_ignored
    if drop_ignored is None:
        drop_ignored = device.type == "cpu"
    if not class_rows:
        n_valid: Tensor | float = float(n)
    elif drop_ignored or teacher is not None:
        keep = p.target != options.ignore_index
        n_keep = int(keep.sum())
        n_valid = float(n_keep)
        if n_keep < n:
            rows = keep.nonzero().squeeze(1)
    else:
        n_valid = (p.target != options.ignore_index).sum().to(torch.float32)  # on the device

    def select(x: Tensor | None) -> Tensor | None:
        return x if (rows is None or x is None) else x.index_select(0, rows)

    h_all, t_all, m_all, r_all = (
        select(x) for x in (p.hidden, p.target, p.hard_mask, p.row_weight)
    )
    u_all = select(upstream) if per_row else upstream
    n_rows = h_all.shape[0]
    if h_all.dtype != mm_dtype:
        h_all = h_all.to(mm_dtype)
    w_mm = p.weight if p.weight.dtype == mm_dtype else p.weight.to(mm_dtype)
    b_mm = None if p.bias is None else p.bias.to(mm_dtype)
    if teacher is not None:
        teacher = teacher.for_matmul(rows, _matmul_dtype(teacher.hidden.dtype, device))
    # A teacher adds its float32 soft target to each chunk's logits.
    elem = mm_dtype.itemsize + (0 if teacher is None else 4)
    chunk = p.settings.chunk_size or default_chunk_size(n_rows, d, v, device, elem)

    # One scale for what the chunks sum: 1/N_valid ('mean'), the float16 chunk scale and the
    # temperature. A reduced loss's upstream gradient (0-dim) scales each chunk before its
    # matmuls, and 1/N_valid and T with it, so that nothing is scaled after the loop
    # (grad_w_into holds more than this loss's gradient).
    scale: Tensor | float = 1.0 / g_scale
    denom = n_valid.clamp(min=1.0) if isinstance(n_valid, Tensor) else max(n_valid, 1.0)
    if reduction == "mean":
        if upstream is not None:
            u_all = upstream / denom
        else:
            scale = scale / denom
    if temp != 1.0:
        if u_all is not None:
            u_all = u_all * temp
        else:
            scale = scale * temp

    need_h, need_w, need_b = needs
    grad_h = torch.empty((n_rows, d), dtype=acc_dtype, device=device) if need_h else None
    if grad_w_into is not None:
        grad_w = grad_w_into
    else:
        grad_w = torch.zeros((v, d), dtype=acc_dtype, device=device) if need_w else None
    grad_b = torch.zeros((v,), dtype=acc_dtype, device=device) if need_b else None
    step = _Chunk(
        w_mm, b_mm, p.settings.forward_fn, kernel_options, gbuf_dtype if any(needs) else None,
        g_scale, grad_w, grad_b, teacher,
    )  # fmt: skip
    loss_rows = (
        torch.zeros(n_rows, dtype=torch.float32, device=device) if reduction == "none" else None
    )
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    sums = torch.zeros(5, dtype=torch.float32, device=device)
    tok = p.per_token_out
    tok_rows = tok if (tok is None or rows is None) else tok.new_empty((tok.shape[0], n_rows))

    def part(x: Tensor | None, start: int, stop: int) -> Tensor | None:
        return None if x is None else x[start:stop]

    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        loss_c, sums_c, tok_c = step.run(
            h_all[start:stop],
            part(t_all, start, stop),
            part(m_all, start, stop),
            part(r_all, start, stop),
            None if teacher is None else teacher.hidden[start:stop],
            part(u_all, start, stop) if per_row else u_all,
            part(grad_h, start, stop),
        )
        sums += sums_c
        if tok_rows is not None:
            tok_rows[:, start:stop] = tok_c
        if loss_rows is not None:
            loss_rows[start:stop] = loss_c
        else:
            loss_sum += loss_c

    if tok is not None and tok_rows is not tok:  # the dropped (ignored) rows: 0
        tok.zero_().index_copy_(1, rows, tok_rows)
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
    if temp != 1.0:
        loss = loss * (temp * temp)
    return loss, sums, (grad_h, grad_w, grad_b)
