"""TRL's fused LM head against qwenrl's linear loss: time and extra peak memory of one
forward+backward over an LLM head, gradients of a previous step kept allocated.

    pytest bench/test_trl_bench.py --benchmark-only               # the quick set
    pytest bench/test_trl_bench.py --benchmark-only --bench-full  # + [4096 × 1024] × [32000]

CPU rows (float32). Every method computes the token-mean cross-entropy of ``hidden @
weight.T`` (and its gradients w.r.t. both) plus, where its name says so, per-token outputs:

* ``trl_head_log_probs``: ``trl.kernels.ChunkedLogProbFunction`` (what
  ``trl.trainer.utils.add_fused_lm_head`` runs; TRL's defaults: 4096-token tiles, a 32768-wide
  vocabulary chunk) asked for ``log_probs`` only, loss ``-log_probs.mean()`` — the baseline;
* ``trl_head_log_probs_entropy_top1``: the same asked for ``entropy`` and ``is_top1`` too
  (``SFTTrainer``'s fields; the loss still from ``log_probs``);
* ``linear_efe_loss_per_token``: ``qwenrl.linear_efe_loss(..., return_per_token=True)`` in its
  default mode (for a ``'mean'`` loss every gradient is computed in the forward: three matrix
  products per chunk, and one transient [V, D] float32 weight gradient that autograd adds into
  ``.grad``), cross-entropy options — loss plus logprob, entropy and correctness per token in
  one pass;
* ``linear_efe_loss_per_token_in_place``: the same with ``weight_grad_in_place=True`` (the
  forward computes the loss alone and the backward runs the chunks again, adding the weight
  gradient straight into ``.grad``: four matrix products per chunk, no [V, D] buffer);
* ``use_qwenrl_head``: what ``use_qwenrl`` runs per micro-batch
  (:func:`qwenrl.integrations.trl.token_losses`: ``reduction='none'``, so that ``log_probs``
  is differentiable for TRL's own losses; its backward runs the chunks again, as TRL's does);
* ``torch_chunked``: ``F.linear_cross_entropy(..., options=nn.LinearCrossEntropyOptions())``;
* ``gemm_floor``: not a loss, the floor under every row: the three matrix products an exact
  fp32 head makes (logits, hidden gradient, weight gradient into ``.grad``) in 512-row chunks,
  and nothing else. TRL's time over it bounds the ratio any head can reach here.

GPU rows (bfloat16, [8192 × 4096] × [151936]): TRL's head on its Triton path, Liger-Kernel's
fused linear cross entropy, ``linear_efe_loss_per_token``; collected everywhere, skipped
without CUDA (or Liger).

Time: pytest-benchmark's median (after a warm-up round; 3 rounds at the quick shape, 1 at
the quoted one: each is seconds on a CPU). Extra peak memory and process CPU time: each (case,
method) again in a fresh process: one step so that the gradients and allocator pools exist,
then the peak RSS of a second step minus the RSS before it, and that step's process CPU time
(``cpu_s``, which a loaded machine disturbs less than the wall clock). Ratios against each
group's first row are printed at the end, never asserted.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from lm_head_cases import (
    CE,
    bench_cuda,
    child_step,
    gemm_floor,
    inputs,
    liger_flce,
    step,
    zero_grads,
)
from peak_memory import HAS_CLEAR_REFS, in_fresh_process

import qwenrl

# The quick set's case (a few seconds a row) and the quoted one (--bench-full: ~6 s a
# forward+backward per method on 2 cores, ~30 s a row with its memory run).
CPU_CASES = {"h1024xD1024xV32000": (1024, 1024, 32000), "h4096xD1024xV32000": (4096, 1024, 32000)}
QUICK_CASE = "h1024xD1024xV32000"
CPU_METHODS = [
    "trl_head_log_probs",
    "trl_head_log_probs_entropy_top1",
    "linear_efe_loss_per_token",
    "linear_efe_loss_per_token_in_place",
    "use_qwenrl_head",
    "torch_chunked",
    "gemm_floor",
]
# The quick set: the baseline and qwenrl's call at the small shape.
QUICK_METHODS = ("trl_head_log_probs", "linear_efe_loss_per_token")
GPU_CASES = {"bf16_h8192xD4096xV151936": (8192, 4096, 151936)}
GPU_METHODS = ["trl_head_log_probs", "liger_flce", "linear_efe_loss_per_token"]


def loss_fn(method: str):
    """The loss of one method: f(hidden, weight, target) -> scalar (token mean)."""
    if method.startswith("trl_head"):
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        fields = (
            ("log_probs",)
            if method == "trl_head_log_probs"
            else ("log_probs", "entropy", "is_top1")
        )

        def trl_head(h, w, t):
            log_probs, *_ = ChunkedLogProbFunction.apply(
                h, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, fields
            )
            return -log_probs.mean()

        return trl_head
    if method.startswith("linear_efe_loss_per_token"):
        # The default weight-gradient mode (the forward path), or in place (True).
        in_place = True if method.endswith("_in_place") else None
        return lambda h, w, t: qwenrl.linear_efe_loss(
            h, w, t, return_per_token=True, weight_grad_in_place=in_place, **CE
        )[0]
    if method == "use_qwenrl_head":
        from qwenrl.integrations.trl import LOSS_DEFAULTS, token_losses

        return lambda h, w, t: token_losses(h, w, None, t, options=dict(LOSS_DEFAULTS))[0].mean()
    if method == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=opts)
    if method == "gemm_floor":
        return gemm_floor()
    if method == "liger_flce":
        return liger_flce()
    raise ValueError(method)


def _cpu_params():
    for case in CPU_CASES:
        for method in CPU_METHODS:
            quick = case == QUICK_CASE and method in QUICK_METHODS
            yield pytest.param(case, method, marks=() if quick else pytest.mark.full)


@pytest.mark.skipif(not HAS_CLEAR_REFS, reason="needs Linux /proc")
@pytest.mark.parametrize(("case_name", "method"), list(_cpu_params()))
def test_cpu_trl_head(benchmark, record, case_name, method):
    pytest.importorskip("trl")
    mem = in_fresh_process(__file__, case_name, method)
    h, w, t = inputs(CPU_CASES[case_name], "cpu", torch.float32)
    fn = loss_fn(method)
    rounds = 3 if case_name == QUICK_CASE else 1
    benchmark.pedantic(step, args=(fn, h, w, t), setup=lambda: zero_grads(h, w), rounds=rounds,
                       warmup_rounds=1)  # fmt: skip
    n, d, v = CPU_CASES[case_name]
    group = f"trl head cpu fp32 [{n} × {d}] × [{v}], grads kept"
    record(group, method, extra_peak_mb=mem["extra_peak_mb"], cpu_s=mem["cpu_s"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case_name", list(GPU_CASES))
@pytest.mark.parametrize("method", GPU_METHODS)
def test_gpu_trl_head(benchmark, record, case_name, method):
    pytest.importorskip("trl")
    group = f"trl head cuda bf16 {case_name}"
    bench_cuda(benchmark, record, group, GPU_CASES[case_name], method, loss_fn)


if __name__ == "__main__":
    child_step(*inputs(CPU_CASES[sys.argv[1]], "cpu", torch.float32), loss_fn(sys.argv[2]))
