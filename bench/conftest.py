"""Shared benchmark plumbing: the tests' helpers on the path, and a ratio table at the end.

Each benchmark calls ``record(group, name, seconds, **extra)``; the first entry of a group is
its baseline, and the terminal summary prints every entry's speed-up against it.

Two sizes: by default (``make bench``) only the quick set runs, one row per baseline family at
the shapes users quote, in a few minutes on a 2-core CPU. Benchmarks marked ``full`` (more
option sets, dtypes, encoders, the two-rank runs) run with ``--bench-full`` (``make
bench-full``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "tests"))
sys.path.insert(0, str(_ROOT / "bench"))
# Compiler caches and the extension requirement: the repository's root conftest.py.

_rows: dict[str, list[tuple[str, float, dict]]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-full",
        action="store_true",
        help="also run the benchmarks marked 'full' (make bench-full)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full: a benchmark outside make bench's quick set")


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    """True under --bench-full: a benchmark may then take more rounds or steps."""
    return bool(request.config.getoption("--bench-full"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--bench-full"):
        return
    skip = pytest.mark.skip(reason="outside the quick set: run with --bench-full")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


@pytest.fixture
def record(benchmark):
    """Records the median time of ``benchmark`` and returns its ratio vs the group baseline."""

    def _record(group: str, name: str, **extra) -> float:
        seconds = benchmark.stats.stats.median
        rows = _rows.setdefault(group, [])
        baseline = rows[0][1] if rows else seconds
        ratio = baseline / seconds
        rows.append((name, seconds, extra))
        benchmark.extra_info.update(
            extra, impl=name, baseline=rows[0][0], speedup_vs_baseline=ratio
        )
        return ratio

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    tr = terminalreporter
    tr.section("speed-ups against each group's baseline (median times)")
    for group, rows in _rows.items():
        base_name, base, _ = rows[0]
        tr.write_line(f"{group}  (baseline: {base_name})")
        for name, seconds, extra in rows:
            info = "  ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
            )
            tr.write_line(
                f"    {name:<28} {seconds * 1e3:10.3f} ms  x{base / seconds:6.2f}  {info}"
            )
