"""Every backend's fused forward against the float64 reference and torch's own losses.

Each test runs on the backends of ``efe_loss``: ``cpu`` (the C++ extension), ``triton`` (the
Triton kernels: on CPU tensors under the interpreter, TRITON_INTERPRET=1; compiled on the GPU
with ``QWENRL_TRITON_TEST_DEVICE=cuda``, as ``make gpu-check`` runs the tests marked
``triton``) and ``reference`` (``efe_loss_reference`` in float32 behind the same fused autograd
function). Every case draws fresh random inputs, seeded per case and not per backend, so that
all backends see the same values.

The interpreter costs about a millisecond per program instance: the Triton cases run at small
shapes with their block sizes shrunk (``TRITON_PATHS``: several programs per launch, several
rows per program, several C-blocks per row), and the larger shapes (the C++ kernel's grid, the
28,800-row float16 case) run on ``cpu`` and ``reference`` only. What only one backend has (the
C++ kernel's row buffer, the Triton launch configurations, block sizes and direct kernel calls)
is in tests/loss/test_loss.py and tests/kernels/.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_inputs import (
    assert_within_twice_torch_error,
    make_inputs,
    run_efe,
    run_reference,
    seed_of,
)
from triton_device import tensors_on_device, triton_missing

from qwenrl._ext import load_extension
from qwenrl.loss import efe_loss, efe_loss_reference
from qwenrl.loss.reference import STAT_NAMES

# --- the backends ----------------------------------------------------------------------------

CPU = pytest.param(
    "cpu",
    marks=pytest.mark.skipif(load_extension() is None, reason="qwenrl._C is not built"),
    id="cpu",
)
TRITON = pytest.param(
    "triton",
    marks=[
        pytest.mark.triton,
        pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing())),
        # Interpreter noise: padding lanes and ignored rows compute -inf - (-inf) before
        # being masked.
        pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    ],
    id="triton",
)
REFERENCE = pytest.param("reference", id="reference")
BACKENDS = [CPU, TRITON, REFERENCE]
NOT_INTERPRETED = [CPU, REFERENCE]  # cases too large for the Triton interpreter


def over(backends, cases):
    """pytest params (backend, case) for each backend and case; a case is a dict whose "id"
    names it."""
    return [
        pytest.param(b.values[0], case, marks=b.marks, id=f"{b.id}-{case['id']}")
        for b in backends
        for case in cases
    ]


@pytest.fixture(autouse=True)
def _on_the_backends_device(request):
    """The Triton cases create every tensor on the Triton tests' device (inputs are drawn on
    the CPU first, then moved); the others on the CPU."""
    callspec = getattr(request.node, "callspec", None)
    with tensors_on_device(callspec is not None and callspec.params.get("backend") == "triton"):
        yield


def on_device(x: torch.Tensor) -> torch.Tensor:
    """A tensor drawn on the CPU (same values on every device), on the test's device."""
    return x.to(torch.get_default_device())


def use_path(monkeypatch, backend: str, path: str | None) -> None:
    """Routes the triton backend to one kernel with blocks small enough for several per
    launch (see TRITON_PATHS); nothing for the other backends or without a path."""
    if backend != "triton" or path is None:
        return
    from qwenrl.kernels import efe as kefe

    if path == "tile":
        monkeypatch.setattr(kefe, "TILE_ELEMS", 256)
    else:
        monkeypatch.setattr(kefe, "MAX_TILE_C", 64)
        monkeypatch.setattr(kefe, "ONLINE_BLOCK_C", 64)


# tile: [41, 12] rows → 16 rows per program, 3 programs (the last one partial).
# online: [7, 300] rows → C-blocks of 64, 5 per row (the last one partial).
TRITON_PATHS = {"tile": (41, 12), "online": (7, 300)}


def grad_output_for(loss_shape, seed):
    """An upstream gradient that is never all ones."""
    g = torch.Generator().manual_seed(seed + 1)
    return on_device(torch.randn(loss_shape, generator=g, device="cpu") * 0.5 + 1.3)


# --- values, gradients and stats against the float64 reference -------------------------------

EXTRAS = {
    "plain": {},
    "entropy_mask": {"entropy_weight": 0.3, "tau": 0.4, "easy_weight": 0.25},
}
OPTION_SETS = [
    {},
    {"tau": 0.3, "easy_weight": 0.25},
    {"label_smoothing": 0.1, "entropy_weight": 0.3},
    {"tau": 1.1, "entropy_weight": 1.0, "easy_weight": 0.0},  # every row hard
    {"tau": 0.0, "label_smoothing": 0.2},  # no hard rows
]
KINDS, REDUCTIONS = ["class", "soft", "log"], ["mean", "sum", "none"]

# Both kernels of the Triton grid, with ε ∈ {0, 0.1}, with and without the entropy term and a
# given hard_mask, an upstream gradient ≠ 1.
TRITON_GRID = [
    {
        "id": f"{path}-{kind}-{reduction}-eps{eps}-{extra}",
        "path": path,
        "kind": kind,
        "reduction": reduction,
        "eps": eps,
        "extra": extra,
    }
    for extra in EXTRAS
    for eps in (0.0, 0.1)
    for reduction in REDUCTIONS
    for kind in KINDS
    for path in TRITON_PATHS
]
# Odd, tiny, tall and wide shapes (C = 32,000: a vocabulary) with five option sets.
CPP_GRID = [
    {
        "id": f"{n}x{c}-{kind}-{reduction}-opts{i}",
        "shape": (n, c),
        "kind": kind,
        "reduction": reduction,
        "opt_index": i,
    }
    for i in range(len(OPTION_SETS))
    for reduction in REDUCTIONS
    for kind in KINDS
    for n, c in [(41, 1271), (7, 3), (300, 12), (37, 29), (3, 32000)]
]


def assert_matches_reference(z, t, backend, grad_out, **opts):
    loss, stats, grad = run_efe(z, t, backend, grad_out, **opts)
    truth = run_reference(z, t, grad_out, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype
    torch.testing.assert_close(loss.double(), truth.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), truth.grad, rtol=1e-4, atol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(
            stats[name].double(), truth.stats[name].double(), rtol=1e-4, atol=1e-5, msg=name
        )


@pytest.mark.parametrize(("backend", "case"), over(BACKENDS, TRITON_GRID))
def test_matches_reference(monkeypatch, backend, case):
    """Values, gradients (grad_output ≠ 1) and stats, every option, both Triton kernels."""
    path, kind, reduction = case["path"], case["kind"], case["reduction"]
    n, c = TRITON_PATHS[path]
    use_path(monkeypatch, backend, path)
    seed = seed_of(path, kind, reduction, case["eps"], case["extra"])
    z, t = make_inputs(n, c, kind, seed)
    opts = dict(
        EXTRAS[case["extra"]],
        reduction=reduction,
        label_smoothing=case["eps"],
        log_target=kind == "log",
    )
    if case["extra"] == "entropy_mask":
        g = torch.Generator().manual_seed(seed)
        opts["hard_mask"] = on_device(torch.rand(n, generator=g, device="cpu") < 0.5)
    grad_out = grad_output_for((n,) if reduction == "none" else (), seed)
    assert_matches_reference(z, t, backend, grad_out, **opts)


@pytest.mark.parametrize(("backend", "case"), over(NOT_INTERPRETED, CPP_GRID))
def test_matches_reference_at_more_shapes(backend, case):
    """The C++ kernel's grid: odd sizes, C from 3 to 32,000, five option sets."""
    (n, c), kind, reduction = case["shape"], case["kind"], case["reduction"]
    opts = dict(OPTION_SETS[case["opt_index"]], reduction=reduction, log_target=kind == "log")
    z, t = make_inputs(n, c, kind, seed_of(case["shape"], kind, reduction, case["opt_index"]))
    grad_out = torch.randn(n) if reduction == "none" else torch.tensor(1.7)
    assert_matches_reference(z, t, backend, grad_out, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_hard_mask_and_batched_shape(backend, seed):
    g = torch.Generator().manual_seed(seed)
    z = on_device(torch.randn(2, 5, 30, 12, generator=g, device="cpu") * 2)
    t = torch.randint(0, 12, (2, 5, 30), generator=g, device="cpu")
    t[0, 1] = -100
    mask = on_device(torch.rand(2, 5, 30, generator=g, device="cpu") < 0.5)
    t = on_device(t)
    for reduction in ("mean", "none"):
        loss, stats, grad = run_efe(z, t, backend, hard_mask=mask, reduction=reduction)
        loss64, _, grad64 = run_reference(
            z.reshape(-1, 12), t.reshape(-1), hard_mask=mask.reshape(-1), reduction=reduction
        )
        torch.testing.assert_close(
            loss.double().reshape(-1), loss64.reshape(-1), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(grad.double().reshape(-1, 12), grad64, rtol=1e-4, atol=1e-7)
        expected_ratio = (mask & (t != -100)).sum() / (t != -100).sum()
        torch.testing.assert_close(stats["mask_ratio"], expected_ratio.float())
        assert loss.shape == (() if reduction == "mean" else (2, 5, 30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    z, t = make_inputs(12, 37, "class", seed=5)
    zt = z.t().contiguous().t()  # same values, column-major strides
    assert not zt.is_contiguous()
    loss_a, _, grad_a = run_efe(zt, t, backend)
    loss_b, _, grad_b = run_efe(z, t, backend)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    # a strided slice of a bigger tensor
    big = torch.randn(12, 80)
    sl = big[:, ::2][:, :37]
    loss_c, _, grad_c = run_efe(sl, t, backend)
    loss_d, _, grad_d = run_reference(sl, t)
    torch.testing.assert_close(loss_c.double(), loss_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c.double(), grad_d, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_out", [1.0, 2.5])
def test_upstream_gradient_of_one_and_not_one(backend, grad_out):
    z, t = make_inputs(50, 700, "class", seed=seed_of("go", grad_out))
    loss, _, grad = run_efe(z, t, backend, torch.tensor(grad_out))
    _, _, grad64 = run_reference(z, t, torch.tensor(grad_out))
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero_not_nan(backend):
    z = torch.randn(6, 12)
    t = torch.full((6,), -100)
    loss, stats, grad = run_efe(z, t, backend)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0
    assert stats["n_valid"].item() == 0 and stats["mask_ratio"].item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits_give_nan_loss(backend):
    z, t = make_inputs(16, 12, "class", seed=4, ignore_frac=0.0)
    z[3, 5] = float("nan")
    z[7, 0] = float("inf")
    loss, stats, grad = run_efe(z, t, backend, reduction="none")
    assert torch.isnan(loss[3]) and torch.isnan(loss[7])
    assert torch.isfinite(loss[[0, 1, 2, 4]]).all()
    assert torch.isnan(run_efe(z, t, backend)[0])


# --- low precision ---------------------------------------------------------------------------

# The Triton grid: both kernels, ε = 0.05, an upstream gradient ≠ 1; the C++ grid: two shapes,
# ε = 0, upstream gradient 1.
LOW_PRECISION = [
    {"id": f"{where}-{str(dtype)[6:]}-{kind}-{reduction}", "where": where, "dtype": dtype,
     "kind": kind, "reduction": reduction}
    for where in [*TRITON_PATHS, "64x12", "9x1271"]
    for dtype in (torch.bfloat16, torch.float16)
    for kind in ("class", "soft")
    for reduction in ("mean", "none")
]  # fmt: skip


@pytest.mark.parametrize(("backend", "case"), over(BACKENDS, LOW_PRECISION))
def test_low_precision_within_twice_torch_error(monkeypatch, backend, case):
    """fp32 math on bf16/fp16 inputs: error ≤ 2× PyTorch's own error in that precision."""
    where, dtype, kind, reduction = case["where"], case["dtype"], case["kind"], case["reduction"]
    opts = {"reduction": reduction, "entropy_weight": 0.2}
    if where in TRITON_PATHS:
        n, c = TRITON_PATHS[where]
        use_path(monkeypatch, backend, where)
        seed = seed_of(where, dtype, kind, reduction)
        opts["label_smoothing"] = 0.05
        grad_out = grad_output_for((n,) if reduction == "none" else (), seed)
    else:
        n, c = map(int, where.split("x"))
        seed = seed_of(dtype, kind, reduction, (n, c))
        grad_out = None
    z, t = make_inputs(n, c, kind, seed, dtype=dtype)
    t = t.to(dtype) if kind == "soft" else t
    loss, _, grad = run_efe(z, t, backend, grad_out, **opts)
    truth_loss, _, truth_grad = run_reference(z, t, grad_out, **opts)
    assert_within_twice_torch_error(z, t, loss, grad, truth_loss, truth_grad, grad_out, **opts)


# --- identities (docs/loss.md) ---------------------------------------------------------------

# The C++ file's cases (one shape, upstream gradient 1, tight tolerances) and the Triton file's
# (both kernels, an upstream gradient ≠ 1 where the loss is reduced by the test).
IDENTITY_CASES = [
    {"id": "arc", "path": None, "tight": True},
    *({"id": path, "path": path, "tight": False} for path in TRITON_PATHS),
]


def _tolerances(case, tight: dict, loose: dict) -> dict:
    return tight if case["tight"] else loose


@pytest.mark.parametrize(("backend", "case"), over(BACKENDS, IDENTITY_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_identity_cross_entropy(monkeypatch, backend, case, reduction):
    use_path(monkeypatch, backend, case["path"])
    if case["path"] is None:
        n, c = 53, 12
        z, t = make_inputs(n, c, "class", seed=11)
        grad_out = None
    else:
        n, c = TRITON_PATHS[case["path"]]
        z, t = make_inputs(n, c, "class", seed_of(case["path"], "ce", reduction))
        grad_out = grad_output_for((n,) if reduction == "none" else (), 3)
    opts = dict(entropy_weight=0.0, easy_weight=1.0, reduction=reduction)
    loss, _, grad = run_efe(z, t, backend, grad_out, **opts)
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t, ignore_index=-100, reduction=reduction)
    ce.backward(torch.ones_like(ce) if grad_out is None else grad_out)
    loss_tol = _tolerances(case, {"rtol": 1e-5, "atol": 1e-6}, {"rtol": 1e-5, "atol": 1e-5})
    grad_tol = _tolerances(case, {"rtol": 1e-5, "atol": 1e-7}, {"rtol": 1e-4, "atol": 1e-6})
    torch.testing.assert_close(loss, ce.detach(), **loss_tol)
    torch.testing.assert_close(grad, zz.grad, **grad_tol)


@pytest.mark.parametrize(("backend", "case"), over(BACKENDS, IDENTITY_CASES))
def test_identity_label_smoothing_gradient(monkeypatch, backend, case):
    """Label smoothing ε: the gradient of F.cross_entropy(label_smoothing=ε); the values
    differ by the entropy of the smoothed target, H(p)."""
    use_path(monkeypatch, backend, case["path"])
    eps = 0.15
    if case["path"] is None:
        n, c = 29, 12
        z, t = make_inputs(n, c, "class", seed=12, ignore_frac=0.0)
    else:
        n, c = TRITON_PATHS[case["path"]]
        z, t = make_inputs(n, c, "class", seed_of(case["path"], "ls"), ignore_frac=0.0)
    loss, _, grad = run_efe(z, t, backend, easy_weight=1.0, label_smoothing=eps, reduction="none")
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t, label_smoothing=eps, reduction="none")
    ce.sum().backward()
    grad_tol = _tolerances(case, {"rtol": 1e-5, "atol": 1e-7}, {"rtol": 1e-4, "atol": 1e-6})
    torch.testing.assert_close(grad, zz.grad, **grad_tol)
    p = torch.full((c,), eps / c, dtype=torch.float64)
    p[0] += 1 - eps
    h_p = -(p * p.log()).sum().float()
    value_tol = _tolerances(case, {"rtol": 1e-5, "atol": 1e-5}, {"rtol": 1e-5, "atol": 1e-4})
    torch.testing.assert_close(ce.detach() - loss, h_p.expand(n), **value_tol)


@pytest.mark.parametrize(("backend", "case"), over(BACKENDS, IDENTITY_CASES))
@pytest.mark.parametrize("kind", ["soft", "log"])
def test_identity_kl_div(monkeypatch, backend, case, kind):
    use_path(monkeypatch, backend, case["path"])
    if case["path"] is None:
        z, t = make_inputs(31, 17, kind, seed=13)
    else:
        n, c = TRITON_PATHS[case["path"]]
        z, t = make_inputs(n, c, kind, seed_of(case["path"], "kl", kind))
    log_target = kind == "log"
    loss, _, grad = run_efe(z, t, backend, easy_weight=1.0, reduction="sum", log_target=log_target)
    zz = z.clone().requires_grad_()
    kl = F.kl_div(F.log_softmax(zz, -1), t, reduction="sum", log_target=log_target)
    kl.backward()
    loss_tol = _tolerances(case, {"rtol": 1e-5, "atol": 1e-5}, {"rtol": 1e-5, "atol": 1e-4})
    grad_tol = _tolerances(case, {"rtol": 1e-5, "atol": 1e-6}, {"rtol": 1e-4, "atol": 1e-6})
    torch.testing.assert_close(loss, kl.detach(), **loss_tol)
    torch.testing.assert_close(grad, zz.grad, **grad_tol)


# --- the gradient written over the logits ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("seed", "grad_out"), [(8, 1.0), (seed_of("inplace-api"), 2.5)], ids=["go1", "go2.5"]
)
def test_inplace_gradient(backend, seed, grad_out):
    z, t = make_inputs(33, 12, "class", seed=seed)
    w = torch.randn(12, 12, requires_grad=True)
    logits = z @ w  # mm does not save its output: writing the gradient over it is safe
    loss = efe_loss(logits, t, inplace=True, backend=backend)
    loss.backward(torch.tensor(grad_out))
    w2 = w.detach().clone().requires_grad_()
    efe_loss_reference(z @ w2, t)[0].backward(torch.tensor(grad_out))
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_over_a_saved_output_raises(backend):
    """exp() saves its output for backward: the in-place write must be caught, not used."""
    z, t = make_inputs(33, 12, "class", seed=8)
    a = z.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        efe_loss(a.exp(), t, inplace=True, backend=backend).backward()


# --- masked classes and float16 --------------------------------------------------------------

NEG_INF = float("-inf")


def masked_inputs(n, c, seed):
    """Logits with -inf on some classes (never all of a row, never the target)."""
    z, t = make_inputs(n, c, "class", seed=seed, ignore_frac=0.1)
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(n, c, generator=g, device="cpu") < 0.3
    masked[torch.arange(n, device="cpu"), t.cpu().clamp(min=0)] = False
    masked = on_device(masked)
    return z.masked_fill(masked, NEG_INF), t, masked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [12, 1271])
def test_masked_classes_equal_cross_entropy(backend, c):
    """-inf logits (vocabulary or action masks) are classes with q = 0: as in F.cross_entropy
    the loss and gradient are finite."""
    z, t, masked = masked_inputs(37, c, seed_of("mask", c))
    loss, _, grad = run_efe(z, t, backend, tau=0.0, easy_weight=1.0)
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t)
    ce.backward()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-7)
    assert (grad[masked] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [12, 1271])
def test_masked_classes_with_every_option(backend, c):
    """Entropy term, smoothing-free soft targets with p = 0 on the masked classes, hard-row
    weights: finite, and equal to the float64 reference on the unmasked classes."""
    z, t, masked = masked_inputs(29, c, seed_of("mask-all", c))
    opts = {"entropy_weight": 0.4, "tau": 0.5}
    loss, stats, grad = run_efe(z, t, backend, **opts)
    loss64, _, grad64 = run_reference(z, t, **opts)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-7)
    p = torch.softmax(torch.randn(29, c), -1).masked_fill(masked, 0.0)
    p = p / p.sum(-1, keepdim=True)
    loss, _, grad = run_efe(z, p, backend, entropy_weight=0.4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_target_class_and_all_masked_row(backend):
    """Only what cross-entropy cannot score is not finite: a masked target class gives an
    infinite loss, a row with every class masked a NaN."""
    z, t = make_inputs(4, 12, "class", seed=17, ignore_frac=0.0)
    z[1, t[1]] = NEG_INF
    z[2] = NEG_INF
    loss, _, _ = run_efe(z, t, backend, tau=0.0, easy_weight=1.0, reduction="none")
    ce = F.cross_entropy(z, t, reduction="none")
    assert loss[1].item() == ce[1].item() == float("inf")
    assert torch.isnan(loss[2]) and torch.isnan(ce[2])
    torch.testing.assert_close(loss[[0, 3]], ce[[0, 3]])


FLOAT16_CASES = [
    {"id": "28800rows", "n": 28800, "seed": seed_of("fp16-scale")},
    {"id": "4096rows", "n": 4096, "seed": seed_of("fp16")},
]


@pytest.mark.parametrize(
    ("backend", "case"),
    over(NOT_INTERPRETED, FLOAT16_CASES[:1]) + over(BACKENDS, FLOAT16_CASES[1:]),
)
def test_float16_gradient_survives_a_loss_scale(backend, case):
    """float16 logits with a GradScaler's 2^16 scale: the loss is float32 (finite), and the
    gradient is kept in float32 until backward: it errs no more than autocast +
    F.cross_entropy (float32 math, one cast), measured against float64, nothing flushed to
    zero on the way."""
    n, c, scale = case["n"], 12, 2.0**16
    z, t = make_inputs(n, c, "class", seed=case["seed"], dtype=torch.float16)
    zz = z.clone().requires_grad_()
    loss = efe_loss(zz, t, backend=backend, tau=0.0, easy_weight=1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss * scale)
    (loss * scale).backward()
    z64 = z.double().requires_grad_()
    (F.cross_entropy(z64, t) * scale).backward()
    zb = z.clone().requires_grad_()  # what autocast runs: fp32 math, the gradient cast to fp16
    (F.cross_entropy(zb.float(), t) * scale).backward()
    ours = (zz.grad.double() - z64.grad).abs()
    torch_err = (zb.grad.double() - z64.grad).abs()
    assert ours.max() <= 2 * torch_err.max() + 1e-7
    assert ours.median() <= 2 * torch_err.median() + 1e-7
    assert (zz.grad != 0).sum() >= (zb.grad != 0).sum() * 0.999  # no flush to zero
