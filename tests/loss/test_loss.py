"""The EFE loss: the C++ backend and the public API against the float64 reference.

The reference (`efe_loss_reference`) is the spec; every case below draws fresh random inputs
(seeded per parameter set) and compares values, gradients and stats.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from loss_inputs import (
    assert_within_twice_torch_error,
    make_inputs,
    run_reference,
    seed_of,
    skip_under_mutmut,
)

import qwenrl
from qwenrl._ext import load_extension
from qwenrl.loss import dispatch, efe_loss, efe_loss_reference

HAS_EXT = load_extension() is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="qwenrl._C is not built")
BACKENDS = [pytest.param("cpu", marks=needs_ext), "reference"]


def run(z, t, backend, grad_out=None, **opts):
    """Loss, stats and d(loss·grad_out)/dz through the public API on one backend."""
    zz = z.detach().clone().requires_grad_()
    loss, stats = efe_loss(zz, t, backend=backend, return_stats=True, **opts)
    go = torch.ones_like(loss) if grad_out is None else grad_out
    loss.backward(go.to(loss.dtype))
    return loss.detach(), stats, zz.grad


OPTION_SETS = [
    {},
    {"tau": 0.3, "easy_weight": 0.25},
    {"label_smoothing": 0.1, "entropy_weight": 0.3},
    {"tau": 1.1, "entropy_weight": 1.0, "easy_weight": 0.0},  # every row hard
    {"tau": 0.0, "label_smoothing": 0.2},  # no hard rows
]


@needs_ext
@pytest.mark.parametrize("shape", [(41, 1271), (7, 3), (300, 12), (37, 29), (3, 32000)])
@pytest.mark.parametrize("kind", ["class", "soft", "log"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt_index", range(len(OPTION_SETS)))
def test_cpu_matches_reference(shape, kind, reduction, opt_index):
    n, c = shape
    opts = dict(OPTION_SETS[opt_index], reduction=reduction, log_target=kind == "log")
    seed = seed_of(shape, kind, reduction, opt_index)
    z, t = make_inputs(n, c, kind, seed)
    grad_out = torch.randn(n) if reduction == "none" else torch.tensor(1.7)
    loss, stats, grad = run(z, t, "cpu", grad_out, **opts)
    truth = run_reference(z, t, grad_out, **opts)
    torch.testing.assert_close(loss.double(), truth.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), truth.grad, rtol=1e-4, atol=1e-6)
    for name in qwenrl.loss.reference.STAT_NAMES:
        torch.testing.assert_close(
            stats[name].double(), truth.stats[name].double(), rtol=1e-4, atol=1e-5
        )


@needs_ext
@pytest.mark.parametrize("seed", [1, 2])
def test_hard_mask_and_batched_shape(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 5, 30, 12, generator=g) * 2
    t = torch.randint(0, 12, (2, 5, 30), generator=g)
    t[0, 1] = -100
    mask = torch.rand(2, 5, 30, generator=g) < 0.5
    for reduction in ("mean", "none"):
        loss, stats, grad = run(z, t, "cpu", hard_mask=mask, reduction=reduction)
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


@needs_ext
def test_qwen_vocabulary_width():
    """C = 151,936 (a Qwen vocabulary): the per-thread row buffer path at full width."""
    z, t = make_inputs(2, 151936, "class", seed=seed_of("vocab"), ignore_frac=0.0)
    loss, stats, grad = run(z, t, "cpu", entropy_weight=0.2, label_smoothing=0.05)
    loss64, _, grad64 = run_reference(z, t, entropy_weight=0.2, label_smoothing=0.05)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-8)


@needs_ext
def test_all_rows_ignored_gives_zero_not_nan():
    z = torch.randn(6, 12)
    t = torch.full((6,), -100)
    for backend in ("cpu", "reference"):
        loss, stats, grad = run(z, t, backend)
        assert loss.item() == 0.0
        assert torch.count_nonzero(grad) == 0
        assert stats["n_valid"].item() == 0 and stats["mask_ratio"].item() == 0


@needs_ext
def test_non_contiguous_input():
    z, t = make_inputs(12, 37, "class", seed=5)
    zt = z.t().contiguous().t()  # same values, column-major strides
    assert not zt.is_contiguous()
    loss_a, _, grad_a = run(zt, t, "cpu")
    loss_b, _, grad_b = run(z, t, "cpu")
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    # a strided slice of a bigger tensor
    big = torch.randn(12, 80)
    sl = big[:, ::2][:, :37]
    loss_c, _, grad_c = run(sl, t, "cpu")
    loss_d, _, grad_d = run_reference(sl, t)
    torch.testing.assert_close(loss_c.double(), loss_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c.double(), grad_d, rtol=1e-4, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["class", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(64, 12), (9, 1271)])
def test_low_precision_within_twice_torch_error(dtype, kind, reduction, shape):
    """The kernel's error is at most 2x that of PyTorch computing in the same precision."""
    n, c = shape
    z, t = make_inputs(n, c, kind, seed=seed_of(dtype, kind, reduction, shape), dtype=dtype)
    opts = {"reduction": reduction, "entropy_weight": 0.2}
    loss, _, grad = run(z, t, "cpu", **opts)
    truth_loss, _, truth_grad = run_reference(z, t, **opts)
    t_low = t.to(dtype) if kind == "soft" else t
    assert_within_twice_torch_error(z, t_low, loss, grad, truth_loss, truth_grad, **opts)


# --- identities (docs/loss.md) ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_identity_cross_entropy(backend, reduction):
    z, t = make_inputs(53, 12, "class", seed=11)
    opts = dict(entropy_weight=0.0, easy_weight=1.0, label_smoothing=0.0, reduction=reduction)
    loss, _, grad = run(z, t, backend, **opts)
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t, ignore_index=-100, reduction=reduction)
    ce.backward(torch.ones_like(ce))
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_label_smoothing_gradient(backend):
    eps = 0.15
    z, t = make_inputs(29, 12, "class", seed=12, ignore_frac=0.0)
    loss, _, grad = run(z, t, backend, easy_weight=1.0, label_smoothing=eps, reduction="none")
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t, label_smoothing=eps, reduction="none")
    ce.sum().backward()
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-7)
    # values differ by the entropy of the smoothed target, H(p)
    p = torch.full((12,), eps / 12)
    p[0] += 1 - eps
    h_p = -(p * p.log()).sum()
    torch.testing.assert_close(ce.detach() - loss, h_p.expand(29), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["soft", "log"])
def test_identity_kl_div(backend, kind):
    z, t = make_inputs(31, 17, kind, seed=13)
    loss, _, grad = run(z, t, backend, easy_weight=1.0, reduction="sum", log_target=kind == "log")
    zz = z.clone().requires_grad_()
    kl = F.kl_div(F.log_softmax(zz, -1), t, reduction="sum", log_target=kind == "log")
    kl.backward()
    torch.testing.assert_close(loss, kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-6)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 2])
    p = torch.softmax(torch.randn(5, 4, dtype=torch.float64, generator=g), -1)
    for target, extra in ((t, {}), (p, {"label_smoothing": 0.1})):
        fn = lambda x, target=target, extra=extra: efe_loss_reference(  # noqa: B023
            x, target, entropy_weight=0.4, reduction="sum", **extra
        )[0]
        assert torch.autograd.gradcheck(fn, (z,))


def test_reference_gradient_matches_closed_form():
    """∂efe/∂z = (q − p) − β·q⊙(log q + H(q)), scaled by w_i."""
    z, t = make_inputs(20, 9, "class", seed=21, ignore_frac=0.0)
    beta, eps = 0.7, 0.05
    loss, _, grad = run_reference(
        z, t, entropy_weight=beta, label_smoothing=eps, reduction="sum", tau=0.5
    )
    zd = z.double()
    q = torch.softmax(zd, -1)
    log_q = torch.log_softmax(zd, -1)
    h = -(q * log_q).sum(-1, keepdim=True)
    p = torch.full_like(q, eps / 9).scatter_(1, t[:, None], 1 - eps + eps / 9)
    w = torch.where(q.gather(1, t[:, None]) < 0.5, 1.0, 0.5)
    expected = w * ((q - p) - beta * q * (log_q + h))
    torch.testing.assert_close(grad, expected)


# --- behaviour ---------------------------------------------------------------------------


@needs_ext
def test_nan_and_inf_logits_give_nan_loss():
    z, t = make_inputs(16, 12, "class", seed=4, ignore_frac=0.0)
    z[3, 5] = float("nan")
    z[7, 0] = float("inf")
    loss, stats, grad = run(z, t, "cpu", reduction="none")
    assert torch.isnan(loss[3]) and torch.isnan(loss[7])
    assert torch.isfinite(loss[[0, 1, 2, 4]]).all()
    assert torch.isnan(run(z, t, "cpu")[0])


@needs_ext
def test_easy_cells_keep_half_weight():
    """The seed's `0.5 + 0.5·mask`: a confidently right row still contributes half its loss."""
    z = torch.zeros(2, 12)
    z[:, 4] = 8.0  # q[4] ≈ 0.99 → easy
    t = torch.tensor([4, 4])
    loss = efe_loss(z, t, reduction="none", backend="cpu")
    full = efe_loss(z, t, reduction="none", backend="cpu", easy_weight=1.0)
    torch.testing.assert_close(loss, 0.5 * full)
    assert (loss > 0).all()


@needs_ext
def test_inplace_gradient():
    z, t = make_inputs(33, 12, "class", seed=8)
    w = torch.randn(12, 12, requires_grad=True)
    x = z.clone()
    logits = x @ w  # mm does not save its output, so writing over it is safe
    loss = efe_loss(logits, t, inplace=True)
    loss.backward()
    w2 = w.detach().clone().requires_grad_()
    efe_loss_reference(x @ w2, t)[0].backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)

    # exp() saves its output for backward: the in-place write must be caught, not used.
    a = z.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        efe_loss(a.exp(), t, inplace=True).backward()


@needs_ext
def test_second_backward_raises():
    z, t = make_inputs(8, 12, "class", seed=9)
    zz = z.clone().requires_grad_()
    loss = efe_loss(zz, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already consumed"):
        loss.backward()


@needs_ext
def test_module_form_and_stats_without_sync():
    crit = qwenrl.EFELoss(tau=0.6, easy_weight=0.5)
    z, t = make_inputs(40, 12, "class", seed=10)
    loss = crit(z, t)
    loss_f, stats = efe_loss(z, t, return_stats=True)
    torch.testing.assert_close(loss, loss_f)
    assert set(crit.last_stats) == {"mask_ratio", "accuracy", "risk", "entropy", "n_valid"}
    for value in crit.last_stats.values():
        assert value.dim() == 0 and value.device == z.device
    crit.tau = 0.3
    assert crit.tau == 0.3 and "tau=0.3" in repr(crit)
    valid = t != -100
    acc = ((z.argmax(-1) == t) & valid).sum() / valid.sum()
    torch.testing.assert_close(stats["accuracy"], acc.float())


def test_missing_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_load", lambda name: "No module named 'qwenrl._C'")
    monkeypatch.setattr(dispatch, "_warned", set())
    z, t = make_inputs(10, 12, "class", seed=14)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = efe_loss(z, t)
        b = efe_loss(z, t)
    assert len([w for w in caught if "reference" in str(w.message)]) == 1
    torch.testing.assert_close(a, efe_loss_reference(z, t)[0])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_named_backend_that_cannot_load_raises(monkeypatch, backend):
    monkeypatch.setattr(dispatch, "_load", lambda name: f"No module named {name!r}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, t = make_inputs(4, 12, "class", seed=15)
    with pytest.raises(dispatch.BackendUnavailableError, match=backend):
        efe_loss(z, t, backend=backend)


def test_only_a_missing_module_counts_as_missing(monkeypatch):
    """A backend that is installed but broken raises its own error instead of a fallback."""
    import qwenrl._ext

    dispatch._load.cache_clear()
    monkeypatch.setattr(
        qwenrl._ext, "require_extension", lambda what: (_ for _ in ()).throw(OSError("bad .so"))
    )
    try:
        with pytest.raises(OSError, match="bad .so"):
            efe_loss(*make_inputs(4, 12, "class", seed=16))
    finally:
        dispatch._load.cache_clear()


def test_auto_backend_on_cpu_picks_the_cpp_kernel():
    name, _ = dispatch.resolve_backend("auto", torch.device("cpu"))
    assert name == ("cpu" if HAS_EXT else "reference")


# --- bad input -----------------------------------------------------------------------------


def test_float_class_target_is_a_type_error():
    """The seed's bug: `target.float()` instead of `target.long()`."""
    z = torch.randn(4, 900, 12)
    t = torch.randint(0, 12, (4, 900))
    with pytest.raises(TypeError, match="float32"):
        efe_loss(z, t.float())


@pytest.mark.parametrize(
    ("target", "error", "pattern"),
    [
        (torch.zeros(4, 5, dtype=torch.long), ValueError, r"\(4, 5\).*\(4, 6, 12\)"),
        (torch.zeros(4, 6, 11), ValueError, "soft target shape"),
        (torch.full((4, 6), 12), ValueError, "outside"),
        (torch.full((4, 6), -3), ValueError, "outside"),
        (torch.zeros(4, 6, dtype=torch.bool), TypeError, "bool"),
        (torch.zeros(4, 6, dtype=torch.uint8), TypeError, "uint8"),
    ],
)
def test_bad_inputs(target, error, pattern):
    z = torch.randn(4, 6, 12)
    with pytest.raises(error, match=pattern):
        efe_loss(z, target)


def test_bad_options():
    z, t = torch.randn(3, 12), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        efe_loss(z, t, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        efe_loss(z, t, backend="cuda")
    with pytest.raises(ValueError, match="label_smoothing"):
        efe_loss(z, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="hard_mask"):
        efe_loss(z, t, hard_mask=torch.zeros(3))
    with pytest.raises(ValueError, match="hard_mask shape"):
        efe_loss(z, t, hard_mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        efe_loss(torch.zeros(3, 12, dtype=torch.long), t)
    with pytest.raises(ValueError, match="log_target"):
        efe_loss(z, t, log_target=True)


# --- masked classes, float16 under a loss scale, torch.compile, the module ----------------

NEG_INF = float("-inf")


def masked_inputs(n, c, seed):
    """Logits with -inf on some classes (never all of a row, never the target)."""
    z, t = make_inputs(n, c, "class", seed=seed, ignore_frac=0.1)
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(n, c, generator=g) < 0.3
    masked[torch.arange(n), t.clamp(min=0)] = False
    return z.masked_fill(masked, NEG_INF), t, masked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [12, 1271])
def test_masked_classes_equal_cross_entropy(backend, c):
    """-inf logits (vocabulary or action masks) are classes with q = 0: as in F.cross_entropy
    the loss and gradient are finite."""
    z, t, masked = masked_inputs(37, c, seed_of("mask", c))
    loss, _, grad = run(z, t, backend, tau=0.0, easy_weight=1.0)
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
    loss, stats, grad = run(z, t, backend, **opts)
    loss64, _, grad64 = run_reference(z, t, **opts)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-7)
    p = torch.softmax(torch.randn(29, c), -1).masked_fill(masked, 0.0)
    p = p / p.sum(-1, keepdim=True)
    loss, _, grad = run(z, p, backend, entropy_weight=0.4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_target_class_and_all_masked_row(backend):
    """Only what cross-entropy cannot score is not finite: a masked target class gives an
    infinite loss, a row with every class masked a NaN."""
    z, t = make_inputs(4, 12, "class", seed=17, ignore_frac=0.0)
    z[1, t[1]] = NEG_INF
    z[2] = NEG_INF
    loss, _, _ = run(z, t, backend, tau=0.0, easy_weight=1.0, reduction="none")
    ce = F.cross_entropy(z, t, reduction="none")
    assert loss[1].item() == ce[1].item() == float("inf")
    assert torch.isnan(loss[2]) and torch.isnan(ce[2])
    torch.testing.assert_close(loss[[0, 3]], ce[[0, 3]])


@needs_ext
def test_float16_gradient_survives_a_loss_scale():
    """float16 logits with a GradScaler's 2^16 scale: the loss is float32 (finite), and the
    gradient errs no more than autocast + F.cross_entropy, measured against float64."""
    n, c, scale = 28800, 12, 2.0**16
    z, t = make_inputs(n, c, "class", seed=seed_of("fp16-scale"), dtype=torch.float16)
    zz = z.clone().requires_grad_()
    loss = efe_loss(zz, t, tau=0.0, easy_weight=1.0)
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


@needs_ext
@skip_under_mutmut
def test_compiles_fullgraph_with_default_options():
    """The defaults (validate on the CPU) compile with fullgraph=True: the target check runs
    inside the custom op, not as a data-dependent branch in the graph."""
    z, t = make_inputs(64, 12, "class", seed=18, ignore_frac=0.3)
    proj = torch.nn.Linear(12, 12)

    def model(x, target):
        return efe_loss(proj(x), target)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(z, t)
    loss_c.backward()
    grad_c = proj.weight.grad.clone()
    proj.weight.grad = None
    loss_e = model(z, t)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, proj.weight.grad)
    bad = t.clone()
    bad[5] = 12
    with pytest.raises(Exception, match="outside"):
        compiled(z, bad)


def test_module_takes_explicit_options():
    with pytest.raises(TypeError, match="eassy_weight"):
        qwenrl.EFELoss(eassy_weight=0.3)
    with pytest.raises(ValueError, match="reduction"):
        qwenrl.EFELoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        qwenrl.EFELoss(backend="gpu")
    crit = qwenrl.EFELoss(easy_weight=0.25, entropy_weight=0.3, backend="reference")
    z, t = make_inputs(30, 12, "class", seed=19)
    mask = torch.rand(30, generator=torch.Generator().manual_seed(19)) < 0.5
    expected, _ = efe_loss_reference(z, t, easy_weight=0.25, entropy_weight=0.3, hard_mask=mask)
    torch.testing.assert_close(crit(z, t, hard_mask=mask), expected)
    torch.testing.assert_close(
        crit.last_stats["mask_ratio"], (mask & (t != -100)).sum() / (t != -100).sum()
    )


@needs_ext
def test_kernel_options_travel_by_name():
    """The C++ binding takes the options as keywords named like EFEOptions' fields."""
    z, t = make_inputs(5, 12, "class", seed=20)
    ext = load_extension()
    options = qwenrl.loss.EFEOptions(tau=0.9, easy_weight=0.1)
    loss, _, per_token = ext.efe_forward(z, t, None, None, None, **options.kernel_kwargs())
    expected, _ = efe_loss_reference(z, t, tau=0.9, easy_weight=0.1)
    torch.testing.assert_close(loss, expected)
    assert per_token.numel() == 0  # per_token=False
    assert tuple(ext.PER_TOKEN_FIELDS) == qwenrl.loss.reference.PER_TOKEN_FIELDS
    with pytest.raises(TypeError):
        ext.efe_forward(z, t, None, None, None, *options.kernel_kwargs().values())


@needs_ext
@pytest.mark.parametrize("grad_out", [1.0, 2.5])
def test_upstream_gradient_of_one_and_not_one(grad_out):
    z, t = make_inputs(50, 700, "class", seed=seed_of("go", grad_out))
    loss, _, grad = run(z, t, "cpu", torch.tensor(grad_out))
    _, _, grad64 = run_reference(z, t, torch.tensor(grad_out))
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-8)
