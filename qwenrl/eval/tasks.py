"""Task by task: test-time training, then voting, then the scores (ARC's pass@2).

For each task: test-time training on its demonstration pairs (:mod:`qwenrl.eval.ttt`), then
each test query predicted under the augmentations and voted into two attempts
(:mod:`qwenrl.eval.voting`); only then is the query's output read, to score it
(:func:`qwenrl.eval.scoring.score_query`). Cell accuracy is that of the per-cell vote over the
same augmentations (:func:`qwenrl.eval.voting.cell_vote`; with one, the per-cell argmax on the
task as it is), after test-time training the tuned models'. The trainer's validation uses it
with ``--vote_transforms`` > 1 or ``--ttt_steps`` > 0; ``python -m qwenrl.eval.evaluate``
always.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tqdm import tqdm

from qwenrl.eval.scoring import TaskTotals, score_query

if TYPE_CHECKING:
    from qwenrl.data import ArcTask
    from qwenrl.eval.ttt import TTTConfig
    from qwenrl.models import QwenRLModels

__all__ = ["evaluate_tasks"]


def evaluate_tasks(
    models: QwenRLModels,
    tasks: Sequence[ArcTask],
    *,
    vote_transforms: int = 1,
    ttt: TTTConfig | None = None,
    aug_seed: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = True,
) -> TaskTotals:
    """Test-time training (``ttt``, optional), then every test query predicted with voting over
    ``vote_transforms`` augmentations, then scored (module docstring). Restores the models'
    train/eval mode; a progress bar over the tasks goes to stderr when ``progress``."""
    from qwenrl.eval.ttt import TTTConfig, adapt_to_task
    from qwenrl.eval.voting import predict

    ttt = ttt or TTTConfig()
    was_training = models.training
    models.eval()
    totals = TaskTotals()
    bar = tqdm(tasks, desc="Evaluating", unit="task", disable=not progress, file=sys.stderr)
    try:
        for index, task in enumerate(bar):
            with autocast():
                tuned, offset = adapt_to_task(models, task.train, ttt, task_seed=index)
                preds = [
                    predict(
                        tuned,
                        task.train,
                        query_input,
                        vote_transforms=vote_transforms,
                        aug_seed=aug_seed,
                        prompt_offset=offset,
                    )
                    for query_input, _ in task.test
                ]
            # The task's test outputs are read here, once all its predictions are made.
            solved = [
                score_query(totals, p.attempts, p.canvas, target)
                for p, (_, target) in zip(preds, task.test, strict=True)
            ]
            totals.tasks += 1
            totals.rows.append({"task_id": task.id, "solved": solved})
            bar.set_postfix(exact=f"{totals.exact}/{totals.queries}")
    finally:
        bar.close()
        models.train(was_training)
    return totals
