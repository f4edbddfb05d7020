"""EmbeddingCache: plan + read of a 256-key batch over 10k cached keys, C++ index vs the oracle.

    pytest bench/test_cache_bench.py --benchmark-only

The oracle is the pure-Python cache in tests/cache_oracle.py (same rules, dicts and an
OrderedDict). Both gather from a torch slab with index_select (on one torch thread here), so the
difference is the index: hashing, LRU moves, stamps and building the plan's tensors. Both
benchmarks store the two medians, measured in alternating blocks, and their ratio in
``extra_info``, reported only (a ratio is never asserted).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from cache_oracle import OracleEmbeddingCache  # tests/ is on the path (bench/conftest.py)

from qwenrl._ext import load_extension

if load_extension() is None or not hasattr(load_extension(), "EmbeddingCacheIndex"):
    pytest.skip("the C++ extension qwenrl._C is not built", allow_module_level=True)

from qwenrl import EmbeddingCache  # noqa: E402

N_KEYS, BATCH, DIM = 10_000, 256, 256


def _make(cls) -> object:
    """A cache holding every key 0..N_KEYS-1 (refresh_every=-1: nothing expires)."""
    cache = cls(N_KEYS, DIM, refresh_every=-1)
    for start in range(0, N_KEYS, 1000):
        plan = cache.plan(torch.arange(start, start + 1000), 0)
        cache.write(plan, torch.randn(plan.num_compute, DIM), 0)
    return cache


def _plan_read(cache) -> Callable[[], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, N_KEYS, (BATCH,), generator=generator) for _ in range(64)]
    batch = itertools.cycle(batches)
    return lambda: cache.read(cache.plan(next(batch), 1))  # [BATCH, DIM]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The [256, 256] gather is the same op on both sides and a few microseconds of work; run it
    on one thread so that OpenMP wake-ups on a busy machine (milliseconds) do not drown the
    difference being measured, which is the index."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def caches() -> dict[str, object]:
    return {"cpp": _make(EmbeddingCache), "oracle": _make(OracleEmbeddingCache)}


@pytest.fixture(scope="module")
def paired(caches) -> dict[str, float]:
    """Median time per call of both, measured in alternating blocks of calls so that the ratio
    sees the same machine load on both sides (each block warm in its own caches); the same
    numbers go into both benchmarks' extra_info."""
    fns = {name: _plan_read(cache) for name, cache in caches.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for block in range(13):
        for name, fn in fns.items():
            for _ in range(25):
                start = time.perf_counter()
                fn()
                if block > 0:  # the first block warms up
                    times[name].append(time.perf_counter() - start)
    cpp, oracle = (statistics.median(times[name]) for name in ("cpp", "oracle"))
    return {
        "cpp_median_us": cpp * 1e6,
        "oracle_median_us": oracle * 1e6,
        "ratio_vs_oracle": oracle / cpp,
    }


GROUP = "cache plan+read, 256 of 10k keys"


def test_plan_read_oracle(benchmark, record, caches, paired):
    out = benchmark(_plan_read(caches["oracle"]))
    assert out.shape == (BATCH, DIM)
    record(GROUP, "oracle (pure Python)", **paired)  # the group's baseline: runs first


def test_plan_read_cpp(benchmark, record, caches, paired):
    cache = caches["cpp"]
    out = benchmark(_plan_read(cache))
    assert out.shape == (BATCH, DIM)
    assert cache.stats.misses == N_KEYS and cache.stats.stale_refreshes == 0  # all hits
    record(GROUP, "C++ index", **paired)  # reported, never asserted: a busy machine must not fail
