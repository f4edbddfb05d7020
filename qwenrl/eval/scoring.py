"""The totals that evaluation sums, and how one batch or one query adds to them.

* :class:`ValTotals`: validation over samples (:func:`qwenrl.eval.validation.evaluate`), summed
  over the ranks' shards, then divided once (:meth:`ValTotals.summary`):

  * cell accuracy: correct cells / cells of the target grids (the OUTSIDE border not counted);
  * canvas accuracy: correct cells / all 30 × 30 canvas cells (the output size included, as
    the loss sees it);
  * exact match: ARC scoring with two attempts (the agent under the two likeliest RL actions);
    a sample counts when either attempt reproduces its target grid exactly;
  * mask ratio: the share of hard cells (q[target] < τ), as in training.

* :class:`TaskTotals`: test queries scored task by task, after test-time training and voting
  (:func:`qwenrl.eval.tasks.evaluate_tasks`), one :func:`score_query` per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from typing import Any

import numpy as np
import torch

from qwenrl.data import CANVAS, OUTSIDE, Batch, decode_grid, exact_match, grid_to_canvas

__all__ = ["TaskTotals", "ValTotals", "score_batch", "score_query"]


# --- over samples: validation --------------------------------------------------------------------


@dataclass
class ValTotals:
    """Sums over validation samples; :meth:`summary` divides them once at the end."""

    correct_cells: float = 0.0  # correct cells inside the target grids (attempt 1)
    target_cells: float = 0.0  # cells inside the target grids
    correct_canvas: float = 0.0  # correct cells over the whole canvas (attempt 1)
    exact: float = 0.0  # samples solved by one of the two attempts
    samples: float = 0.0
    hard_cells: float = 0.0  # cells with q[target] < τ (from the loss's stats)
    loss_cells: float = 0.0  # cells the loss counted

    def __add__(self, other: ValTotals) -> ValTotals:
        return ValTotals(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def to_tensor(self) -> torch.Tensor:
        """float64 [7], for one all-reduce over the ranks."""
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> ValTotals:
        return cls(*t.tolist())

    def summary(self) -> dict[str, float | int]:
        return {
            "cell_accuracy": self.correct_cells / max(self.target_cells, 1),
            "canvas_accuracy": self.correct_canvas / max(self.samples * CANVAS * CANVAS, 1),
            "exact_match": self.exact / max(self.samples, 1),
            "exact": int(self.exact),
            "mask_ratio": self.hard_cells / max(self.loss_cells, 1),
            "samples": int(self.samples),
        }


def score_batch(
    attempts: Sequence[torch.Tensor], batch: Batch, stats: dict[str, torch.Tensor]
) -> ValTotals:
    """Totals of one batch.

    Args:
        attempts: one or two logits tensors [B, 900, C]; the first is the agent's answer, the
            second its second ARC attempt.
        batch: the B samples (targets [B, 30, 30], true output shapes [B, 2]).
        stats: the loss's stats on the first attempt (``mask_ratio``, ``n_valid``).
    """
    b = len(batch)
    target = batch.target.reshape(b, -1)
    preds = [a.argmax(-1) for a in attempts]  # [B, 900] each
    inside = target != OUTSIDE
    exact = 0
    for i in range(b):
        h, w = batch.shapes[i].tolist()
        tgt = batch.target[i, :h, :w].cpu().numpy()
        exact += exact_match([decode_grid(p[i]) for p in preds], tgt)
    n_valid = float(stats["n_valid"])
    return ValTotals(
        correct_cells=float(((preds[0] == target) & inside).sum()),
        target_cells=float(inside.sum()),
        correct_canvas=float((preds[0] == target).sum()),
        exact=float(exact),
        samples=float(b),
        hard_cells=float(stats["mask_ratio"]) * n_valid,
        loss_cells=n_valid,
    )


# --- over test queries: task by task, after test-time training and voting -----------------------


@dataclass
class TaskTotals:
    """Sums over the test queries scored by :func:`evaluate_tasks`, and one row per task.

    ``exact_match`` is averaged over queries, not tasks: a task with two test queries counts
    twice, each query solved or not on its own.
    """

    tasks: int = 0
    queries: int = 0
    exact: int = 0  # queries solved by one of the two attempts
    target_cells: int = 0  # cells inside the target grids
    correct_cells: int = 0  # ... right in the per-cell argmax on the task as it is
    attempt_cells: int = 0  # ... right in the first attempt (cells it does not cover: wrong)
    rows: list[dict[str, Any]] = field(default_factory=list)  # task_id, solved per query

    def summary(self) -> dict[str, float | int]:
        return {
            "tasks": self.tasks,
            "queries": self.queries,
            "exact": self.exact,
            "exact_match": self.exact / max(self.queries, 1),
            "cell_accuracy": self.correct_cells / max(self.target_cells, 1),
            "attempt_cell_accuracy": self.attempt_cells / max(self.target_cells, 1),
        }


def score_query(
    totals: TaskTotals, attempts: Sequence[np.ndarray], canvas: torch.Tensor, target: np.ndarray
) -> bool:
    """Adds one query to ``totals``: at most two attempted grids, the per-cell argmax canvas
    [900] and the target grid [h, w]. Returns whether it is solved (pass@2)."""
    solved = exact_match(list(attempts), target)
    tgt = grid_to_canvas(target, OUTSIDE).reshape(-1)
    inside = tgt != OUTSIDE
    totals.queries += 1
    totals.exact += int(solved)
    totals.target_cells += int(inside.sum())
    totals.correct_cells += int(((canvas.reshape(-1).cpu() == tgt) & inside).sum())
    if len(attempts):
        first = grid_to_canvas(attempts[0], OUTSIDE).reshape(-1)
        totals.attempt_cells += int(((first == tgt) & inside).sum())
    return solved
