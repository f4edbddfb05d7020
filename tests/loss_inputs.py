"""Random inputs and the reference runs shared by the loss tests of every backend."""

from __future__ import annotations

import os
import zlib
from typing import Any, NamedTuple

import pytest
import torch

from qwenrl.loss import efe_loss_reference, stats_from_sums

# `make mutate` runs the tests with a ContextVar trampoline in every function of the mutated
# modules, which torch.compile(fullgraph=True) cannot trace: those tests say so and skip there.
skip_under_mutmut = pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ,
    reason="make mutate: mutmut's trampolines break torch.compile's fullgraph tracing",
)


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
