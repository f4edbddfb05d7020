"""Forward+backward of the EFE loss on a CUDA GPU: Triton kernel vs eager vs torch.compile vs Liger.

Run: pytest bench/test_loss_triton_bench.py --benchmark-only   (skipped without a CUDA GPU)

Measured on the cross-entropy special case (β = 0, w_e = 1, no smoothing), where Liger-Kernel's
fused cross entropy computes the same loss. Each case records in ``extra_info``:
* ``gb_per_s``: the memory floor (one read of the logits + one write of the gradient) / time;
* ``frac_of_copy_bw``: that rate over a device-to-device copy of the same bytes, measured in the
  same run (DESIGN.md §2.5 target on [8192, 128256] bf16: >= 0.8);
* ``ratio_vs_eager``: eager reference time / this time.
``triton_kernel`` is the fused launch alone (no autograd, gradient into a preallocated buffer);
``triton`` goes through ``efe_loss(backend="triton")`` and ``.backward()``.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from qwenrl.loss import efe_loss, efe_loss_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton benchmarks need a CUDA GPU"
)

SHAPES = {
    "arc_cells[28800,12] fp32": (28800, 12, torch.float32),
    "llm_vocab[8192,128256] bf16": (8192, 128256, torch.bfloat16),
}
# Eager first: it is the group's baseline in bench/conftest.py's ratio table.
IMPLS = ("eager_reference", "compiled_reference", "liger_cross_entropy", "triton", "triton_kernel")
CE = dict(easy_weight=1.0, entropy_weight=0.0, label_smoothing=0.0)

_medians: dict[tuple[str, str], float] = {}
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


def _ce_reference(z, t):
    return efe_loss_reference(z, t, **CE)[0]


_compiled_reference = torch.compile(_ce_reference, dynamic=False)


def _liger_loss():
    """Liger's cross entropy (ignore_index=-100, mean), via its module: stable across versions."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        pass
    else:
        return LigerCrossEntropyLoss()
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        pytest.skip("liger-kernel is not installed")
    return lambda z, t: liger_cross_entropy(z, t)


def _step(impl: str, z: torch.Tensor, t: torch.Tensor):
    """One forward+backward on a fresh leaf (or the fused launch alone), synchronised."""
    if impl == "triton_kernel":
        from qwenrl.kernels.efe import efe_forward_triton

        grad = torch.empty_like(z)
        opts = dict(CE, soft=False, log_target=False, tau=0.6, ignore_index=-100)

        def run():
            efe_forward_triton(z, t, None, grad, reduction="mean", **opts)

        return run
    if impl == "eager_reference":
        loss_fn = _ce_reference
    elif impl == "compiled_reference":
        loss_fn = _compiled_reference
    elif impl == "liger_cross_entropy":
        loss_fn = _liger_loss()
    else:
        loss_fn = lambda zz, tt: efe_loss(zz, tt, backend="triton", validate=False, **CE)  # noqa: E731
    # Liger writes its gradient over the logits: later rounds then run on gradient values,
    # which changes nothing in the memory traffic being timed.
    leaf = z.detach().requires_grad_()

    def run():
        leaf.grad = None
        loss_fn(leaf, t).backward()

    return run


@pytest.mark.parametrize(("shape", "impl"), [(s, i) for s in SHAPES for i in IMPLS])
def test_efe_ce_forward_backward_cuda(benchmark, record, shape, impl):
    n, c, dtype = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, c, generator=g, device="cuda").to(dtype)
    t = torch.randint(0, c, (n,), generator=g, device="cuda")
    t[::7] = -100
    try:
        run = _step(impl, z, t)
        run()  # compile / autotune / warm up outside the timed rounds
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} does not fit in GPU memory at {shape}")

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.group = f"efe CE fwd+bwd cuda {shape}"
    benchmark.pedantic(timed, rounds=10 if c > 1000 else 50, warmup_rounds=2)
    seconds = _cuda_seconds(run)
    _medians[(shape, impl)] = seconds
    floor_bytes = 2 * z.numel() * z.element_size()  # one read of z, one write of the gradient
    eager = _medians.get((shape, "eager_reference"))
    record(
        benchmark.group,
        impl,
        cuda_ms=seconds * 1e3,
        gb_per_s=floor_bytes / seconds / 1e9,
        frac_of_copy_bw=_copy_time(shape, z) / seconds,
        ratio_vs_eager=eager / seconds if eager is not None else float("nan"),
    )
