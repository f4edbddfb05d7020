"""What the LM-head benchmarks share: their inputs, one training step, and its measurements.

A case is ``(n, d, v)``: hidden [n, d], weight [v, d] (scaled so that the logits are O(1)),
targets [n]. Every method is a function ``f(hidden, weight, target) -> scalar loss``; a step is
its forward and backward with the gradients of the previous step kept allocated (zeroed in
place, as ``zero_grad(set_to_none=False)`` or gradient accumulation leave them).
"""

from __future__ import annotations

import json

import torch
from peak_memory import measure_step

CE = {"tau": 0.0, "easy_weight": 1.0}  # qwenrl's options that make its loss cross-entropy


def inputs(case: tuple[int, int, int], device: str, dtype: torch.dtype):
    n, d, v = case
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, t


def step(fn, h, w, t) -> None:
    fn(h, w, t).backward()


def zero_grads(*leaves) -> None:
    """``zero_grad(set_to_none=False)``: the gradients stay allocated."""
    for x in leaves:
        if x.grad is not None:
            x.grad.zero_()


def liger_flce():
    """Liger-Kernel's fused linear cross-entropy as a method (GPU rows only)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    crit = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: crit(w, h, t)


class _GemmFloor(torch.autograd.Function):
    """The three matrix products that any exact fp32 head must make, and nothing else: per
    chunk the logits ``h @ w.T``, then (with the logits standing in for their gradient) the
    hidden gradient ``g @ w`` and the weight gradient ``g.T @ h``, added into ``w.grad``."""

    @staticmethod
    def forward(ctx, h, w, chunk):
        grad_h = torch.empty_like(h)
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        grad_w = w.grad
        for lo in range(0, h.shape[0], chunk):
            hc = h[lo : lo + chunk]
            g = hc @ w.T
            torch.mm(g, w, out=grad_h[lo : lo + chunk])
            grad_w.addmm_(g.T, hc)
        ctx.save_for_backward(grad_h)
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        (grad_h,) = ctx.saved_tensors
        return grad_h, None, None


def gemm_floor(chunk: int = 512):
    """A method that only makes the GEMMs (its loss is 0 and its gradients are not a loss's):
    the time no exact fp32 head can beat on this machine. ``w.grad`` is updated in the forward,
    so the step runs with ``w.grad`` kept allocated, as the other methods do."""
    return lambda h, w, t: _GemmFloor.apply(h, w, chunk)


def child_step(h, w, t, fn) -> None:
    """A fresh process's measurement of one step (see :mod:`peak_memory`), printed as JSON."""
    print(json.dumps(measure_step(lambda: step(fn, h, w, t), reset=lambda: zero_grads(h, w))))


def bench_cuda(benchmark, record, group: str, case, method: str, loss_fn) -> None:
    """A GPU row: bf16 inputs of ``case``, ``loss_fn(method)`` timed over 5 rounds and recorded
    in ``group`` (the card's name appended) with its extra peak memory."""
    import pytest

    if method == "liger_flce":
        pytest.importorskip("liger_kernel")
    h, w, t = inputs(case, "cuda", torch.bfloat16)
    run, extra = cuda_step(loss_fn(method), h, w, t)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record(f"{group} ({torch.cuda.get_device_name()})", method, extra_peak_mb=extra)


def cuda_step(fn, h, w, t):
    """(run, extra peak MiB): a synchronised step, and the extra GPU memory of one."""

    def run():
        zero_grads(h, w)
        step(fn, h, w, t)
        torch.cuda.synchronize()

    run()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    return run, (torch.cuda.max_memory_allocated() - base) / 2**20
