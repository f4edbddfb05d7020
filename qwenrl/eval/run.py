"""A saved run, loaded for evaluation in one process: its models, its options, its step.

:func:`load_run` reads a run directory (its newest complete checkpoint) or a checkpoint, saved
by one process or by DDP (``model.safetensors``) or sharded by ``--fsdp`` ranks, any number of
them (their shards are joined here, as ``python -m qwenrl.train.export`` does: both read the
weights with :meth:`~qwenrl.train.checkpoint.Checkpointer.load_weights`). ``--resume`` is the
trainer's own loader (:meth:`qwenrl.train.Trainer.load_checkpoint`): it restores the optimizer
and the rest of a run's state as well, under the run's processes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qwenrl.models import QwenRLModels
from qwenrl.train.checkpoint import Checkpointer, find_checkpoint
from qwenrl.train.config import TrainConfig, check_config, config_from_dict, model_config

__all__ = ["find_checkpoint", "load_run"]


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
    models.load_state_dict(
        Checkpointer.load_weights(checkpoint, models.state_dict, renamed=models.RENAMED)
    )
    return models.to(cfg.device).eval(), cfg, int(state["step"])
