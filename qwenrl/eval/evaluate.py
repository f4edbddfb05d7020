"""Score a saved run on the evaluation tasks, with augmentation voting and test-time training.

    python -m qwenrl.eval.evaluate runs/default                            # as validation does
    python -m qwenrl.eval.evaluate runs/default --tasks 100 --vote_transforms 8
    python -m qwenrl.eval.evaluate runs/default --tasks 100 --vote_transforms 8 --ttt_steps 32

(``python -m qwenrl.evaluate`` is the same command.) The run is read by
:func:`qwenrl.eval.run.load_run`: a run directory (its newest checkpoint) or a checkpoint,
single-process or sharded (``--fsdp``). For each task: test-time training on its demonstration
pairs (``--ttt_steps``, :mod:`qwenrl.eval.ttt`), then each test query predicted under
``--vote_transforms`` augmentations and voted into two attempts (:mod:`qwenrl.eval.voting`);
only then is the test output read, to score (:func:`qwenrl.eval.tasks.evaluate_tasks`):

* ``exact_match``: ARC's pass@2, one of the two attempts equals the output exactly;
* ``cell_accuracy``: the target grid's cells right in the per-cell vote over the augmentations
  (:func:`qwenrl.eval.voting.cell_vote`; with ``--vote_transforms 1`` the argmax on the task as
  it is under the likeliest action, the trainer's validation metric; after test-time training,
  the tuned models');
* ``attempt_cell_accuracy``: the target grid's cells the first attempt gets right (cells it
  does not cover count as wrong).

Options left out take the run's own (its ``--vote_transforms``, ``--ttt_*``, seed, loss). The
summary and one row per task are written atomically to ``--out``, by default
``RUN_DIR/eval/<checkpoint>-v<K>-ttt<S>-n<N>.json``, and the summary is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from qwenrl.eval.run import OVERRIDABLE, TTT_OPTIONS, add_run_arguments, load_run_from_args
from qwenrl.eval.tasks import evaluate_tasks
from qwenrl.train.config import ttt_config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.eval.evaluate",
        description=__doc__.split("\n\n")[0],
    )
    add_run_arguments(parser, OVERRIDABLE)
    parser.add_argument("--out", default=None, help="result JSON; default: RUN_DIR/eval/...")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = load_run_from_args(parser, args)
    if isinstance(run, int):
        return run
    models, cfg, checkpoint, tasks = run.models, run.cfg, run.checkpoint, run.tasks
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    device_type = torch.device(cfg.device).type

    def autocast() -> Any:
        return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)

    start = time.perf_counter()
    totals = evaluate_tasks(
        models,
        tasks,
        vote_transforms=cfg.vote_transforms,
        ttt=ttt_config(cfg),
        aug_seed=cfg.seed,
        autocast=autocast,
        progress=not args.quiet,
    )
    summary = {
        **run.header("device", "vote_transforms", *TTT_OPTIONS),
        **totals.summary(),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    name = f"{checkpoint.name}-v{cfg.vote_transforms}-ttt{cfg.ttt_steps}-n{len(tasks)}.json"
    run.write_report(args.out, name, summary, totals.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
