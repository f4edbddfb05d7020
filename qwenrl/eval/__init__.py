"""Evaluation: the trainer's validation, test-time training, voting and the evaluation CLI.

Modules (docs/trainer-layout.md has the map):

* :mod:`~qwenrl.eval.scoring` — the totals: :class:`ValTotals` / :func:`score_batch` (over
  samples), :class:`TaskTotals` / :func:`score_query` (over test queries);
* :mod:`~qwenrl.eval.validation` — the trainer's validation: :func:`validation_totals`
  computes, :func:`log_validation` logs;
* :mod:`~qwenrl.eval.tasks` — :func:`evaluate_tasks`: per task, test-time training then voting;
* :mod:`~qwenrl.eval.ttt` — test-time training on a task's demonstrations;
* :mod:`~qwenrl.eval.voting` — ARC's two attempts by voting over augmentations;
* :mod:`~qwenrl.eval.val_grids` — the ``val_grids.json`` schema ``qwenrl.plot`` reads;
* :mod:`~qwenrl.eval.run` — :func:`load_run`: a saved run (plain or sharded) in one process;
* :mod:`~qwenrl.eval.evaluate` — ``python -m qwenrl.eval.evaluate`` (alias
  ``python -m qwenrl.evaluate``);
* :mod:`~qwenrl.eval.fit` — ``python -m qwenrl.eval.fit``: can test-time training fit a
  task's own demonstrations?

The trainer (:mod:`qwenrl.train`) imports from here; this package imports the trainer's
configuration, checkpoint and (for types) distributed and monitor modules, never the
:class:`~qwenrl.train.Trainer`. Names are imported on first use, so ``qwenrl.plot`` reads the
schema without loading the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwenrl._lazy import lazy_getattr

if TYPE_CHECKING:
    from qwenrl.eval.run import find_checkpoint, load_run
    from qwenrl.eval.scoring import TaskTotals, ValTotals, score_batch, score_query
    from qwenrl.eval.tasks import evaluate_tasks
    from qwenrl.eval.ttt import TTTConfig, adapt_to_task
    from qwenrl.eval.val_grids import GRID_KEYS, VAL_GRIDS_FILE, check_val_grids
    from qwenrl.eval.validation import log_validation, validation_totals
    from qwenrl.eval.voting import Prediction, predict

_EXPORTS = {
    "GRID_KEYS": "val_grids",
    "Prediction": "voting",
    "TTTConfig": "ttt",
    "TaskTotals": "scoring",
    "VAL_GRIDS_FILE": "val_grids",
    "ValTotals": "scoring",
    "adapt_to_task": "ttt",
    "check_val_grids": "val_grids",
    "evaluate_tasks": "tasks",
    "find_checkpoint": "run",
    "load_run": "run",
    "log_validation": "validation",
    "predict": "voting",
    "score_batch": "scoring",
    "score_query": "scoring",
    "validation_totals": "validation",
}

__all__ = [
    "GRID_KEYS",
    "Prediction",
    "TTTConfig",
    "TaskTotals",
    "VAL_GRIDS_FILE",
    "ValTotals",
    "adapt_to_task",
    "check_val_grids",
    "evaluate_tasks",
    "find_checkpoint",
    "load_run",
    "log_validation",
    "predict",
    "score_batch",
    "score_query",
    "validation_totals",
]


__getattr__ = lazy_getattr(__name__, _EXPORTS)
