"""Can the agent fit a task? Test-time training on its demonstrations, then each demonstration
predicted back.

    python -m qwenrl.eval.fit runs/default --tasks 50                    # the run's TTT options
    python -m qwenrl.eval.fit runs/default --tasks 50 --ttt_steps 100 --ttt_lr 3e-3

For each task: :func:`qwenrl.eval.ttt.adapt_to_task` on its demonstration pairs, then each pair
j predicted as training saw it, leave-one-out (the other pairs as prompt, pair j's input as the
query; identity augmentation, the likeliest action) and compared with pair j's output. A task
*fits* when at least ``--fit_share`` (0.8) of its pairs come out exact. This measures capacity,
not generalisation: the outputs predicted here are those test-time training trained on. The
test pairs are never read.

The summary (tasks, fitted tasks, fit rate, pairs exact, seconds per task: TTT plus the
predictions) and one row per task go atomically to ``--out`` (default
``RUN_DIR/eval/fit-<checkpoint>-ttt<S>-lr<LR>-n<N>.json``); the summary is printed as one JSON
line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from qwenrl.data import ArcTask
from qwenrl.eval.run import OVERRIDABLE, TTT_OPTIONS, add_run_arguments, load_run_from_args
from qwenrl.eval.ttt import TTTConfig, adapt_to_task
from qwenrl.eval.voting import predict
from qwenrl.models import QwenRLModels
from qwenrl.train.config import ttt_config

__all__ = ["TaskFit", "fit_task", "main"]

FIT_SHARE = 0.8


@dataclass(frozen=True)
class TaskFit:
    """One task's fit: demonstration pairs exact after test-time training, of how many, and
    the seconds spent (training and predictions)."""

    task_id: str
    exact: int
    pairs: int
    seconds: float

    def fits(self, share: float = FIT_SHARE) -> bool:
        return self.pairs > 0 and self.exact >= share * self.pairs


def fit_task(models: QwenRLModels, task: ArcTask, ttt: TTTConfig, *, task_seed: int = 0) -> TaskFit:
    """Test-time training on ``task``'s demonstrations, then each of them predicted leave-one-out
    (module docstring). A task with fewer than two pairs has no leave-one-out prompt: 0 pairs."""
    start = time.perf_counter()
    demos: Sequence = task.train
    if len(demos) < 2:
        return TaskFit(task.id, 0, 0, 0.0)
    tuned, offset = adapt_to_task(models, demos, ttt, task_seed=task_seed)
    exact = 0
    for j, (query_input, target) in enumerate(demos):
        others = [pair for i, pair in enumerate(demos) if i != j]
        attempt = predict(tuned, others, query_input, prompt_offset=offset).attempts[0]
        exact += int(attempt.shape == target.shape and bool(np.array_equal(attempt, target)))
    return TaskFit(task.id, exact, len(demos), time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.eval.fit", description=__doc__.split("\n\n")[0]
    )
    add_run_arguments(parser, [n for n in OVERRIDABLE if n != "vote_transforms"])
    parser.add_argument(
        "--fit_share", type=float, default=FIT_SHARE, help="share of pairs exact for a task to fit"
    )
    parser.add_argument("--out", default=None, help="result JSON; default: RUN_DIR/eval/fit-...")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.fit_share <= 1:
        parser.error(f"--fit_share must be in (0, 1], got {args.fit_share}")
    run = load_run_from_args(parser, args)
    if isinstance(run, int):
        return run
    models, cfg, checkpoint, tasks = run.models, run.cfg, run.checkpoint, run.tasks
    ttt = ttt_config(cfg)
    rows: list[TaskFit] = []
    bar = tqdm(tasks, desc="Fitting", unit="task", disable=args.quiet, file=sys.stderr)
    with torch.random.fork_rng():
        for index, task in enumerate(bar):
            rows.append(fit_task(models, task, ttt, task_seed=index))
            bar.set_postfix(fit=f"{sum(r.fits(args.fit_share) for r in rows)}/{len(rows)}")
    bar.close()
    counted = [r for r in rows if r.pairs]
    summary = {
        **run.header(*TTT_OPTIONS),
        "tasks": len(counted),
        "fitted": sum(r.fits(args.fit_share) for r in counted),
        "fit_rate": round(sum(r.fits(args.fit_share) for r in counted) / max(len(counted), 1), 4),
        "pairs_exact": sum(r.exact for r in counted),
        "pairs": sum(r.pairs for r in counted),
        "seconds_per_task": round(sum(r.seconds for r in counted) / max(len(counted), 1), 2),
        "max_seconds": round(max((r.seconds for r in counted), default=0.0), 2),
    }
    aug = "" if cfg.ttt_augment else "-noaug"
    name = f"fit-{checkpoint.name}-ttt{cfg.ttt_steps}-lr{cfg.ttt_lr:g}{aug}-n{len(tasks)}.json"
    run.write_report(args.out, name, summary, [r.__dict__ for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
