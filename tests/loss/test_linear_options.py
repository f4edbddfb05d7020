"""row_weight, z_loss and the per-token outputs of linear_efe_loss, against the float64 loss of
the materialised logits: ``efe_loss_reference(hidden @ weight.T + bias, ...)``.

Every case compares the loss, the stats, the per-token outputs and the gradients of hidden,
weight and bias, in each way the gradients can be computed: in the forward (no ``.grad`` yet),
added into an existing ``weight.grad`` in the backward, a fresh gradient although ``.grad``
exists (``weight_grad_in_place=False``), and the rows backward of ``'none'``.
"""

from __future__ import annotations

import pytest
import torch
from loss_inputs import (
    LINEAR_BACKENDS,
    WEIGHT_GRAD_MODES,
    assert_linear_call_raises,
    assert_linear_matches,
    grad_out_for,
    needs_ext,
    run_linear_modes,
    seed_of,
    skip_under_mutmut,
)

import qwenrl
from qwenrl.loss import chunks, efe_loss_reference, linear, linear_op
from qwenrl.loss.dispatch import resolve_backend
from qwenrl.loss.options import EFEOptions
from qwenrl.loss.reference import PER_TOKEN_FIELDS


def make(n, d, v, seed, *, kind="class", ignore_frac=0.25, dtype=torch.float32):
    """hidden [n, d], weight [v, d], bias [v], a target, row weights of both signs, a mask."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g) * 0.5
    if kind == "class":
        t = torch.randint(0, v, (n,), generator=g)
        t[torch.rand(n, generator=g) < ignore_frac] = -100
    else:
        t = torch.softmax(torch.randn(n, v, generator=g) * 2, -1)
    rw = torch.randn(n, generator=g) * 1.5
    mask = torch.rand(n, generator=g) < 0.5
    return h.to(dtype), w.to(dtype), b.to(dtype), t, rw, mask


def reference(h, w, b, t, grad_out, *, row_weight=None, hard_mask=None, **opts):
    """The float64 truth on the materialised logits: (loss, sums, per_token [4, N], grads)."""
    leaves = [x.detach().double().requires_grad_() for x in (h, w, b)]
    hh, ww, bb = leaves
    v = w.shape[0]
    soft = t.is_floating_point()
    logits = (hh @ ww.T + bb).reshape(-1, v)
    loss, sums, tok = efe_loss_reference(
        logits,
        t.double().reshape(-1, v) if soft else t.reshape(-1),
        row_weight=None if row_weight is None else row_weight.double().reshape(-1),
        hard_mask=None if hard_mask is None else hard_mask.reshape(-1),
        return_per_token=True,
        **opts,
    )
    if opts.get("reduction") == "none":
        loss = loss.reshape(h.shape[:-1])
    loss.backward(grad_out.double())
    return loss.detach(), sums, tok, tuple(x.grad for x in leaves)


# What each case adds to the call: one option alone, then all of them with label smoothing,
# β, a hard mask and ignored rows.
CASES = {
    "row_weight": lambda rw, mask: {"row_weight": rw},
    "z_loss": lambda rw, mask: {"z_loss": 0.02},
    "plain": lambda rw, mask: {},  # per-token outputs alone (every case returns them)
    "combined": lambda rw, mask: {
        "row_weight": rw,
        "z_loss": 0.05,
        "hard_mask": mask,
        "label_smoothing": 0.1,
        "entropy_weight": 0.3,
        "tau": 0.4,
        "easy_weight": 0.25,
    },
}


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", WEIGHT_GRAD_MODES)
def test_matches_float64_materialised_reference(backend, reduction, case, mode):
    """37 rows in chunks of 5 (the last one short), ignored rows, an upstream gradient ≠ 1."""
    n, d, v = 37, 12, 53
    h, w, b, t, rw, mask = make(n, d, v, seed_of("options", reduction, case))
    opts = dict(CASES[case](rw, mask), reduction=reduction)
    go = grad_out_for(reduction, n, seed_of("go", reduction, case))
    ours = run_linear_modes(h, w, b, t, go, mode, chunk_size=5, backend=backend, **opts)
    assert_linear_matches(ours, reference(h, w, b, t, go, **opts))


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_targets_with_every_option(reduction):
    h, w, b, t, rw, mask = make(29, 8, 41, seed_of("soft", reduction), kind="soft")
    opts = {**CASES["combined"](rw, mask), "reduction": reduction}
    go = grad_out_for(reduction, 29, 3)
    for mode in WEIGHT_GRAD_MODES:
        assert_linear_matches(
            run_linear_modes(h, w, b, t, go, mode, chunk_size=6, **opts),
            reference(h, w, b, t, go, **opts),
        )


@needs_ext
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100, None])
def test_uneven_chunks_and_batched_rows(chunk_size):
    """hidden [2, 3, 7, D]: loss, per-token outputs and row_weight keep the rows' shape."""
    h, w, b, t, rw, mask = make(42, 8, 29, seed_of("batched", chunk_size))
    h3, t3, rw3, mask3 = (
        h.reshape(2, 3, 7, 8),
        t.reshape(2, 3, 7),
        rw.reshape(2, 3, 7),
        mask.reshape(2, 3, 7),
    )
    for reduction in ("mean", "none"):
        opts = {**CASES["combined"](rw3, mask3), "reduction": reduction}
        go = grad_out_for(reduction, 42, 4)
        go = go.reshape(2, 3, 7) if reduction == "none" else go
        ours = run_linear_modes(h3, w, b, t3, go, chunk_size=chunk_size, **opts)
        assert ours[2]["lse"].shape == (2, 3, 7) and ours[3][0].shape == h3.shape
        assert_linear_matches(ours, reference(h3, w, b, t3, go, **opts))


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_no_grad_returns_the_same_loss_and_per_token(backend):
    h, w, b, t, rw, mask = make(33, 8, 30, seed_of("nograd", backend))
    opts = {**CASES["combined"](rw, mask), "reduction": "none"}
    truth = reference(h, w, b, t, torch.ones(33), **opts)
    with torch.no_grad():
        loss, stats, tok = qwenrl.linear_efe_loss(
            h.requires_grad_(), w, t, bias=b, chunk_size=4, backend=backend,
            return_stats=True, return_per_token=True, **opts,
        )  # fmt: skip
    assert not loss.requires_grad
    assert_linear_matches((loss, stats, tok, ()), (*truth[:3], ()))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_weight_follows_the_row_selection(reduction):
    """Ignored rows dropped before the matmul (the CPU way) or kept in it (the CUDA way): the
    row weights and per-token outputs go with their rows either way, also in a backward pass
    that runs the chunks again."""
    n = 30
    h, w, b, t, rw, mask = make(n, 8, 20, seed_of("select", reduction), ignore_frac=0.4)
    _, forward_fn = resolve_backend("auto", torch.device("cpu"))
    options = EFEOptions(entropy_weight=0.2, z_loss=0.01, reduction=reduction, per_token=True)
    opts = {"entropy_weight": 0.2, "z_loss": 0.01, "reduction": reduction, "hard_mask": mask}
    up = grad_out_for(reduction, n, 6)
    truth = reference(h, w, b, t, up, row_weight=rw, **opts)
    for drop in (True, False):
        settings = chunks.ChunkSettings(forward_fn, options, 7, drop)
        tok = torch.full((4, n), float("nan"))  # every column must be written
        p = chunks.LinearProblem(h, w, b, t, mask, settings, rw, None, tok)
        loss, sums = chunks.chunked_loss(p)
        torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tok.double(), truth[2].double(), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(sums, truth[1].float(), rtol=1e-5, atol=1e-5)
        p = chunks.LinearProblem(h, w, b, t, mask, settings, rw)
        grads = chunks.chunked_grads(p, (True, True, True), up)
        for g, g64 in zip(grads, truth[3]):
            torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """bf16/fp16 hidden, weight and bias: close to the float64 truth of those very values
    (loose: the gradients come back rounded to ``dtype``)."""
    h, w, b, t, rw, mask = make(64, 32, 300, seed_of("low", dtype), dtype=dtype)
    opts = {**CASES["combined"](rw, mask), "reduction": "mean"}
    ours = run_linear_modes(h, w, b, t, torch.tensor(1.0), chunk_size=24, **opts)
    loss64, sums64, tok64, grads64 = reference(h, w, b, t, torch.tensor(1.0), **opts)
    torch.testing.assert_close(ours[0].double(), loss64, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ours[2]["lse"].double(), tok64[3].double(), rtol=1e-3, atol=1e-3)
    for g, g64 in zip(ours[3], grads64):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), g64, rtol=2e-2, atol=2e-2 * g64.abs().max().item())


def test_module_takes_row_weight():
    h, w, b, t, rw, _ = make(23, 8, 19, seed_of("module"))
    crit = qwenrl.LinearEFELoss(chunk_size=6, z_loss=0.01)
    got = crit(h, w, t, bias=b, row_weight=rw)
    want = qwenrl.linear_efe_loss(h, w, t, bias=b, row_weight=rw, z_loss=0.01)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, crit(h, w, t, bias=b))  # the weights mattered


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"row_weight": torch.ones(4, 5)}, ValueError, r"row_weight shape \(4, 5\)"),
        (
            {"row_weight": torch.ones(4, 6, dtype=torch.long)},
            TypeError,
            "row_weight must be a floating",
        ),
        ({"row_weight": [1.0] * 24}, TypeError, "row_weight must be a floating tensor, got list"),
        ({"row_weight": torch.ones(4, 6, requires_grad=True)}, ValueError, "requires grad"),
        ({"row_weight": torch.ones(4, 6, device="meta")}, ValueError, "row_weight is on meta"),
        ({"z_loss": -0.1}, ValueError, "z_loss"),
        ({"target": None}, TypeError, "only a distillation call"),
    ],
)
def test_bad_inputs(kwargs, error, pattern):
    assert_linear_call_raises(kwargs, error, pattern)


# --- torch.compile: the custom ops carry row_weight and return the per-token outputs ---------


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_compiled_branch_carries_the_options(monkeypatch, reduction):
    """With is_compiling() forced on (eagerly), the loss goes through the custom op and its
    registered autograd (the rows backward for 'none'): the same loss, per-token outputs and
    gradients as the eager Function."""
    h, w, b, t, rw, mask = make(31, 8, 27, seed_of("op-branch", reduction))
    opts = {**CASES["combined"](rw, mask), "reduction": reduction, "chunk_size": 6}
    go = grad_out_for(reduction, 31, 7)
    want = run_linear_modes(h, w, b, t, go, **opts)
    calls = []
    real = linear_op.linear_efe_fused
    monkeypatch.setattr(
        linear, "linear_efe_fused", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = run_linear_modes(h, w, b, t, go, **opts)
    assert len(calls) == 1 and calls[0][8] is not None  # row_weight reached the op
    torch.testing.assert_close(got[0], want[0])
    for name in PER_TOKEN_FIELDS:
        torch.testing.assert_close(got[2][name], want[2][name])
    for g, g_want in zip(got[3], want[3]):
        torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_token", [False, True])
def test_op_fake_matches_the_real_outputs(per_token):
    h, w, b, t, rw, _ = make(17, 8, 23, seed_of("fake", per_token))
    options = EFEOptions(reduction="mean", z_loss=0.01, per_token=per_token)
    args = (h, w, b, t, None, "reference", 5, [True, True, True], rw)
    real = linear_op.linear_efe_fused(*args, **options.kernel_kwargs())
    fake = linear_op._linear_efe_fused_fake(*args, **options.kernel_kwargs())
    assert [(x.shape, x.dtype) for x in fake] == [(x.shape, x.dtype) for x in real]
    assert real[5].shape == ((4, 17) if per_token else (0,))


@needs_ext
@skip_under_mutmut
@pytest.mark.parametrize("feature", ["row_weight", "z_loss", "per_token", "row_weight_none"])
def test_compiles_fullgraph(feature):
    """A projection and an LM head compiled with fullgraph=True: each feature gives the eager
    loss, per-token outputs and gradients."""
    h, w, b, t, rw, _ = make(40, 12, 50, seed_of("compile", feature))
    proj = torch.nn.Linear(12, 12)
    head = torch.nn.Linear(12, 50)
    reduction = "none" if feature == "row_weight_none" else "mean"
    go = torch.randn(40) if reduction == "none" else torch.tensor(1.3)
    kw = {
        "row_weight": {"row_weight": rw},
        "row_weight_none": {"row_weight": rw},
        "z_loss": {"z_loss": 0.03},
        "per_token": {"return_per_token": True},
    }[feature]

    def model(x, target):
        out = qwenrl.linear_efe_loss(
            proj(x), head.weight, target, bias=head.bias, chunk_size=16, reduction=reduction, **kw
        )
        return out if isinstance(out, tuple) else (out, {})

    def grads_of(fn):
        for p in (*proj.parameters(), *head.parameters()):
            p.grad = None
        loss, tok = fn(h, t)
        loss.backward(go)
        return (
            loss.detach(),
            tok,
            [p.grad.clone() for p in (*proj.parameters(), *head.parameters())],
        )

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c, tok_c, grads_c = grads_of(compiled)
    loss_e, tok_e, grads_e = grads_of(model)
    torch.testing.assert_close(loss_c, loss_e)
    assert set(tok_c) == set(tok_e)
    for name in tok_e:
        torch.testing.assert_close(tok_c[name], tok_e[name])
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
