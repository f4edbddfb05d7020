"""The loss API as the trainer uses it (public API only): EFELoss's options and hard_mask."""

from __future__ import annotations

import warnings

import pytest
import torch

import qwenrl

BACKENDS = ["reference", "cpu"]


def _inputs(n: int = 64, c: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_passes_hard_mask_through(backend):
    logits, target = _inputs()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[::3] = True
    crit = qwenrl.EFELoss(tau=0.6, easy_weight=0.2, backend=backend)
    loss = crit(logits, target, hard_mask=mask)
    expected = qwenrl.efe_loss(
        logits, target, tau=0.6, easy_weight=0.2, hard_mask=mask, backend=backend
    )
    torch.testing.assert_close(loss, expected)
    assert crit.last_stats["mask_ratio"].item() == pytest.approx(mask.float().mean().item())
    assert not torch.allclose(loss, crit(logits, target))  # the τ rule gives another mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_at_tau_counts_as_easy(backend):
    """Hard means q[y] < τ: a row with q[y] exactly τ is easy."""
    logits = torch.zeros(8, 4)  # q = 0.25 for every class
    target = torch.arange(8) % 4
    q = torch.softmax(logits, -1)[0, 0].item()
    assert q == 0.25
    crit = qwenrl.EFELoss(tau=q, easy_weight=0.5, backend=backend)
    crit(logits, target)
    assert crit.last_stats["mask_ratio"].item() == 0.0
    crit.tau = torch.nextafter(torch.tensor(q), torch.tensor(1.0)).item()
    crit(logits, target)
    assert crit.last_stats["mask_ratio"].item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_easy_weight_scales_the_easy_rows(backend):
    logits, target = _inputs()
    easy = torch.zeros(64, dtype=torch.bool)
    full = qwenrl.EFELoss(easy_weight=1.0, backend=backend)(logits, target, hard_mask=easy)
    for w in (0.0, 0.25, 0.5):
        crit = qwenrl.EFELoss(easy_weight=w, backend=backend)
        torch.testing.assert_close(crit(logits, target, hard_mask=easy), w * full)
    hard = ~easy  # hard rows weigh 1 whatever easy_weight says
    torch.testing.assert_close(
        qwenrl.EFELoss(easy_weight=0.25, backend=backend)(logits, target, hard_mask=hard), full
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_options_match_the_function(backend):
    logits, target = _inputs(seed=1)
    opts = dict(tau=0.3, easy_weight=0.7, entropy_weight=0.1, label_smoothing=0.05)
    crit = qwenrl.EFELoss(backend=backend, **opts)
    expected, stats = qwenrl.efe_loss(logits, target, backend=backend, return_stats=True, **opts)
    torch.testing.assert_close(crit(logits, target), expected)
    for k, v in stats.items():
        torch.testing.assert_close(crit.last_stats[k], v)


@pytest.mark.parametrize(
    ("module", "bad_setting"),
    [(qwenrl.EFELoss, {"backend": "gpu"}), (qwenrl.LinearEFELoss, {"chunk_size": -1})],
    ids=["EFELoss", "LinearEFELoss"],
)
def test_modules_refuse_unknown_and_bad_options(module, bad_setting):
    with pytest.raises(TypeError, match="eassy_weight"):
        module(eassy_weight=0.3)
    with pytest.raises(ValueError, match="reduction"):
        module(reduction="avg")
    (name,) = bad_setting
    with pytest.raises(ValueError, match=name):
        module(**bad_setting)


def test_tau_is_settable_and_used():
    logits, target = _inputs(seed=2)
    crit = qwenrl.EFELoss(tau=0.6, backend="reference")
    crit(logits, target)
    high = crit.last_stats["mask_ratio"].item()
    crit.tau = 0.05
    assert crit.tau == 0.05
    crit(logits, target)
    assert crit.last_stats["mask_ratio"].item() < high


def test_repr_lists_the_options():
    parts = repr(qwenrl.EFELoss(tau=0.3, easy_weight=0.7)).split(", ")
    assert any(p.endswith("tau=0.3") for p in parts) and "easy_weight=0.7" in " ".join(parts)
    assert any(p.startswith("easy_weight=0.7") for p in parts)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    logits, target = _inputs(n=8, c=4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' on CPU tensors needs the Triton"):
        qwenrl.efe_loss(logits, target, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an available kernel runs without a fallback warning
        loss = qwenrl.efe_loss(logits, target, backend="triton")
    torch.testing.assert_close(loss, qwenrl.efe_loss(logits, target, backend="reference"))


def test_logits_shapes_at_the_edges():
    one_class = torch.randn(5, 1)
    loss = qwenrl.efe_loss(one_class, torch.zeros(5, dtype=torch.long), backend="reference")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # q = 1 for the only class
    with pytest.raises(ValueError, match=r"shape \[\.\.\., C\] with C >= 1"):
        qwenrl.efe_loss(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(TypeError, match="logits and target must be torch.Tensors"):
        qwenrl.efe_loss(torch.zeros(2, 3), [0, 1])


def test_soft_targets_in_float64_match_float32():
    logits, _ = _inputs(n=16, c=5, seed=3)
    probs = torch.softmax(torch.randn(16, 5, generator=torch.Generator().manual_seed(4)), -1)
    for backend in BACKENDS:
        a = qwenrl.efe_loss(logits, probs, backend=backend)
        b = qwenrl.efe_loss(logits, probs.double(), backend=backend)
        torch.testing.assert_close(a, b)


def test_options_are_declared_once_and_reach_every_op_by_name():
    """The custom ops' schemas take EFEOptions' fields as keyword arguments (op_schema), and
    a loss module holds one EFEOptions whose fields are its attributes."""
    import dataclasses

    from qwenrl.loss.options import EFEOptions

    fields = [f.name for f in dataclasses.fields(EFEOptions)]
    for name in ("efe_fused", "linear_efe_fused", "linear_efe_rows_backward"):
        schema = getattr(torch.ops.qwenrl, name).default._schema
        kwargs = [a.name for a in schema.arguments if a.kwarg_only]
        assert kwargs == fields, name
    crit = qwenrl.EFELoss(tau=0.3, label_smoothing=0.1)
    assert crit.efe_options.tau == 0.3 and crit.label_smoothing == 0.1
    crit.tau = 0.45
    assert crit.efe_options.tau == 0.45 and crit.options()["tau"] == 0.45
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        crit.label_smoothing = 1.5
    assert crit.label_smoothing == 0.1  # a rejected value leaves the options as they were


def test_every_backend_returns_its_sums_in_the_declared_order():
    """SUM_FIELDS is the one declaration of the sums' order: the C++ kernel exports the same
    tuple, and stats_from_sums reads the sums by those names."""
    from qwenrl._ext import load_extension
    from qwenrl.loss.options import SUM_FIELDS
    from qwenrl.loss.reference import stats_from_sums, sums_by_name

    ext = load_extension()
    if ext is not None:
        assert tuple(ext.SUM_FIELDS) == SUM_FIELDS
    sums = torch.tensor([3.0, 2.0, 5.0, 7.0, 4.0])  # n_hard, n_correct, Σ risk, Σ H, n_valid
    assert {k: float(v) for k, v in sums_by_name(sums).items()} == dict(
        zip(SUM_FIELDS, [3.0, 2.0, 5.0, 7.0, 4.0])
    )
    stats = stats_from_sums(sums)
    assert {k: float(v) for k, v in stats.items()} == {
        "mask_ratio": 0.75, "accuracy": 0.5, "risk": 1.25, "entropy": 1.75, "n_valid": 4.0,
    }  # fmt: skip
