"""Distillation without the teacher's logits at a Qwen vocabulary (V = 151,936), CPU, fp32.

Run: pytest bench/test_distill_bench.py --benchmark-only   (it is in the quick set)

One forward + backward of the forward KL(teacher ‖ student) over student hidden [N, D] with
head [V, D] and teacher hidden [N, D_t] with head [V, D_t] (the teacher frozen), each method in
a fresh process: wall time, CPU time and the step's extra peak RSS (its peak minus the RSS
before it, after a warm-up step left the gradients allocated). Methods:

* ``materialised`` (the baseline): both logits whole, ``F.kl_div`` of the student's
  log-softmax against the teacher's softmax (``reduction='batchmean'``);
* ``trl_chunked_divergence``: TRL 1.16's ``_chunked_divergence_loss`` (``beta=0``, the forward
  KL), what ``DistillationTrainer`` runs;
* ``linear_efe_loss``: ``qwenrl.linear_efe_loss(..., teacher_hidden=, teacher_weight=)`` in
  the cross-entropy mode (``tau=0, easy_weight=1``: the EFE is the forward KL).

The benchmark row is the wall time of that one step; the ratio is against the baseline.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from peak_memory import HAS_CLEAR_REFS, in_fresh_process, measure_step

N, D, D_T, V = 512, 256, 384, 151936
METHODS = ["materialised", "trl_chunked_divergence", "linear_efe_loss"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D**-0.5).requires_grad_()
    ht = torch.randn(N, D_T, generator=g)
    wt = torch.randn(V, D_T, generator=g) * D_T**-0.5
    return h, w, ht, wt


def _loss(method: str, h, w, ht, wt) -> torch.Tensor:
    if method == "materialised":
        log_q = torch.log_softmax(h @ w.t(), -1)
        p = torch.softmax(ht @ wt.t(), -1)
        return F.kl_div(log_q, p, reduction="batchmean")
    if method == "trl_chunked_divergence":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, N, dtype=torch.long)
        loss, *_ = _chunked_divergence_loss(h[None], ht[None], w, wt, mask, beta=0.0)
        return loss
    if method == "linear_efe_loss":
        import qwenrl

        return qwenrl.linear_efe_loss(
            h, w, None, teacher_hidden=ht, teacher_weight=wt, tau=0.0, easy_weight=1.0
        )
    raise ValueError(method)


def _child(method: str) -> None:
    h, w, ht, wt = _inputs()
    losses = []

    def one_step():
        loss = _loss(method, h, w, ht, wt)
        loss.backward()
        losses.append(float(loss.detach()))

    result = measure_step(one_step, reset=lambda: (h.grad.zero_(), w.grad.zero_()))
    print(json.dumps({**result, "loss": losses[-1]}))


@pytest.mark.skipif(not HAS_CLEAR_REFS, reason="needs Linux /proc")
@pytest.mark.parametrize("method", METHODS)
def test_distillation_at_qwen_vocabulary(benchmark, record, method):
    if method == "trl_chunked_divergence":
        pytest.importorskip("trl")
    result = {}

    def run():
        result.update(in_fresh_process(__file__, method))
        return result["seconds"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.stats.stats.median = result["seconds"]  # the step, not the process start
    record(
        f"distillation [{N} x {D}] x [{V}] (teacher D={D_T}) fp32",
        method,
        cpu_s=round(result["cpu_s"], 2),
        extra_peak_mb=round(result["extra_peak_mb"]),
        loss=round(result["loss"], 5),
    )


if __name__ == "__main__":
    _child(sys.argv[1])
