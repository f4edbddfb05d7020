"""The dispatcher op ``qwenrl::efe_forward``: one schema, a kernel per device, chosen by torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qwenrl
from qwenrl.loss import dispatch
from qwenrl.loss.options import EFEOptions


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(7, 5, generator=g)
    t = torch.randint(0, 5, (7,), generator=g)
    return z, t


def test_schema_takes_every_option_by_name_and_mutates_only_grad():
    schema = torch.ops.qwenrl.efe_forward.default._schema
    kwargs = [a.name for a in schema.arguments if a.kwarg_only]
    assert kwargs == [f.name for f in dataclasses.fields(EFEOptions)]
    mutated = [
        a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
    ]
    assert mutated == ["grad"]


@pytest.mark.parametrize(
    ("backend", "runs"),
    [("auto", "_cpu_forward"), ("cpu", "_cpu_forward"), ("reference", "reference_forward")],
)
def test_the_cpu_kernel_is_the_extension_unless_the_reference_is_asked_for(
    monkeypatch, backend, runs
):
    """efe_loss on CPU tensors reaches the op's CPU kernel, which runs the C++ extension (or
    the reference when named); the other one is never called."""
    calls = []
    for name in ("_cpu_forward", "reference_forward", "_triton_forward"):
        real = getattr(dispatch, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(dispatch, name, spy)
    z, t = _inputs()
    qwenrl.efe_loss(z.requires_grad_(), t, backend=backend).backward()
    assert calls == [runs]


def test_direct_call_matches_the_loss_and_writes_the_gradient():
    z, t = _inputs(1)
    options = EFEOptions(tau=0.4, easy_weight=0.3, entropy_weight=0.1)
    grads, losses = {}, {}
    for backend in ("auto", "reference"):
        grad = torch.full_like(z, float("nan"))
        loss, sums, _ = torch.ops.qwenrl.efe_forward(
            z, t, None, None, grad, backend, **options.kernel_kwargs()
        )
        assert sums.shape == (5,) and sums.dtype == torch.float32
        grads[backend], losses[backend] = grad, loss
    torch.testing.assert_close(losses["auto"], losses["reference"])
    torch.testing.assert_close(grads["auto"], grads["reference"])
    zz = z.clone().requires_grad_()
    want = qwenrl.efe_loss(zz, t, **options.loss_kwargs())
    want.backward()
    torch.testing.assert_close(losses["auto"], want.detach())
    torch.testing.assert_close(grads["auto"], zz.grad)


def test_fake_kernel_gives_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    z, t = _inputs(2)
    for reduction in ("mean", "none"):
        kw = EFEOptions(reduction=reduction).kernel_kwargs()
        real = torch.ops.qwenrl.efe_forward(z, t, None, None, None, "auto", **kw)
        with FakeTensorMode() as mode:
            fake = torch.ops.qwenrl.efe_forward(
                mode.from_tensor(z), mode.from_tensor(t), None, None, None, "auto", **kw
            )
        for r, f in zip(real, fake):
            assert (r.shape, r.dtype) == (f.shape, f.dtype)


def test_a_device_without_a_fused_kernel_runs_the_reference():
    """The op's default kernel (any device the extension and Triton do not serve) is the
    reference: checked on 'meta' tensors through the fake, and by the table itself."""
    assert dispatch._DEVICE_BACKEND.get("mps", "reference") == "reference"
    name, _ = dispatch.resolve_backend("auto", torch.device("mps"))
    assert name == "reference"


@pytest.mark.parametrize("name", ["SUM_FIELDS", "PER_TOKEN_FIELDS"])
def test_a_stale_extension_build_is_refused_by_name(monkeypatch, name):
    """An extension whose field names differ from Python's (a stale build) does not load as
    the C++ backend: the reason names the tuple and says how to rebuild."""
    import types

    import qwenrl._ext
    from qwenrl.loss import options

    fields = {"SUM_FIELDS": options.SUM_FIELDS, "PER_TOKEN_FIELDS": options.PER_TOKEN_FIELDS}
    fields[name] = tuple(reversed(fields[name]))
    stale = types.SimpleNamespace(**fields)
    monkeypatch.setattr(qwenrl._ext, "require_extension", lambda what: stale)
    why = dispatch._load.__wrapped__("cpu")
    assert why is not None and name in why and "make ext" in why
    fields[name] = tuple(reversed(fields[name]))  # both right again: it loads
    monkeypatch.setattr(
        qwenrl._ext, "require_extension", lambda what: types.SimpleNamespace(**fields)
    )
    assert dispatch._load.__wrapped__("cpu") is None
