"""DDP vs FSDP (``--fsdp``) on two CPU ranks (gloo): training steps per second and what each
rank holds.

Run: pytest bench/test_fsdp_bench.py --benchmark-only
Each setting launches two worker processes (``tests/distributed_worker.py``) on the default
configuration at batch 8 per rank (16 in all, the default run's batch) with a Qwen of four
layers (``QWEN4`` below, saved as a local checkpoint and loaded with ``--qwen``). A worker
takes 3 warm-up steps, then times 20 steps (``steps_per_s``) and reports its parameter and
optimizer-state bytes (local shards under FSDP) and its peak resident memory. The benchmark's
own time is the whole launch, start-up included. Benchmarks report; they assert nothing.
"""

from __future__ import annotations

import pytest
import torch
from distributed_worker import launch

from qwenrl.models import QwenPromptEncoder, TinyQwenConfig

QWEN4 = TinyQwenConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
WARMUP, TIMED = 3, 20


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen4")
    torch.manual_seed(0)
    QwenPromptEncoder(128, tiny=QWEN4).save_pretrained(path)
    return path


@pytest.mark.full  # two torchrun launches: --bench-full
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_fsdp_vs_ddp_two_cpu_ranks(benchmark, record, tmp_path, qwen_dir, mode):
    cfg = {
        "batch_size": 8,
        "qwen": str(qwen_dir),
        "fsdp": mode == "fsdp",
        "out": str(tmp_path / "run"),
        "val_tasks": 1,
    }
    spec = {"config": cfg, "steps": WARMUP, "timed": TIMED}
    ranks: list[dict] = []
    benchmark.pedantic(
        lambda: ranks.extend(launch(2, spec, tmp_path / "w", timeout=1200)),
        rounds=1,
        iterations=1,
    )
    mem = [r["memory"] for r in ranks]
    record(
        "2 CPU ranks, default config, 4-layer Qwen (time: whole launch)",
        mode,
        steps_per_s=min(r["steps_per_s"] for r in ranks),
        param_MB=max(m["param_bytes"] for m in mem) / 2**20,
        optimizer_MB=max(m["optimizer_bytes"] for m in mem) / 2**20,
        peak_rss_MB=max(r["max_rss_bytes"] for r in ranks) / 2**20,
    )
