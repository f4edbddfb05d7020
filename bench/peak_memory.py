"""One step's time and extra peak memory, measured in a process of its own.

A benchmark file that uses it runs itself as the child (``python bench/<file>.py ARGS``): the
child builds its inputs, calls :func:`measure_step` and prints the result as its last line;
the parent reads it with :func:`in_fresh_process`. A fresh process, because a peak RSS is a
high-water mark of the whole process: earlier benchmarks' allocations would hide this one's.

The step runs once first (the gradients and the allocator's pools now exist, as in a real
training loop), then the peak is reset to the current RSS (Linux ``/proc/self/clear_refs``)
and the step runs again: the extra peak is how far the second step rises above where it began.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAS_CLEAR_REFS = Path("/proc/self/clear_refs").exists()


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_step(step: Callable[[], object], reset: Callable[[], object] = lambda: None) -> dict:
    """Run ``step`` once to warm up, ``reset`` (zero the gradients, say), then time the second
    ``step``: ``{"seconds", "cpu_s", "extra_peak_mb"}``."""
    step()
    reset()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = status_bytes("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "extra_peak_mb": (status_bytes("VmHWM") - base) / 2**20,
    }


def in_fresh_process(script: str, *args: str) -> dict:
    """Run ``python script *args`` from the repository root and return the JSON object of its
    last output line; a failing child fails the benchmark with its stderr."""
    out = subprocess.run(
        [sys.executable, script, *args],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
