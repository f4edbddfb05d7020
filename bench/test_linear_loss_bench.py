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
weight gradient is added into an existing ``.grad``. ``linear_efe_loss`` (its default) computes
every gradient in the forward into new buffers, which autograd adds; ``linear_efe_loss_in_place``
is the same call with ``weight_grad_in_place=True``, which adds the weight gradient into
``.grad`` during the backward (running the chunks again: one more matrix product per chunk).

Time: pytest-benchmark's median over a few rounds (each is seconds on a CPU). Extra peak
memory: each (case, method) runs again in a fresh process (so cases cannot pollute each
other's allocator), does one step so that the gradients and allocator pools exist, resets the
process's peak RSS (Linux ``/proc/self/clear_refs``), and reports the peak RSS of a second step
minus the RSS before it. The summary prints each method's ratio against the group's first row.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from lm_head_cases import CE, bench_cuda, child_step, inputs, liger_flce, step, zero_grads
from peak_memory import HAS_CLEAR_REFS, in_fresh_process

import qwenrl

CPU_CASES = {"h4096xV32000": (4096, 1024, 32000), "h2048xV151936": (2048, 1024, 151936)}
CPU_METHODS = [
    "torch_reference",
    "torch_chunked",
    "linear_then_efe_loss",
    "linear_efe_loss",
    "linear_efe_loss_in_place",
]
QUICK_SKIPS = ("torch_reference", "linear_efe_loss_in_place")  # run with --bench-full
GPU_CASES = {"bf16_h8192x4096xV151936": (8192, 4096, 151936)}
GPU_METHODS = ["liger_flce", "torch_chunked", "linear_efe_loss", "linear_efe_loss_in_place"]


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
    if method == "linear_efe_loss_in_place":  # the weight gradient into .grad in the backward
        return lambda h, w, t: qwenrl.linear_efe_loss(h, w, t, weight_grad_in_place=True, **CE)
    if method == "liger_flce":
        return liger_flce()
    raise ValueError(method)


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
    bench_cuda(benchmark, record, f"cuda bf16 {case_name}", GPU_CASES[case_name], method, loss_fn)


if __name__ == "__main__":
    child_step(*inputs(CPU_CASES[sys.argv[1]], "cpu", torch.float32), loss_fn(sys.argv[2]))
