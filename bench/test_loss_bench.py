"""Forward+backward of the EFE loss on the CPU against what a user would otherwise run.

Run: pytest bench/test_loss_bench.py --benchmark-only

Baselines, all measured in the same run (the first row of each group is its baseline):
* ``plain_eager`` / ``plain_compile``: the EFE loss written the plain way (log_softmax, the
  target's log-probabilities, hard-row weights, mean over valid rows),
  eager and under ``torch.compile(dynamic=False)`` (``bench/plain_loss.py``);
* ``F.cross_entropy`` on the cross-entropy special case (β = 0, w_e = 1, no smoothing);
* the memory floor: one read of the logits (and of a soft target) plus one write of the
  gradient at the bandwidth of a measured ``copy_`` of the logits (``floor_ms``).
``efe_kernel`` is the fused C++ call alone, writing into a preallocated gradient buffer;
``efe_loss`` is the public API with ``.backward()``. The float64 reference is the tests'
correctness oracle, never a baseline here.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from plain_loss import compiled_plain_efe, plain_efe

from qwenrl._ext import load_extension
from qwenrl.loss import EFEOptions, efe_loss

SHAPES = {"arc_cells[28800,12]": (28800, 12), "llm_vocab[4096,32000]": (4096, 32000)}
# Option sets (efe_loss keyword arguments); "default" is what the trainer runs.
VARIANTS = {
    "default": {},
    "label_smoothing=0.1": {"label_smoothing": 0.1},
    "entropy_weight=0.2": {"entropy_weight": 0.2},
    "soft_targets": {},  # a [N, C] target distribution
}


def _inputs(shape: str, variant: str, dtype=torch.float32):
    n, c = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, c, generator=g) * 3).to(dtype)
    if variant == "soft_targets":
        t = torch.softmax(torch.randn(n, c, generator=g) * 2, -1)
    else:
        t = torch.randint(0, c, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.1] = -100
    return z, t


def _seconds(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_floor_ms: dict[tuple, float] = {}


def _floor(z: torch.Tensor, t: torch.Tensor) -> float:
    """Milliseconds to read the logits (and a soft target) once and write a gradient once, at the
    bandwidth of a measured copy (which reads and writes the logits' bytes once each)."""
    key = (tuple(z.shape), z.dtype, t.is_floating_point())
    if key not in _floor_ms:
        dst = torch.empty_like(z)
        copy_s = _seconds(lambda: dst.copy_(z), rounds=20 if z.numel() < 10**7 else 5)
        moved = 2 * z.numel() * z.element_size()
        floor_bytes = moved + (t.numel() * t.element_size() if t.is_floating_point() else 0)
        _floor_ms[key] = copy_s * floor_bytes / moved * 1e3
    return _floor_ms[key]


def _fwd_bwd(loss_fn, z, t):
    def setup():
        return (z.detach().clone().requires_grad_(), t), {}

    def step(zz, tt):
        loss_fn(zz, tt).backward()

    return setup, step


def _run(benchmark, record, group, name, loss_fn, z, t):
    setup, step = _fwd_bwd(loss_fn, z, t)
    step(*setup()[0])  # compile / warm up outside the timed rounds
    rounds = 3 if z.shape[1] > 1000 else 30
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1)
    floor = _floor(z, t)
    seconds = benchmark.stats.stats.median
    record(group, name, floor_ms=floor, x_floor=seconds * 1e3 / floor)


def _require_ext():
    if load_extension() is None:
        pytest.skip("qwenrl._C is not built")


# Baselines first in each group: the ratios are taken against them (bench/conftest.py).
IMPLS = ("plain_eager", "plain_compile", "efe_loss", "efe_kernel")
# The quick set (make bench) is the default options; the other option sets are --bench-full.
CASES = [
    pytest.param(s, v, i, marks=() if v == "default" else pytest.mark.full)
    for s in SHAPES
    for v in VARIANTS
    for i in IMPLS
]


@pytest.mark.parametrize(("shape", "variant", "impl"), CASES)
def test_efe_fwd_bwd(benchmark, record, shape, variant, impl):
    z, t = _inputs(shape, variant)
    opts = VARIANTS[variant]
    group = f"efe fwd+bwd {shape} fp32 {variant}"
    if impl == "plain_eager":
        return _run(benchmark, record, group, impl, lambda a, b: plain_efe(a, b, **opts), z, t)
    if impl == "plain_compile":
        fn = compiled_plain_efe((shape, variant), **opts)
        return _run(benchmark, record, group, impl, fn, z, t)
    _require_ext()
    if impl == "efe_loss":
        return _run(benchmark, record, group, impl, lambda a, b: efe_loss(a, b, **opts), z, t)
    # The kernel alone: loss, stats and gradient into a buffer allocated once.
    ext = load_extension()
    kwargs = EFEOptions(soft=t.is_floating_point(), **opts).kernel_kwargs()
    grad = torch.empty_like(z)
    benchmark.pedantic(
        lambda: ext.efe_forward(z, t, None, None, grad, **kwargs),
        rounds=3 if z.shape[1] > 1000 else 30,
        warmup_rounds=1,
    )
    floor = _floor(z, t)
    record(group, impl, floor_ms=floor, x_floor=benchmark.stats.stats.median * 1e3 / floor)


CE = {"tau": 0.0, "easy_weight": 1.0}  # the EFE loss's cross-entropy special case


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["F.cross_entropy", "efe_loss"])
def test_cross_entropy_case(benchmark, record, shape, impl):
    z, t = _inputs(shape, "default")
    if impl == "F.cross_entropy":
        fn = F.cross_entropy
    else:
        _require_ext()
        fn = lambda a, b: efe_loss(a, b, **CE)  # noqa: E731
    _run(benchmark, record, f"cross-entropy case {shape} fp32", impl, fn, z, t)


@pytest.mark.full
@pytest.mark.parametrize("impl", ["plain_compile", "efe_loss"])
def test_bf16_llm_vocab(benchmark, record, impl):
    """bf16 logits (the usual LLM training dtype), default options."""
    z, t = _inputs("llm_vocab[4096,32000]", "default", dtype=torch.bfloat16)
    if impl == "plain_compile":
        fn = compiled_plain_efe(("bf16",))
    else:
        _require_ext()
        fn = efe_loss
    _run(benchmark, record, "efe fwd+bwd llm_vocab[4096,32000] bf16 default", impl, fn, z, t)


# The RL options: each one's cost against the same call without it (the group's baseline).
OPTION_COSTS = {
    "without": {},
    "row_weight": {"row_weight": True},
    "z_loss=1e-4": {"z_loss": 1e-4},
    "return_per_token": {"return_per_token": True},
    "all three": {"row_weight": True, "z_loss": 1e-4, "return_per_token": True},
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("option", list(OPTION_COSTS))
def test_option_cost(benchmark, record, shape, option):
    """efe_loss forward+backward with one of the RL options against efe_loss without it."""
    z, t = _inputs(shape, "default")
    opts = dict(OPTION_COSTS[option])
    weight = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    if opts.pop("row_weight", False):
        opts["row_weight"] = weight

    def fn(a, b):
        out = efe_loss(a, b, **opts)
        return out[0] if isinstance(out, tuple) else out

    _run(benchmark, record, f"RL option cost {shape} fp32", option, fn, z, t)
