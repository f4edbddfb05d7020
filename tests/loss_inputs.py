"""Random inputs shared by the loss tests of every backend."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

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


def _max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item()


def assert_within_twice_torch_error(
    z, t, loss, grad, truth_loss, truth_grad, grad_out=None, **opts
) -> None:
    """A kernel's loss and gradient on low-precision ``z`` err at most 2x as much as PyTorch
    computing the reference in that same precision (plus one ulp of the largest true value),
    both measured against the float64 truth."""
    from qwenrl.loss import efe_loss_reference

    dtype = z.dtype
    zz = z.detach().clone().requires_grad_()
    own_loss, _ = efe_loss_reference(zz, t, upcast=False, **opts)
    own_loss.backward(torch.ones_like(own_loss) if grad_out is None else grad_out.to(dtype))
    ulp = torch.finfo(dtype).eps
    assert loss.dtype == torch.float32 and grad.dtype == dtype  # the loss is always fp32
    floor_loss = ulp * truth_loss.abs().max().item()
    floor_grad = ulp * truth_grad.abs().max().item()
    assert _max_err(loss, truth_loss) <= 2 * _max_err(own_loss.detach(), truth_loss) + floor_loss
    assert _max_err(grad, truth_grad) <= 2 * _max_err(zz.grad, truth_grad) + floor_grad
