"""The trainer's validation: scores on the evaluation tasks' test queries, then the log.

Two steps, which the trainer calls in turn (:meth:`qwenrl.train.Trainer.validate`):

* :func:`validation_totals` computes: the samples of this rank's shard scored in one pass
  (:func:`evaluate`: the agent under the two likeliest RL actions), and with voting or
  test-time training (``vote_transforms`` > 1, ``ttt.steps`` > 0) the test queries scored task
  by task (:func:`qwenrl.eval.tasks.evaluate_tasks`), whose cell accuracy and exact match replace
  the samples' (canvas accuracy and mask ratio stay those of the trained models); then the
  totals summed over the ranks. It logs nothing.
* :func:`log_validation` logs the summary (``kind: val``) and writes ``val_grids.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwenrl.data import collate
from qwenrl.eval.scoring import ValTotals, score_batch
from qwenrl.eval.tasks import evaluate_tasks
from qwenrl.eval.val_grids import grid_examples, write_val_grids

if TYPE_CHECKING:
    from qwenrl.data import ArcDataset, Batch
    from qwenrl.eval.ttt import TTTConfig
    from qwenrl.loss import EFELoss
    from qwenrl.models import QwenRLModels
    from qwenrl.train.distributed import DistInfo
    from qwenrl.train.monitor import Monitor

__all__ = ["evaluate", "log_validation", "predict_attempts", "validation_totals"]


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


def validation_totals(
    models: QwenRLModels,
    criterion: EFELoss,
    dataset: ArcDataset,
    dist: DistInfo,
    *,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    min_batches: int = 0,
    vote_transforms: int = 1,
    ttt: TTTConfig | None = None,
    aug_seed: int = 0,
    progress: bool = True,
) -> tuple[ValTotals, list[dict]]:
    """The validation totals of ``dataset``, summed over the ranks of ``dist`` (each scores its
    shard of the samples, and of the tasks), and this rank's shown samples in the
    ``val_grids.json`` form (module docstring). Every rank must call it; nothing is logged."""
    totals, shown = evaluate(
        models,
        criterion,
        dataset,
        dist.shard(len(dataset)),
        batch_size=batch_size,
        device=device,
        autocast=autocast,
        min_batches=min_batches,
    )
    if vote_transforms > 1 or (ttt is not None and ttt.steps > 0):
        # Cells and exact matches task by task, after test-time training and voting; this
        # rank's tasks replace its samples' counts (both shards partition the queries).
        tasks = dataset.tasks
        voted = evaluate_tasks(
            models,
            [tasks[i] for i in dist.shard(len(tasks))],
            vote_transforms=vote_transforms,
            ttt=ttt,
            aug_seed=aug_seed,
            autocast=autocast,
            progress=progress,
        )
        totals = dataclasses.replace(
            totals,
            correct_cells=float(voted.correct_cells),
            target_cells=float(voted.target_cells),
            exact=float(voted.exact),
        )
    if dist.enabled:
        t = totals.to_tensor().to(device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(t)
        totals = ValTotals.from_tensor(t.cpu())
    return totals, shown


def log_validation(
    monitor: Monitor,
    run_dir: str | Path,
    totals: ValTotals,
    shown: list[dict],
    *,
    step: int,
    epoch: int,
    tau: float,
    vote_transforms: int = 1,
    ttt_steps: int = 0,
    is_main: bool = True,
) -> dict[str, Any]:
    """Logs the summary of ``totals`` (``kind: val``; with voting or test-time training, their
    settings too) and, on the main rank, writes ``shown`` to ``run_dir/val_grids.json``.
    Returns the summary."""
    summary = {"kind": "val", "step": step, "epoch": epoch, **totals.summary()}
    if vote_transforms > 1 or ttt_steps > 0:
        summary |= {"vote_transforms": vote_transforms, "ttt_steps": ttt_steps}
    monitor.log(summary)
    if is_main and shown:
        write_val_grids(run_dir, step, epoch, tau, shown)
    return summary
