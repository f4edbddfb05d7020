"""The ``val_grids.json`` schema: a few validation samples of a run, for ``python -m qwenrl.plot``.

The trainer writes it after each validation (:func:`write_val_grids`, rank 0 only); the plot
reads it (:func:`read_val_grids`). Light on purpose: ``qwenrl.plot`` imports this module
without loading the models (and transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwenrl.data import CANVAS
from qwenrl.train.checkpoint import write_json_atomic

if TYPE_CHECKING:
    from qwenrl.data import Batch

__all__ = [
    "GRID_KEYS",
    "VAL_GRIDS_FILE",
    "check_val_grids",
    "grid_examples",
    "read_val_grids",
    "val_grids_record",
    "write_val_grids",
]

VAL_GRIDS_FILE = "val_grids.json"
# Each sample: task_id (str) and four CANVAS × CANVAS grids of ints/bools: the query input, the
# first attempt's prediction, the target (OUTSIDE beyond the output grid) and the hard cells.
GRID_KEYS = ("input", "prediction", "target", "hard")


def val_grids_record(step: int, epoch: int, tau: float, samples: list[dict]) -> dict[str, Any]:
    """The content of ``val_grids.json``: {step, epoch, tau, samples}."""
    return {"step": step, "epoch": epoch, "tau": tau, "samples": samples}


def check_val_grids(data: Any) -> list[dict]:
    """The samples of a ``val_grids.json`` content; ``ValueError`` names what is malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise ValueError("expected an object with a 'samples' list")
    for i, sample in enumerate(data["samples"]):
        missing = [k for k in GRID_KEYS if not isinstance(sample, dict) or k not in sample]
        if missing:
            raise ValueError(f"sample {i} is malformed (missing {', '.join(missing)})")
    return data["samples"]


def grid_examples(batch: Batch, logits: torch.Tensor, tau: float, k: int = 4) -> list[dict]:
    """Up to ``k`` samples of ``batch`` in the ``val_grids.json`` form.

    Args:
        batch: a validation batch of B samples.
        logits: the first attempt's logits [B, 900, C].
        tau: the current hard-cell threshold.
    """
    b = min(k, len(batch))
    target = batch.target[:b].reshape(b, -1)
    q_target = logits[:b].float().softmax(-1).gather(-1, target[..., None]).squeeze(-1)
    pred = logits[:b].argmax(-1)
    return [
        {
            "task_id": batch.task_ids[i],
            "input": batch.query[i].tolist(),
            "prediction": pred[i].view(CANVAS, CANVAS).tolist(),
            "target": batch.target[i].tolist(),
            "hard": (q_target[i] < tau).view(CANVAS, CANVAS).tolist(),
        }
        for i in range(b)
    ]


def write_val_grids(
    run_dir: str | Path, step: int, epoch: int, tau: float, samples: list[dict]
) -> Path:
    """Writes ``run_dir/val_grids.json`` atomically; returns its path."""
    path = Path(run_dir) / VAL_GRIDS_FILE
    write_json_atomic(path, val_grids_record(step, epoch, tau, samples))
    return path


def read_val_grids(path: str | Path) -> dict[str, Any]:
    """The content of a ``val_grids.json`` file, its samples checked: ``json.JSONDecodeError``
    if it is not JSON, ``ValueError`` (:func:`check_val_grids`) if it is not of this schema."""
    data = json.loads(Path(path).read_text())
    check_val_grids(data)
    return data
