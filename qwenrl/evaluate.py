"""Score a saved run on the evaluation tasks, with augmentation voting and test-time training.

    python -m qwenrl.evaluate runs/default                                 # as validation does
    python -m qwenrl.evaluate runs/default --tasks 100 --vote_transforms 8
    python -m qwenrl.evaluate runs/default --tasks 100 --vote_transforms 8 --ttt_steps 32

For each task: test-time training on its demonstration pairs (``--ttt_steps``, :mod:`qwenrl.ttt`),
then each test query predicted under ``--vote_transforms`` augmentations and voted into two
attempts (:mod:`qwenrl.voting`); only then is the test output read, to score
(:func:`evaluate_tasks`, which the trainer's validation uses too):

* ``exact_match``: ARC's pass@2, one of the two attempts equals the output exactly;
* ``cell_accuracy``: the target grid's cells right in the per-cell argmax on the task as it is
  under the likeliest action (the trainer's validation metric; after test-time training, the
  tuned models');
* ``attempt_cell_accuracy``: the target grid's cells the first attempt gets right (cells it
  does not cover count as wrong).

Options left out take the run's own (its ``--vote_transforms``, ``--ttt_*``, seed, loss). The
summary and one row per task are written atomically to ``--out``, by default
``RUN_DIR/eval/<checkpoint>-v<K>-ttt<S>-n<N>.json``, and the summary is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from qwenrl.data import OUTSIDE, exact_match, grid_to_canvas, load_tasks
from qwenrl.models import ModelConfig, QwenRLModels
from qwenrl.ttt import TTTConfig

if TYPE_CHECKING:
    from qwenrl.data import ArcTask
    from qwenrl.train import TrainConfig


@dataclass
class TaskTotals:
    """Sums over the test queries scored by :func:`evaluate_tasks`, and one row per task."""

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
    from qwenrl.ttt import adapt_to_task
    from qwenrl.voting import predict

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


# --- a saved run ---------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete ``checkpoint-*`` of a run."""
    from qwenrl.train import latest_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    if (path / "state.pt").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint-* in this run directory")
    return found


def run_config(values: dict[str, Any]) -> TrainConfig:
    """A :class:`~qwenrl.train.TrainConfig` from saved or given values, checked as the trainer
    checks its flags; ``ValueError`` names an unknown option or a bad value."""
    from qwenrl.train import TrainConfig, check_config

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}")
    cfg = TrainConfig(**values)
    problem = check_config(cfg)
    if problem:
        raise ValueError(problem)
    return cfg


def load_run(
    checkpoint: Path, overrides: dict[str, Any] | None = None
) -> tuple[QwenRLModels, TrainConfig, int]:
    """The models (eval mode, on the config's device), the run's config with ``overrides``
    (``ValueError`` names a bad one) and the checkpoint's step."""
    from safetensors.torch import load_file

    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    values = {**state["config"], **(overrides or {})}
    if values.get("amp") == "fp16" and not str(values.get("device", "cpu")).startswith("cuda"):
        values["amp"] = "off"  # fp16 autocast is a CUDA-only path
    cfg = run_config(values)
    models = QwenRLModels(
        ModelConfig(
            dim=cfg.dim,
            agent_layers=cfg.agent_layers,
            dropout=cfg.dropout,
            prompt_dropout=cfg.prompt_dropout,
            reward_scale=cfg.reward_scale,
            qwen_path=cfg.qwen,
            max_length=cfg.qwen_max_length,
        )
    )
    models.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    return models.to(cfg.device).eval(), cfg, int(state["step"])


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # the file appears complete or not at all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.evaluate",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("run", help="a run directory (its newest checkpoint) or a checkpoint")
    parser.add_argument(
        "--tasks", type=int, default=0, help="the first N evaluation tasks (0: all)"
    )
    from qwenrl.train import HELP as run_help

    for name, kind in (
        ("vote_transforms", int),
        ("ttt_steps", int),
        ("ttt_lr", float),
        ("ttt_batch_size", int),
    ):
        parser.add_argument(
            f"--{name}", type=kind, default=None, help=f"{run_help[name]}; default: the run's value"
        )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: the run's")
    parser.add_argument("--out", default=None, help="result JSON; default: RUN_DIR/eval/...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    from qwenrl.train import ttt_config

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks < 0:
        parser.error(f"--tasks must be >= 0, got {args.tasks}")
    overrides = {
        k: getattr(args, k)
        for k in ("vote_transforms", "ttt_steps", "ttt_lr", "ttt_batch_size", "device")
        if getattr(args, k) is not None
    }
    try:  # this command's options first, with the trainer's bounds, then the run's config
        run_config(overrides)
        checkpoint = find_checkpoint(args.run)
        models, cfg, step = load_run(checkpoint, overrides)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as exc:
        parser.error(str(exc))
    _, eval_tasks = load_tasks(cfg.data)
    tasks = eval_tasks[: args.tasks] if args.tasks else eval_tasks
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
        "checkpoint": str(checkpoint),
        "step": step,
        "device": cfg.device,
        "vote_transforms": cfg.vote_transforms,
        "ttt_steps": cfg.ttt_steps,
        "ttt_lr": cfg.ttt_lr,
        "ttt_batch_size": cfg.ttt_batch_size,
        **totals.summary(),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    name = f"{checkpoint.name}-v{cfg.vote_transforms}-ttt{cfg.ttt_steps}-n{len(tasks)}.json"
    out = Path(args.out) if args.out else checkpoint.parent / "eval" / name
    _write_json_atomic(out, {**summary, "per_task": totals.rows})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
