"""Forward+backward of the EFE loss on a CUDA GPU: Triton against what a user would otherwise run.

Run: pytest bench/test_loss_triton_bench.py --benchmark-only   (skipped without a CUDA GPU)

Groups, each with its baseline first (bench/conftest.py prints every ratio against it):
* cross-entropy case (β = 0, w_e = 1, no smoothing), where ``F.cross_entropy`` and Liger-Kernel's
  fused cross entropy compute the same loss: ``F.cross_entropy`` (baseline), the plain EFE
  under ``torch.compile`` (``bench/plain_loss.py``), Liger, ``efe_loss(backend="triton")`` and
  ``triton_kernel`` (the fused launch alone, gradient into a preallocated buffer);
* default options (τ = 0.6, w_e = 0.5): the plain EFE under ``torch.compile`` (baseline) and
  ``efe_loss``.
Each row records ``cuda_ms`` (CUDA events), ``gb_per_s`` (one read of the logits and one write
of the gradient, over the time) and ``frac_of_copy_bw`` (a device-to-device copy of the same
bytes, measured in the same run, over the time).
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from plain_loss import compiled_plain_efe

from qwenrl.loss import efe_loss

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton benchmarks need a CUDA GPU"
)

SHAPES = {
    "arc_cells[28800,12] fp32": (28800, 12, torch.float32),
    "llm_vocab[8192,128256] bf16": (8192, 128256, torch.bfloat16),
}
CE_IMPLS = ("F.cross_entropy", "plain_compile", "liger_cross_entropy", "triton", "triton_kernel")
DEFAULT_IMPLS = ("plain_compile", "triton")
CE = dict(tau=0.0, easy_weight=1.0, entropy_weight=0.0, label_smoothing=0.0)

_copy_seconds: dict[str, float] = {}


def _cuda_seconds(fn, reps: int = 20) -> float:
    """Median time of ``fn`` over ``reps`` runs, with CUDA events (after two warm-up runs)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_time(shape: str, z: torch.Tensor) -> float:
    """A device-to-device copy of the logits' bytes: the card's practical bandwidth here."""
    if shape not in _copy_seconds:
        dst = torch.empty_like(z)
        _copy_seconds[shape] = _cuda_seconds(lambda: dst.copy_(z))
    return _copy_seconds[shape]


def _liger_loss():
    """Liger's cross entropy (ignore_index=-100, mean), via its module: stable across versions."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        pytest.skip("liger-kernel is not installed")
    return LigerCrossEntropyLoss()


def _step(shape: str, impl: str, opts: dict, z: torch.Tensor, t: torch.Tensor):
    """One forward+backward on a fresh leaf (or the fused launch alone)."""
    if impl == "triton_kernel":
        from qwenrl.kernels.efe import efe_forward_triton

        grad = torch.empty_like(z)
        kwargs = dict(soft=False, log_target=False, ignore_index=-100, reduction="mean", **opts)
        return lambda: efe_forward_triton(z, t, None, grad, **kwargs)
    if impl == "F.cross_entropy":
        loss_fn = F.cross_entropy
    elif impl == "plain_compile":
        loss_fn = compiled_plain_efe((shape, tuple(opts.items())), **opts)
    elif impl == "liger_cross_entropy":
        loss_fn = _liger_loss()
    else:
        loss_fn = lambda zz, tt: efe_loss(zz, tt, backend="triton", validate=False, **opts)  # noqa: E731
    # Liger writes its gradient over the logits: later rounds then run on gradient values,
    # which changes nothing in the memory traffic being timed.
    leaf = z.detach().requires_grad_()

    def run():
        leaf.grad = None
        loss_fn(leaf, t).backward()

    return run


CASES = [(s, "ce", i) for s in SHAPES for i in CE_IMPLS]
CASES += [(s, "default", i) for s in SHAPES for i in DEFAULT_IMPLS]


@pytest.mark.parametrize(("shape", "options", "impl"), CASES)
def test_efe_forward_backward_cuda(benchmark, record, shape, options, impl):
    n, c, dtype = SHAPES[shape]
    opts = CE if options == "ce" else {}
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(n, c, generator=g, device="cuda") * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=g, device="cuda")
    t[::7] = -100
    try:
        run = _step(shape, impl, opts, z, t)
        run()  # compile / autotune / warm up outside the timed rounds
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} does not fit in GPU memory at {shape}")

    def timed():
        run()
        torch.cuda.synchronize()

    group = f"{'cross-entropy case' if options == 'ce' else 'default options'} cuda {shape}"
    benchmark.group = group
    benchmark.pedantic(timed, rounds=10 if c > 1000 else 50, warmup_rounds=2)
    seconds = _cuda_seconds(run)
    floor_bytes = 2 * z.numel() * z.element_size()  # one read of z, one write of the gradient
    record(
        group,
        impl,
        cuda_ms=seconds * 1e3,
        gb_per_s=floor_bytes / seconds / 1e9,
        frac_of_copy_bw=_copy_time(shape, z) / seconds,
    )
