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
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
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


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _child(method: str) -> None:
    h, w, ht, wt = _inputs()
    _loss(method, h, w, ht, wt).backward()  # the gradients and allocator pools now exist
    h.grad.zero_(), w.grad.zero_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = _status("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    loss = _loss(method, h, w, ht, wt)
    loss.backward()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = (_status("VmHWM") - base) / 2**20
    print(
        json.dumps(
            {"seconds": seconds, "cpu_s": cpu, "extra_peak_mb": extra, "loss": float(loss.detach())}
        )
    )


def _in_fresh_process(method: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, method],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("method", METHODS)
def test_distillation_at_qwen_vocabulary(benchmark, record, method):
    if method == "trl_chunked_divergence":
        pytest.importorskip("trl")
    result = {}

    def run():
        result.update(_in_fresh_process(method))
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
