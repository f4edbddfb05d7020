"""Forward+backward of the EFE loss on the CPU: fused C++ kernel vs eager vs torch.compile.

Run: pytest bench/test_loss_bench.py --benchmark-only
Targets (DESIGN.md §2.5): >= 3x the eager reference and >= 1.5x torch.compile(reference).
"""

from __future__ import annotations

import pytest
import torch

from qwenrl.loss import efe as efe_module
from qwenrl.loss import efe_loss, efe_loss_reference

SHAPES = {"arc_cells[28800,12]": (28800, 12), "llm_vocab[4096,32000]": (4096, 32000)}
IMPLS = ("eager_reference", "compiled_reference", "cpp_fused")


def _reference_loss(z, t):
    return efe_loss_reference(z, t)[0]


_compiled = torch.compile(_reference_loss, dynamic=False)


def _loss_fn(impl):
    if impl == "eager_reference":
        return _reference_loss
    if impl == "compiled_reference":
        return _compiled
    if efe_module._cpu_forward() is None:
        pytest.skip("qwenrl._C is not built")
    return lambda z, t: efe_loss(z, t, backend="cpu")


# Baseline first: the ratio of every later entry is taken against it (bench/conftest.py).
@pytest.mark.parametrize(("shape", "impl"), [(s, i) for s in SHAPES for i in IMPLS])
def test_efe_forward_backward_cpu(benchmark, record, shape, impl):
    n, c = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    fn = _loss_fn(impl)

    def setup():
        return (z.detach().clone().requires_grad_(), t), {}

    def step(zz, tt):
        fn(zz, tt).backward()

    step(*setup()[0])  # compile / warm up outside the timed rounds
    rounds = 3 if c > 1000 else 30
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1)
    floor_bytes = 2 * z.numel() * z.element_size()  # one read of z, one write of the gradient
    seconds = benchmark.stats.stats.median
    record(f"efe fwd+bwd {shape} fp32", impl, gb_per_s=floor_bytes / seconds / 1e9)
