"""The trainer: ``python -m qwenrl.train``, or ``Trainer(TrainConfig(...)).train()``.

Modules, in the order a step uses them (docs/trainer-layout.md has the map):

* :mod:`~qwenrl.train.config` — :class:`TrainConfig`: the flags, ``--config FILE``, checks;
* :mod:`~qwenrl.train.trainer` — :class:`Trainer`: setup phases, ``train_step``, ``train``;
* :mod:`~qwenrl.train.step` — the DDP-wrapped forward, step metrics, LR and τ schedules;
* :mod:`~qwenrl.train.monitor` — console line, ``metrics.jsonl``, TensorBoard, red flags;
* :mod:`~qwenrl.train.checkpoint` — atomic checkpoints, newest checkpoint, fsync helpers;
* :mod:`~qwenrl.train.distributed` — torchrun group, averaging, teardown, FSDP2 sharding;
* :mod:`~qwenrl.train.export` — a checkpoint's weights as one safetensors file;
* :mod:`~qwenrl.train.cli` — :func:`main`.

Validation scores, test-time training, voting, the ``val_grids.json`` schema and loading a
saved run for evaluation are in :mod:`qwenrl.eval`, which the trainer imports. Names are
imported on first use (``import qwenrl.train`` loads no models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwenrl._lazy import lazy_getattr

if TYPE_CHECKING:
    from qwenrl.train.checkpoint import Checkpointer, latest_checkpoint
    from qwenrl.train.cli import main
    from qwenrl.train.config import ConfigError, TrainConfig, parse_args
    from qwenrl.train.monitor import RedFlags
    from qwenrl.train.step import lr_factor, tau_for_epoch
    from qwenrl.train.trainer import NonFiniteLossError, Trainer

_EXPORTS = {
    "Checkpointer": "checkpoint",
    "ConfigError": "config",
    "NonFiniteLossError": "trainer",
    "RedFlags": "monitor",
    "TrainConfig": "config",
    "Trainer": "trainer",
    "latest_checkpoint": "checkpoint",
    "lr_factor": "step",
    "main": "cli",
    "parse_args": "config",
    "tau_for_epoch": "step",
}

__all__ = [
    "Checkpointer",
    "ConfigError",
    "NonFiniteLossError",
    "RedFlags",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "lr_factor",
    "main",
    "parse_args",
    "tau_for_epoch",
]


__getattr__ = lazy_getattr(__name__, _EXPORTS)
