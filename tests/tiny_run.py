"""A training run that takes seconds: synthetic ARC task folders and its TrainConfig.

Shared by the trainer's and the evaluation's tests (tests/train, tests/eval) and by the
``arc_dir`` fixture (conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qwenrl.train import TrainConfig

# Two epochs of four steps, a 32-wide model with one agent layer, two validation tasks.
TINY: dict[str, Any] = {
    **dict(epochs=2, max_batches=4, batch_size=2, working_set=4, refresh_every=3, seed=0),
    **dict(dim=32, agent_layers=1, qwen_max_length=128),
    **dict(val_tasks=2, val_batch_size=4, log_every=1),
}


def write_arc_tasks(
    root: Path, n: int, seed: int, *, prefix: str = "task", n_test: int = 1
) -> Path:
    """Writes ``n`` task files ``{prefix}000.json``, ... into ``root``: three demonstrations and
    ``n_test`` test pairs each, every pair a random grid (2 to 5 cells a side, the same shape
    within a task) and its mirror image. The same ``seed`` writes the same files."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(2, 6, size=2)

        def pair(h=h, w=w):
            grid = rng.integers(0, 10, size=(h, w))
            return {"input": grid.tolist(), "output": np.fliplr(grid).tolist()}

        task = {"train": [pair(), pair(), pair()], "test": [pair() for _ in range(n_test)]}
        (root / f"{prefix}{i:03d}.json").write_text(json.dumps(task))
    return root


def tiny_config(out: Path, data: Path, **overrides: Any) -> TrainConfig:
    """The tiny run (:data:`TINY`) on the ARC folder ``data``, writing to ``out``."""
    return TrainConfig(**{**TINY, "data": str(data), "out": str(out), **overrides})
