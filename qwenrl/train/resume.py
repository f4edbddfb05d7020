"""What a :class:`~qwenrl.train.trainer.Trainer` saves and restores: the shared state, each
rank's own state (embedding cache, RNG), and the checkpoint around them (docs/distributed.md).

A mixin: the methods read the trainer's attributes (``step``, ``cfg``, ``dist``, ``models``, the
optimizers, ``cache``, ``criterion``, ``checkpointer``, ``monitor``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from qwenrl.train import distributed as D
from qwenrl.train.checkpoint import Checkpointer, rng_state, set_rng_state

__all__ = ["TrainerCheckpoints"]


class TrainerCheckpoints:
    """State dicts and checkpoints of the trainer that inherits this."""

    def state_dict(self) -> dict[str, Any]:
        """What the ranks share of an exact resume, weights aside (``state.pt``)."""
        return {
            "step": self.step,
            "tau": self.criterion.tau,
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rl_optimizer": self.rl_optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "flags": self.flags.state_dict(),
        }

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own part (``rank-<r>.pt``): its embedding cache and RNG states."""
        return {"cache": self.cache.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s parts (under FSDP the optimizer comes from the shards)."""
        self.step = int(state["step"])
        self.criterion.tau = state["tau"]
        if not self.cfg.fsdp:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rl_optimizer.load_state_dict(state["rl_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.flags.load_state_dict(state["flags"])

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`rank_state_dict`'s parts."""
        self.cache.load_state_dict(state["cache"])
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoint-<step>`` atomically once every rank got here: rank 0 the shared
        parts, every rank its own ``rank-<r>.pt`` (and under FSDP its shards; see
        docs/distributed.md). Every rank must call it."""
        self.read_metrics()  # the red flags' state must include every step taken
        state, own = self.state_dict(), self.rank_state_dict()
        if self.cfg.fsdp:
            state.pop("optimizer")  # sharded, with the weights
            sharded = D.sharded_state_dict(self.models, self.optimizer)
            return self.checkpointer.save_sharded(self.step, sharded, state, own, self.dist)
        weights = self.models.state_dict()
        return self.checkpointer.save(self.step, weights, state, own, self.dist)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restores everything :meth:`save_checkpoint` wrote; a rank whose own part is missing
        (e.g. another number of ranks) warns and starts with an empty cache and fresh RNG."""
        if self.cfg.fsdp:
            sharded = D.sharded_state_dict(self.models, self.optimizer)
            state, _ = Checkpointer.load_sharded(path, sharded, None, self.models.RENAMED)
            D.load_sharded_state_dict(self.models, self.optimizer, sharded)
        else:
            weights, state = Checkpointer.load(path, self.device)
            self.models.load_weights(weights, str(path))
        self.load_state_dict(state)
        own, why = Checkpointer.load_rank_state(path, state, self.dist)
        if own is None:
            warnings.warn(
                f"rank {self.dist.rank}: no state of its own in {path} ({why}): it starts with "
                "an empty embedding cache and fresh RNG states (the run continues, not exactly "
                "as it would have)",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            self.load_rank_state_dict(own)
        self.monitor.print(f"Resumed from {path} at step {self.step}")
