"""Score a saved run on the evaluation tasks, with augmentation voting and test-time training.

    python -m qwenrl.evaluate runs/default                                 # as validation does
    python -m qwenrl.evaluate runs/default --tasks 100 --vote_transforms 8
    python -m qwenrl.evaluate runs/default --tasks 100 --vote_transforms 8 --ttt_steps 32

For each task: test-time training on its demonstration pairs (:mod:`qwenrl.ttt`, with
``--ttt_steps``), then each test query predicted under ``--vote_transforms`` augmentations and
voted into two attempts (:mod:`qwenrl.voting`). Only then is the test output read, to score:

* ``exact_match``: ARC's pass@2, one of the two attempts equals the output exactly;
* ``cell_accuracy``: the target grid's cells predicted right by the per-cell argmax on the task
  as it is under the likeliest action (the trainer's validation metric, here after test-time
  training);
* ``attempt_cell_accuracy``: the target grid's cells the first attempt gets right (cells it
  does not cover count as wrong).

The summary (and one row per task) is written atomically to ``--out``, by default
``RUN_DIR/eval/<checkpoint>-v<K>-ttt<S>-n<N>.json``, and printed as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qwenrl.data import OUTSIDE, ArcTask, exact_match, grid_to_canvas, load_tasks
from qwenrl.models import ModelConfig, QwenRLModels
from qwenrl.ttt import TTTConfig, adapt_to_task
from qwenrl.voting import predict


@dataclass
class EvalTotals:
    """Running counts over the queries scored so far (named, never positional)."""

    tasks: int = 0
    queries: int = 0
    exact: int = 0
    cells: int = 0  # target cells
    cells_correct: int = 0  # ... right in the per-cell argmax
    attempt_cells_correct: int = 0  # ... right in the first attempt
    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "queries": self.queries,
            "exact": self.exact,
            "exact_match": self.exact / max(self.queries, 1),
            "cell_accuracy": self.cells_correct / max(self.cells, 1),
            "attempt_cell_accuracy": self.attempt_cells_correct / max(self.cells, 1),
        }


def score_query(
    totals: EvalTotals, attempts: Sequence[np.ndarray], canvas: torch.Tensor, target: np.ndarray
) -> bool:
    """Add one query to ``totals``: attempts (≤ 2 grids), per-cell argmax canvas [900] and the
    target grid [h, w]; returns whether it is solved (pass@2)."""
    solved = exact_match(list(attempts), target)
    tgt = grid_to_canvas(target, OUTSIDE).view(-1)
    counted = tgt != OUTSIDE
    first = grid_to_canvas(attempts[0], OUTSIDE).view(-1) if len(attempts) else None
    totals.queries += 1
    totals.exact += int(solved)
    totals.cells += int(counted.sum())
    totals.cells_correct += int(((canvas.view(-1).cpu() == tgt) & counted).sum())
    if first is not None:
        totals.attempt_cells_correct += int(((first == tgt) & counted).sum())
    return solved


def evaluate_tasks(
    models: QwenRLModels,
    tasks: Sequence[ArcTask],
    *,
    vote_transforms: int = 1,
    ttt: TTTConfig | None = None,
    aug_seed: int = 0,
    autocast: Any = contextlib.nullcontext,
    progress: bool = True,
) -> EvalTotals:
    """Test-time train (optional), predict with voting, then score every test query of ``tasks``.

    ``models`` should be in eval mode. ``autocast``: a factory of the context to predict in
    (e.g. the trainer's bf16 autocast). A progress bar over tasks goes to stderr.
    """
    ttt = ttt or TTTConfig()
    totals = EvalTotals()
    bar = tqdm(tasks, desc="Evaluating", unit="task", disable=not progress, file=sys.stderr)
    for index, task in enumerate(bar):
        with autocast():
            tuned, offset = adapt_to_task(models, task.train, ttt, task_seed=index)
        solved = []
        for query_input, _ in task.test:
            with autocast():
                pred = predict(
                    tuned,
                    task.train,
                    query_input,
                    vote_transforms=vote_transforms,
                    aug_seed=aug_seed,
                    prompt_offset=offset,
                )
            solved.append(pred)
        # The test outputs are read here, after every prediction of the task is made.
        row = {"task_id": task.id, "solved": []}
        for pred, (_, target) in zip(solved, task.test, strict=True):
            row["solved"].append(score_query(totals, pred.attempts, pred.canvas, target))
        totals.tasks += 1
        totals.rows.append(row)
        bar.set_postfix(exact=f"{totals.exact}/{totals.queries}")
    bar.close()
    return totals


# --- a saved run -------------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or the newest complete ``checkpoint-*`` in a run dir."""
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "state.pt").is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    done = sorted(p for p in path.glob("checkpoint-*") if (p / "state.pt").is_file())
    if not done:
        raise FileNotFoundError(f"{path}: no complete checkpoint-* in this run directory")
    return done[-1]


def model_config_from_run(run: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` a run with this saved training config built."""
    return ModelConfig(
        dim=run["dim"],
        agent_layers=run["agent_layers"],
        dropout=run["dropout"],
        prompt_dropout=run["prompt_dropout"],
        reward_scale=run["reward_scale"],
        qwen_path=run["qwen"],
        max_length=run["qwen_max_length"],
    )


def load_run(checkpoint: Path, device: str) -> tuple[QwenRLModels, dict[str, Any], int]:
    """Models (eval mode, on ``device``), the run's training config and the checkpoint's step."""
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    run = state["config"]
    models = QwenRLModels(model_config_from_run(run))
    models.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    return models.to(device).eval(), run, int(state["step"])


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # the file appears complete or not at all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", help="a run directory (its newest checkpoint) or a checkpoint dir")
    parser.add_argument(
        "--tasks", type=int, default=0, help="the first N evaluation tasks (0 = all)"
    )
    parser.add_argument(
        "--vote_transforms", type=int, default=1, help="augmentations voted over (1 = none)"
    )
    parser.add_argument(
        "--ttt_steps", type=int, default=0, help="test-time training steps per task (0 = none)"
    )
    parser.add_argument("--ttt_lr", type=float, default=TTTConfig.lr, help="test-time training lr")
    parser.add_argument(
        "--ttt_batch_size", type=int, default=TTTConfig.batch_size, help="test-time batch size"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument("--out", default=None, help="result JSON (default: RUN_DIR/eval/...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.tasks < 0 or args.vote_transforms < 1 or args.ttt_steps < 0:
        parser.error("--tasks and --ttt_steps must be >= 0 and --vote_transforms >= 1")
    if args.ttt_batch_size < 1 or not args.ttt_lr > 0:
        parser.error("--ttt_batch_size must be >= 1 and --ttt_lr > 0")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for but CUDA is not available here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = find_checkpoint(args.run)
        state_device = args.device or "cpu"
        models, run, step = load_run(checkpoint, state_device)
        _, eval_tasks = load_tasks(run["data"])
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tasks = eval_tasks[: args.tasks] if args.tasks else eval_tasks
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.get("amp", "off"))
    device_type = torch.device(state_device).type

    def autocast():
        return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)

    ttt = TTTConfig(
        steps=args.ttt_steps,
        lr=args.ttt_lr,
        batch_size=args.ttt_batch_size,
        tau=run["tau_end"],
        easy_weight=run["easy_weight"],
        seed=run["seed"],
    )
    start = time.perf_counter()
    totals = evaluate_tasks(
        models,
        tasks,
        vote_transforms=args.vote_transforms,
        ttt=ttt,
        aug_seed=run["seed"],
        autocast=autocast,
        progress=not args.quiet,
    )
    summary = {
        "checkpoint": str(checkpoint),
        "step": step,
        "vote_transforms": args.vote_transforms,
        "ttt_steps": args.ttt_steps,
        "ttt_lr": args.ttt_lr,
        "ttt_batch_size": args.ttt_batch_size,
        "device": state_device,
        **totals.summary(),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    name = f"{checkpoint.name}-v{args.vote_transforms}-ttt{args.ttt_steps}-n{len(tasks)}.json"
    out = Path(args.out) if args.out else checkpoint.parent / "eval" / name
    _write_json_atomic(out, {**summary, "per_task": totals.rows})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
