"""Consolidated weights of a checkpoint, for one process: ``model.safetensors`` + ``config.yaml``.

    python -m qwenrl.train.export runs/fsdp                    # the newest checkpoint of a run
    python -m qwenrl.train.export runs/fsdp/checkpoint-00000400 --out weights/

A sharded (FSDP) checkpoint is read in this one process, whatever number of ranks wrote it, and
its shards are joined into full tensors; a single-process checkpoint's weights are copied. The
result is the directory ``<run>/export-<step>`` (or ``--out``), written atomically: the weights
under the names of ``QwenRLModels.state_dict()`` and the run's options. :func:`load_models`
builds the models from it; the run directory's ``metrics.jsonl`` and ``val_grids.json`` stay
where ``python -m qwenrl.plot`` reads them. Evaluation needs no export:
:func:`qwenrl.eval.run.load_run` reads sharded checkpoints with the same reader
(:meth:`~qwenrl.train.checkpoint.Checkpointer.load_weights`).

Memory: the full model once, in host memory (a run with ``--qwen DIR`` also needs DIR, from
which the models are built before the checkpoint's weights replace Qwen's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwenrl.models import QwenRLModels
from qwenrl.train.checkpoint import (
    STATE,
    WEIGHTS,
    Checkpointer,
    find_checkpoint,
    fsync_dir,
    fsync_file,
)
from qwenrl.train.config import ConfigError, TrainConfig, config_from_dict, model_config

__all__ = ["CONFIG_FILE", "consolidated_weights", "export", "load_models", "main"]

CONFIG_FILE = "config.yaml"


def consolidated_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], TrainConfig]:
    """(full weights by ``QwenRLModels.state_dict()`` name, the run's options) of a
    checkpoint directory, sharded or not."""
    checkpoint = Path(checkpoint)
    state = Checkpointer.load_state(checkpoint)
    cfg = config_from_dict(state["config"], where=str(checkpoint / STATE))
    # The models of the run give the names and full shapes of a sharded checkpoint's tensors.
    # Tensors saved under an earlier name are exported under today's.
    weights = Checkpointer.load_weights(
        checkpoint,
        lambda: QwenRLModels(model_config(cfg)).state_dict(),
        renamed=QwenRLModels.RENAMED,
    )
    return weights, cfg


def export(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Writes ``out`` (default ``<run>/export-<step>``) holding ``model.safetensors`` and
    ``config.yaml``; atomically (a temp directory renamed into place). Returns ``out``."""
    import yaml

    checkpoint = Path(checkpoint)
    weights, cfg = consolidated_weights(checkpoint)
    step = checkpoint.name.rsplit("-", 1)[-1]
    out = Path(out) if out is not None else checkpoint.parent / f"export-{step}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for f in tmp.iterdir():
        fsync_file(f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return out


def load_models(directory: str | Path, device: torch.device | str = "cpu") -> QwenRLModels:
    """The models of an :func:`export` directory, in eval mode on ``device``."""
    import yaml

    directory = Path(directory)
    for name in (WEIGHTS, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not an export directory (no {name})")
    cfg = config_from_dict(yaml.safe_load((directory / CONFIG_FILE).read_text()), str(directory))
    models = QwenRLModels(model_config(cfg))
    models.load_weights(load_file(str(directory / WEIGHTS)), str(directory))
    return models.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.train.export",
        description="Consolidate a checkpoint's weights (sharded FSDP or not) into one "
        "safetensors file with the run's config.yaml.",
    )
    parser.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint")
    parser.add_argument(
        "--out", default=None, help="output directory (default <run>/export-<step>)"
    )
    args = parser.parse_args(argv)
    path = Path(args.path)
    try:
        checkpoint = find_checkpoint(path)
    except FileNotFoundError:
        print(f"error: {path}: no complete checkpoint there", file=sys.stderr)
        return 2
    try:
        out = export(checkpoint, args.out)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
