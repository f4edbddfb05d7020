"""Training throughput with the prompt-embedding cache on (refresh every 10 steps) vs off.

Run: pytest bench/test_train_bench.py --benchmark-only

Two prompt encoders, each its own group (cache off is the baseline):
* ``tiny``: the default configuration of ``python -m qwenrl.train`` (a 2-layer, width-64
  random Qwen3), where Qwen is only about half of an uncached step;
* ``qwen_8x384``: a larger random Qwen3 saved with ``save_pretrained`` and loaded through
  ``--qwen`` (8 layers, width 384), whose forward dominates the step as a real Qwen's does.
Each round times whole cache windows (two, 20 optimiser steps, under --bench-full; one, 10
steps, in make bench's quick set), so both settings do the same
work per round; data loading is not timed.
"""

from __future__ import annotations

import pytest

from qwenrl.models import QwenPromptEncoder
from qwenrl.models.encoder import TinyQwenConfig
from qwenrl.train import TrainConfig, Trainer

STEPS = 20  # per round under --bench-full: two cache windows
QUICK_STEPS = 10  # make bench: one window
ENCODERS = {
    "tiny": None,
    "qwen_8x384": TinyQwenConfig(
        hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=1024
    ),
}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("train_bench")


def _qwen_path(out_dir, encoder: str) -> str | None:
    size = ENCODERS[encoder]
    if size is None:
        return None
    path = out_dir / encoder
    if not path.exists():
        QwenPromptEncoder(128, tiny=size).save_pretrained(path)
    return str(path)


# Baseline first (cache off): the ratio of the cached run is taken against it.
@pytest.mark.parametrize(
    "encoder",
    # the quick set: the default encoder (the larger one is --bench-full)
    [pytest.param(e, marks=() if e == "tiny" else pytest.mark.full) for e in ENCODERS],
)
@pytest.mark.parametrize("refresh_every", [0, 10])
def test_train_steps_per_second(benchmark, record, out_dir, encoder, refresh_every, bench_full):
    cfg = TrainConfig(
        refresh_every=refresh_every,
        qwen=_qwen_path(out_dir, encoder),
        out=str(out_dir / f"{encoder}-r{refresh_every}"),
    )
    trainer = Trainer(cfg, quiet=True)
    steps = STEPS if bench_full else QUICK_STEPS
    batches = [trainer.batch_at(s) for s in range(steps)]  # data loading is not timed
    state = {"round": 0}

    def run_window():
        # Each round continues the run: the cache sees new windows, as in training.
        for batch in batches:
            trainer.train_step(batch)
        state["round"] += 1

    rounds = 3 if bench_full else 2
    benchmark.pedantic(run_window, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    record(
        f"train steps (batch 16, encoder {encoder})",
        f"refresh_every={refresh_every}",
        steps_per_s=steps / seconds,
        cache_hit_rate=trainer.cache.stats.hit_rate,
    )
    trainer.close()
