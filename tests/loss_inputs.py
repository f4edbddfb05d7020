"""Random inputs and the reference runs shared by the loss tests of every backend."""

from __future__ import annotations

import contextlib
import os
import zlib
from typing import Any, NamedTuple

import pytest
import torch

import qwenrl
from qwenrl._ext import load_extension
from qwenrl.loss import chunks, efe_loss, efe_loss_reference, stats_from_sums
from qwenrl.loss.reference import PER_TOKEN_FIELDS, STAT_NAMES

# `make mutate` runs the tests with a ContextVar trampoline in every function of the mutated
# modules, which torch.compile(fullgraph=True) cannot trace: those tests say so and skip there.
skip_under_mutmut = pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ,
    reason="make mutate: mutmut's trampolines break torch.compile's fullgraph tracing",
)


def kernel_options(kind: str, reduction: str, **overrides) -> dict:
    """The Triton launcher's keyword options for a target ``kind`` (``class``, ``soft`` or
    ``log``) and a reduction: every option away from its default (β, ε), ``overrides`` last."""
    opts = dict(
        soft=kind != "class",
        log_target=kind == "log",
        tau=0.6,
        easy_weight=0.5,
        entropy_weight=0.2,
        label_smoothing=0.05,
        ignore_index=-100,
        reduction=reduction,
    )
    opts.update(overrides)
    return opts


def seed_of(*params) -> int:
    """A seed per parameter set: fresh across cases, stable across runs."""
    return zlib.crc32(repr(params).encode())


def make_inputs(n, c, kind, seed, *, ignore_frac=0.2, dtype=torch.float32, scale=3.0):
    """Random logits [n, c] and a target of the given kind: 'class', 'soft' or 'log'.

    Drawn on the CPU (the same values on every device), then moved to torch's default device.
    """
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, device="cpu") * scale).to(dtype)
    if kind == "class":
        t = torch.randint(0, c, (n,), generator=g, device="cpu")
        t[torch.rand(n, generator=g, device="cpu") < ignore_frac] = -100
    else:
        p = torch.softmax(torch.randn(n, c, generator=g, device="cpu") * 2, -1)
        t = p.log() if kind == "log" else p
    device = torch.get_default_device()
    return z.to(device), t.to(device)


def run_efe(z, t, backend, grad_out=None, **opts):
    """Loss, stats and d(loss·grad_out)/dz through the public API on one backend."""
    zz = z.detach().clone().requires_grad_()
    loss, stats = efe_loss(zz, t, backend=backend, return_stats=True, **opts)
    go = torch.ones_like(loss) if grad_out is None else grad_out
    loss.backward(go.to(loss.dtype))
    return loss.detach(), stats, zz.grad


class ReferenceRun(NamedTuple):
    """What a reference run gives: the loss, its sums (``stats`` reads them) and the gradient
    (one tensor, or a tuple for the linear form's hidden, weight and bias)."""

    loss: torch.Tensor
    sums: torch.Tensor
    grad: Any

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        return stats_from_sums(self.sums)


def _leaf(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.detach().to(dtype, copy=True).requires_grad_()


def _reference_backward(logits, t, grad_out, dtype, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """efe_loss_reference on logits [..., C] taken as rows (the target and hard_mask too), then
    the backward of loss·grad_out through the graph that built the logits."""
    c = logits.shape[-1]
    soft = t.is_floating_point()
    rows_t = t.to(dtype).reshape(-1, c) if soft else t.reshape(-1)
    mask = opts.pop("hard_mask", None)
    loss, sums = efe_loss_reference(
        logits.reshape(-1, c),
        rows_t,
        hard_mask=None if mask is None else mask.reshape(-1),
        **opts,
    )
    if opts.get("reduction") == "none":
        loss = loss.reshape(logits.shape[:-1])
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(dtype))
    return loss.detach(), sums


def run_reference(z, t, grad_out=None, *, dtype=torch.float64, **opts) -> ReferenceRun:
    """``efe_loss_reference`` on ``z`` and a soft ``t`` cast to ``dtype``, and the gradient
    d(loss·grad_out)/dz; ``grad_out`` defaults to ones, which is also the fused kernels' own
    convention (the gradient of ``loss.sum()``).

    In float64 (the default) this is the truth every backend is held to; with
    ``dtype=z.dtype, upcast=False`` it is PyTorch's own error in that precision.
    """
    zz = _leaf(z, dtype)
    loss, sums = _reference_backward(zz, t, grad_out, dtype, opts)
    return ReferenceRun(loss, sums, zz.grad)


def run_linear_reference(h, w, b, t, grad_out=None, *, dtype=torch.float64, **opts):
    """:func:`run_reference` of the materialised logits ``h @ w.T + b`` (``b`` may be None);
    the gradient is the tuple (hidden, weight, bias), None for a missing bias."""
    leaves = [_leaf(x, dtype) for x in (h, w, b)]
    hh, ww, bb = leaves
    logits = hh @ ww.T + (bb if bb is not None else 0.0)
    loss, sums = _reference_backward(logits, t, grad_out, dtype, opts)
    return ReferenceRun(loss, sums, tuple(None if x is None else x.grad for x in leaves))


def _max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item()


def assert_within_twice_torch_error(
    z, t, loss, grad, truth_loss, truth_grad, grad_out=None, **opts
) -> None:
    """A kernel's loss and gradient on low-precision ``z`` err at most 2x as much as PyTorch
    computing the reference in that same precision (plus one ulp of the largest true value),
    both measured against the float64 truth."""
    dtype = z.dtype
    own = run_reference(z, t, grad_out, dtype=dtype, upcast=False, **opts)
    ulp = torch.finfo(dtype).eps
    assert loss.dtype == torch.float32 and grad.dtype == dtype  # the loss is always fp32
    floor_loss = ulp * truth_loss.abs().max().item()
    floor_grad = ulp * truth_grad.abs().max().item()
    assert _max_err(loss, truth_loss) <= 2 * _max_err(own.loss, truth_loss) + floor_loss
    assert _max_err(grad, truth_grad) <= 2 * _max_err(own.grad, truth_grad) + floor_grad


# --- linear_efe_loss: what tests/loss/test_linear_*.py and test_distill.py share -------------

HAS_EXT = load_extension() is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="qwenrl._C is not built")
LINEAR_BACKENDS = [pytest.param("cpu", marks=needs_ext), "reference"]
# How the weight gradient is made: no ``.grad`` yet / added into an existing ``weight.grad`` in
# the backward / a fresh gradient although ``.grad`` exists (``weight_grad_in_place=False``).
WEIGHT_GRAD_MODES = ["fresh", "in_place", "not_in_place"]


def grad_out_for(reduction, n, seed):
    """The upstream gradient: n random values for ``'none'``, a scalar otherwise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) if reduction == "none" else torch.tensor(1.7)


@contextlib.contextmanager
def weight_grad_into_recorded():
    """Records, for each backward that runs the chunks again, whether the weight gradient
    went straight into ``weight.grad`` (``grad_w_into``)."""
    seen, real = [], chunks.chunked_grads

    def grads_only(p, needs, upstream, grad_w_into=None):
        seen.append(grad_w_into is not None)
        return real(p, needs, upstream, grad_w_into=grad_w_into)

    chunks.chunked_grads = grads_only
    try:
        yield seen
    finally:
        chunks.chunked_grads = real


def run_linear_modes(h, w, b, t, grad_out, mode="fresh", **kw):
    """linear_efe_loss with stats and per-token outputs, then backward(grad_out); ``mode`` is
    one of :data:`WEIGHT_GRAD_MODES`. Returns (loss, stats, per_token, grads), the weight's
    gradient being what this loss added to ``.grad``."""
    hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
    prev = None
    if mode != "fresh":
        prev = torch.randn(ww.shape, generator=torch.Generator().manual_seed(5))
        ww.grad = prev.clone()
    grad_tensor = ww.grad
    loss, stats, tok = qwenrl.linear_efe_loss(
        hh, ww, t, bias=bb, return_stats=True, return_per_token=True,
        weight_grad_in_place=mode != "not_in_place", **kw,
    )  # fmt: skip
    with weight_grad_into_recorded() as into:
        loss.backward(grad_out)
    # in place: the backward added the weight gradient into .grad; otherwise it never did
    assert (into == [True]) if mode == "in_place" else not any(into)
    gw = ww.grad
    if mode == "in_place":
        assert ww.grad is grad_tensor  # added into the very tensor
    if prev is not None:
        gw = gw - prev
    return loss.detach(), stats, tok, (hh.grad, gw, bb.grad)


def assert_linear_matches(ours, truth, *, rtol=1e-4, atol=1e-5):
    """(loss, stats, per_token, grads) against the float64 (loss, sums, per_token [4, N],
    grads): values, and the per-token outputs' shape (the loss's rows) and dtype."""
    loss, stats, tok, grads = ours
    loss64, sums64, tok64, grads64 = truth
    torch.testing.assert_close(loss.double(), loss64, rtol=rtol, atol=atol)
    stats64 = stats_from_sums(sums64)
    for name in STAT_NAMES:
        torch.testing.assert_close(
            stats[name].double(), stats64[name].double(), rtol=1e-4, atol=1e-5
        )
    row_shape = loss.shape if loss.dim() else tok["lse"].shape
    for i, name in enumerate(PER_TOKEN_FIELDS):
        got = tok[name]
        assert got.shape == row_shape
        want = tok64[i].reshape(row_shape)
        if name == "correct":
            assert got.dtype == torch.bool and torch.equal(got, want != 0)
        else:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=2e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=rtol, atol=atol)


def assert_linear_call_raises(kwargs, error, pattern, args=None):
    """linear_efe_loss on ``args`` (hidden, weight, target and options; by default hidden
    [4, 6, 8], weight [12, 8] and class targets) updated by ``kwargs`` raises ``error`` with a
    message that matches ``pattern``."""
    if args is None:
        args = {
            "hidden": torch.randn(4, 6, 8),
            "weight": torch.randn(12, 8),
            "target": torch.zeros(4, 6, dtype=torch.long),
        }
    args = {**args, **kwargs}
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(error, match=pattern):
        qwenrl.linear_efe_loss(hidden, weight, target, **args)


def make_distill(n, d, v, seed, *, d_t=6, ignore_frac=0.25, dtype=torch.float32, t_dtype=None):
    """The student (hidden [n, d], weight [v, d], bias [v]), the teacher (hidden [n, d_t],
    weight [v, d_t], bias [v]), class targets that mark ignored rows, row weights, a mask."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g) * 0.5
    th = torch.randn(n, d_t, generator=g)
    tw = torch.randn(v, d_t, generator=g) * (3.0 / d_t**0.5)
    tb = torch.randn(v, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    rw = torch.randn(n, generator=g) * 1.5
    mask = torch.rand(n, generator=g) < 0.5
    t_dtype = t_dtype or dtype
    student = tuple(x.to(dtype) for x in (h, w, b))
    teacher = tuple(x.to(t_dtype) for x in (th, tw, tb))
    return student, teacher, t, rw, mask


def distill_reference(
    student, teacher, t, grad_out, *, temperature=1.0, row_weight=None, hard_mask=None,
    ignore_index=-100, **opts,
):  # fmt: skip
    """The float64 truth of a distillation call: T² · efe_loss_reference(z / T,
    softmax(teacher / T)) over the rows that are not ignored, z = hidden @ weight.T + bias:
    (loss, sums, per_token [4, N], grads of the student)."""
    leaves = [x.detach().double().requires_grad_() for x in student]
    hh, ww, bb = leaves
    v = ww.shape[0]
    th, tw, tb = (x.detach().double() for x in teacher)
    z = (hh @ ww.T + bb).reshape(-1, v) / temperature
    p = torch.softmax((th @ tw.T + tb).reshape(-1, v) / temperature, -1)
    n = z.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if t is None else t.reshape(-1) != ignore_index
    sel = lambda x: None if x is None else x.reshape(-1)[keep]  # noqa: E731
    loss, sums, tok = efe_loss_reference(
        z[keep],
        p[keep],
        row_weight=None if row_weight is None else sel(row_weight.double()),
        hard_mask=sel(hard_mask),
        return_per_token=True,
        **opts,
    )
    loss = loss * temperature**2
    full_tok = torch.zeros(4, n, dtype=tok.dtype)
    full_tok[:, keep] = tok
    if opts.get("reduction") == "none":
        loss = torch.zeros(n, dtype=loss.dtype).masked_scatter(keep, loss)
        loss = loss.reshape(student[0].shape[:-1])
    loss.backward(grad_out.double())
    return loss.detach(), sums, full_tok, tuple(x.grad for x in leaves)


def assert_compiled_matches_eager(model, grads_of):
    """``grads_of(fn)`` -> (loss, grads) is the same through torch.compile(model, fullgraph)
    as through the model itself. Returns the compiled model."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = grads_of(compiled)
    loss_e, grads_e = grads_of(model)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
    return compiled
