"""Training throughput with the prompt-embedding cache on (refresh every 10 steps) vs off.

Run: pytest bench/test_train_bench.py --benchmark-only
The default configuration of ``python -m qwenrl.train`` (tiny Qwen, batch 16, CPU); each round
times two full cache windows (20 optimiser steps) so both settings do the same work per round.
"""

from __future__ import annotations

import pytest

from qwenrl.train import TrainConfig, Trainer

STEPS = 20


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("train_bench")


# Baseline first (cache off): the ratio of the cached run is taken against it.
@pytest.mark.parametrize("refresh_every", [0, 10])
def test_train_steps_per_second(benchmark, record, out_dir, refresh_every):
    cfg = TrainConfig(refresh_every=refresh_every, out=str(out_dir / f"r{refresh_every}"))
    trainer = Trainer(cfg, quiet=True)
    batches = [trainer.batch_at(s) for s in range(STEPS)]  # data loading is not timed
    state = {"round": 0}

    def run_window():
        # Each round continues the run: the cache sees new windows, as in training.
        for batch in batches:
            trainer.train_step(batch)
        state["round"] += 1

    benchmark.pedantic(run_window, rounds=3, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    record(
        "train steps (default config, batch 16)",
        f"refresh_every={refresh_every}",
        steps_per_s=STEPS / seconds,
        cache_hit_rate=trainer.cache.stats.hit_rate,
    )
    trainer.close()
