"""Validation on the evaluation tasks, and the ``val_grids.json`` schema ``qwenrl.plot`` reads.

Scores per epoch (all summed over the ranks' shards, then divided once):

* cell accuracy: correct cells / cells of the target grids (the OUTSIDE border not counted);
* canvas accuracy: correct cells / all 30 × 30 canvas cells (the output size included, as
  the loss sees it);
* exact match: ARC scoring with two attempts (the agent under the two likeliest RL actions);
  a sample counts when either attempt reproduces its target grid exactly;
* mask ratio: the share of hard cells (q[target] < τ), as in training.

With voting or test-time training (``--vote_transforms`` > 1, ``--ttt_steps`` > 0), the test
queries are scored task by task instead (:func:`evaluate_tasks`): test-time training on the
task's demonstrations (:mod:`qwenrl.eval.ttt`), then each query predicted under the augmentations
and voted into two attempts (:mod:`qwenrl.eval.voting`); only then is its output read. Cell accuracy
and exact match come from there (after test-time training, the tuned models' per-cell argmax
on the task as it is); canvas accuracy and mask ratio stay those of the trained models.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from qwenrl.data import CANVAS, OUTSIDE, Batch, collate, decode_grid, exact_match, grid_to_canvas

if TYPE_CHECKING:
    from qwenrl.data import ArcDataset, ArcTask
    from qwenrl.eval.ttt import TTTConfig
    from qwenrl.loss import EFELoss
    from qwenrl.models import QwenRLModels

__all__ = [
    "GRID_KEYS",
    "VAL_GRIDS_FILE",
    "TaskTotals",
    "ValTotals",
    "check_val_grids",
    "evaluate",
    "evaluate_tasks",
    "grid_examples",
    "predict_attempts",
    "score_batch",
    "score_query",
    "val_grids_record",
]

# --- the val_grids.json schema ---------------------------------------------------------------

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


# --- scores ----------------------------------------------------------------------------------


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


def predict_attempts(models: QwenRLModels, batch: Batch, n: int = 2) -> list[torch.Tensor]:
    """Logits [B, 900, C] of the agent under the ``n`` likeliest RL actions, best first."""
    prompt = models.encoder.encode(batch.prompts).float()
    refined = models.refiner.apply(prompt)
    ranked = models.policy.distribution(refined).probs.argsort(-1, descending=True)
    return [
        models.agent(batch.query, models.policy.steer(refined, ranked[:, a]), batch.hints).float()
        for a in range(min(n, ranked.shape[-1]))
    ]


@torch.no_grad()
def evaluate(
    models: QwenRLModels,
    criterion: EFELoss,
    dataset: ArcDataset,
    indices: range,
    *,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    min_batches: int = 0,
) -> tuple[ValTotals, list[dict]]:
    """Scores ``dataset[indices]`` in eval mode and restores the models' train/eval mode.

    Returns the totals (of this process's ``indices`` only) and the first batch's samples in
    the ``val_grids.json`` form. With fewer than ``min_batches`` batches the models also run
    on unscored filler batches (FSDP: each call of a sharded module is a collective, so every
    rank makes as many calls as the rank with the most batches).
    """
    was_training = models.training
    models.eval()
    totals, shown = ValTotals(), []
    try:
        for start in range(indices.start, indices.stop, batch_size):
            rows = range(start, min(start + batch_size, indices.stop))
            batch = collate([dataset[i] for i in rows]).to(device)
            with autocast():
                attempts = predict_attempts(models, batch)
                criterion(attempts[0], batch.target.reshape(len(batch), -1))
            totals = totals + score_batch(attempts, batch, criterion.last_stats)
            if not shown:
                shown = grid_examples(batch, attempts[0], criterion.tau)
        missing = min_batches - len(range(indices.start, indices.stop, batch_size))
        if missing > 0:
            filler = collate([dataset[indices.start if len(indices) else 0]]).to(device)
            for _ in range(missing):
                with autocast():
                    predict_attempts(models, filler)
    finally:
        models.train(was_training)
    return totals, shown


# --- task by task: test-time training and voting ---------------------------------------------


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
