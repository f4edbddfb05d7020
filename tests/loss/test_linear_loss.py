"""The fused linear + EFE loss against the float64 loss of the materialised logits.

The spec is ``efe_loss_reference(hidden @ weight.T + bias, target)`` in float64; every case
compares the loss, the stats and the gradients of hidden, weight and bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_inputs import (
    LINEAR_BACKENDS,
    assert_compiled_matches_eager,
    assert_linear_call_raises,
    assert_linear_matches,
    distill_reference,
    grad_out_for,
    make_distill,
    needs_ext,
    run_linear_modes,
    run_linear_reference,
    seed_of,
    skip_under_mutmut,
    weight_grad_into_recorded,
)

import qwenrl
from qwenrl.loss import (
    chunks,
    distill,
    efe_loss,
    efe_loss_reference,
    grad_engine,
    linear,
    linear_op,
    stats_from_sums,
)
from qwenrl.loss.dispatch import resolve_backend
from qwenrl.loss.options import EFEOptions
from qwenrl.loss.reference import STAT_NAMES


def make_linear_inputs(n, d, v, kind, seed, *, bias=True, ignore_frac=0.2, dtype=torch.float32):
    """hidden [n, d], weight [v, d], bias [v] (or None) and a target of the given kind."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    if kind == "class":
        t = torch.randint(0, v, (n,), generator=g)
        t[torch.rand(n, generator=g) < ignore_frac] = -100
    else:
        p = torch.softmax(torch.randn(n, v, generator=g) * 2, -1)
        t = p.log() if kind == "log" else p
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(h), cast(w), cast(b), t


def run(h, w, b, t, grad_out=None, **opts):
    """Loss, stats and the gradients (hidden, weight, bias) through linear_efe_loss."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    hh, ww, bb = leaves
    loss, stats = qwenrl.linear_efe_loss(hh, ww, t, bias=bb, return_stats=True, **opts)
    go = torch.ones_like(loss) if grad_out is None else grad_out
    loss.backward(go.to(loss.dtype))
    return loss.detach(), stats, tuple(None if x is None else x.grad for x in leaves)


def assert_matches(ours, truth, *, rtol=1e-4, atol=1e-5):
    loss, stats, grads = ours
    loss64, grads64, stats64 = truth.loss, truth.grad, truth.stats
    torch.testing.assert_close(loss.double(), loss64, rtol=rtol, atol=atol)
    for name in STAT_NAMES:
        torch.testing.assert_close(
            stats[name].double(), stats64[name].double(), rtol=1e-4, atol=1e-5
        )
    for g, g64 in zip(grads, grads64):
        assert (g is None) == (g64 is None)
        if g is not None:
            torch.testing.assert_close(g.double(), g64, rtol=rtol, atol=atol)


OPTION_SETS = [
    {},
    {"tau": 0.3, "easy_weight": 0.25, "entropy_weight": 0.4},  # β > 0
    {"label_smoothing": 0.1, "entropy_weight": 0.2},
    {"tau": 1.1, "easy_weight": 0.0, "label_smoothing": 0.05},  # every row hard
    {"tau": 0.0, "easy_weight": 1.0},  # cross-entropy
]


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("kind", ["class", "soft", "log"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt_index", range(len(OPTION_SETS)))
def test_matches_float64_materialised_reference(backend, kind, reduction, opt_index):
    """Odd sizes, a chunk that does not divide N, a bias, an upstream gradient ≠ 1."""
    n, d, v = 37, 24, 131
    seed = seed_of("linear", backend, kind, reduction, opt_index)
    h, w, b, t = make_linear_inputs(n, d, v, kind, seed)
    opts = dict(OPTION_SETS[opt_index], reduction=reduction, log_target=kind == "log")
    grad_out = torch.randn(n) if reduction == "none" else torch.tensor(1.7)
    ours = run(h, w, b, t, grad_out, backend=backend, chunk_size=5, **opts)
    assert_matches(ours, run_linear_reference(h, w, b, t, grad_out, **opts))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "n, d, v", [(4096, 1024, 32000), (2048, 1024, 151936), (32768, 4096, 151936), (7, 8, 13)]
)
def test_default_chunk_size(device, n, d, v):
    """Enough rows for the matmuls (the hidden-size rule, the logits budget, the floor), a
    power of two, never more than N, and no more logits than the larger of the two rules."""
    dev = torch.device(device)
    rows = chunks.default_chunk_size(n, d, v, dev, 4)
    floor = chunks.MIN_CHUNK_ROWS[device]
    assert rows <= n and (rows == n or rows & (rows - 1) == 0)
    assert rows >= min(n, floor)
    assert rows * v * 4 >= min(n * v * 4, chunks.CHUNK_LOGITS_BYTES / 2)  # budget used
    if rows > floor:  # above the floor: at most 2× the hidden states or the budget
        assert rows * v * 4 <= max(2 * n * d * 4, chunks.CHUNK_LOGITS_BYTES)
    # half-size logits fit twice as many rows in the budget
    assert chunks.default_chunk_size(n, d, v, dev, 2) >= rows


@needs_ext
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 40, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_chunk_sizes_and_batched_shape(chunk_size, bias):
    """hidden [..., D] with any chunk size: 1, odd, N not a multiple, larger than N, auto."""
    h, w, b, t = make_linear_inputs(
        2 * 3 * 7, 16, 97, "class", seed_of("chunks", chunk_size, bias), bias=bias
    )
    h3, t3 = h.reshape(2, 3, 7, 16), t.reshape(2, 3, 7)
    opts = {"entropy_weight": 0.3, "label_smoothing": 0.05}
    for reduction in ("mean", "none"):
        ours = run(h3, w, b, t3, chunk_size=chunk_size, reduction=reduction, **opts)
        assert ours[0].shape == (() if reduction == "mean" else (2, 3, 7))
        assert ours[2][0].shape == h3.shape
        assert_matches(ours, run_linear_reference(h3, w, b, t3, reduction=reduction, **opts))


@needs_ext
def test_qwen_vocabulary():
    """V = 151,936 (Qwen's vocabulary) with a handful of rows and a chunk that does not divide them."""
    h, w, b, t = make_linear_inputs(5, 32, 151936, "class", seed_of("vocab"), ignore_frac=0.0)
    t[3] = -100
    opts = {"entropy_weight": 0.2, "label_smoothing": 0.05, "tau": 0.5}
    ours = run(h, w, b, t, torch.tensor(0.7), chunk_size=2, **opts)
    assert_matches(ours, run_linear_reference(h, w, b, t, torch.tensor(0.7), **opts), atol=1e-6)


@needs_ext
def test_hard_mask():
    h, w, b, t = make_linear_inputs(30, 8, 40, "class", seed_of("mask"))
    mask = torch.rand(30, generator=torch.Generator().manual_seed(3)) < 0.5
    for reduction in ("mean", "none"):
        ours = run(h, w, b, t, chunk_size=7, hard_mask=mask, reduction=reduction)
        assert_matches(ours, run_linear_reference(h, w, b, t, hard_mask=mask, reduction=reduction))


@needs_ext
def test_equals_efe_loss_on_the_logits():
    """Same loss and stats as efe_loss on the materialised logits (same C++ kernel)."""
    h, w, b, t = make_linear_inputs(64, 16, 300, "class", seed_of("same"))
    opts = {"tau": 0.4, "entropy_weight": 0.1}
    loss, stats = qwenrl.linear_efe_loss(h, w, t, bias=b, chunk_size=9, return_stats=True, **opts)
    loss_m, stats_m = efe_loss(F.linear(h, w, b), t, return_stats=True, **opts)
    torch.testing.assert_close(loss, loss_m, rtol=1e-5, atol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name], stats_m[name])


@needs_ext
def test_cross_entropy_mode_equals_torch():
    h, w, b, t = make_linear_inputs(50, 16, 77, "class", seed_of("ce"))
    loss, _, grads = run(h, w, b, t, chunk_size=8, tau=0.0, easy_weight=1.0)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    ce = F.cross_entropy(F.linear(hh, ww, bb), t)
    ce.backward()
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-5, atol=1e-6)
    for g, x in zip(grads, (hh, ww, bb)):
        torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-6)


# --- what the chunking promises -------------------------------------------------------------


def spy_forward(calls):
    """A fused backend (the C++ kernel, else the reference) that records each chunk's logits."""
    _, forward_fn = resolve_backend("auto", torch.device("cpu"))

    def spy(logits, target, hard_mask, row_weight, grad, options):
        over_logits = grad is not None and grad.data_ptr() == logits.data_ptr()
        calls.append((tuple(logits.shape), grad is not None, options.reduction, over_logits))
        return forward_fn(logits, target, hard_mask, row_weight, grad, options)

    return spy


def problem(h, w, b, t, mask, forward_fn, options, chunk, drop_ignored=None):
    """A chunks.LinearProblem of these flattened inputs."""
    settings = chunks.ChunkSettings(forward_fn, options, chunk, drop_ignored)
    return chunks.LinearProblem(h, w, b, t, mask, settings)


def test_never_more_than_a_chunk_of_logits_and_ignored_rows_skip_the_matmul():
    h, w, b, t = make_linear_inputs(50, 8, 33, "class", seed_of("spy"), ignore_frac=0.0)
    t[::3] = -100  # 17 ignored rows, 33 valid
    calls = []
    options = EFEOptions(entropy_weight=0.2)
    loss, sums, gh, gw, gb = chunks.chunked_loss_and_grads(
        problem(h, w, b, t, None, spy_forward(calls), options, 8), (True, True, True)
    )
    assert [c[0] for c in calls] == [(8, 33)] * 4 + [(1, 33)]  # only the 33 valid rows
    assert all(c[1] and c[2] == "sum" for c in calls)
    assert all(c[3] for c in calls)  # float32: the gradient overwrites the logits, no 2nd buffer
    assert (gh[::3] == 0).all() and gh.shape == h.shape
    ref, _ = efe_loss_reference(F.linear(h, w, b), t, entropy_weight=0.2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert sums[4].item() == 33


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_kept_in_the_matmul(reduction):
    """The CUDA way (no host sync): ignored rows go through the matmul, N_valid stays a tensor."""
    h, w, b, t = make_linear_inputs(30, 8, 20, "class", seed_of("keep", reduction), ignore_frac=0.4)
    calls = []
    options = EFEOptions(entropy_weight=0.3, reduction=reduction)
    p = problem(h, w, b, t, None, spy_forward(calls), options, 8, drop_ignored=False)
    if reduction == "none":  # the loss in one pass, the gradients (upstream 1) in another
        loss, _ = chunks.chunked_loss(p)
        gh, gw, gb = chunks.chunked_grads(p, (True, True, True), torch.ones(30))
        assert sum(c[0][0] for c in calls) == 60
        calls = calls[: len(calls) // 2]
    else:
        loss, _, gh, gw, gb = chunks.chunked_loss_and_grads(p, (True, True, True))
    assert sum(c[0][0] for c in calls) == 30
    truth = run_linear_reference(h, w, b, t, entropy_weight=0.3, reduction=reduction)
    torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-6)
    for g, g64 in zip((gh, gw, gb), truth[2]):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_backend(reduction):
    """The GPU path's kernel (here in Triton's interpreter) behind the same chunk loop."""
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
    h, w, b, t = make_linear_inputs(19, 8, 40, "class", seed_of("triton", reduction))
    opts = {"entropy_weight": 0.2, "label_smoothing": 0.1, "reduction": reduction}
    ours = run(h, w, b, t, backend="triton", chunk_size=6, **opts)
    assert_matches(ours, run_linear_reference(h, w, b, t, **opts))


def test_frozen_weight_and_bias_cost_nothing(monkeypatch):
    h, w, b, t = make_linear_inputs(20, 8, 30, "class", seed_of("frozen"))
    mms = []
    real = chunks._accumulate_mm
    monkeypatch.setattr(chunks, "_accumulate_mm", lambda *a: (mms.append(1), real(*a)))
    hh = h.clone().requires_grad_()
    loss = qwenrl.linear_efe_loss(hh, w, t, bias=b, chunk_size=6)  # w, b: requires_grad False
    loss.backward()
    assert mms == []
    hh2 = hh.detach().clone().requires_grad_()
    efe_loss_reference(F.linear(hh2, w, b), t)[0].backward()
    torch.testing.assert_close(hh.grad, hh2.grad, rtol=1e-4, atol=1e-6)
    # no gradient at all: the kernel gets no gradient buffer
    calls = []
    chunks.chunked_loss(problem(h, w, b, t, None, spy_forward(calls), EFEOptions(), 6))
    assert calls and not any(c[1] for c in calls)


def test_all_rows_ignored_gives_zero_not_nan():
    h, w, b, _ = make_linear_inputs(6, 8, 12, "class", seed_of("allign"))
    t = torch.full((6,), -100)
    loss, stats, grads = run(h, w, b, t, chunk_size=4)
    assert loss.item() == 0.0 and stats["n_valid"].item() == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@needs_ext
@pytest.mark.parametrize("grad_out", [1.0, 2.5])
def test_upstream_gradient_of_one_and_not_one(grad_out):
    h, w, b, t = make_linear_inputs(40, 8, 50, "class", seed_of("go", grad_out))
    go = torch.tensor(grad_out)
    assert_matches(run(h, w, b, t, go, chunk_size=16), run_linear_reference(h, w, b, t, go))


@needs_ext
def test_second_backward_raises():
    h, w, b, t = make_linear_inputs(8, 4, 12, "class", seed_of("twice"))
    hh = h.clone().requires_grad_()
    loss = qwenrl.linear_efe_loss(hh, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already consumed"):
        loss.backward()


# --- the weight gradient added straight into an existing .grad ------------------------------


def _with_grad(x, prev):
    leaf = x.detach().clone().requires_grad_()
    leaf.grad = None if prev is None else prev.clone()
    return leaf


def _record_modes(monkeypatch):
    """Records, per pass of the chunk loop, (gradients asked for, added into .grad or not)."""
    modes = []
    real_loss, real_both, real_grads = (
        chunks.chunked_loss, chunks.chunked_loss_and_grads, chunks.chunked_grads,
    )  # fmt: skip

    def loss_only(p):
        modes.append(((False, False, False), False))
        return real_loss(p)

    def loss_and_grads(p, needs):
        modes.append((tuple(needs), False))
        return real_both(p, needs)

    def grads_only(p, needs, upstream, grad_w_into=None):
        modes.append((tuple(needs), grad_w_into is not None))
        return real_grads(p, needs, upstream, grad_w_into=grad_w_into)

    monkeypatch.setattr(chunks, "chunked_loss", loss_only)
    monkeypatch.setattr(chunks, "chunked_loss_and_grads", loss_and_grads)
    monkeypatch.setattr(chunks, "chunked_grads", grads_only)
    return modes


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt_index", [1, 2])
def test_weight_grad_added_into_existing_grad(monkeypatch, backend, reduction, opt_index):
    """With weight.grad already there, the backward adds this loss's weight gradient into that
    very tensor (no fresh [V, D] buffer), scaled by the upstream gradient and 1/N_valid; hidden
    and bias gradients are as before."""
    h, w, b, t = make_linear_inputs(45, 8, 37, "class", seed_of("inplace", reduction, opt_index))
    opts = {**OPTION_SETS[opt_index], "reduction": reduction}
    g = torch.Generator().manual_seed(seed_of("inplace-up", reduction))
    prev_w, prev_b = torch.randn(w.shape, generator=g), torch.randn(b.shape, generator=g)
    hh, ww, bb = h.clone().requires_grad_(), _with_grad(w, prev_w), _with_grad(b, prev_b)
    grad_tensor = ww.grad
    modes = _record_modes(monkeypatch)
    loss = qwenrl.linear_efe_loss(
        hh, ww, t, bias=bb, chunk_size=7, backend=backend, weight_grad_in_place=True, **opts
    )
    up = torch.randn(loss.shape, generator=g) if reduction == "none" else torch.tensor(0.37)
    loss.backward(up)
    # forward: the loss only; backward: every gradient, the weight's into its .grad
    assert modes == [((False, False, False), False), ((True, True, True), True)]
    assert ww.grad is grad_tensor
    _, _, (gh64, gw64, gb64) = run_linear_reference(h, w, b, t, up, **opts)
    torch.testing.assert_close(ww.grad.double(), prev_w.double() + gw64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bb.grad.double(), prev_b.double() + gb64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hh.grad.double(), gh64, rtol=1e-4, atol=1e-5)


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_in_place_step_allocates_nothing_of_the_weight_size(reduction):
    """The point of the in-place mode: a step (forward + backward) whose weight.grad exists
    allocates nothing near the weight's size, while a fresh gradient does."""
    n, d, v = 96, 64, 4096
    h, w, _, t = make_linear_inputs(n, d, v, "class", seed_of("alloc", reduction), bias=False)
    weight_bytes = v * d * 4

    def step(in_place):
        hh, ww = h.clone().requires_grad_(), _with_grad(w, torch.zeros_like(w))

        def forward_backward():
            loss = qwenrl.linear_efe_loss(
                hh, ww, t, chunk_size=8, reduction=reduction, weight_grad_in_place=in_place
            )
            loss.sum().backward()

        return _largest_allocation(forward_backward)

    assert step(True) <= 8 * v * 4  # one chunk of logits: 1/8 of the weight here
    assert step(False) >= weight_bytes


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_default_adds_in_place_only_where_the_backward_reruns_anyway(reduction):
    """weight_grad_in_place=None with .grad present: 'none' (whose backward runs the chunks
    again in any case) adds into .grad; 'mean'/'sum' compute every gradient in the forward
    (three matmuls per chunk, not four: the backward runs no chunk). Both equal the explicit
    modes' gradients."""
    n, d, v = 24, 8, 40
    h, w, _, t = make_linear_inputs(n, d, v, "class", seed_of("default", reduction), bias=False)
    grads, reruns = {}, {}
    for mode in (None, True, False):
        hh, ww = h.clone().requires_grad_(), _with_grad(w, torch.ones_like(w))
        grad_tensor = ww.grad
        with weight_grad_into_recorded() as into:
            loss = qwenrl.linear_efe_loss(
                hh, ww, t, chunk_size=8, reduction=reduction, weight_grad_in_place=mode
            )
            loss.backward(torch.ones_like(loss))
        reruns[mode] = list(into)
        grads[mode] = (hh.grad, ww.grad - 1.0)
        if mode is None and reduction == "none":
            assert ww.grad is grad_tensor  # added into the very tensor
    if reduction == "none":
        assert reruns[None] == reruns[True] == [True] and reruns[False] == [False]
    else:
        assert reruns[None] == reruns[False] == [] and reruns[True] == [True]
    for mode in (True, False):
        for ours, theirs in zip(grads[None], grads[mode]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="weight_grad_in_place must be True, False or None"):
        qwenrl.linear_efe_loss(h, w, t, weight_grad_in_place="yes")


def test_in_place_only_where_the_engine_accumulates(monkeypatch):
    """autograd.grad returns the gradient and leaves .grad alone; backward(inputs=[hidden])
    leaves the weight's .grad alone; a tensor hook on the weight sees the true gradient."""
    h, w, b, t = make_linear_inputs(30, 8, 25, "class", seed_of("engine"))
    prev = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    _, _, (gh64, gw64, _) = run_linear_reference(h, w, None, t)
    modes = _record_modes(monkeypatch)

    hh, ww = h.clone().requires_grad_(), _with_grad(w, prev)
    gh, gw = torch.autograd.grad(
        qwenrl.linear_efe_loss(hh, ww, t, chunk_size=8, weight_grad_in_place=True), [hh, ww]
    )
    assert torch.equal(ww.grad, prev) and hh.grad is None
    torch.testing.assert_close(gw.double(), gw64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gh.double(), gh64, rtol=1e-4, atol=1e-5)
    assert modes[-1] == ((True, True, False), False)

    qwenrl.linear_efe_loss(hh, ww, t, chunk_size=8, weight_grad_in_place=True).backward(inputs=[hh])
    assert torch.equal(ww.grad, prev)
    torch.testing.assert_close(hh.grad.double(), gh64, rtol=1e-4, atol=1e-5)

    finished = []  # post-accumulate hooks (what optimizers-in-backward use) see the sum
    ww.register_post_accumulate_grad_hook(lambda p: finished.append(p.grad.clone()))
    qwenrl.linear_efe_loss(hh, ww, t, chunk_size=8, weight_grad_in_place=True).backward()
    assert modes[-1][1] is True
    torch.testing.assert_close(finished[0].double(), prev.double() + gw64, rtol=1e-4, atol=1e-5)
    ww.grad = prev.clone()

    seen = []
    ww.register_hook(lambda g: seen.append(g.clone()))
    qwenrl.linear_efe_loss(hh, ww, t, chunk_size=8, weight_grad_in_place=True).backward()
    torch.testing.assert_close(seen[0].double(), gw64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ww.grad.double(), prev.double() + gw64, rtol=1e-4, atol=1e-5)
    assert modes[-1][1] is False  # hooked: a fresh gradient for autograd to hand the hook


def test_gradient_accumulation_over_micro_batches(monkeypatch):
    """The first micro-batch (no .grad yet) takes the fresh-buffer path, the next ones add in
    place; the sum equals the float64 gradients of the summed losses."""
    h, w, b, t = make_linear_inputs(40, 8, 30, "class", seed_of("accum"))
    modes = _record_modes(monkeypatch)
    ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
    for part in (slice(0, 13), slice(13, 27), slice(27, 40)):
        qwenrl.linear_efe_loss(
            h[part], ww, t[part], bias=bb, chunk_size=6, weight_grad_in_place=True
        ).backward()
    assert [m[1] for m in modes] == [False, False, True, False, True]
    truth_w, truth_b = torch.zeros(w.shape, dtype=torch.float64), 0.0
    for part in (slice(0, 13), slice(13, 27), slice(27, 40)):
        _, _, (_, gw64, gb64) = run_linear_reference(h[part], w, b, t[part])
        truth_w, truth_b = truth_w + gw64, truth_b + gb64
    torch.testing.assert_close(ww.grad.double(), truth_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bb.grad.double(), truth_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_in_place_under_activation_checkpointing(use_reentrant):
    """torch.utils.checkpoint around the loss (a nested backward when reentrant, recomputed
    saved tensors otherwise): the same gradients as without it, added into .grad."""
    from torch.utils.checkpoint import checkpoint

    h, w, _, t = make_linear_inputs(30, 8, 25, "class", seed_of("ckpt", use_reentrant), bias=False)
    proj = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))

    def grads(wrap):
        ww, pp = _with_grad(w, torch.ones_like(w)), _with_grad(proj, torch.zeros_like(proj))

        def f(x, weight, p):
            return qwenrl.linear_efe_loss(
                torch.tanh(x @ p), weight, t, chunk_size=7, weight_grad_in_place=True
            )

        loss = checkpoint(f, h, ww, pp, use_reentrant=use_reentrant) if wrap else f(h, ww, pp)
        (2 * loss).backward()
        return ww.grad, pp.grad

    for ours, plain in zip(grads(True), grads(False)):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


def test_no_in_place_for_low_precision_or_non_leaf_weights():
    h, w, _, t = make_linear_inputs(12, 8, 20, "class", seed_of("nonleaf"), bias=False)
    base = w.clone().requires_grad_()
    assert grad_engine.writable_grad(base) is None  # no .grad yet
    base.grad = torch.zeros_like(base)
    assert grad_engine.writable_grad(base) is base.grad
    assert grad_engine.writable_grad(base * 1.0) is None  # not a leaf
    low = w.to(torch.bfloat16).requires_grad_()
    low.grad = torch.zeros_like(low)
    assert grad_engine.writable_grad(low) is None  # bf16: its .grad cannot accumulate in float32
    base.grad = torch.zeros(w.shape[1], w.shape[0]).t()  # a transposed .grad
    assert grad_engine.writable_grad(base) is None


def test_chunk_entry_points_check_their_mode():
    h, w, b, t = make_linear_inputs(10, 8, 12, "class", seed_of("into-args"))
    _, fwd = resolve_backend("auto", torch.device("cpu"))
    into = torch.zeros_like(w)
    p = problem(h, w, b, t, None, fwd, EFEOptions(), 4)
    with pytest.raises(ValueError, match=r"^upstream must be \[N\] for reduction='none'"):
        chunks.chunked_grads(p, (True,) * 3, torch.ones(10))
    with pytest.raises(ValueError, match="grad_w_into needs"):  # no weight gradient asked
        chunks.chunked_grads(p, (True, False, True), torch.tensor(1.0), grad_w_into=into)
    with pytest.raises(ValueError, match="grad_w_into needs"):  # bf16 inputs
        low = problem(h.bfloat16(), w.bfloat16(), None, t, None, fwd, EFEOptions(), 4)
        chunks.chunked_grads(low, (True,) * 3, torch.tensor(1.0), grad_w_into=into)
    with pytest.raises(ValueError, match="needs reduction 'sum' or 'mean'"):
        none = problem(h, w, b, t, None, fwd, EFEOptions(reduction="none"), 4)
        chunks.chunked_loss_and_grads(none, (True,) * 3)
    # 'mean' without dropping ignored rows (the CUDA way): 1/N_valid stays a tensor
    p = problem(h, w, b, t, None, fwd, EFEOptions(), 4, drop_ignored=False)
    gh, gw, gb = chunks.chunked_grads(p, (True,) * 3, torch.tensor(2.0), grad_w_into=into)
    assert gw is None
    _, _, (gh64, gw64, gb64) = run_linear_reference(h, w, b, t, torch.tensor(2.0))
    torch.testing.assert_close(into.double(), gw64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gh.double(), gh64, rtol=1e-4, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    """bf16/fp16 inputs: each gradient errs at most 2x as much as PyTorch's own linear +
    reference loss in that precision (both against float64), and comes back in ``dtype``."""
    h, w, b, t = make_linear_inputs(96, 64, 500, "class", seed_of("low", dtype), dtype=dtype)
    opts = {"entropy_weight": 0.2}
    ours = run(h, w, b, t, chunk_size=32, **opts)
    truth = run_linear_reference(h, w, b, t, **opts)
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    own_loss, _ = efe_loss_reference(F.linear(*leaves), t, upcast=False, **opts)
    own_loss.backward()
    ulp = torch.finfo(dtype).eps
    err = lambda x, y: (x.double() - y).abs().max().item()
    assert ours[0].dtype == torch.float32
    assert (
        err(ours[0], truth[0]) <= 2 * err(own_loss.detach(), truth[0]) + ulp * truth[0].abs().item()
    )
    for g, g64, leaf in zip(ours[2], truth[2], leaves):
        assert g.dtype == dtype
        assert err(g, g64) <= 2 * err(leaf.grad, g64) + ulp * g64.abs().max().item()


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"target": torch.zeros(4, 6)}, TypeError, "float32"),  # float class targets
        ({"target": torch.zeros(4, 5, dtype=torch.long)}, ValueError, r"\(4, 5\)"),
        ({"target": torch.zeros(4, 6, 11)}, ValueError, "soft target shape"),
        ({"target": torch.full((4, 6), 12)}, ValueError, "outside"),
        ({"target": torch.full((4, 6), -3)}, ValueError, "outside"),
        ({"target": torch.zeros(4, 6, dtype=torch.uint8)}, TypeError, "uint8"),
        ({"weight": torch.randn(12, 7)}, ValueError, "hidden's last dimension"),
        ({"weight": torch.randn(12)}, ValueError, r"\[V, D\]"),
        ({"weight": torch.randn(12, 8, dtype=torch.float64)}, TypeError, "dtype"),
        ({"bias": torch.randn(11)}, ValueError, "bias must have shape"),
        ({"bias": torch.randn(12, dtype=torch.bfloat16)}, TypeError, "bias dtype"),
        ({"hidden": torch.zeros(4, 6, 8, dtype=torch.long)}, TypeError, "floating"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"hard_mask": torch.zeros(4, 6)}, TypeError, "hard_mask"),
        ({"label_smoothing": 2.0}, ValueError, "label_smoothing"),
        ({"target": None}, TypeError, "^target is None: only a distillation call"),
        ({"teacher_bias": torch.randn(12)}, ValueError, "^teacher_bias was given without"),
        (  # a distillation call checks its hard_mask too
            {
                "teacher_hidden": torch.randn(4, 6, 5),
                "teacher_weight": torch.randn(12, 5),
                "hard_mask": torch.zeros(4, 6),
            },
            TypeError,
            "^hard_mask must be a bool tensor",
        ),
    ],
)
def test_bad_inputs(kwargs, error, pattern):
    assert_linear_call_raises(kwargs, error, pattern)


def test_module_options_reach_the_loss():
    crit = qwenrl.LinearEFELoss(easy_weight=0.25, entropy_weight=0.3, chunk_size=7)
    h, w, b, t = make_linear_inputs(30, 8, 20, "class", seed_of("module"))
    expected, sums = efe_loss_reference(F.linear(h, w, b), t, easy_weight=0.25, entropy_weight=0.3)
    torch.testing.assert_close(crit(h, w, t, bias=b), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crit.last_stats["accuracy"], stats_from_sums(sums)["accuracy"])
    assert "chunk_size=7" in repr(crit)


# --- torch.compile ---------------------------------------------------------------------------


@needs_ext
@skip_under_mutmut
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_fullgraph(reduction):
    """A projection, then the loss of an LM head, compiled with fullgraph=True: same loss and
    gradients as eager, and the target check still runs inside the graph."""
    h, w, b, t = make_linear_inputs(40, 12, 50, "class", seed_of("compile", reduction))
    proj = torch.nn.Linear(12, 12)
    head = torch.nn.Linear(12, 50)
    go = torch.randn(40) if reduction == "none" else torch.tensor(1.0)

    def model(x, target):
        return qwenrl.linear_efe_loss(
            proj(x), head.weight, target, bias=head.bias, chunk_size=16, reduction=reduction,
            entropy_weight=0.1,
        )  # fmt: skip

    def grads_of(fn):
        for p in (*proj.parameters(), *head.parameters()):
            p.grad = None
        loss = fn(h, t)
        loss.backward(go)
        return loss.detach(), [p.grad.clone() for p in (*proj.parameters(), *head.parameters())]

    compiled = assert_compiled_matches_eager(model, grads_of)
    bad = t.clone()
    bad[5] = 50
    with pytest.raises(Exception, match="outside"):
        compiled(h, bad)


# --- DistributedDataParallel ---------------------------------------------------------------


class _Head(torch.nn.Module):
    """A projection and an LM head whose loss is linear_efe_loss (what DDP wraps)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 40)

    def forward(self, x, target):
        return qwenrl.linear_efe_loss(
            torch.tanh(self.proj(x)), self.head.weight, target, bias=self.head.bias,
            chunk_size=5, entropy_weight=0.2, weight_grad_in_place=True,
        )  # fmt: skip


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, as_view: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    into = []
    real = chunks.chunked_loss, chunks.chunked_loss_and_grads, chunks.chunked_grads

    def loss_only(p):  # records which passes add into .grad
        into.append(False)
        return real[0](p)

    def loss_and_grads(p, needs):
        into.append(False)
        return real[1](p, needs)

    def grads_only(p, needs, upstream, grad_w_into=None):
        into.append(grad_w_into is not None)
        return real[2](p, needs, upstream, grad_w_into=grad_w_into)

    chunks.chunked_loss, chunks.chunked_loss_and_grads, chunks.chunked_grads = (
        loss_only, loss_and_grads, grads_only,
    )  # fmt: skip
    try:
        model = DistributedDataParallel(_Head(), gradient_as_bucket_view=as_view)
        x, t = _ddp_batch()
        for half in (0, 1):  # two batches, gradients accumulated (.grad kept after the first)
            rows = slice(half * 32 + rank * 16, half * 32 + (rank + 1) * 16)
            model(x[rows], t[rows]).backward()
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save((grads, into), f"{out_dir}/grads{rank}.pt")
        del model
        dist.barrier()  # as the trainer's shutdown: no rank tears gloo down while another talks
    finally:
        chunks.chunked_loss, chunks.chunked_loss_and_grads, chunks.chunked_grads = real
        dist.destroy_process_group()


def _ddp_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(64, 8, generator=g), torch.randint(0, 40, (64,), generator=g)


@needs_ext
@pytest.mark.parametrize("as_view", [False, True])
def test_ddp_gradients_equal_the_average_of_the_ranks(tmp_path, as_view):
    """Two gloo ranks, each with half of each of two batches: DDP's averaged gradients equal
    one process computing the mean of the two halves' losses, per batch, summed. The second
    batch adds the weight gradient into .grad (a bucket view with ``gradient_as_bucket_view``)
    in the backward, before DDP's hook reads it."""
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "init"), str(tmp_path), as_view)
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    model = _Head()
    x, t = _ddp_batch()
    for half in (0, 1):
        a, b, c = half * 32, half * 32 + 16, half * 32 + 32
        ((model(x[a:b], t[a:b]) + model(x[b:c], t[b:c])) / 2).backward()
    for rank in (0, 1):
        grads, into = torch.load(tmp_path / f"grads{rank}.pt")
        # batch 1: forward with the gradients; batch 2: forward, then backward into .grad
        assert into == [False, False, True]
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


# --- no gradients where none are asked for; no silent double backward --------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_buffers_under_no_grad(mode, monkeypatch):
    """Evaluation calls (no_grad / inference_mode) compute the loss alone: no grad_h, no [V, D]
    grad_W, even though the inputs require grad."""
    h, w, b, t = make_linear_inputs(37, 16, 53, "class", seed_of(mode))
    h, w, b = (x.requires_grad_() for x in (h, w, b))
    modes = _record_modes(monkeypatch)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        loss = qwenrl.linear_efe_loss(h, w, t, bias=b, backend="reference")
    assert modes == [((False, False, False), False)]  # chunked_loss alone
    assert not loss.requires_grad
    ref, _ = efe_loss_reference((h @ w.T + b).detach().double(), t)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_exists", [False, True])
def test_create_graph_raises_a_clear_error(reduction, grad_exists):
    h, w, b, t = make_linear_inputs(19, 8, 29, "class", seed_of(reduction, grad_exists))
    h, w = h.requires_grad_(), w.requires_grad_()
    if grad_exists:
        w.grad = torch.zeros_like(w)
    loss = qwenrl.linear_efe_loss(h, w, t, reduction=reduction, backend="reference")
    with pytest.raises(RuntimeError, match="no double backward.*create_graph=True"):
        loss.sum().backward(create_graph=True)


# --- the chunk rule and the module's pass-through --------------------------------------------


@pytest.mark.parametrize(
    "n, d, v, device, elem, rows",
    [
        # ceil(V/D) = 32 → 4096/32 = 128 rows; 64 MiB of fp32 logits hold 524 → 512 win
        (4096, 1024, 32000, "cpu", 4, 512),
        # V = 151,936: 149 → 28 → 32 rows; 64 MiB holds 110 → 64; the CPU floor 128 wins
        (4096, 1024, 151936, "cpu", 4, 128),
        # D ≥ V: the hidden-size rule gives every row (65,536) beyond the 4,096 of 64 MiB
        (65536, 4096, 4096, "cpu", 4, 65536),
        (65536, 4096, 4096, "cuda", 2, 65536),
        # never more than N
        (100, 64, 1000, "cuda", 2, 100),
        # a device without its own floor takes 256
        (1000, 4, 10**8, "meta", 4, 256),
    ],
)
def test_default_chunk_size_follows_its_rule(n, d, v, device, elem, rows):
    assert chunks.default_chunk_size(n, d, v, torch.device(device), elem) == rows


def test_module_defaults_and_options_reach_the_loss(monkeypatch):
    import inspect

    fn = inspect.signature(qwenrl.linear_efe_loss).parameters
    module = inspect.signature(qwenrl.LinearEFELoss.__init__).parameters
    for name, p in module.items():
        if name != "self":
            assert p.default == fn[name].default, name
    crit = qwenrl.LinearEFELoss(validate=False, chunk_size=7, tau=0.3, entropy_weight=0.1)
    assert crit.options()["validate"] is False
    sizes = []
    real = chunks.chunked_loss
    monkeypatch.setattr(
        chunks, "chunked_loss", lambda p: sizes.append(p.settings.chunk_size) or real(p)
    )
    h, w, b, t = make_linear_inputs(23, 8, 31, "class", seed_of("module-pass"))
    mask = torch.rand(23, generator=torch.Generator().manual_seed(1)) < 0.5
    got = crit(h, w, t, bias=b, hard_mask=mask)
    assert sizes and set(sizes) == {7}
    want = qwenrl.linear_efe_loss(
        h, w, t, bias=b, hard_mask=mask, tau=0.3, entropy_weight=0.1, validate=False
    )
    torch.testing.assert_close(got, want)
    other = qwenrl.linear_efe_loss(h, w, t, bias=b, tau=0.3, entropy_weight=0.1)
    assert not torch.allclose(got, other)  # the mask mattered


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_custom_op_eager_autograd_and_fake_match_the_function(reduction):
    """The op torch.compile sees (qwenrl::linear_efe_fused), called eagerly: its registered
    autograd (setup_context + backward, the rows backward for 'none') gives the Function's
    loss and gradients, and its fake gives the real outputs' shapes and dtypes (opcheck)."""
    h, w, b, t = make_linear_inputs(29, 8, 37, "class", seed_of("op", reduction))
    go = torch.rand(29 if reduction == "none" else (), generator=torch.Generator().manual_seed(2))
    want, _, want_grads = run(
        h, w, b, t, grad_out=go + 0.5, reduction=reduction, backend="reference"
    )
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    options = EFEOptions(
        soft=False, log_target=False, tau=0.6, easy_weight=0.5, entropy_weight=0.0,
        label_smoothing=0.0, ignore_index=-100, reduction=reduction, validate=True,
    )  # fmt: skip
    args = (*leaves[:2], leaves[2], t, None, "reference", 0, [True, True, True])
    loss, sums, *_ = linear_op.linear_efe_fused(*args, **options.kernel_kwargs())
    loss.backward(go + 0.5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip((x.grad for x in leaves), want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert sums.shape == (5,)
    torch.library.opcheck(
        linear_op.linear_efe_fused,
        args,
        options.kernel_kwargs(),
        test_utils=("test_autograd_registration",),
    )
    # The fake (what torch.compile traces with) promises the real outputs' shapes and dtypes.
    real = linear_op.linear_efe_fused(*args, **options.kernel_kwargs())
    fake = linear_op._linear_efe_fused_fake(*args, **options.kernel_kwargs())
    assert [(x.shape, x.dtype) for x in fake] == [(x.shape, x.dtype) for x in real]
    # float16 inputs: the gradients are float32 (grad_dtype), in the fake as in the op
    half = (leaves[0].detach().half(), leaves[1].detach().half(), leaves[2].detach().half())
    args16 = (*half, t, None, "reference", 0, [True, True, True])
    real = linear_op.linear_efe_fused(*args16, **options.kernel_kwargs())
    fake = linear_op._linear_efe_fused_fake(*args16, **options.kernel_kwargs())
    assert [(x.shape, x.dtype) for x in fake] == [(x.shape, x.dtype) for x in real]
    # A distillation call: the teacher (its bias too) and the temperature reach the op's chunks.
    student, teacher, t, *_ = make_distill(17, 8, 23, seed_of("op-teacher", reduction))
    leaves = [x.clone().requires_grad_() for x in student]
    go = grad_out_for(reduction, 17, 3)
    kw = dict(teacher_hidden=teacher[0], teacher_weight=teacher[1], teacher_bias=teacher[2])
    loss, *_ = linear_op.linear_efe_fused(
        *leaves, t, None, "reference", 0, [True, True, True], **kw, temperature=1.5,
        **options.kernel_kwargs(),
    )  # fmt: skip
    loss.backward(go)
    want, _, _, want_grads = distill_reference(
        student, teacher, t, go, temperature=1.5, reduction=reduction
    )
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for got, ref in zip((x.grad for x in leaves), want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


# --- the autograd internals the in-place mode reads (qwenrl/loss/grad_engine.py) ------------


class _EngineProbe(torch.autograd.Function):
    """Records, inside its backward, whether the engine will accumulate into ``w.grad``."""

    @staticmethod
    def forward(ctx, x, w, seen):
        ctx.w, ctx.seen = w, seen
        return x * 2

    @staticmethod
    def backward(ctx, g):
        ctx.seen.append(grad_engine.engine_accumulates(ctx.w))
        return g * 2, None, None


def test_torch_still_answers_what_the_in_place_mode_asks():
    """If this fails after a torch upgrade, the private API grad_engine reads has changed:
    fix grad_engine.py (the in-place weight-gradient mode would otherwise switch silently)."""
    assert grad_engine.IN_PLACE_AVAILABLE, "torch._C._will_engine_execute_node is gone"
    w = torch.randn(3, requires_grad=True)
    assert not grad_engine.has_tensor_hooks(w)
    handle = w.register_hook(lambda g: g)
    assert grad_engine.has_tensor_hooks(w)
    handle.remove()
    assert not grad_engine.has_tensor_hooks(w)

    def probe(seen):
        x = torch.randn(3, requires_grad=True)
        return x, (_EngineProbe.apply(x, w, seen) * w).sum()

    seen = []
    probe(seen)[1].backward()  # the engine accumulates into w.grad: True
    x, out = probe(seen)
    torch.autograd.grad(out, [x])  # .grad untouched: False
    x, out = probe(seen)
    out.backward(inputs=[x])  # w not among the inputs: False
    x, out = probe(seen)
    out.backward(create_graph=True)  # grad mode on in the backward: False
    assert seen == [True, False, False, False]
    assert not grad_engine.engine_accumulates(w)  # outside any backward (grad mode on)


# --- what the mutation sample found unguarded -----------------------------------------------


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_compiled_branch_passes_every_input_to_the_op(monkeypatch, reduction):
    """Under torch.compile linear_efe_loss calls the custom op: with is_compiling() forced on,
    eagerly, the op gets the hidden states, weight, bias, target, mask, chunk size and which
    inputs need a gradient (grad mode and requires_grad), and equals the eager path."""
    h, w, b, t = make_linear_inputs(33, 8, 29, "class", seed_of("compiled", reduction))
    mask = torch.rand(33, generator=torch.Generator().manual_seed(3)) < 0.5
    go = torch.rand(33 if reduction == "none" else (), generator=torch.Generator().manual_seed(4))
    opts = dict(reduction=reduction, hard_mask=mask, chunk_size=5, entropy_weight=0.2)
    want = run(h, w, b, t, go, **opts)
    calls = []
    real = linear_op.linear_efe_fused

    def spy(*args, **kwargs):
        calls.append(args[5:8])  # backend, chunk_size, needs
        return real(*args, **kwargs)

    monkeypatch.setattr(linear, "linear_efe_fused", spy)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = run(h, w, b, t, go, **opts)
    torch.testing.assert_close(got[0], want[0])
    for g, g_want in zip(got[2], want[2]):
        torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-6)
    assert calls == [("auto", 5, [True, True, True])]
    # a frozen weight: no weight gradient asked for; no grad mode: none at all
    hh = h.clone().requires_grad_()
    qwenrl.linear_efe_loss(hh, w, t, bias=b, reduction=reduction).sum().backward()
    assert calls[-1][2] == [True, False, False]
    with torch.no_grad():
        qwenrl.linear_efe_loss(hh, w.requires_grad_(), t, bias=b, reduction=reduction)
    assert calls[-1][2] == [False, False, False]


@needs_ext
def test_low_precision_gradients_accumulate_in_float32():
    """bf16 inputs: grad_W sums 512 rows in float32 and rounds once, so it is as close to the
    float64 truth as bf16 rounding of that truth allows (a bf16 accumulator is not)."""
    h, w, b, t = make_linear_inputs(512, 16, 40, "class", seed_of("acc32"), ignore_frac=0.0)
    h, w, b = (x.bfloat16() for x in (h, w, b))
    _, _, (gh, gw, gb) = run(h, w, b, t, reduction="sum", chunk_size=64)
    _, _, (gh64, gw64, gb64) = run_linear_reference(h, w, b, t, reduction="sum")
    for g, g64 in ((gw, gw64), (gb, gb64)):
        rounding = (g64.bfloat16().double() - g64).abs().max()
        assert (g.double() - g64).abs().max() <= 2 * rounding + 1e-6


def test_input_errors_name_the_problem():
    h, w, b, t = make_linear_inputs(6, 8, 12, "class", seed_of("errors"), bias=True)
    with pytest.raises(TypeError, match="^hidden and weight must be torch.Tensors$"):
        qwenrl.linear_efe_loss(h.tolist(), w, t)
    h3 = h.reshape(2, 3, 8)
    with pytest.raises(ValueError, match=r"D=8 \(expected \[V, 8\]\)$"):
        qwenrl.linear_efe_loss(h3, w[:, :5], t.reshape(2, 3))
    with pytest.raises(ValueError, match="^weight is on meta but hidden is on cpu$"):
        qwenrl.linear_efe_loss(h, w.to("meta"), t)
    with pytest.raises(ValueError, match="^bias is on meta but hidden is on cpu$"):
        qwenrl.linear_efe_loss(h, w, t, bias=b.to("meta"))
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \(12,\), got list$"):
        qwenrl.linear_efe_loss(h, w, t, bias=b.tolist())
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \(12,\), got \(5,\)$"):
        qwenrl.linear_efe_loss(h, w, t, bias=b[:5])
    # one row as a 1-D hidden state [D] with a 0-dim target is a valid call
    one = qwenrl.linear_efe_loss(h[0], w, t[0].clamp(min=0), bias=b)
    torch.testing.assert_close(one, qwenrl.linear_efe_loss(h[:1], w, t[:1].clamp(min=0), bias=b))


@needs_ext
def test_int32_targets_equal_int64():
    h, w, b, t = make_linear_inputs(21, 8, 17, "class", seed_of("int32"))
    (loss32, _, grads32), (loss64, _, grads64) = run(h, w, b, t.int()), run(h, w, b, t)
    assert torch.equal(loss32, loss64)
    assert all(torch.equal(a, c) for a, c in zip(grads32, grads64))


def test_module_defaults_are_the_options_defaults():
    """LinearEFELoss() holds EFEOptions' defaults (what linear_efe_loss defaults to), the
    weight-gradient rule (None: in place where it is free) and the chunk rule; one row per
    chunk is allowed."""
    crit = qwenrl.LinearEFELoss()
    assert crit.efe_options == EFEOptions(soft=True)
    assert crit.weight_grad_in_place is None and crit.chunk_size is None
    with pytest.raises(TypeError, match="weight_grad_in_place must be True, False or None"):
        qwenrl.LinearEFELoss(weight_grad_in_place=1)
    assert (crit.backend, crit.validate) == ("auto", None)
    assert qwenrl.LinearEFELoss(chunk_size=1).chunk_size == 1
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        qwenrl.LinearEFELoss(chunk_size=0)


@needs_ext
def test_double_backward_and_reuse_messages_say_what_to_do():
    h, w, b, t = make_linear_inputs(8, 4, 12, "class", seed_of("messages"))
    hh = h.clone().requires_grad_()
    with pytest.raises(RuntimeError) as err:
        qwenrl.linear_efe_loss(hh, w, t).backward(create_graph=True)
    assert str(err.value) == (
        "linear_efe_loss has no double backward: backward(create_graph=True) and "
        "torch.autograd.grad(..., create_graph=True) are not supported. For higher-order "
        "gradients compute the logits (hidden @ weight.T) and use "
        "qwenrl.efe_loss(..., backend='reference')"
    )
    loss = qwenrl.linear_efe_loss(hh, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="; compute the loss again to backward twice$"):
        loss.backward()


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_teacher_row_weight_and_per_token_outputs_through_both_passes(reduction):
    """What tests/loss/test_distill.py and test_linear_options.py check at length, once in a
    file that ``make mutate`` runs: a teacher with a bias and T != 1, row weights, ignored rows
    and the per-token outputs, through the forward and (for 'none') the backward's second pass
    of the chunks. The per-token outputs carry no gradient."""
    student, teacher, t, rw, _ = make_distill(23, 8, 19, seed_of("teacher-rows", reduction))
    go = grad_out_for(reduction, 23, 5)
    opts = {"reduction": reduction, "row_weight": rw, "temperature": 2.0}
    kw = dict(teacher_hidden=teacher[0], teacher_weight=teacher[1], teacher_bias=teacher[2])
    ours = run_linear_modes(*student, t, go, chunk_size=5, **kw, **opts)
    assert not any(x.requires_grad for x in ours[2].values())
    assert_linear_matches(ours, distill_reference(student, teacher, t, go, **opts))
    # row weights without a teacher, and the per-token outputs of ignored rows: 0
    h, w, b = student
    ours = run_linear_modes(h, w, b, t, go, chunk_size=5, reduction=reduction, row_weight=rw)
    keep = t != -100
    assert (ours[2]["lse"][~keep] == 0).all() and (ours[2]["lse"][keep] != 0).all()
    leaves = [x.detach().double().requires_grad_() for x in student]
    loss64, _ = efe_loss_reference(
        F.linear(*leaves), t, row_weight=rw.double(), reduction=reduction
    )
    loss64.backward(go.double())
    torch.testing.assert_close(ours[0].double(), loss64.detach(), rtol=1e-4, atol=1e-5)
    for g, leaf in zip(ours[3], leaves):
        torch.testing.assert_close(g.double(), leaf.grad, rtol=1e-4, atol=1e-5)


def test_float64_inputs_give_float64_gradients():
    """float64 hidden states and weight (the reference backend): the gradients are
    accumulated and returned in float64."""
    h, w, b, t = make_linear_inputs(40, 8, 23, "class", seed_of("f64"), dtype=torch.float64)
    _, _, grads = run(h, w, b, t, reduction="sum", chunk_size=6, backend="reference")
    _, _, grads64 = run_linear_reference(h, w, b, t, reduction="sum")
    for g, g64 in zip(grads, grads64):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, g64, rtol=1e-5, atol=1e-6)


def test_default_chunk_size_counts_the_teacher_buffer(monkeypatch):
    """The default chunk rule is given the bytes per logit alive in a chunk: the logits' own
    (float32: 4, also for bfloat16 on the CPU, whose matmul runs in float32), plus 4 for a
    teacher's float32 soft target."""
    elems = []
    real = chunks.default_chunk_size
    monkeypatch.setattr(chunks, "default_chunk_size", lambda *a: elems.append(a[-1]) or real(*a))
    student, teacher, t, *_ = make_distill(10, 8, 12, seed_of("elem"))
    _, fwd = resolve_backend("auto", torch.device("cpu"))
    chunks.chunked_loss(problem(*student, t, None, fwd, EFEOptions(), 0))
    low = tuple(x.bfloat16() for x in student)
    chunks.chunked_loss(problem(*low, t, None, fwd, EFEOptions(), 0))
    settings = chunks.ChunkSettings(fwd, EFEOptions(soft=True), 0)
    with_teacher = distill.Teacher(*teacher, 1.0)
    chunks.chunked_loss(chunks.LinearProblem(*student, t, None, settings, None, with_teacher))
    assert elems == [4, 4, 8]


def test_the_backward_does_not_check_the_targets_again(monkeypatch):
    """'none' runs the chunks twice; only the forward checks the class targets' range (a
    host sync on CUDA)."""
    checks = []
    real = chunks.check_target_range
    monkeypatch.setattr(chunks, "check_target_range", lambda *a: checks.append(1) or real(*a))
    h, w, b, t = make_linear_inputs(12, 8, 15, "class", seed_of("check-once"))
    hh = h.clone().requires_grad_()
    loss = qwenrl.linear_efe_loss(hh, w, t, bias=b, reduction="none", validate=True)
    assert checks == [1]
    loss.sum().backward()
    assert checks == [1] and hh.grad is not None


@pytest.mark.parametrize("upstream", [1.0, 1.7])
def test_the_backward_scales_the_forward_gradients_in_place(monkeypatch, upstream):
    """'mean': the gradients computed in the forward are scaled in their own buffers, which
    become the leaves' .grad (no second [V, D] tensor)."""
    buffers = []
    real = chunks.chunked_loss_and_grads

    def record(p, needs):
        out = real(p, needs)
        buffers.append([g.data_ptr() for g in out[2:]])  # addresses only: no reference kept
        return out

    monkeypatch.setattr(chunks, "chunked_loss_and_grads", record)
    h, w, b, t = make_linear_inputs(20, 8, 30, "class", seed_of("scale-in-place", upstream))
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    qwenrl.linear_efe_loss(*leaves[:2], t, bias=leaves[2]).backward(torch.tensor(upstream))
    assert buffers == [[x.grad.data_ptr() for x in leaves]]
