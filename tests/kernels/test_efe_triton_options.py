"""row_weight, z_loss and the per-token outputs in the Triton EFE kernels (qwenrl.kernels.efe).

Each row's loss is r_i·(w_i·(risk_i + β·H_i) + λ·lse_i²), its gradient r_i·scale·(w_i·d_i +
2λ·lse_i·q_i), and ``per_token_out`` [4, N] receives PER_TOKEN_FIELDS (logprob, entropy,
correct, lse). Both kernels are held to the float64 reference (``efe_loss_reference``), and
through the public API to the C++ kernel (``backend='cpu'``), which implements the same math.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before Triton is
imported; about a millisecond per program instance): the shapes are tiny and the blocks small,
so that a launch still has several programs (tile kernel) or several C-blocks per row (online
kernel). ``QWENRL_TRITON_TEST_DEVICE=cuda`` runs the same tests compiled on a CUDA GPU.
"""

from __future__ import annotations

import pytest
from triton_device import DEVICE, triton_missing

if triton_missing() is not None:
    pytest.skip(triton_missing(), allow_module_level=True)

import torch  # noqa: E402
from loss_inputs import kernel_options, make_inputs, seed_of  # noqa: E402

from qwenrl._ext import load_extension  # noqa: E402
from qwenrl.kernels import efe as kefe  # noqa: E402
from qwenrl.loss import efe_loss  # noqa: E402
from qwenrl.loss.dispatch import grad_dtype  # noqa: E402
from qwenrl.loss.reference import PER_TOKEN_FIELDS, STAT_NAMES, efe_loss_reference  # noqa: E402

needs_ext = pytest.mark.skipif(load_extension() is None, reason="qwenrl._C is not built")

pytestmark = [
    # Interpreter noise: padding lanes and ignored rows compute -inf - (-inf) before masking.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

# The launch of each kernel: [N, C] and its block override. tile: 16 rows per program, three
# programs (the last one partial); online: C-blocks of 64, five per row (the last one partial).
KERNELS = {
    "tile": dict(shape=(40, 12), launch=dict(online=False, block_n=16)),
    "online": dict(shape=(7, 300), launch=dict(online=True, block_c=64)),
}
Z_LOSS = 0.03


@pytest.fixture(autouse=True)
def _on_test_device():
    """Every tensor a test creates lands on DEVICE (inputs are drawn on the CPU first)."""
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(previous)


def _row_weight(n: int, seed: int) -> torch.Tensor:
    """[n] float32 of both signs, with an exact 0 and a large weight."""
    g = torch.Generator().manual_seed(seed + 7)
    r = torch.randn(n, generator=g, device="cpu") * 1.5
    r[0], r[1], r[-1] = -2.0, 0.0, 4.0
    return r.to(DEVICE)


def _hard_mask(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 11)
    return (torch.rand(n, generator=g, device="cpu") < 0.5).to(DEVICE)


def run_kernel(z, t, *, hard_mask=None, row_weight=None, per_token=True, with_grad=True, **kw):
    """efe_forward_triton with fresh output buffers → (loss, sums, grad | None, per_token | None)."""
    grad = torch.empty(z.shape, dtype=grad_dtype(z.dtype)) if with_grad else None
    tok = torch.full((len(PER_TOKEN_FIELDS), z.shape[0]), 123.0) if per_token else None
    loss, sums = kefe.efe_forward_triton(
        z, t, hard_mask, grad, row_weight=row_weight, per_token_out=tok, **kw
    )
    return loss, sums, grad, tok


def run_reference64(z, t, *, hard_mask=None, row_weight=None, soft=None, **opts):
    """The reference in float64 → (loss, sums, grad of loss.sum(), per_token): the fused
    convention's gradient (of each row's own loss for 'none')."""
    del soft
    zz = z.detach().double().requires_grad_()
    tt = t.double() if t.is_floating_point() else t
    loss, sums, tok = efe_loss_reference(
        zz, tt, hard_mask=hard_mask, row_weight=row_weight, return_per_token=True, **opts
    )
    loss.sum().backward()
    return loss.detach(), sums, zz.grad, tok


def assert_per_token_close(tok, tok64, *, atol=2e-5):
    for i, name in enumerate(PER_TOKEN_FIELDS):
        torch.testing.assert_close(
            tok[i].double(), tok64[i].double(), rtol=2e-5, atol=atol, msg=name
        )


def assert_matches(got, want, *, grad_rtol=1e-4, grad_atol=1e-6, loss_tol=2e-5, tok_atol=2e-5):
    loss, sums, grad, tok = got
    loss64, sums64, grad64, tok64 = want
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=loss_tol)
    torch.testing.assert_close(sums.double(), sums64.double(), rtol=1e-4, atol=1e-4)
    if grad is not None:
        torch.testing.assert_close(grad.double(), grad64, rtol=grad_rtol, atol=grad_atol)
    if tok is not None:
        assert tok.dtype == torch.float32 and tok.shape == tok64.shape
        assert_per_token_close(tok, tok64, atol=tok_atol)


# --- the kernels against the float64 reference --------------------------------------------


@pytest.mark.parametrize("kind", ["class", "soft", "log"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_all_options_match_reference(kernel, kind, reduction):
    """row_weight (both signs) + z_loss + per-token outputs, with ignored rows (class targets)
    and a hard mask ('sum'): loss, gradient, sums and per-token outputs."""
    (n, c), launch = KERNELS[kernel]["shape"], KERNELS[kernel]["launch"]
    seed = seed_of("options", kernel, kind, reduction)
    z, t = make_inputs(n, c, kind, seed)
    if kind == "class":
        t[2] = -100  # at least one ignored row, with a nonzero row weight
    opts = kernel_options(kind, reduction, z_loss=Z_LOSS)
    extra = dict(row_weight=_row_weight(n, seed))
    if reduction == "sum":
        extra["hard_mask"] = _hard_mask(n, seed)
    got = run_kernel(z, t, **extra, **opts, **launch)
    assert_matches(got, run_reference64(z, t, **extra, **opts))
    if kind == "class":
        assert (got[3][:, t == -100] == 0).all()  # the per-token outputs of ignored rows
        assert (got[2][t == -100] == 0).all()


@pytest.mark.parametrize("option", ["row_weight", "z_loss", "per_token"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_each_option_alone(kernel, option):
    """Each flag on its own (the others off), class targets, 'mean' over N_valid."""
    (n, c), launch = KERNELS[kernel]["shape"], KERNELS[kernel]["launch"]
    seed = seed_of("alone", kernel, option)
    z, t = make_inputs(n, c, "class", seed)
    opts = kernel_options("class", "mean", z_loss=Z_LOSS if option == "z_loss" else 0.0)
    extra = dict(row_weight=_row_weight(n, seed)) if option == "row_weight" else {}
    got = run_kernel(z, t, per_token=option == "per_token", **extra, **opts, **launch)
    assert (got[3] is not None) == (option == "per_token")
    assert_matches(got, run_reference64(z, t, **extra, **opts))


@pytest.mark.parametrize("kind", ["class", "soft"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_without_gradient(kernel, kind):
    """No gradient buffer (WRITE_GRAD off): per-row weighted losses and per-token outputs."""
    (n, c), launch = KERNELS[kernel]["shape"], KERNELS[kernel]["launch"]
    seed = seed_of("nograd", kernel, kind)
    z, t = make_inputs(n, c, kind, seed)
    opts = kernel_options(kind, "none", z_loss=Z_LOSS)
    rw = _row_weight(n, seed)
    got = run_kernel(z, t, row_weight=rw, with_grad=False, **opts, **launch)
    assert got[2] is None
    assert_matches(got, run_reference64(z, t, row_weight=rw, **opts))


@pytest.mark.parametrize("kind", ["class", "soft"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradient_in_place_over_the_logits(kernel, kind):
    """grad may be the logits tensor itself with every option on: the per-token outputs and
    the gradient come from values read before the row is overwritten."""
    (n, c), launch = KERNELS[kernel]["shape"], KERNELS[kernel]["launch"]
    seed = seed_of("inplace", kernel, kind)
    z, t = make_inputs(n, c, kind, seed)
    opts = kernel_options(kind, "mean", z_loss=Z_LOSS)
    rw = _row_weight(n, seed)
    loss, sums, grad, tok = run_kernel(z, t, row_weight=rw, **opts, **launch)
    zz = z.clone()
    tok_b = torch.empty_like(tok)
    loss_b, sums_b = kefe.efe_forward_triton(
        zz, t, None, zz, row_weight=rw, per_token_out=tok_b, **opts, **launch
    )
    for a, b in ((zz, grad), (loss_b, loss), (sums_b, sums), (tok_b, tok)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_all_rows_ignored_stay_zero(kernel, reduction):
    """Ignored rows add nothing, whatever their weight and lse: loss, gradient and per-token
    outputs are 0, not NaN (the online kernel's lse is -inf on a row it never reads)."""
    (n, c), launch = KERNELS[kernel]["shape"], KERNELS[kernel]["launch"]
    z, _ = make_inputs(n, c, "class", seed_of("ignored", kernel, reduction))
    t = torch.full((n,), -100)
    opts = kernel_options("class", reduction, z_loss=Z_LOSS)
    loss, sums, grad, tok = run_kernel(z, t, row_weight=_row_weight(n, 3), **opts, **launch)
    for out in (loss, sums, grad, tok):
        assert not torch.isnan(out).any() and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["class", "soft"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_low_precision_logits(kernel, kind, dtype):
    """bf16 / fp16 logits (and soft targets): fp32 math on the exact low-precision values, the
    gradient stored in grad_dtype (bf16, or fp32 for fp16)."""
    (n, c), launch = KERNELS[kernel]["shape"], KERNELS[kernel]["launch"]
    seed = seed_of("lowp", kernel, kind, dtype)
    z, t = make_inputs(n, c, kind, seed, dtype=dtype)
    t = t.to(dtype) if kind == "soft" else t
    opts = kernel_options(kind, "mean", z_loss=Z_LOSS)
    rw = _row_weight(n, seed)
    got = run_kernel(z, t, row_weight=rw, **opts, **launch)
    assert got[2].dtype == grad_dtype(dtype)
    want = run_reference64(z, t, row_weight=rw, **opts)
    scale = want[2].abs().max().item()
    assert_matches(got, want, grad_rtol=1e-2, grad_atol=1e-2 * scale, loss_tol=1e-4, tok_atol=1e-4)


# --- NaN rows and masked classes, against the C++ kernel ------------------------------------


@needs_ext
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_nan_rows_and_masked_classes_match_cpp(kernel):
    """On a NaN row (NaN or +inf logit, every class masked, out-of-range target) the per-token
    floats are NaN and correct is 0; a masked target class gives logprob = -inf; a masked
    non-target class is finite. As the C++ kernel, row for row; the other rows as the reference."""
    (n, c), launch = KERNELS[kernel]["shape"], KERNELS[kernel]["launch"]
    n = max(n, 9)
    z, t = make_inputs(n, c, "class", seed_of("nan", kernel), ignore_frac=0.0)
    z[0, t[0]] = float("-inf")  # masked target class: infinite risk, logprob -inf
    z[1, (t[1] + 1) % c] = float("-inf")  # masked other class: finite
    z[2, 3] = float("nan")
    z[3, 0] = float("inf")
    z[4, :] = float("-inf")  # every class masked
    t[2], t[3], t[4] = 3, 0, 0  # where argmax z lands on those rows: still not correct
    t[5], t[6], t[7] = c + 10**6, -7, -100  # out of range (not validated) twice, ignored
    # No smoothing: it would put mass on the masked class (an infinite risk).
    opts = kernel_options("class", "none", z_loss=Z_LOSS, label_smoothing=0.0)
    rw = _row_weight(n, 5)
    loss, _, _, tok = run_kernel(z, t, row_weight=rw, with_grad=False, **opts, **launch)

    ext = load_extension()
    cpu = [x.cpu() for x in (z, t, rw)]
    loss_c, _, tok_c = ext.efe_forward(
        *cpu[:2], None, cpu[2], None, validate=False, per_token=True, **opts
    )
    nan_rows = [2, 3, 4, 5, 6]
    assert torch.isnan(tok[[0, 1, 3]][:, nan_rows]).all()  # logprob, entropy, lse
    assert (tok[2, nan_rows] == 0).all()
    assert (tok[:, 7] == 0).all()
    assert tok[0, 0] == float("-inf") and torch.isfinite(tok[:, 1]).all()
    torch.testing.assert_close(tok.cpu(), tok_c, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(loss.cpu(), loss_c, rtol=2e-5, atol=2e-5, equal_nan=True)
    good = [1, 7, *range(8, n)]
    want = run_reference64(z[good], t[good], row_weight=rw[good], **opts)
    torch.testing.assert_close(loss[good].double(), want[0], rtol=2e-5, atol=2e-5)
    assert_per_token_close(tok[:, good], want[3])


# --- the public API: backend='triton' equals backend='cpu' -----------------------------------


@pytest.fixture(params=list(KERNELS))
def routed(request, monkeypatch):
    """Routes efe_loss to one kernel with small blocks (as KERNELS): [N, C] by name."""
    if request.param == "tile":
        monkeypatch.setattr(kefe, "TILE_ELEMS", 16 * 16)  # 16 rows of 16 (C = 12 padded)
    else:
        monkeypatch.setattr(kefe, "MAX_TILE_C", 64)
        monkeypatch.setattr(kefe, "ONLINE_BLOCK_C", 64)
    return KERNELS[request.param]["shape"]


@needs_ext
@pytest.mark.parametrize("kind", ["class", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_public_api_matches_cpp(routed, kind, reduction):
    """efe_loss(..., backend='triton', row_weight=, z_loss=, return_per_token=True) on [2, N/2, C]
    logits: loss, stats, per-token outputs and the logits' gradient (grad_output ≠ 1) equal the
    C++ backend's."""
    n, c = routed
    n -= n % 2
    seed = seed_of("api", n, c, kind, reduction)
    z, t = make_inputs(n, c, kind, seed)
    z, t = z.reshape(2, n // 2, c), t.reshape(2, n // 2, *t.shape[1:])
    rw = _row_weight(n, seed).reshape(2, n // 2)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (2, n // 2) if reduction == "none" else ()
    grad_out = (torch.randn(shape, generator=g, device="cpu") * 0.5 + 1.3).to(DEVICE)
    opts = dict(
        reduction=reduction, z_loss=Z_LOSS, entropy_weight=0.2, label_smoothing=0.05, tau=0.5
    )

    def run(backend, zz, tt, rr, go):
        leaf = zz.detach().clone().requires_grad_()
        loss, stats, tok = efe_loss(
            leaf,
            tt,
            backend=backend,
            row_weight=rr,
            return_stats=True,
            return_per_token=True,
            **opts,
        )
        loss.backward(go)
        return loss.detach(), stats, tok, leaf.grad

    loss, stats, tok, grad = run("triton", z, t, rw, grad_out)
    loss_c, stats_c, tok_c, grad_c = run("cpu", z.cpu(), t.cpu(), rw.cpu(), grad_out.cpu())
    torch.testing.assert_close(loss.cpu(), loss_c, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.cpu(), grad_c, rtol=1e-4, atol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name].cpu(), stats_c[name], rtol=1e-4, atol=1e-5)
    assert set(tok) == set(PER_TOKEN_FIELDS)
    for name in PER_TOKEN_FIELDS:
        assert tok[name].shape == (2, n // 2)
        torch.testing.assert_close(tok[name].cpu(), tok_c[name], rtol=2e-5, atol=2e-5, msg=name)


def test_public_api_without_per_token_returns_no_buffer():
    """per_token off: the dispatcher's third output is empty, and the loss is the same."""
    from qwenrl.loss.dispatch import efe_forward

    z, t = make_inputs(6, 12, "class", seed_of("empty"))
    conv = dict(kernel_options("class", "mean"), validate=True, z_loss=0.0)
    for per_token in (False, True):
        loss, sums, tok = efe_forward(z, t, None, None, None, "triton", per_token=per_token, **conv)
        assert tok.dtype == torch.float32
        assert tok.shape == ((len(PER_TOKEN_FIELDS), 6) if per_token else (0,))


# --- the launcher's arguments and flags --------------------------------------------------------


def test_bad_buffers_are_refused():
    z, t = make_inputs(5, 12, "class", seed_of("bad"))
    conv = kernel_options("class", "mean")
    for tok in (torch.empty(4, 6), torch.empty(4, 5, dtype=torch.float64), torch.empty(5, 4).T):
        with pytest.raises(ValueError, match="per_token_out"):
            kefe.efe_forward_triton(z, t, None, None, per_token_out=tok, **conv)
    with pytest.raises(ValueError, match="row_weight"):
        kefe.efe_forward_triton(z, t, None, None, row_weight=torch.ones(6), **conv)


def test_kernel_flags_of_the_options():
    """The three flags are off by default (the plain loss, what bench/gpu_compile.py compiles)
    and follow their option; z_loss = 0 costs nothing."""
    base = dict(soft=False, log_target=False, label_smoothing=0.0, reduction="mean", has_mask=False)
    plain = kefe.kernel_flags(**base, has_grad=True)
    assert not (plain["HAS_ROW_WEIGHT"] or plain["HAS_Z_LOSS"] or plain["WRITE_PER_TOKEN"])
    assert kefe.kernel_flags(**base, has_grad=True, z_loss=0.0) == plain
    on = kefe.kernel_flags(**base, has_grad=True, has_row_weight=True, z_loss=0.1, per_token=True)
    assert on == {**plain, "HAS_ROW_WEIGHT": True, "HAS_Z_LOSS": True, "WRITE_PER_TOKEN": True}
