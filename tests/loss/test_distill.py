"""Distillation in linear_efe_loss from a teacher's hidden states and head, against the float64
loss of the materialised logits: T² · efe_loss_reference(z / T, softmax(teacher / T)) over the
rows that are not ignored, with z = hidden @ weight.T + bias."""

from __future__ import annotations

import loss_inputs as cases
import pytest
import torch

import qwenrl
from qwenrl.loss import chunks, distill, linear, linear_op
from qwenrl.loss.dispatch import resolve_backend
from qwenrl.loss.options import EFEOptions
from qwenrl.loss.reference import PER_TOKEN_FIELDS


def run(student, teacher, t, grad_out, mode="fresh", **kw):
    """linear_efe_loss with the teacher (``run_linear_modes`` of tests/loss_inputs.py with each ``mode``). The
    teacher's tensors require grad: they must get none."""
    th, tw, tb = (x.detach().clone().requires_grad_() for x in teacher)
    out = cases.run_linear_modes(
        *student, t, grad_out, mode, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, **kw
    )
    assert th.grad is None and tw.grad is None and tb.grad is None  # the teacher: no gradient
    return out


OPTION_SETS = [
    {},
    {"tau": 0.3, "easy_weight": 0.25, "entropy_weight": 0.2, "label_smoothing": 0.05},
]


@pytest.mark.parametrize("backend", cases.LINEAR_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
@pytest.mark.parametrize("target", ["ignored", "none"])
def test_matches_float64_materialised_reference(backend, reduction, temperature, target):
    """37 rows in chunks of 5 (the last one short), an upstream gradient ≠ 1, ignored rows
    marked by a class target or no target at all."""
    n, d, v = 37, 12, 53
    seed = cases.seed_of("distill", reduction, temperature, target)
    student, teacher, t, *_ = cases.make_distill(n, d, v, seed)
    t = t if target == "ignored" else None
    opts = dict(OPTION_SETS[int(temperature != 1.0)], reduction=reduction)
    go = cases.grad_out_for(reduction, n, seed)
    ours = run(
        student, teacher, t, go, chunk_size=5, backend=backend, temperature=temperature, **opts
    )
    cases.assert_linear_matches(
        ours, cases.distill_reference(student, teacher, t, go, temperature=temperature, **opts)
    )


@pytest.mark.parametrize("backend", cases.LINEAR_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", cases.WEIGHT_GRAD_MODES)
def test_every_option_and_both_weight_gradient_modes(backend, reduction, mode):
    """row_weight, z_loss, a hard mask, label smoothing, β and ignored rows together."""
    n, d, v = 31, 8, 41
    student, teacher, t, rw, mask = cases.make_distill(
        n, d, v, cases.seed_of("combined", reduction, mode)
    )
    opts = {
        "row_weight": rw, "z_loss": 0.03, "hard_mask": mask, "label_smoothing": 0.1,
        "entropy_weight": 0.3, "tau": 0.4, "easy_weight": 0.25, "reduction": reduction,
    }  # fmt: skip
    go = cases.grad_out_for(reduction, n, 2)
    ours = run(
        student, teacher, t, go, mode, chunk_size=6, backend=backend, temperature=2.0, **opts
    )
    cases.assert_linear_matches(
        ours, cases.distill_reference(student, teacher, t, go, temperature=2.0, **opts)
    )


@cases.needs_ext
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64, None])
def test_uneven_chunks_and_batched_rows(chunk_size):
    """hidden [2, 3, 5, D] and teacher_hidden [2, 3, 5, D_t]: the loss and per-token outputs
    keep the rows' shape, the gradient hidden's."""
    student, teacher, t, rw, _ = cases.make_distill(30, 8, 29, cases.seed_of("batched", chunk_size))
    shape = (2, 3, 5)
    student = (student[0].reshape(*shape, 8), *student[1:])
    teacher = (teacher[0].reshape(*shape, 6), *teacher[1:])
    t, rw = t.reshape(shape), rw.reshape(shape)
    for reduction in ("mean", "none"):
        go = cases.grad_out_for(reduction, 30, 3)
        go = go.reshape(shape) if reduction == "none" else go
        opts = {"reduction": reduction, "row_weight": rw, "temperature": 1.5}
        ours = run(student, teacher, t, go, chunk_size=chunk_size, **opts)
        assert ours[0].shape == (shape if reduction == "none" else ())
        assert ours[2]["lse"].shape == shape and ours[3][0].shape == student[0].shape
        cases.assert_linear_matches(ours, cases.distill_reference(student, teacher, t, go, **opts))


@pytest.mark.parametrize("backend", cases.LINEAR_BACKENDS)
def test_no_grad(backend):
    student, teacher, t, rw, _ = cases.make_distill(25, 8, 30, cases.seed_of("nograd", backend))
    opts = {"reduction": "none", "row_weight": rw, "temperature": 3.0}
    truth = cases.distill_reference(student, teacher, t, torch.ones(25), **opts)
    h, w, b = (x.requires_grad_() for x in student)
    with torch.no_grad():
        loss, stats, tok = qwenrl.linear_efe_loss(
            h, w, t, bias=b, teacher_hidden=teacher[0], teacher_weight=teacher[1],
            teacher_bias=teacher[2], chunk_size=4, backend=backend, return_stats=True,
            return_per_token=True, **opts,
        )  # fmt: skip
    assert not loss.requires_grad
    cases.assert_linear_matches((loss, stats, tok, ()), (*truth[:3], ()))


@cases.needs_ext
def test_teacher_without_bias_and_student_without_bias():
    student, teacher, t, *_ = cases.make_distill(21, 8, 19, cases.seed_of("nobias"))
    h, w, _ = (x.clone().requires_grad_() for x in student)
    loss = qwenrl.linear_efe_loss(
        h, w, t, teacher_hidden=teacher[0], teacher_weight=teacher[1], temperature=2.0, chunk_size=4
    )
    loss.backward()
    zero = torch.zeros(19)
    truth = cases.distill_reference(
        (student[0], student[1], zero), (*teacher[:2], zero), t, torch.tensor(1.0), temperature=2.0
    )
    torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), truth[3][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), truth[3][1], rtol=1e-4, atol=1e-5)


@cases.needs_ext
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_student_equal_to_its_teacher_has_nothing_to_learn(temperature):
    """KL(p ‖ q) = 0 when the student's logits are the teacher's: loss and gradients 0 (β = 0,
    no smoothing), whatever T."""
    student, _, t, *_ = cases.make_distill(20, 8, 33, cases.seed_of("same", temperature))
    h, w, b = (x.clone().requires_grad_() for x in student)
    loss = qwenrl.linear_efe_loss(
        h, w, t, bias=b, teacher_hidden=student[0], teacher_weight=student[1],
        teacher_bias=student[2], temperature=temperature, chunk_size=6,
    )  # fmt: skip
    loss.backward()
    assert abs(loss.item()) < 1e-5
    for g in (h.grad, w.grad, b.grad):
        assert g.abs().max().item() < 1e-5


@cases.needs_ext
@pytest.mark.parametrize(
    ("dtype", "t_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_low_precision(dtype, t_dtype):
    """bf16 student and/or teacher: close to the float64 truth of those very values (loose)."""
    student, teacher, t, rw, _ = cases.make_distill(
        64, 32, 300, cases.seed_of("low", dtype, t_dtype), dtype=dtype, t_dtype=t_dtype
    )
    opts = {"reduction": "mean", "row_weight": rw, "temperature": 2.0}
    ours = run(student, teacher, t, torch.tensor(1.0), chunk_size=24, **opts)
    loss64, _, tok64, grads64 = cases.distill_reference(
        student, teacher, t, torch.tensor(1.0), **opts
    )
    torch.testing.assert_close(ours[0].double(), loss64, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ours[2]["entropy"].double(), tok64[1].double(), rtol=1e-3, atol=1e-3)
    for g, g64 in zip(ours[3], grads64):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), g64, rtol=2e-2, atol=2e-2 * g64.abs().max().item())


@pytest.mark.parametrize("drop_ignored", [None, False])
def test_never_more_than_a_chunk_of_either_logits(drop_ignored):
    """Every kernel call sees one chunk of student logits and one chunk of soft target, only
    the rows that are not ignored: also where class targets keep their ignored rows in the
    matmul (CUDA, ``drop_ignored=False``), since the kernel's soft mode would count them."""
    student, teacher, t, *_ = cases.make_distill(50, 8, 33, cases.seed_of("spy"), ignore_frac=0.0)
    t[::3] = -100  # 17 ignored rows, 33 kept
    _, forward_fn = resolve_backend("auto", torch.device("cpu"))
    calls = []

    def spy(logits, target, hard_mask, row_weight, grad, options):
        calls.append((tuple(logits.shape), tuple(target.shape), target.dtype, options.soft))
        return forward_fn(logits, target, hard_mask, row_weight, grad, options)

    settings = chunks.ChunkSettings(spy, EFEOptions(soft=True), 8, drop_ignored)
    teacher_ = distill.Teacher(*teacher, 2.0)
    p = chunks.LinearProblem(*student, t, None, settings, None, teacher_)
    loss, sums, gh, _, _ = chunks.chunked_loss_and_grads(p, (True, True, True))
    assert [c[0] for c in calls] == [(8, 33)] * 4 + [(1, 33)]
    assert all(c[0] == c[1] and c[2] == torch.float32 and c[3] for c in calls)
    assert sums[4].item() == 33 and (gh[::3] == 0).all()
    truth = cases.distill_reference(student, teacher, t, torch.tensor(1.0), temperature=2.0)
    torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-6)


def _peak_and_largest(fn) -> tuple[int, int]:
    """(peak of the bytes allocated and not yet freed while ``fn`` runs, its largest single
    allocation): the profiler's allocation records (the method of test_linear_loss.py), each
    allocation and free, summed in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        event = todo.pop()
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        todo.extend(event.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak, max(size for _, size in allocations)


@cases.needs_ext
def test_memory_stays_far_below_the_materialised_logits():
    """V = 32,000, N = 512: the student's and the teacher's [N, V] float32 logits would take
    131 MB; a forward and backward in chunks of 64 rows allocates a fraction of that (a chunk
    of each, the [V, D] weight gradient), and no single tensor the size of either."""
    n, d, v = 512, 64, 32000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_()
    th, tw = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5
    t = torch.randint(0, v, (n,), generator=g)
    materialised = 2 * n * v * 4

    def step():
        loss = qwenrl.linear_efe_loss(
            h, w, t, teacher_hidden=th, teacher_weight=tw, temperature=2.0, chunk_size=64
        )
        loss.backward()

    peak, largest = _peak_and_largest(step)
    chunk = 64 * v * 4
    assert largest <= max(chunk, v * d * 4)  # a chunk, or the weight gradient
    # A chunk of student logits (their gradient in place), a chunk of soft target and the
    # [V, D] weight gradient: 24.7 MB, against 131 MB for the two [N, V] logits alone.
    assert peak < materialised / 4
    assert w.grad is not None and h.grad is not None


# --- torch.compile ---------------------------------------------------------------------------


@cases.needs_ext
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_compiled_branch_carries_the_teacher(monkeypatch, reduction):
    """With is_compiling() forced on (eagerly): the custom op and its registered autograd give
    the eager Function's loss, per-token outputs and gradients."""
    student, teacher, t, rw, mask = cases.make_distill(
        31, 8, 27, cases.seed_of("op-branch", reduction)
    )
    opts = {
        "reduction": reduction,
        "row_weight": rw,
        "hard_mask": mask,
        "temperature": 2.0,
        "chunk_size": 6,
    }
    go = cases.grad_out_for(reduction, 31, 7)
    want = run(student, teacher, t, go, **opts)
    calls = []
    real = linear_op.linear_efe_fused
    monkeypatch.setattr(
        linear, "linear_efe_fused", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = run(student, teacher, t, go, **opts)
    assert len(calls) == 1 and calls[0][9] is not None and calls[0][12] == 2.0
    torch.testing.assert_close(got[0], want[0])
    for name in PER_TOKEN_FIELDS:
        torch.testing.assert_close(got[2][name], want[2][name])
    for g, g_want in zip(got[3], want[3]):
        torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-6)


@cases.needs_ext
@cases.skip_under_mutmut
def test_compiles_fullgraph():
    """A student projection and head distilled from a frozen teacher head, compiled with
    fullgraph=True: the eager loss and gradients; the teacher gets none."""
    student, teacher, t, *_ = cases.make_distill(40, 12, 50, cases.seed_of("compile"))
    proj = torch.nn.Linear(12, 12)
    head = torch.nn.Linear(12, 50)
    t_head = torch.nn.Linear(6, 50)

    def model(x, x_t, target):
        return qwenrl.linear_efe_loss(
            proj(x), head.weight, target, bias=head.bias, chunk_size=16, teacher_hidden=x_t,
            teacher_weight=t_head.weight, teacher_bias=t_head.bias, temperature=2.0,
        )  # fmt: skip

    def grads_of(fn):
        for p in (*proj.parameters(), *head.parameters()):
            p.grad = None
        loss = fn(student[0], teacher[0], t)
        loss.backward()
        assert all(p.grad is None for p in t_head.parameters())
        return loss.detach(), [p.grad.clone() for p in (*proj.parameters(), *head.parameters())]

    cases.assert_compiled_matches_eager(model, grads_of)


# --- bad input -------------------------------------------------------------------------------


def _bad_case_args():
    return {
        "hidden": torch.randn(4, 6, 8),
        "weight": torch.randn(12, 8),
        "target": torch.zeros(4, 6, dtype=torch.long),
        "teacher_hidden": torch.randn(4, 6, 5),
        "teacher_weight": torch.randn(12, 5),
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": "2"}, TypeError, "temperature must be a number"),
        ({"teacher_hidden": torch.randn(4, 5, 5)}, ValueError, "does not have the student's rows"),
        ({"teacher_hidden": torch.randn(24, 5)}, ValueError, "does not have the student's rows"),
        ({"teacher_weight": torch.randn(12, 7)}, ValueError, "teacher_hidden's width D_t=5"),
        ({"teacher_weight": torch.randn(13, 5)}, ValueError, r"vocabulary \(13 rows.*\(12 rows"),
        ({"teacher_weight": None}, ValueError, "teacher_hidden was given without teacher_weight"),
        ({"teacher_hidden": None}, ValueError, "teacher_weight was given without teacher_hidden"),
        (
            {"teacher_hidden": None, "teacher_weight": None, "teacher_bias": torch.randn(12)},
            ValueError,
            "teacher_bias was given without",
        ),
        (
            {"teacher_hidden": None, "teacher_weight": None, "temperature": 2.0},
            ValueError,
            "temperature=2.0 needs a teacher",
        ),
        ({"target": torch.rand(4, 6, 12)}, ValueError, "a soft target and a teacher"),
        ({"target": torch.zeros(4, 5, dtype=torch.long)}, ValueError, r"target shape \(4, 5\)"),
        (
            {"teacher_bias": torch.randn(11)},
            ValueError,
            r"teacher_bias must have shape \[V\] = \(12,\)",
        ),
        ({"teacher_weight": torch.randn(12, 5).double()}, TypeError, "teacher_weight dtype"),
        (
            {"teacher_hidden": torch.zeros(4, 6, 5, dtype=torch.long)},
            TypeError,
            "teacher_hidden must be a floating",
        ),
        (
            {"teacher_weight": torch.randn(12, 5, device="meta")},
            ValueError,
            "teacher_weight is on meta",
        ),
        ({"log_target": True}, ValueError, "log_target=True has no meaning with a teacher"),
        ({"hard_mask": torch.zeros(4, 6)}, TypeError, "hard_mask"),
    ],
)
def test_bad_inputs(kwargs, error, pattern):
    cases.assert_linear_call_raises(kwargs, error, pattern, _bad_case_args())


def test_target_none_means_every_row():
    args = _bad_case_args()
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    a = qwenrl.linear_efe_loss(hidden, weight, None, **args, return_stats=True)
    b = qwenrl.linear_efe_loss(hidden, weight, target, **args, return_stats=True)
    torch.testing.assert_close(a[0], b[0])
    assert a[1]["n_valid"].item() == b[1]["n_valid"].item() == 24
