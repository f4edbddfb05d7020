"""EmbeddingCache (C++ index + torch slab) against its rules and against the Python oracle."""

from __future__ import annotations

import gc
import io
import random
import threading
import weakref

import pytest
import torch
from cache_oracle import OracleEmbeddingCache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenrl._ext import load_extension
from qwenrl.cache import CachePlan, CacheStats, StalePlanError

if load_extension() is None or not hasattr(load_extension(), "EmbeddingCacheIndex"):
    pytest.skip("the C++ extension qwenrl._C is not built", allow_module_level=True)

from qwenrl import EmbeddingCache  # noqa: E402

DIM = 4


def values_for(keys: torch.Tensor, step: int = 0, dim: int = DIM) -> torch.Tensor:
    """[U, dim] float32 values that identify (key, step) exactly."""
    base = keys.to(torch.float32).unsqueeze(1) * 1000 + step  # [U, 1]
    return base + torch.arange(dim, dtype=torch.float32)  # [U, dim]


def fill(cache, keys, step: int = 0) -> CachePlan:
    """plan + write with values_for(); returns the plan."""
    plan = cache.plan(keys, step)
    cache.write(plan, values_for(plan.compute_keys, step, cache.dim), step)
    return plan


def assert_stats_add_up(stats: CacheStats) -> None:
    assert stats.lookups == stats.hits + stats.misses + stats.stale_refreshes
    assert stats.hit_rate == (stats.hits / stats.lookups if stats.lookups else 0.0)
    assert min(stats.hits, stats.misses, stats.stale_refreshes, stats.evictions) >= 0


def assert_index_consistent(cache, quiet: bool = True) -> None:
    """Checks one atomic snapshot; with quiet=True (no other thread running) also len/in."""
    state = cache.state_dict()
    keys, slots, free = state["keys"].tolist(), state["slots"].tolist(), state["free_slots"]
    assert len(keys) <= cache.capacity
    assert len(set(keys)) == len(keys), "a key is indexed twice"
    assert sorted(slots + free.tolist()) == list(range(cache.capacity)), "slots lost or shared"
    assert_stats_add_up(cache.stats)
    if quiet:
        assert len(cache) == len(keys) and all(k in cache for k in keys)


# --- freshness -------------------------------------------------------------------------------


@pytest.mark.parametrize("refresh_every", [1, 3, 10])
def test_fresh_until_exactly_refresh_every_steps(refresh_every):
    cache = EmbeddingCache(8, DIM, refresh_every=refresh_every)
    fill(cache, [1, 2], step=5)
    for step in range(5, 5 + refresh_every):
        plan = cache.plan([1, 2], step)
        assert plan.num_compute == 0, f"entry written at 5 must be fresh at step {step}"
        torch.testing.assert_close(cache.read(plan), values_for(torch.tensor([1, 2]), 5))
    plan = cache.plan([2, 1], 5 + refresh_every)
    assert plan.compute_keys.tolist() == [2, 1]
    assert cache.stats == CacheStats(hits=2 * refresh_every, misses=2, stale_refreshes=2)
    with pytest.raises(StalePlanError):  # the stale value is not readable until rewritten
        cache.read(plan)
    cache.write(plan, values_for(plan.compute_keys, 5 + refresh_every), 5 + refresh_every)
    assert cache.plan([1], 4 + 2 * refresh_every).num_compute == 0


def test_refresh_every_zero_computes_every_time():
    cache = EmbeddingCache(8, DIM, refresh_every=0)
    for step in range(4):
        plan = cache.plan([3, 4, 3], step)
        assert plan.compute_keys.tolist() == [3, 4]  # duplicates still computed once
        assert plan.compute_mask.all()
        cache.write(plan, values_for(plan.compute_keys, step), step)
        torch.testing.assert_close(cache.read(plan), values_for(plan.keys, step))
    assert cache.stats == CacheStats(misses=2, stale_refreshes=6, duplicates=4)
    assert cache.stats.hit_rate == 0.0


def test_refresh_every_minus_one_never_expires():
    cache = EmbeddingCache(8, DIM, refresh_every=-1)
    fill(cache, [7], step=0)
    for step in (1, 10**6, 2**62):
        assert cache.plan([7], step).num_compute == 0
    assert cache.stats.hits == 3


@pytest.mark.parametrize(
    ("capacity", "dim", "refresh_every"), [(0, 4, 10), (4, 0, 10), (4, 4, -2), (-1, 4, 1)]
)
def test_bad_configuration_is_a_value_error(capacity, dim, refresh_every):
    with pytest.raises(ValueError):
        EmbeddingCache(capacity, dim, refresh_every=refresh_every)


# --- duplicates, LRU and capacity ------------------------------------------------------------


def test_duplicates_are_computed_once():
    cache = EmbeddingCache(8, DIM)
    fill(cache, [5])
    plan = cache.plan([7, 8, 7, 5, 7, 5], 1)
    assert plan.compute_keys.tolist() == [7, 8]
    assert plan.compute_index.tolist() == [0, 1, 0, -1, 0, -1]
    assert plan.compute_mask.tolist() == [True, True, True, False, True, False]
    assert plan.slots[0] == plan.slots[2] == plan.slots[4] and plan.slots[3] == plan.slots[5]
    assert plan.compute_slots.tolist() == [plan.slots[0].item(), plan.slots[1].item()]
    # Distinct keys are the lookups; the further rows of a repeated key are duplicates.
    assert cache.stats == CacheStats(hits=1, misses=3, duplicates=3)


def test_lru_evicts_least_recently_planned_and_reuses_its_slot():
    cache = EmbeddingCache(3, DIM, refresh_every=-1)
    first = fill(cache, [1, 2, 3])
    assert first.slots.tolist() == [0, 1, 2]  # the free stack hands out 0, 1, 2, ...
    cache.plan([1], 1)  # a hit refreshes 1: LRU order is now 2, 3, 1
    plan = fill(cache, [4], 2)
    assert 2 not in cache and {1, 3, 4} <= {k for k in (1, 2, 3, 4) if k in cache}
    assert plan.slots.tolist() == [1]  # 2's slot
    plan = fill(cache, [5], 3)
    assert 3 not in cache and plan.slots.tolist() == [2]
    assert cache.stats.evictions == 2
    torch.testing.assert_close(cache.read(cache.plan([1], 4)), values_for(torch.tensor([1])))


def test_a_key_of_the_current_plan_is_never_evicted():
    cache = EmbeddingCache(2, DIM, refresh_every=-1)
    fill(cache, [10, 11])  # LRU order: 10, 11
    plan = cache.plan([12, 10], 1)  # 10 is the LRU entry, but it is in this batch
    assert plan.compute_keys.tolist() == [12]
    assert 10 in cache and 11 not in cache
    cache.write(plan, values_for(plan.compute_keys, 1), 1)
    emb = cache.read(plan)
    torch.testing.assert_close(emb[1], values_for(torch.tensor([10]))[0])
    assert cache.stats == CacheStats(hits=1, misses=3, evictions=1)


def test_more_distinct_keys_than_capacity_is_a_value_error_that_changes_nothing():
    cache = EmbeddingCache(3, DIM)
    fill(cache, [1, 2])
    before_state, before_stats = cache.state_dict(), cache.stats
    with pytest.raises(ValueError, match="4 distinct keys"):
        cache.plan([1, 2, 3, 4], 1)
    after = cache.state_dict()
    for name in ("keys", "slots", "stamps", "has_value", "values", "free_slots"):
        assert torch.equal(after[name], before_state[name]), name
    assert cache.stats == before_stats
    plan = cache.plan([1, 1, 2, 3, 3, 3], 1)  # many rows, but only 3 distinct keys
    assert plan.compute_keys.tolist() == [3]


# --- detached storage and gradients ----------------------------------------------------------


def test_values_are_stored_detached_and_the_graph_is_not_kept_alive():
    cache = EmbeddingCache(4, DIM)
    leaf = torch.randn(2, DIM, requires_grad=True)
    fresh = leaf * 2 + 1  # [2, DIM], part of a graph
    plan = cache.plan([1, 2], 0)
    cache.write(plan, fresh, 0)
    leaf_ref, fresh_ref = weakref.ref(leaf), weakref.ref(fresh)
    expected = fresh.detach().clone()
    del leaf, fresh
    gc.collect()
    assert leaf_ref() is None and fresh_ref() is None, "the cache keeps the graph alive"
    emb = cache.read(plan)
    assert not emb.requires_grad and emb.grad_fn is None
    torch.testing.assert_close(emb, expected)
    assert not cache.state_dict()["values"].requires_grad


def test_gather_gradients_reach_fresh_rows_only():
    cache = EmbeddingCache(8, DIM)
    fill(cache, [1])  # key 1 cached
    plan = cache.plan([1, 2, 2, 3], 1)
    assert plan.compute_keys.tolist() == [2, 3]
    weight = torch.randn(2, DIM, requires_grad=True)
    fresh = weight * 3  # [U=2, DIM], "Qwen's output"
    cache.write(plan, fresh, 1)
    emb = cache.gather(plan, fresh)  # [4, DIM]
    torch.testing.assert_close(emb[0], values_for(torch.tensor([1]))[0])
    torch.testing.assert_close(emb[1:], fresh.detach()[[0, 0, 1]])
    grad_out = torch.randn(4, DIM)
    emb.backward(grad_out)
    expected = 3 * torch.stack([grad_out[1] + grad_out[2], grad_out[3]])
    torch.testing.assert_close(weight.grad, expected)
    assert not cache.read(plan).requires_grad  # the slab never joined the graph
    # Before write() the cached rows are readable already; after it, read() matches gather().
    assert torch.equal(cache.read(plan), emb.detach())


def test_gather_when_all_cached_or_all_computed():
    cache = EmbeddingCache(8, DIM)
    fill(cache, [1, 2])
    cached = cache.plan([2, 1], 1)
    emb = cache.gather(cached, None)
    assert not emb.requires_grad
    torch.testing.assert_close(emb, values_for(torch.tensor([2, 1])))
    assert torch.equal(cache.gather(cached, torch.empty(0, DIM)), emb)
    computed = cache.plan([5, 6, 5], 1)
    fresh = torch.randn(2, DIM, requires_grad=True)
    emb = cache.gather(computed, fresh)  # no write needed for gather
    assert emb.grad_fn is not None
    torch.testing.assert_close(emb, fresh.detach()[[0, 1, 0]])


def test_fetch_encodes_only_the_keys_to_compute():
    cache = EmbeddingCache(8, DIM, refresh_every=2)
    seen: list[list[int]] = []

    def encode(keys: torch.Tensor) -> torch.Tensor:
        seen.append(keys.tolist())
        return values_for(keys, 0)

    for step in range(4):
        emb = cache.fetch([4, 5, 4], step, encode)
        torch.testing.assert_close(emb, values_for(torch.tensor([4, 5, 4]), 0))
    assert seen == [[4, 5], [4, 5]]  # steps 0 and 2


# --- bad inputs and stale plans --------------------------------------------------------------


def test_write_and_gather_check_dtype_device_and_shape():
    cache = EmbeddingCache(8, DIM)
    plan = cache.plan([1, 2], 0)
    good = values_for(plan.compute_keys)
    for method in (cache.write, cache.gather):
        with pytest.raises(TypeError, match=r"torch\.float32.*got torch\.float64"):
            method(plan, good.double())
        with pytest.raises(ValueError, match=r"on cpu.*got meta"):
            method(plan, torch.empty(2, DIM, device="meta"))
        with pytest.raises(ValueError, match=r"shape \[2, 4\].*got \[2, 5\]"):
            method(plan, torch.zeros(2, DIM + 1))
        with pytest.raises(ValueError, match=r"shape \[2, 4\].*got \[3, 4\]"):
            method(plan, torch.zeros(3, DIM))
        with pytest.raises(TypeError, match="must be a Tensor"):
            method(plan, [[0.0] * DIM] * 2)
    assert len(cache) == 2 and cache.state_dict()["has_value"].tolist() == [False, False]


def test_the_cpp_boundary_checks_too():
    cache = EmbeddingCache(8, DIM)
    plan = cache.plan([1], 0)
    index = cache._index
    with pytest.raises(TypeError, match="Float"):
        index.write(plan.compute_keys, plan.compute_slots, torch.zeros(1, DIM).half(), 0)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        index.write(plan.compute_keys, plan.compute_slots, torch.zeros(1, 3), 0)
    with pytest.raises(TypeError, match="int64"):
        index.plan(torch.tensor([1.0]), 0)
    with pytest.raises(ValueError, match="1-D"):
        index.plan(torch.tensor([[1]]), 0)


def test_bad_keys_and_foreign_plans():
    cache = EmbeddingCache(8, DIM)
    with pytest.raises(TypeError, match="integers"):
        cache.plan(torch.tensor([1.5]), 0)
    with pytest.raises(ValueError, match="1-D"):
        cache.plan(torch.tensor([[1, 2]]), 0)
    with pytest.raises(TypeError, match="step"):
        cache.plan([1], 1.0)
    assert cache.plan(torch.tensor([3], dtype=torch.int32), 0).keys.dtype == torch.int64
    assert cache.plan([], 0).batch_size == 0
    other = EmbeddingCache(8, DIM)
    with pytest.raises(ValueError, match="another"):
        cache.read(other.plan([1], 0))
    with pytest.raises(TypeError, match="CachePlan"):
        cache.read("plan")


def test_stale_write_is_detected_and_writes_nothing():
    cache = EmbeddingCache(2, DIM)
    old = cache.plan([1, 2], 0)
    with pytest.raises(StalePlanError, match="write"):
        cache.read(old)  # nothing written yet
    new = fill(cache, [3, 4], 0)  # evicts 1 and 2, reusing their slots
    before = cache.state_dict()
    with pytest.raises(StalePlanError, match="key 1 no longer owns slot 0"):
        cache.write(old, values_for(old.compute_keys, 99), 0)
    with pytest.raises(StalePlanError):
        cache.read(old)
    # gather() reads only cached rows: a plan whose rows were all computed needs no slab.
    torch.testing.assert_close(
        cache.gather(old, values_for(old.compute_keys)), values_for(old.keys)
    )
    assert torch.equal(cache.state_dict()["values"], before["values"])
    torch.testing.assert_close(cache.read(new), values_for(torch.tensor([3, 4])))
    cache.invalidate([3])
    with pytest.raises(StalePlanError):
        cache.write(new, values_for(new.compute_keys), 0)
    with pytest.raises(StalePlanError, match="key 3"):
        cache.read(new)


def test_a_write_for_a_key_planned_again_is_still_valid():
    cache = EmbeddingCache(4, DIM, refresh_every=1)
    first = fill(cache, [1], 0)
    second = cache.plan([1], 5)  # stale refresh: same key, same slot
    cache.write(first, values_for(torch.tensor([1]), 7), 7)  # a late write of the same key
    torch.testing.assert_close(cache.read(second), values_for(torch.tensor([1]), 7))


# --- invalidate, len, contains, stats --------------------------------------------------------


def test_invalidate_some_or_all():
    cache = EmbeddingCache(4, DIM)
    fill(cache, [1, 2, 3])
    assert len(cache) == 3 and 2 in cache and 9 not in cache and "x" not in cache
    assert cache.invalidate([2, 9, 1]) == 2
    assert len(cache) == 1 and 2 not in cache and 3 in cache
    plan = cache.plan([7, 8, 9], 1)
    assert plan.slots.tolist() == [0, 1, 3]  # freed slots pop in reverse order of invalidation
    assert cache.invalidate() == 4 and len(cache) == 0
    assert cache.plan([5], 2).slots.tolist() == [0]  # a full reset restores the initial stack
    stats = cache.stats
    assert stats.misses == 7 and stats.evictions == 0
    cache.reset_stats()
    assert cache.stats == CacheStats()


def test_stats_add_up():
    cache = EmbeddingCache(4, DIM, refresh_every=2)
    rng = random.Random(0)
    rows = distinct = 0
    for step in range(200):
        keys = [rng.randrange(8) for _ in range(rng.randrange(1, 7))]
        if len(set(keys)) > 4:
            continue
        fill(cache, keys, step)
        rows, distinct = rows + len(keys), distinct + len(set(keys))
    stats = cache.stats
    assert_stats_add_up(stats)
    assert stats.lookups == distinct and stats.duplicates == rows - distinct
    assert stats.hits and stats.misses and stats.stale_refreshes and stats.evictions
    d = stats.to_dict()
    assert d["lookups"] == stats.lookups and d["hit_rate"] == stats.hit_rate


# --- state_dict ------------------------------------------------------------------------------


def test_state_dict_round_trip_restores_hits_exactly():
    rng = random.Random(1)
    batches = [[rng.randrange(20) for _ in range(6)] for _ in range(120)]
    original = EmbeddingCache(8, DIM, refresh_every=3)
    for step, keys in enumerate(batches[:60]):
        fill(original, keys, step)
    original.plan([40, 41], 60)  # leave two planned-but-unwritten keys in the state
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    restored = EmbeddingCache(8, DIM, refresh_every=3)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert restored.stats == original.stats and len(restored) == len(original)
    for step, keys in enumerate(batches[60:], start=61):
        a, b = fill(original, keys, step), fill(restored, keys, step)
        for name in ("slots", "compute_mask", "compute_index", "compute_keys"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (step, name)
        assert torch.equal(original.read(a), restored.read(b))
    assert restored.stats == original.stats


def test_load_state_dict_rejects_mismatches():
    cache = EmbeddingCache(4, DIM)
    fill(cache, [1, 2])
    state = cache.state_dict()
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(5, DIM).load_state_dict(state)
    with pytest.raises(TypeError, match="float64"):
        EmbeddingCache(4, DIM, dtype=torch.float64).load_state_dict(state)
    broken = dict(state, slots=torch.tensor([0, 0]))
    target = EmbeddingCache(4, DIM)
    with pytest.raises(ValueError, match="slot 0"):
        target.load_state_dict(broken)
    assert len(target) == 0  # nothing changed


# --- threads ---------------------------------------------------------------------------------


def test_concurrent_plan_write_read_keeps_the_index_consistent():
    cache = EmbeddingCache(48, DIM, refresh_every=4)
    n_threads, n_iters = 8, 1000
    barrier = threading.Barrier(n_threads)
    totals = [[0, 0, 0] for _ in range(n_threads)]  # rows, distinct keys, successful reads
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        barrier.wait()
        try:
            for it in range(n_iters):
                keys = torch.tensor([rng.randrange(160) for _ in range(rng.randrange(1, 24))])
                step = it // 4
                plan = cache.plan(keys, step)
                totals[tid][0] += len(keys)
                totals[tid][1] += len(set(keys.tolist()))
                try:
                    if rng.random() < 0.9:
                        cache.write(plan, values_for(plan.compute_keys, 0), step)
                    emb = cache.read(plan) if rng.random() < 0.5 else None
                    if emb is None:
                        fresh = values_for(plan.compute_keys, 0)
                        emb = cache.gather(plan, fresh if plan.num_compute else None)
                    # Whatever interleaving happened, a successful read is never another key's.
                    assert torch.equal(emb, values_for(keys, 0)), "corrupted row"
                    totals[tid][2] += 1
                except StalePlanError:
                    pass
                if rng.random() < 0.02:
                    cache.invalidate(keys[:2])
                if rng.random() < 0.01:
                    assert_index_consistent(cache, quiet=False)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert_index_consistent(cache)
    state = cache.state_dict()
    written = state["has_value"]
    assert torch.equal(state["values"][written], values_for(state["keys"][written], 0))
    rows, distinct, reads = (sum(t[i] for t in totals) for i in range(3))
    stats = cache.stats
    assert stats.lookups == distinct and stats.duplicates == rows - distinct
    assert reads > n_threads * n_iters // 4, "almost every plan went stale"


# --- the oracle ------------------------------------------------------------------------------


def outcome(fn, *args):
    """fn(*args), or the exception type it raised (compared between implementations)."""
    try:
        return fn(*args)
    except (ValueError, TypeError, StalePlanError) as exc:
        return type(exc)


def assert_same_plan(a, b) -> None:
    if isinstance(a, type) or isinstance(b, type):
        assert a is b
        return
    for name in ("keys", "slots", "compute_mask", "compute_index", "compute_keys", "step"):
        x, y = getattr(a, name), getattr(b, name)
        assert (torch.equal(x, y) and x.dtype == y.dtype) if torch.is_tensor(x) else x == y, name


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, x in a.items():
        y = b[name]
        assert (torch.equal(x, y) and x.dtype == y.dtype) if torch.is_tensor(x) else x == y, name


key_lists = st.lists(st.integers(0, 9), max_size=5)
# keys, step increment, and whether to write right away (the trainer's plan -> write).
plan_op = st.tuples(st.just("plan"), key_lists, st.integers(0, 2), st.booleans())
# For write/read/gather: which plan (0 = newest) and, for write, whether to pass an explicit step.
write_op = st.tuples(st.just("write"), st.integers(0, 3), st.booleans())
operations = st.lists(
    st.one_of(
        plan_op,
        plan_op,
        write_op,
        write_op,
        st.tuples(st.just("read"), st.integers(0, 3)),
        st.tuples(st.just("gather"), st.integers(0, 3)),
        st.tuples(st.just("invalidate"), st.none() | key_lists),
        st.tuples(st.just("round_trip"), st.booleans()),  # cross-load the two states?
    ),
    min_size=10,
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 8),
    refresh_every=st.sampled_from([-1, 0, 1, 2, 3]),
    ops=operations,
)
def test_matches_the_python_oracle(capacity, refresh_every, ops):
    def new_caches() -> list:
        return [
            EmbeddingCache(capacity, 3, refresh_every),
            OracleEmbeddingCache(capacity, 3, refresh_every),
        ]

    caches = new_caches()
    plans: list[tuple] = []  # (C++ plan, oracle plan), newest last
    step = 0
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "plan":
            step += op[2]
            got = [outcome(c.plan, op[1], step) for c in caches]
            assert_same_plan(*got)
            if not isinstance(got[0], type):
                plans.append(tuple(got))
                if op[3]:
                    fresh = values_for(got[0].compute_keys, n, dim=3)
                    for c, p in zip(caches, got):
                        c.write(p, fresh, step)
        elif kind in ("write", "read", "gather") and plans:
            pair = plans[-1 - op[1] % len(plans)]
            fresh = values_for(pair[0].compute_keys, n, dim=3)
            if kind == "write":
                at = step if op[2] else None
                got = [outcome(c.write, p, fresh, at) for c, p in zip(caches, pair)]
            elif kind == "read":
                got = [outcome(c.read, p) for c, p in zip(caches, pair)]
            else:
                got = [outcome(c.gather, p, fresh) for c, p in zip(caches, pair)]
            if torch.is_tensor(got[0]) and torch.is_tensor(got[1]):
                assert torch.equal(*got)
            else:
                assert got[0] is got[1] or got == [None, None], got
        elif kind == "invalidate":
            assert caches[0].invalidate(op[1]) == caches[1].invalidate(op[1])
        elif kind == "round_trip":
            states = [c.state_dict() for c in caches]
            assert_same_state(*states)
            loaded = new_caches()
            # Cross-load (C++ state into the oracle and back) or each its own.
            for c, s in zip(loaded, states[::-1] if op[1] else states):
                c.load_state_dict(s)
            caches, plans = loaded, []
        assert caches[0].stats == caches[1].stats
        assert len(caches[0]) == len(caches[1])
        assert all((k in caches[0]) == (k in caches[1]) for k in range(10))
    assert_stats_add_up(caches[0].stats)
    assert_same_state(caches[0].state_dict(), caches[1].state_dict())


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_slab():
    cache = EmbeddingCache(16, DIM, refresh_every=-1, device="cuda")
    assert cache.device.type == "cuda"
    plan = cache.plan([1, 2, 1], 0)
    weight = torch.randn(2, DIM, device="cuda", requires_grad=True)
    cache.write(plan, weight * 2, 0)
    emb = cache.gather(plan, weight * 2)
    emb.sum().backward()
    torch.testing.assert_close(
        weight.grad, torch.tensor([[4.0], [2.0]], device="cuda").expand(2, DIM)
    )
    cached = cache.plan([2, 1, 3], 1)
    fresh = torch.ones(1, DIM, device="cuda")
    emb = cache.gather(cached, fresh)
    assert emb.device.type == "cuda"
    torch.testing.assert_close(emb[:2], (weight.detach() * 2)[[1, 0]])
    with pytest.raises(ValueError, match="cuda"):
        cache.write(cached, fresh.cpu(), 1)
    restored = EmbeddingCache(16, DIM, refresh_every=-1, device="cuda")
    restored.load_state_dict(
        {k: v.cpu() if torch.is_tensor(v) else v for k, v in cache.state_dict().items()}
    )
    assert torch.equal(restored.read(restored.plan([1, 2], 2)), cache.read(cache.plan([1, 2], 2)))
