"""The Triton EFE kernels (qwenrl.kernels.efe) called directly: launch configurations, block
sizes, the gradient buffer, the kernel choice, torch.compile and the custom op.

What every backend must give through ``efe_loss`` (values, gradients and stats against the
float64 reference, the identities, low precision, masked classes) is checked for the Triton
backend too in tests/loss/test_conformance.py.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before Triton is
imported). The interpreter costs about a millisecond per program instance, so the shapes are
small and the block sizes are shrunk (passed or monkeypatched) to still cover several programs
per launch, several rows per program and several C-blocks per row. Every case draws fresh
random inputs, seeded per parameter set.

``QWENRL_TRITON_TEST_DEVICE=cuda`` runs the same tests compiled on a CUDA GPU instead
(``make gpu-check``, which runs every test marked ``triton``: those of tests/kernels and the
triton backend of tests/loss/test_conformance.py): every tensor is then created on the GPU.
"""

from __future__ import annotations

import pytest
from triton_device import DEVICE, tensors_on_device, triton_missing

if triton_missing() is not None:
    pytest.skip(triton_missing(), allow_module_level=True)

import torch  # noqa: E402
from loss_inputs import (  # noqa: E402
    kernel_options,
    make_inputs,
    run_reference,
    seed_of,
)

from qwenrl.kernels import efe as kefe  # noqa: E402
from qwenrl.loss import efe_loss  # noqa: E402
from qwenrl.loss.reference import STAT_NAMES  # noqa: E402


@pytest.fixture(autouse=True)
def _on_test_device():
    """Every tensor a test creates lands on DEVICE (inputs are drawn on the CPU first)."""
    with tensors_on_device():
        yield


def _cpu_drawn(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(DEVICE)


# Interpreter noise: padding lanes and ignored rows compute -inf - (-inf) before being masked.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def run_triton(z, t, grad_out=None, **opts):
    """Loss, stats and d(loss·grad_out)/dz through efe_loss(backend='triton')."""
    zz = z.detach().clone().requires_grad_()
    loss, stats = efe_loss(zz, t, backend="triton", return_stats=True, **opts)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), stats, zz.grad


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("kind", ["class", "soft"])
def test_odd_shapes(online, kind):
    """A weird realistic shape (41×1271) and a tiny one (7×3), on both kernels."""
    for n, c, block_c in ((41, 1271, 512), (7, 3, 2)):
        seed = seed_of(online, kind, n, c)
        z, t = make_inputs(n, c, kind, seed)
        for reduction in ("mean", "none"):
            g = torch.empty_like(z)
            loss, sums = kefe.efe_forward_triton(
                z, t, None, g, **kernel_options(kind, reduction), online=online, block_c=block_c
            )
            loss64, sums64, grad64 = _reference_run(z, t, kind, reduction)
            torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(g.double(), grad64, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sums.double(), sums64.double(), rtol=1e-4, atol=1e-4)


def _reference_run(z, t, kind, reduction, **overrides):
    """The reference in float64, with the fused convention's gradient (of loss.sum())."""
    opts = kernel_options(kind, reduction, **overrides)
    del opts["soft"]
    return run_reference(z, t, **opts)


@pytest.mark.parametrize("online", [False, True])
def test_unnormalised_soft_target(online):
    """A target that does not sum to 1 (nor is ≥ 0 everywhere): the gradient is (Σp)·q − p."""
    z, t = make_inputs(6, 40, "soft", seed_of("unnormalised", online))
    t = t * 1.3
    t[2, 3] = -0.01
    g = torch.empty_like(z)
    conv = kernel_options("soft", "none")
    loss, sums = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    loss64, sums64, grad64 = _reference_run(z, t, "soft", "none")
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g.double(), grad64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sums.double(), sums64.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["class", "log"])
def test_large_c_split_into_blocks(kind):
    """C = 5000 streamed in C-blocks of 1024 (five, the last partial) by the online kernel."""
    n, c = 3, 5000
    z, t = make_inputs(n, c, kind, seed_of("large", kind), ignore_frac=0.0)
    g = torch.empty_like(z)
    loss, sums = kefe.efe_forward_triton(
        z, t, None, g, **kernel_options(kind, "sum"), online=True, block_c=1024
    )
    loss64, sums64, grad64 = _reference_run(z, t, kind, "sum")
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(g.double(), grad64, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sums.double(), sums64.double(), rtol=1e-4, atol=1e-4)


def test_wide_rows_pick_the_online_kernel(monkeypatch):
    """Rows wider than MAX_TILE_C go to the online kernel by default; both agree."""
    monkeypatch.setattr(kefe, "MAX_TILE_C", 32)
    monkeypatch.setattr(kefe, "ONLINE_BLOCK_C", 16)
    calls = []
    launch = kefe._launch
    monkeypatch.setattr(
        kefe, "_launch", lambda *a, **k: calls.append(k["online"]) or launch(*a, **k)
    )
    z, t = make_inputs(5, 40, "class", seed_of("pick"))
    wide = kefe.efe_forward_triton(z, t, None, None, **kernel_options("class", "none"))
    narrow = kefe.efe_forward_triton(
        z[:, :20], t % 20, None, None, **kernel_options("class", "none")
    )
    tile = kefe.efe_forward_triton(
        z, t, None, None, **kernel_options("class", "none"), online=False
    )
    assert calls == [True, False, False]
    torch.testing.assert_close(wide[0], tile[0], rtol=1e-5, atol=1e-6)
    assert narrow[0].shape == (5,)


@pytest.mark.parametrize("seed", [0, 1])
def test_tile_several_rows_per_program(seed):
    """ARC-like rows (C = 12) with 32 rows per program and a partial last program."""
    z, t = make_inputs(100, 12, "class", seed_of("arc", seed))
    mask = _cpu_drawn(
        torch.rand(100, generator=torch.Generator().manual_seed(seed), device="cpu") < 0.3
    )
    g = torch.empty_like(z)
    loss, sums = kefe.efe_forward_triton(
        z, t, mask, g, **kernel_options("class", "mean"), online=False, block_n=32
    )
    loss64, sums64, grad64 = _reference_run(z, t, "class", "mean", hard_mask=mask)
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), grad64, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sums.double(), sums64.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(online, reduction):
    z = torch.randn(6, 40)
    t = torch.full((6,), -100)
    g = torch.full_like(z, 7.0)
    loss, sums = kefe.efe_forward_triton(
        z, t, None, g, **kernel_options("class", reduction), online=online, block_c=16
    )
    assert torch.count_nonzero(loss) == 0 and not torch.isnan(loss).any()
    assert torch.count_nonzero(g) == 0
    assert torch.count_nonzero(sums) == 0


def test_zero_rows():
    z = torch.randn(0, 12)
    for reduction in ("mean", "none"):
        loss, sums = kefe.efe_forward_triton(
            z, torch.zeros(0, dtype=torch.int64), None, None, **kernel_options("class", reduction)
        )
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert torch.count_nonzero(sums) == 0


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("kind", ["class", "soft"])
def test_gradient_in_place_over_the_logits(online, kind):
    """grad may be the logits tensor itself: each row is fully read before it is written."""
    z, t = make_inputs(9, 50, kind, seed_of("inplace", online, kind))
    separate = torch.empty_like(z)
    loss_a, sums_a = kefe.efe_forward_triton(
        z, t, None, separate, **kernel_options(kind, "mean"), online=online, block_c=16
    )
    zz = z.clone()
    loss_b, sums_b = kefe.efe_forward_triton(
        zz, t, None, zz, **kernel_options(kind, "mean"), online=online, block_c=16
    )
    torch.testing.assert_close(zz, separate, rtol=0, atol=0)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(sums_a, sums_b, rtol=0, atol=0)


# --- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize("online", [False, True])
def test_nan_and_inf_logits_give_nan_loss(online):
    z, t = make_inputs(8, 40, "class", seed_of("nan", online), ignore_frac=0.0)
    z[3, 5] = float("nan")
    z[6, 0] = float("inf")
    conv = kernel_options("class", "none")
    loss, sums = kefe.efe_forward_triton(z, t, None, None, **conv, online=online, block_c=16)
    assert torch.isnan(loss[3]) and torch.isnan(loss[6])
    assert torch.isfinite(loss[[0, 1, 2, 4, 5, 7]]).all()
    assert torch.isnan(sums[2])
    conv = kernel_options("class", "mean")
    g = torch.empty_like(z)
    loss, _ = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    assert torch.isnan(loss)
    assert torch.isnan(run_triton(z, t)[0])


@pytest.mark.parametrize("online", [False, True])
def test_out_of_range_class_target_gives_nan_row(online):
    """Unvalidated targets outside [0, C) are never used as an offset: that row is NaN."""
    z, t = make_inputs(6, 40, "class", seed_of("range", online), ignore_frac=0.0)
    t[1], t[4] = 40 + 10**6, -7
    g = torch.empty_like(z)
    conv = kernel_options("class", "none")
    loss, _ = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    bad, good = [1, 4], [0, 2, 3, 5]
    assert torch.isnan(loss[bad]).all() and torch.isnan(g[bad]).all()
    loss64, _, grad64 = _reference_run(z[good], t[good], "class", "none")
    torch.testing.assert_close(loss[good].double(), loss64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g[good].double(), grad64, rtol=1e-4, atol=1e-6)


# --- torch.compile ------------------------------------------------------------------------


class _TinyModel(torch.nn.Module):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 12)
        self.backend = backend

    def forward(self, x, y):
        logits = torch.tanh(self.proj(x)) * 4  # [B, cells, 12]
        return efe_loss(
            logits,
            y,
            backend=self.backend,
            entropy_weight=0.1,
            validate=False,
            return_stats=True,
        )


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.filterwarnings("ignore:qwenrl.*reference loss:RuntimeWarning")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_matches_eager(backend):
    """A compiled model gives the eager loss, stats and gradients, without graph breaks."""
    torch._dynamo.reset()
    torch.manual_seed(seed_of("compile", backend))
    model = _TinyModel(backend)
    x = torch.randn(3, 30, 8)
    y = torch.randint(0, 12, (3, 30))
    y[0, :7] = -100

    loss, stats = model(x, y)
    (loss * 1.7).backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    loss_c, stats_c = compiled(x, y)
    (loss_c * 1.7).backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats_c[name], stats[name], rtol=1e-5, atol=1e-6)
    for got, want in zip([p.grad for p in model.parameters()], eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "reduction"), [("class", "mean"), ("soft", "none")])
def test_custom_op_registration(kind, reduction):
    """The fused op's fake implementation and autograd formula pass torch's own checks."""
    from qwenrl.loss.compile import efe_fused

    z, t = make_inputs(6, 12, kind, seed_of("opcheck", kind, reduction))
    zz = z.clone().requires_grad_()
    options = dict(kernel_options(kind, reduction), validate=False, z_loss=0.0, per_token=False)
    torch.library.opcheck(
        efe_fused,
        (zz, t, None, None, "triton", True),
        options,
        test_utils=(
            "test_schema",
            "test_faketensor",
            "test_autograd_registration",
            "test_aot_dispatch_dynamic",
        ),
    )


# --- masked classes -----------------------------------------------------------------------


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("kind", ["class", "soft"])
def test_masked_classes_are_finite(online, kind):
    """-inf logits, including whole C-blocks of them (the online kernel's running max is then
    -inf): equal to the float64 reference, finite loss and gradient."""
    n, c = 6, 64
    z, t = make_inputs(n, c, kind, seed_of("masked", online, kind))
    z[:, :16] = float("-inf")  # the first C-block of every row
    z[2, 40:] = float("-inf")
    if kind == "class":
        t = t.clamp(min=16, max=39)
        t[4] = -100
    else:
        t[:, :16] = 0.0
        t[2, 40:] = 0.0
        t = t / t.sum(-1, keepdim=True)
    g = torch.empty_like(z)
    conv = kernel_options(kind, "none", label_smoothing=0.0)
    loss, _ = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    loss64, _, grad64 = _reference_run(z, t, kind, "none", label_smoothing=0.0)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g.double(), grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("online", [False, True])
def test_masked_classes_equal_cross_entropy(online):
    z, t = make_inputs(9, 40, "class", seed_of("masked-ce", online))
    z[:, ::3] = float("-inf")
    t = (t.clamp(min=0) // 3) * 3 + 1  # never a masked class
    t[3] = -100
    zz = z.clone().requires_grad_()
    ce = torch.nn.functional.cross_entropy(zz, t)
    ce.backward()
    g = torch.empty_like(z)
    conv = kernel_options("class", "mean", tau=0.0, easy_weight=1.0, entropy_weight=0.0)
    conv["label_smoothing"] = 0.0
    loss, _ = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, zz.grad, rtol=1e-5, atol=1e-7)
