"""Checkpoints on disk: atomic save, load, the newest complete one, pruning.

A checkpoint is a directory ``checkpoint-<step:08d>/`` holding ``model.safetensors`` (the
weights), ``state.pt`` (what the ranks share: step, optimizers, schedule, ...) and one
``rank-<r>.pt`` per rank (``RANK_STATE``: that rank's embedding cache and RNG states; each rank
caches its own prompts and draws its own random numbers), all loadable with
``weights_only=True``. It is written into ``.tmp-checkpoint-<step>``, each file fsynced, then
renamed into place and the parent directory fsynced: a run killed at any moment leaves either
the new checkpoint or none of it, and the previous one intact. Temp directories of a killed
save are ignored by :func:`latest_checkpoint` and removed by the next save. Under torchrun
every rank writes its ``rank-<r>.pt`` into the same temp directory (a file system all ranks
share) and rank 0 the rest; rank 0 renames the directory into place only after every rank has
finished (:meth:`Checkpointer._write`). On resume each rank reads its own file
(:meth:`Checkpointer.load_rank_state`); checkpoints from before the rank files hold rank 0's
cache and RNG states in ``state.pt``.

Under FSDP (``--fsdp``) a checkpoint is *sharded*: ``torch.distributed.checkpoint`` (DCP) files
(``.metadata`` and one ``__<rank>_0.distcp`` per rank) hold the weights and the main optimizer,
each rank writing its own shards, instead of ``model.safetensors``; ``state.pt`` and the
``rank-<r>.pt`` files are as above. :meth:`Checkpointer.load_weights` reads the full weights of
either kind in one process (``qwenrl.eval.run.load_run``, ``python -m qwenrl.train.export``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qwenrl.train.distributed import DistInfo, barrier, rename_parameters

__all__ = [
    "RANK_STATE",
    "Checkpointer",
    "find_checkpoint",
    "fsync_dir",
    "fsync_file",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "move_earlier_run",
    "rng_state",
    "set_rng_state",
    "write_json_atomic",
    "write_text_atomic",
]

WEIGHTS, STATE = "model.safetensors", "state.pt"
DCP_INDEX = ".metadata"  # written by torch.distributed.checkpoint once every shard is written
# What a rank-<r>.pt holds: the parts of a run's state that differ between ranks.
RANK_STATE = ("cache", "rng")


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

    def save(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        rank_state: dict[str, Any] | None = None,
        info: DistInfo | None = None,
    ) -> Path:
        """Writes ``checkpoint-<step>`` atomically and prunes older ones; returns its path.

        ``weights``: tensors for safetensors (moved to the CPU here); ``state``: anything
        ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings, containers);
        both are rank 0's (other ranks' are not read). ``rank_state``: this rank's
        ``rank-<r>.pt`` (none if None). Under DDP every rank must call it (:meth:`_write`).
        """

        def weights_and_state(tmp: Path) -> list[Path]:
            cpu = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
            save_file(cpu, str(tmp / WEIGHTS))
            torch.save(state, tmp / STATE)
            return [tmp / WEIGHTS, tmp / STATE]

        return self._write(step, info or DistInfo(), weights_and_state, rank_state)

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
        ``state``: rank 0's ``state.pt``; ``rank_state``: this rank's ``rank-<r>.pt``.
        """
        import torch.distributed.checkpoint as dcp

        def state_only(tmp: Path) -> list[Path]:
            torch.save(state, tmp / STATE)
            return [tmp / STATE]

        def shards(tmp: Path) -> None:
            # A collective: rank 0 writes DCP_INDEX after gathering every rank's write results.
            dcp.save(sharded, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))

        return self._write(step, info, state_only, rank_state, shards)

    def _write(
        self,
        step: int,
        info: DistInfo,
        main_files: Callable[[Path], list[Path]],
        rank_state: dict[str, Any] | None,
        collective: Callable[[Path], None] | None = None,
    ) -> Path:
        """The atomic save that :meth:`save` and :meth:`save_sharded` share; every rank calls
        it. Rank 0 writes ``main_files`` into a temp directory all ranks share, every rank its
        ``rank-<r>.pt`` there (then ``collective``, which every rank runs). The directory is
        renamed into place after a barrier that every rank reaches only once its files are
        written and fsynced, so a save killed on any rank leaves the previous checkpoint the
        newest complete one."""
        final = self.path(step)
        tmp = self.out / f".tmp-checkpoint-{step:08d}"  # one name for all ranks (no pid)
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(info)  # the temp directory exists and is empty before anyone writes
        files = main_files(tmp) if info.is_main else []
        if rank_state is not None:
            torch.save(rank_state, tmp / rank_state_name(info.rank))
            files.append(tmp / rank_state_name(info.rank))
        for f in files:
            fsync_file(f)
        if collective is not None:
            collective(tmp)
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
        path: str | Path,
        sharded: dict[str, Any],
        rank: int | None,
        renamed: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Fills ``sharded`` (laid out as when saved, any number of ranks) in place from a
        sharded checkpoint; returns (``state.pt``, ``rank-<rank>.pt`` or None if the checkpoint
        has none for that rank or ``rank`` is None). A collective: every rank must call it.

        ``renamed`` (earlier parameter name → today's, ``QwenRLModels.RENAMED``): a
        checkpoint that holds a parameter under its earlier name is read into today's."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        if not is_sharded_checkpoint(path) or not (path / STATE).is_file():
            if (path / WEIGHTS).is_file():
                raise ValueError(
                    f"{path} is a single-process (non-FSDP) checkpoint: resume it without --fsdp"
                )
            raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint")
        earlier = _earlier_names(path, renamed)
        rename_parameters(sharded, earlier)
        dcp.load(sharded, storage_reader=dcp.FileSystemReader(path))
        rename_parameters(sharded, {old: new for new, old in earlier.items()})
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        return state, None if rank is None else _read_rank_file(path, rank)

    @staticmethod
    def load_rank_state(
        path: str | Path, state: dict[str, Any], info: DistInfo
    ) -> tuple[dict[str, Any] | None, str]:
        """This rank's part of a checkpoint (``RANK_STATE``: its embedding cache and RNG
        states), given the checkpoint's ``state.pt``: (it, "") or (None, why there is none).

        A rank reads its own ``rank-<r>.pt``; there is none for it when the checkpoint was
        saved by another number of ranks (the sampler's shares of the prompts differ) or the
        file is missing. Checkpoints from before the rank files kept rank 0's in ``state.pt``:
        rank 0 takes it from there."""
        saved_by = state.get("world_size")
        if saved_by is None and "cache" in state:  # written before the rank files
            if info.rank == 0:
                return {k: state[k] for k in RANK_STATE}, ""
            return None, "it holds the embedding cache and RNG states of rank 0 only"
        if saved_by != info.world_size:
            return None, f"it was saved by {saved_by} ranks, this run has {info.world_size}"
        own = _read_rank_file(Path(path), info.rank)
        if own is None:
            return None, f"it has no {rank_state_name(info.rank)}"
        return own, ""

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
        path: str | Path,
        like: Callable[[], dict[str, torch.Tensor]],
        renamed: Mapping[str, str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The full weights of a checkpoint, in this one process and on the CPU, whether one
        process saved them (``model.safetensors``) or FSDP ranks, any number of them (their
        shards joined into full tensors). ``like()`` gives the full tensors' names and shapes
        (e.g. a ``state_dict()`` of the run's models), which DCP fills in place; it is called
        for a sharded checkpoint only. ``renamed`` (earlier name → today's,
        ``QwenRLModels.RENAMED``): tensors saved under an earlier name come back under
        today's."""
        path = Path(path)
        renamed = renamed or {}
        if not is_sharded_checkpoint(path):
            if not (path / WEIGHTS).is_file():
                raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint")
            weights = load_file(str(path / WEIGHTS))
            for old, new in renamed.items():
                if old in weights and new not in weights:
                    weights[new] = weights.pop(old)
            return weights
        import torch.distributed.checkpoint as dcp

        state = {"model": like()}
        earlier = _earlier_names(path, renamed)
        rename_parameters(state, earlier)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
        rename_parameters(state, {old: new for new, old in earlier.items()})
        return state["model"]


def _read_rank_file(path: Path, rank: int) -> dict[str, Any] | None:
    own = path / rank_state_name(rank)
    return torch.load(own, map_location="cpu", weights_only=True) if own.is_file() else None


def _earlier_names(path: Path, renamed: Mapping[str, str] | None) -> dict[str, str]:
    """{today's name: the earlier one} for the parameters that the sharded checkpoint ``path``
    holds under an earlier name (``renamed``: earlier → today's)."""
    if not renamed:
        return {}
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {
        new: old
        for old, new in renamed.items()
        if f"model.{old}" in stored and f"model.{new}" not in stored
    }


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA and Python RNG states (for a ``rank-<r>.pt``)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]),
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((3, tuple(rng["python"]), None))
