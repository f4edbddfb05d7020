"""Checkpoints on disk: atomic save, load, the newest complete one, pruning.

A checkpoint is a directory ``checkpoint-<step:08d>/`` holding ``model.safetensors`` (the
weights) and ``state.pt`` (everything else, loadable with ``weights_only=True``). It is written
into ``.tmp-checkpoint-*``, each file fsynced, then renamed into place and the parent directory
fsynced: a run killed at any moment leaves either the new checkpoint or none of it, and the
previous one intact. Temp directories of a killed save are ignored by :func:`latest_checkpoint`
and removed by the next save.

Under FSDP (``--fsdp``) a checkpoint is *sharded*: ``torch.distributed.checkpoint`` (DCP) files
(``.metadata`` and one ``__<rank>_0.distcp`` per rank) hold the weights and the main optimizer,
each rank writing its own shards; ``state.pt`` holds the rest, as above, and ``rank-<r>.pt``
each rank's own embedding cache and RNG states. Every rank writes into the same temp directory
(a file system all ranks share), and rank 0 renames it into place only after every rank has
finished. :meth:`Checkpointer.load_weights` reads the full weights of either kind in one
process (``qwenrl.eval.run.load_run``, ``python -m qwenrl.train.export``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qwenrl.train.distributed import DistInfo, barrier

__all__ = [
    "Checkpointer",
    "find_checkpoint",
    "fsync_dir",
    "fsync_file",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "move_earlier_run",
    "write_json_atomic",
    "write_text_atomic",
]

WEIGHTS, STATE = "model.safetensors", "state.pt"
DCP_INDEX = ".metadata"  # written by torch.distributed.checkpoint once every shard is written


def rank_state_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint written under FSDP (DCP shards instead of ``model.safetensors``)."""
    return (Path(path) / DCP_INDEX).is_file()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temp file and a rename: readers see the old file
    or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj))


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint in a run dir (temp dirs of a killed save are ignored)."""
    done = sorted(p for p in Path(out).glob("checkpoint-*") if (p / STATE).is_file())
    return done[-1] if done else None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete ``checkpoint-*`` of a run."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    if (path / STATE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint-* in this run directory")
    return found


def move_earlier_run(out: Path) -> Path | None:
    """Renames a non-empty ``out`` to ``out-<date>-<time>`` so that a fresh run never mixes
    with (or deletes) an earlier one; returns the new name, or None if there was nothing."""
    if not (out.is_dir() and any(out.iterdir())):
        return None
    aside = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    print(
        f"{out} held an earlier run: moved it to {aside} (use --resume to continue a run instead)",
        file=sys.stderr,
    )
    return aside


class Checkpointer:
    """Saves and loads the checkpoints of one run directory, keeping the newest ``keep``."""

    def __init__(self, out: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.out = Path(out)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.out / f"checkpoint-{step:08d}"

    def save(self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        """Writes ``checkpoint-<step>`` atomically and prunes older ones; returns its path.

        ``weights``: tensors for safetensors (moved to the CPU here); ``state``: anything
        ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings, containers).
        """
        final = self.path(step)
        tmp = self.out / f".tmp-checkpoint-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS)
        )
        torch.save(state, tmp / STATE)
        for f in tmp.iterdir():
            fsync_file(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint appears complete or not at all
        fsync_dir(self.out)
        self._prune()
        return final

    def save_sharded(
        self,
        step: int,
        sharded: dict[str, Any],
        state: dict[str, Any],
        rank_state: dict[str, Any],
        info: DistInfo,
    ) -> Path:
        """Writes a sharded ``checkpoint-<step>`` atomically; every rank must call it.

        ``sharded``: the state dict DCP saves (FSDP's DTensors: each rank writes its shards);
        ``state``: rank 0's ``state.pt``; ``rank_state``: this rank's ``rank-<r>.pt``. The temp
        directory is renamed into place after a barrier that every rank reaches only once its
        files are written and fsynced, so a save killed on any rank leaves the previous
        checkpoint the newest complete one.
        """
        import torch.distributed.checkpoint as dcp

        final = self.path(step)
        tmp = self.out / f".tmp-checkpoint-{step:08d}"  # one name for all ranks (no pid)
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(info)  # the temp directory exists and is empty before anyone writes
        torch.save(rank_state, tmp / rank_state_name(info.rank))
        fsync_file(tmp / rank_state_name(info.rank))
        if info.is_main:
            torch.save(state, tmp / STATE)
            fsync_file(tmp / STATE)
        # A collective: rank 0 writes DCP_INDEX after gathering every rank's write results.
        dcp.save(sharded, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        barrier(info)  # every rank's files are on disk
        if info.is_main:
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the checkpoint appears complete or not at all
            fsync_dir(self.out)
            self._prune()
        barrier(info)  # no rank goes on (or loads) before the rename
        return final

    def _prune(self) -> None:
        for old in sorted(self.out.glob("checkpoint-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.out.glob(".tmp-checkpoint-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load_sharded(
        path: str | Path, sharded: dict[str, Any], rank: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Fills ``sharded`` (laid out as when saved, any number of ranks) in place from a
        sharded checkpoint; returns (``state.pt``, this rank's ``rank-<r>.pt`` or None if the
        checkpoint has none for this rank). A collective: every rank must call it."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        if not is_sharded_checkpoint(path) or not (path / STATE).is_file():
            if (path / WEIGHTS).is_file():
                raise ValueError(
                    f"{path} is a single-process (non-FSDP) checkpoint: resume it without --fsdp"
                )
            raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint")
        dcp.load(sharded, storage_reader=dcp.FileSystemReader(path))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        own = path / rank_state_name(rank)
        rank_state = (
            torch.load(own, map_location="cpu", weights_only=True) if own.is_file() else None
        )
        return state, rank_state

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out)

    @staticmethod
    def load(
        path: str | Path, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights on ``device``, state on the CPU) of a checkpoint directory."""
        path = Path(path)
        if is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is a sharded (FSDP) checkpoint: resume it with --fsdp under torchrun, "
                "or consolidate its weights with python -m qwenrl.train.export"
            )
        if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
            raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint")
        weights = load_file(str(path / WEIGHTS), device=str(device))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        return weights, state

    @staticmethod
    def load_state(path: str | Path) -> dict[str, Any]:
        """``state.pt`` of a checkpoint directory, sharded or not (on the CPU)."""
        path = Path(path)
        if not (path / STATE).is_file():
            raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint (no {STATE})")
        return torch.load(path / STATE, map_location="cpu", weights_only=True)

    @staticmethod
    def load_weights(
        path: str | Path, like: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The full weights of a checkpoint, in this one process and on the CPU, whether one
        process saved them (``model.safetensors``) or FSDP ranks, any number of them (their
        shards joined into full tensors). ``like()`` gives the full tensors' names and shapes
        (e.g. a ``state_dict()`` of the run's models), which DCP fills in place; it is called
        for a sharded checkpoint only."""
        path = Path(path)
        if not is_sharded_checkpoint(path):
            if not (path / WEIGHTS).is_file():
                raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint")
            return load_file(str(path / WEIGHTS))
        import torch.distributed.checkpoint as dcp

        weights = like()
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load({"model": weights}, storage_reader=dcp.FileSystemReader(path), no_dist=True)
        return weights
