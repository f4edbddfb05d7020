"""The EFE loss: the public API (options, dispatch, bad input, the module, torch.compile), the
reference itself and what only the C++ backend has.

The reference (`efe_loss_reference`) is the spec. What every backend must give through
``efe_loss`` (values, gradients and stats against the float64 reference, the identities, low
precision, masked classes, in-place gradients) is in test_conformance.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from loss_inputs import (
    HAS_EXT,
    make_inputs,
    needs_ext,
    run_efe,
    run_reference,
    seed_of,
    skip_under_mutmut,
)

import qwenrl
from qwenrl._ext import load_extension
from qwenrl.loss import dispatch, efe_loss, efe_loss_reference


@needs_ext
def test_qwen_vocabulary_width():
    """C = 151,936 (a Qwen vocabulary): the per-thread row buffer path at full width."""
    z, t = make_inputs(2, 151936, "class", seed=seed_of("vocab"), ignore_frac=0.0)
    loss, stats, grad = run_efe(z, t, "cpu", entropy_weight=0.2, label_smoothing=0.05)
    loss64, _, grad64 = run_reference(z, t, entropy_weight=0.2, label_smoothing=0.05)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-8)


# --- the reference itself -----------------------------------------------------------------


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


# --- torch.compile, the module, the C++ binding ------------------------------------------


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


def test_module_options_reach_the_loss():
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
