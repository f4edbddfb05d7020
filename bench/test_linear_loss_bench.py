"""Linear + loss on an LLM head: time and extra peak memory of one forward+backward.

    pytest bench/test_linear_loss_bench.py --benchmark-only

CPU rows (float32, cross-entropy mode so that every method computes the same loss):
hidden [4096, 1024] × weight [32000, 1024] and [2048, 1024] × [151936, 1024], against both
paths of ``F.linear_cross_entropy`` (``options=None``: the reference, which materialises the
logits; ``options=nn.LinearCrossEntropyOptions()``: torch's chunked path), and against
``F.linear`` + ``qwenrl.efe_loss``. GPU rows (bfloat16) against Liger-Kernel's fused linear
cross entropy; they are collected everywhere and skipped without CUDA (or without Liger).

Both are measured with the gradients of a previous step still allocated (zeroed in place, as
``zero_grad(set_to_none=False)`` or gradient accumulation leave them), so each method's new
weight gradient is added into an existing ``.grad``. ``linear_efe_loss`` then adds it in place
during the backward (its default); ``linear_efe_loss_fresh_grad`` is the same call with
``weight_grad_in_place=False``, which computes every gradient in the forward into new buffers
(what it does anyway when ``.grad`` is None).

Time: pytest-benchmark's median over a few rounds (each is seconds on a CPU). Extra peak
memory: each (case, method) runs again in a fresh process (so cases cannot pollute each
other's allocator), does one step so that the gradients and allocator pools exist, resets the
process's peak RSS (Linux ``/proc/self/clear_refs``), and reports the peak RSS of a second step
minus the RSS before it. The summary prints each method's ratio against the group's first row.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from peak_memory import HAS_CLEAR_REFS, in_fresh_process, measure_step

import qwenrl

CPU_CASES = {"h4096xV32000": (4096, 1024, 32000), "h2048xV151936": (2048, 1024, 151936)}
CPU_METHODS = [
    "torch_reference",
    "torch_chunked",
    "linear_then_efe_loss",
    "linear_efe_loss",
    "linear_efe_loss_fresh_grad",
]
QUICK_SKIPS = ("torch_reference", "linear_efe_loss_fresh_grad")  # run with --bench-full
GPU_CASES = {"bf16_h8192x4096xV151936": (8192, 4096, 151936)}
GPU_METHODS = ["liger_flce", "torch_chunked", "linear_efe_loss", "linear_efe_loss_fresh_grad"]
CE = {"tau": 0.0, "easy_weight": 1.0}


def inputs(case: tuple[int, int, int], device: str, dtype: torch.dtype):
    n, d, v = case
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, t


def loss_fn(method: str):
    """The loss of one method: f(hidden, weight, target) -> scalar."""
    if method == "torch_reference":
        return lambda h, w, t: F.linear_cross_entropy(h, w, t)
    if method == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=opts)
    if method == "linear_then_efe_loss":
        return lambda h, w, t: qwenrl.efe_loss(F.linear(h, w), t, **CE)
    if method == "linear_efe_loss":
        return lambda h, w, t: qwenrl.linear_efe_loss(h, w, t, **CE)
    if method == "linear_efe_loss_fresh_grad":  # gradients in the forward, a new [V, D] buffer
        return lambda h, w, t: qwenrl.linear_efe_loss(h, w, t, weight_grad_in_place=False, **CE)
    if method == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        crit = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, t: crit(w, h, t)
    raise ValueError(method)


def step(fn, h, w, t) -> None:
    fn(h, w, t).backward()


def zero_grads(*leaves) -> None:
    """``zero_grad(set_to_none=False)``: the gradients stay allocated (see the docstring)."""
    for x in leaves:
        if x.grad is not None:
            x.grad.zero_()


def _child(case_name: str, method: str) -> None:
    h, w, t = inputs(CPU_CASES[case_name], "cpu", torch.float32)
    fn = loss_fn(method)
    print(json.dumps(measure_step(lambda: step(fn, h, w, t))))


@pytest.mark.skipif(not HAS_CLEAR_REFS, reason="needs Linux /proc")
@pytest.mark.parametrize(
    "case_name",
    # the quick set: V = 32000 (the 151,936 vocabulary is --bench-full)
    [pytest.param(c, marks=() if c == "h4096xV32000" else pytest.mark.full) for c in CPU_CASES],
)
@pytest.mark.parametrize(
    "method",
    # the quick set: torch's chunked path, the unfused linear + efe_loss and the default call
    [pytest.param(m, marks=pytest.mark.full if m in QUICK_SKIPS else ()) for m in CPU_METHODS],
)
def test_cpu_linear_loss(benchmark, record, case_name, method):
    mem = in_fresh_process(__file__, case_name, method)
    h, w, t = inputs(CPU_CASES[case_name], "cpu", torch.float32)
    fn = loss_fn(method)

    benchmark.pedantic(step, args=(fn, h, w, t), setup=lambda: zero_grads(h, w), rounds=1,
                       warmup_rounds=1)  # fmt: skip
    record(f"cpu fp32 {case_name}", method, extra_peak_mb=mem["extra_peak_mb"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case_name", list(GPU_CASES))
@pytest.mark.parametrize("method", GPU_METHODS)
def test_gpu_linear_loss(benchmark, record, case_name, method):
    if method == "liger_flce":
        pytest.importorskip("liger_kernel")
    h, w, t = inputs(GPU_CASES[case_name], "cuda", torch.bfloat16)
    fn = loss_fn(method)

    def run():
        zero_grads(h, w)
        step(fn, h, w, t)
        torch.cuda.synchronize()

    run()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record(f"cuda bf16 {case_name} ({torch.cuda.get_device_name()})", method, extra_peak_mb=extra)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
