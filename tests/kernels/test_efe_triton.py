"""The Triton EFE kernels (qwenrl.kernels.efe) against the float64 reference.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before Triton is
imported). The interpreter costs about a millisecond per program instance, so the shapes are
small and the block sizes are shrunk (monkeypatched or passed) to still cover several programs
per launch, several rows per program and several C-blocks per row. Every case draws fresh
random inputs, seeded per parameter set.

``QWENRL_TRITON_TEST_DEVICE=cuda`` runs the same tests compiled on a CUDA GPU instead
(``make gpu-check``): every tensor is then created on the GPU.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("QWENRL_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytest.importorskip("triton", reason="triton is not installed")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "TRITON_INTERPRET is set to something other than 1: no CPU interpreter",
        allow_module_level=True,
    )

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from loss_inputs import (  # noqa: E402
    assert_within_twice_torch_error,
    make_inputs,
    run_reference,
    seed_of,
)

from qwenrl.kernels import efe as kefe  # noqa: E402
from qwenrl.loss import efe_loss, efe_loss_reference  # noqa: E402
from qwenrl.loss.reference import STAT_NAMES  # noqa: E402


# Interpreter noise: padding lanes and ignored rows compute -inf - (-inf) before being masked.
@pytest.fixture(autouse=True)
def _on_test_device():
    """Every tensor a test creates lands on DEVICE (inputs are drawn on the CPU first)."""
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(previous)


def _cpu_drawn(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(DEVICE)


pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def grad_output_for(loss_shape, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return _cpu_drawn(
        torch.randn(loss_shape, generator=g, device="cpu") * 0.5 + 1.3
    )  # never all ones


def run_triton(z, t, grad_out=None, **opts):
    """Loss, stats and d(loss·grad_out)/dz through efe_loss(backend='triton')."""
    zz = z.detach().clone().requires_grad_()
    loss, stats = efe_loss(zz, t, backend="triton", return_stats=True, **opts)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), stats, zz.grad


def assert_matches_reference(z, t, grad_out, *, loss_tol=2e-5, grad_tol=1e-6, **opts):
    loss, stats, grad = run_triton(z, t, grad_out, **opts)
    truth = run_reference(z, t, grad_out, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype
    torch.testing.assert_close(loss.double(), truth.loss, rtol=2e-5, atol=loss_tol)
    torch.testing.assert_close(grad.double(), truth.grad, rtol=1e-4, atol=grad_tol)
    for name in STAT_NAMES:
        torch.testing.assert_close(
            stats[name].double(), truth.stats[name].double(), rtol=1e-4, atol=1e-5, msg=name
        )


@pytest.fixture(params=["tile", "online"])
def path(request, monkeypatch):
    """Routes efe_loss to one kernel, with blocks small enough for several per launch.

    tile: [41, 12] rows → 16 rows per program, 3 programs (the last one partial).
    online: [7, 300] rows → C-blocks of 64, 5 per row (the last one partial).
    """
    if request.param == "tile":
        monkeypatch.setattr(kefe, "TILE_ELEMS", 256)
        return request.param, (41, 12)
    monkeypatch.setattr(kefe, "MAX_TILE_C", 64)
    monkeypatch.setattr(kefe, "ONLINE_BLOCK_C", 64)
    return request.param, (7, 300)


EXTRAS = {
    "plain": {},
    "entropy_mask": {"entropy_weight": 0.3, "tau": 0.4, "easy_weight": 0.25},
}


@pytest.mark.parametrize("kind", ["class", "soft", "log"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_matches_reference(path, kind, reduction, eps, extra):
    """Values, gradients (grad_output ≠ 1) and stats, every option, both kernels."""
    name, (n, c) = path
    seed = seed_of(name, kind, reduction, eps, extra)
    z, t = make_inputs(n, c, kind, seed)
    opts = dict(EXTRAS[extra], reduction=reduction, label_smoothing=eps, log_target=kind == "log")
    if extra == "entropy_mask":
        opts["hard_mask"] = _cpu_drawn(
            torch.rand(n, generator=torch.Generator().manual_seed(seed), device="cpu") < 0.5
        )
    grad_out = grad_output_for((n,) if reduction == "none" else (), seed)
    assert_matches_reference(z, t, grad_out, **opts)


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
                z, t, None, g, **_convention(kind, reduction), online=online, block_c=block_c
            )
            loss64, sums64, grad64 = _reference_convention(z, t, kind, reduction)
            torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(g.double(), grad64, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sums.double(), sums64.double(), rtol=1e-4, atol=1e-4)


def _convention(kind, reduction, **overrides):
    opts = dict(
        soft=kind != "class",
        log_target=kind == "log",
        tau=0.6,
        easy_weight=0.5,
        entropy_weight=0.2,
        label_smoothing=0.05,
        ignore_index=-100,
        reduction=reduction,
    )
    opts.update(overrides)
    return opts


def _reference_convention(z, t, kind, reduction, **overrides):
    """The reference in float64, with the fused convention's gradient (of loss.sum())."""
    opts = _convention(kind, reduction, **overrides)
    del opts["soft"]
    return run_reference(z, t, **opts)


@pytest.mark.parametrize("online", [False, True])
def test_unnormalised_soft_target(online):
    """A target that does not sum to 1 (nor is ≥ 0 everywhere): the gradient is (Σp)·q − p."""
    z, t = make_inputs(6, 40, "soft", seed_of("unnormalised", online))
    t = t * 1.3
    t[2, 3] = -0.01
    g = torch.empty_like(z)
    conv = _convention("soft", "none")
    loss, sums = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    loss64, sums64, grad64 = _reference_convention(z, t, "soft", "none")
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
        z, t, None, g, **_convention(kind, "sum"), online=True, block_c=1024
    )
    loss64, sums64, grad64 = _reference_convention(z, t, kind, "sum")
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
    wide = kefe.efe_forward_triton(z, t, None, None, **_convention("class", "none"))
    narrow = kefe.efe_forward_triton(z[:, :20], t % 20, None, None, **_convention("class", "none"))
    tile = kefe.efe_forward_triton(z, t, None, None, **_convention("class", "none"), online=False)
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
        z, t, mask, g, **_convention("class", "mean"), online=False, block_n=32
    )
    loss64, sums64, grad64 = _reference_convention(z, t, "class", "mean", hard_mask=mask)
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
        z, t, None, g, **_convention("class", reduction), online=online, block_c=16
    )
    assert torch.count_nonzero(loss) == 0 and not torch.isnan(loss).any()
    assert torch.count_nonzero(g) == 0
    assert torch.count_nonzero(sums) == 0


def test_zero_rows():
    z = torch.randn(0, 12)
    for reduction in ("mean", "none"):
        loss, sums = kefe.efe_forward_triton(
            z, torch.zeros(0, dtype=torch.int64), None, None, **_convention("class", reduction)
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
        z, t, None, separate, **_convention(kind, "mean"), online=online, block_c=16
    )
    zz = z.clone()
    loss_b, sums_b = kefe.efe_forward_triton(
        zz, t, None, zz, **_convention(kind, "mean"), online=online, block_c=16
    )
    torch.testing.assert_close(zz, separate, rtol=0, atol=0)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(sums_a, sums_b, rtol=0, atol=0)


def test_inplace_through_the_public_api():
    z, t = make_inputs(33, 12, "class", seed_of("inplace-api"))
    w = torch.randn(12, 12, requires_grad=True)
    logits = z @ w  # mm does not save its output: writing the gradient over it is safe
    loss = efe_loss(logits, t, inplace=True, backend="triton")
    loss.backward(torch.tensor(2.5))
    w2 = w.detach().clone().requires_grad_()
    efe_loss_reference(z @ w2, t)[0].backward(torch.tensor(2.5))
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["class", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_within_twice_torch_error(path, dtype, kind, reduction):
    """fp32 math on bf16/fp16 inputs: error ≤ 2× PyTorch's own error in that precision."""
    name, (n, c) = path
    seed = seed_of(name, dtype, kind, reduction)
    z, t = make_inputs(n, c, kind, seed, dtype=dtype)
    t = t.to(dtype) if kind == "soft" else t
    opts = {"reduction": reduction, "entropy_weight": 0.2, "label_smoothing": 0.05}
    grad_out = grad_output_for((n,) if reduction == "none" else (), seed)
    loss, _, grad = run_triton(z, t, grad_out, **opts)
    truth_loss, _, truth_grad = run_reference(z, t, grad_out, **opts)
    assert_within_twice_torch_error(z, t, loss, grad, truth_loss, truth_grad, grad_out, **opts)


# --- identities (docs/loss.md) ------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_identity_cross_entropy(path, reduction):
    name, (n, c) = path
    z, t = make_inputs(n, c, "class", seed_of(name, "ce", reduction))
    grad_out = grad_output_for((n,) if reduction == "none" else (), 3)
    opts = dict(entropy_weight=0.0, easy_weight=1.0, reduction=reduction)
    loss, _, grad = run_triton(z, t, grad_out, **opts)
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t, ignore_index=-100, reduction=reduction)
    ce.backward(grad_out)
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-4, atol=1e-6)


def test_identity_label_smoothing_gradient(path):
    name, (n, c) = path
    eps = 0.15
    z, t = make_inputs(n, c, "class", seed_of(name, "ls"), ignore_frac=0.0)
    loss, _, grad = run_triton(z, t, easy_weight=1.0, label_smoothing=eps, reduction="none")
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t, label_smoothing=eps, reduction="none")
    ce.sum().backward()
    torch.testing.assert_close(grad, zz.grad, rtol=1e-4, atol=1e-6)
    p = torch.full((c,), eps / c, dtype=torch.float64)
    p[0] += 1 - eps
    h_p = -(p * p.log()).sum().float()
    torch.testing.assert_close(ce.detach() - loss, h_p.expand(n), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["soft", "log"])
def test_identity_kl_div(path, kind):
    name, (n, c) = path
    z, t = make_inputs(n, c, kind, seed_of(name, "kl", kind))
    log_target = kind == "log"
    loss, _, grad = run_triton(z, t, easy_weight=1.0, reduction="sum", log_target=log_target)
    zz = z.clone().requires_grad_()
    kl = F.kl_div(F.log_softmax(zz, -1), t, reduction="sum", log_target=log_target)
    kl.backward()
    torch.testing.assert_close(loss, kl.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-4, atol=1e-6)


# --- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize("online", [False, True])
def test_nan_and_inf_logits_give_nan_loss(online):
    z, t = make_inputs(8, 40, "class", seed_of("nan", online), ignore_frac=0.0)
    z[3, 5] = float("nan")
    z[6, 0] = float("inf")
    conv = _convention("class", "none")
    loss, sums = kefe.efe_forward_triton(z, t, None, None, **conv, online=online, block_c=16)
    assert torch.isnan(loss[3]) and torch.isnan(loss[6])
    assert torch.isfinite(loss[[0, 1, 2, 4, 5, 7]]).all()
    assert torch.isnan(sums[2])
    conv = _convention("class", "mean")
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
    conv = _convention("class", "none")
    loss, _ = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    bad, good = [1, 4], [0, 2, 3, 5]
    assert torch.isnan(loss[bad]).all() and torch.isnan(g[bad]).all()
    loss64, _, grad64 = _reference_convention(z[good], t[good], "class", "none")
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
    options = dict(_convention(kind, reduction), validate=False)
    torch.library.opcheck(
        efe_fused,
        (zz, t, None, "triton", True),
        options,
        test_utils=(
            "test_schema",
            "test_faketensor",
            "test_autograd_registration",
            "test_aot_dispatch_dynamic",
        ),
    )


# --- masked classes and float16 ------------------------------------------------------------


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
    conv = _convention(kind, "none", label_smoothing=0.0)
    loss, _ = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    loss64, _, grad64 = _reference_convention(z, t, kind, "none", label_smoothing=0.0)
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
    conv = _convention("class", "mean", tau=0.0, easy_weight=1.0, entropy_weight=0.0)
    conv["label_smoothing"] = 0.0
    loss, _ = kefe.efe_forward_triton(z, t, None, g, **conv, online=online, block_c=16)
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, zz.grad, rtol=1e-5, atol=1e-7)


def test_float16_gradient_kept_in_float32_until_backward():
    """Under a 2^16 loss scale the float16 gradient errs no more than autocast's
    F.cross_entropy (float32 math, one cast): nothing flushed to zero on the way."""
    n, c, scale = 4096, 12, 2.0**16
    z, t = make_inputs(n, c, "class", seed_of("fp16"), dtype=torch.float16)
    zz = z.clone().requires_grad_()
    loss = efe_loss(zz, t, backend="triton", tau=0.0, easy_weight=1.0)
    assert loss.dtype == torch.float32
    (loss * scale).backward()
    z64 = z.double().requires_grad_()
    (torch.nn.functional.cross_entropy(z64, t) * scale).backward()
    zb = z.clone().requires_grad_()
    (torch.nn.functional.cross_entropy(zb.float(), t) * scale).backward()
    ours = (zz.grad.double() - z64.grad).abs().max()
    torch_err = (zb.grad.double() - z64.grad).abs().max()
    assert ours <= 2 * torch_err + 1e-7
