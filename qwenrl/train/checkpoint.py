"""Checkpoints on disk: atomic save, load, the newest complete one, pruning.

A checkpoint is a directory ``checkpoint-<step:08d>/`` holding ``model.safetensors`` (the
weights) and ``state.pt`` (everything else, loadable with ``weights_only=True``). It is written
into ``.tmp-checkpoint-*``, each file fsynced, then renamed into place and the parent directory
fsynced: a run killed at any moment leaves either the new checkpoint or none of it, and the
previous one intact. Temp directories of a killed save are ignored by :func:`latest_checkpoint`
and removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "Checkpointer",
    "fsync_dir",
    "fsync_file",
    "latest_checkpoint",
    "move_earlier_run",
    "write_json_atomic",
    "write_text_atomic",
]

WEIGHTS, STATE = "model.safetensors", "state.pt"


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
        for old in sorted(self.out.glob("checkpoint-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.out.glob(".tmp-checkpoint-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out)

    @staticmethod
    def load(
        path: str | Path, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights on ``device``, state on the CPU) of a checkpoint directory."""
        path = Path(path)
        if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
            raise FileNotFoundError(f"{path} is not a complete qwenrl checkpoint")
        weights = load_file(str(path / WEIGHTS), device=str(device))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        return weights, state
