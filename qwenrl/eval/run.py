"""A saved run, loaded for evaluation in one process: its models, its options, its step.

:func:`load_run` reads a run directory (its newest complete checkpoint) or a checkpoint, saved
by one process or by DDP (``model.safetensors``) or sharded by ``--fsdp`` ranks, any number of
them (their shards are joined here, as ``python -m qwenrl.train.export`` does: both read the
weights with :meth:`~qwenrl.train.checkpoint.Checkpointer.load_weights`). ``--resume`` is the
trainer's own loader (:meth:`qwenrl.train.Trainer.load_checkpoint`): it restores the optimizer
and the rest of a run's state as well, under the run's processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwenrl.data import load_tasks
from qwenrl.models import QwenRLModels
from qwenrl.train.checkpoint import Checkpointer, find_checkpoint, write_json_atomic
from qwenrl.train.config import (
    ConfigError,
    TrainConfig,
    check_config,
    config_from_dict,
    model_config,
)

__all__ = ["RunArgs", "add_run_arguments", "find_checkpoint", "load_run", "load_run_from_args"]

# The run options an evaluation command may override: their flags, help and bounds are the
# trainer's (TrainConfig), their default the run's own value.
OVERRIDABLE = (
    "vote_transforms",
    "ttt_steps",
    "ttt_lr",
    "ttt_batch_size",
    "ttt_augment",
    "ttt_stop_after",
    "device",
)
TTT_OPTIONS = tuple(name for name in OVERRIDABLE if name.startswith("ttt_"))


def add_run_arguments(parser: argparse.ArgumentParser, overridable: Sequence[str]) -> None:
    """The arguments every evaluation command shares: the run, ``--tasks``, ``--NAME`` for each
    of ``overridable`` (of :data:`OVERRIDABLE`; default ``None`` = the run's value) and
    ``--quiet``."""
    parser.add_argument("run", help="a run directory (its newest checkpoint) or a checkpoint")
    parser.add_argument(
        "--tasks", type=int, default=0, help="the first N evaluation tasks (0: all)"
    )
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in overridable:
        if name not in OVERRIDABLE:
            raise ValueError(f"{name!r} is not an option an evaluation may override")
        f = fields[name]
        kind = type(f.default)
        text = f"{f.metadata['help']}; default: the run's value".replace("%", "%%")
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """What :func:`load_run_from_args` read: the models, the options, the checkpoint and its
    step, and the evaluation tasks the command is to score (``--tasks``)."""

    models: QwenRLModels
    cfg: TrainConfig
    checkpoint: Path
    step: int
    tasks: list

    def header(self, *options: str) -> dict[str, Any]:
        """A report's first fields: the checkpoint, its step and the named run options."""
        return {
            "checkpoint": str(self.checkpoint),
            "step": self.step,
            **{name: getattr(self.cfg, name) for name in options},
        }

    def write_report(self, out: str | None, name: str, summary: dict, per_task: list) -> Path:
        """Writes ``summary`` and its ``per_task`` rows atomically to ``out`` (default:
        ``<run dir>/eval/<name>``) and prints the summary as one JSON line."""
        path = Path(out) if out else self.checkpoint.parent / "eval" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**summary, "per_task": per_task})
        print(json.dumps(summary))
        return path


def load_run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunArgs | int:
    """The run and tasks of a command built with :func:`add_run_arguments`. A bad option is a
    usage error (``parser.error``: exit 2 with the usage); a missing or unreadable run prints
    ``error: ...`` to stderr and returns 2, for the command to return."""
    if args.tasks < 0:
        parser.error(f"--tasks must be >= 0, got {args.tasks}")
    overrides = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k, None) is not None}
    try:  # the command's options first, with the trainer's bounds, then the run's config
        check_config(config_from_dict(overrides, where="options"))
        checkpoint = find_checkpoint(args.run)
        models, cfg, step = load_run(checkpoint, overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _, eval_tasks = load_tasks(cfg.data)
    tasks = eval_tasks[: args.tasks] if args.tasks else eval_tasks
    return RunArgs(models, cfg, checkpoint, step, list(tasks))


def load_run(
    run_dir: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[QwenRLModels, TrainConfig, int]:
    """The models of a run (eval mode, on the config's device), its options and the step of
    the checkpoint read.

    ``run_dir``: a run directory (its newest complete checkpoint) or a checkpoint directory,
    plain or sharded (module docstring); ``FileNotFoundError`` when there is none. The options
    are those the run was saved with, for one process: ``--fsdp`` off, then ``overrides``,
    fp16 autocast off outside CUDA; checked as the trainer checks them
    (:class:`~qwenrl.train.config.ConfigError` names the checkpoint and the bad option)."""
    checkpoint = find_checkpoint(run_dir)
    state = Checkpointer.load_state(checkpoint)
    # One process evaluates: the run's --fsdp does not apply here.
    values = {**state["config"], "fsdp": False, **(overrides or {})}
    cfg = config_from_dict(values, where=str(checkpoint))
    if cfg.amp == "fp16" and not cfg.device.startswith("cuda"):
        cfg = dataclasses.replace(cfg, amp="off")  # fp16 autocast is a CUDA-only path
    check_config(cfg)
    models = QwenRLModels(model_config(cfg))
    models.load_weights(
        Checkpointer.load_weights(checkpoint, models.state_dict, renamed=models.RENAMED),
        str(checkpoint),
    )
    return models.to(cfg.device).eval(), cfg, int(state["step"])
