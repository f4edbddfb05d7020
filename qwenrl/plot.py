"""Plot a training run: learning curves from ``metrics.jsonl`` and the last validation grids.

    python -m qwenrl.plot runs/default              # PNGs written next to the metrics
    python -m qwenrl.plot runs/default --out figs   # or into another directory

Writes ``training_curves.png`` (loss, mask ratio, reward, Qwen grad norm, cache hit rate and
validation accuracy vs step) and, when the run has a ``val_grids.json``, ``val_grids.png``
(input / prediction / target for up to four validation samples). Exits with code 2 and a
message naming the file when the run directory or its metrics are missing or malformed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from qwenrl.data.grids import OUTSIDE, PAD, decode_grid  # noqa: E402
from qwenrl.eval.val_grids import GRID_KEYS, VAL_GRIDS_FILE, read_val_grids  # noqa: E402

__all__ = ["PlotError", "main", "plot_run"]

# ARC colours 0..9, then OUTSIDE (10) and PAD (11) in light greys.
ARC_COLOURS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00"]
ARC_COLOURS += ["#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25", "#E6E6E6", "#F4F4F4"]
CMAP = ListedColormap(ARC_COLOURS)
MAX_GRID_ROWS = 4


class PlotError(Exception):
    """A run directory or one of its files cannot be plotted; the message names the path."""


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (blank lines skipped); raises :class:`PlotError`."""
    if not path.is_file():
        raise PlotError(f"{path}: metrics file not found")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
        records.append(record)
    if not records:
        raise PlotError(f"{path}: metrics file is empty")
    return records


def _series(records: list[dict[str, Any]], key: str, positive: bool = False):
    """(steps, values) of ``key`` over ``records``, dropping missing and non-finite points."""
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    pts = [(s, v) for s, v in pts if math.isfinite(v) and (v > 0 or not positive)]
    return [s for s, _ in pts], [v for _, v in pts]


def _panel(ax: Axes, title: str, ylabel: str, boundaries: list[int]) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    for b in boundaries:
        ax.axvline(b, color="grey", linestyle=":", linewidth=1)
    if not ax.has_data():
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """The 2×3 panel figure of training and validation metrics."""
    train = [r for r in records if r.get("kind", "train") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    # Epoch boundaries: the first logged step of each epoch after the first.
    boundaries = [b["step"] for a, b in zip(train, train[1:]) if b.get("epoch") != a.get("epoch")]
    # τ changes: (step, new τ) wherever the logged τ differs from the previous record's.
    taus = [(r["step"], r["tau"]) for r in train if isinstance(r.get("tau"), (int, float))]
    tau_changes = [b for a, b in zip(taus, taus[1:]) if b[1] != a[1]]

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    (ax_loss, ax_mask, ax_reward), (ax_grad, ax_cache, ax_val) = axes
    ax_loss.plot(*_series(train, "loss"), color="C0", linewidth=1)
    _panel(ax_loss, "Loss", "EFE loss", boundaries)

    ax_mask.plot(*_series(train, "mask_ratio"), color="C1", linewidth=1, label="train")
    if val:
        ax_mask.plot(*_series(val, "mask_ratio"), "s", color="C3", label="val")
        ax_mask.legend(loc="lower left", fontsize="small")
    _panel(ax_mask, "Mask ratio (hard cells)", "fraction of cells", boundaries)
    for step, tau in tau_changes:
        ax_mask.annotate(
            f"τ → {tau:g}",
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize="small",
            color="dimgrey",
        )

    ax_reward.plot(*_series(train, "reward"), color="C2", linewidth=1)
    _panel(ax_reward, "Reward", "mean reward", boundaries)

    ax_grad.plot(*_series(train, "qwen_grad", positive=True), color="C4", linewidth=1)
    if ax_grad.has_data():
        ax_grad.set_yscale("log")
    _panel(ax_grad, "Qwen grad norm (zeros omitted)", "grad norm (log)", boundaries)

    ax_cache.plot(*_series(train, "cache_hit_rate"), color="C5", linewidth=1)
    _panel(ax_cache, "Embedding cache hit rate", "hit rate", boundaries)

    for key, label, marker in (
        ("cell_accuracy", "cell accuracy", "o"),
        ("canvas_accuracy", "canvas accuracy", "s"),
        ("exact_match", "exact match", "^"),
    ):
        if any(key in r for r in val):  # canvas_accuracy is absent from older runs
            ax_val.plot(*_series(val, key), marker=marker, label=label)
    for r in val:
        if isinstance(r.get("cell_accuracy"), (int, float)) and "epoch" in r:
            ax_val.annotate(
                f"e{r['epoch']} {r['cell_accuracy']:.3f}",
                (r["step"], r["cell_accuracy"]),
                xytext=(0, 6),
                textcoords="offset points",
                ha="center",
                fontsize="x-small",
            )
    if val:
        ax_val.legend(loc="best", fontsize="small")
    _panel(ax_val, "Validation (one point per epoch)", "fraction", boundaries)

    if taus:
        schedule = " → ".join(f"{t:g}" for t in [taus[0][1]] + [t for _, t in tau_changes])
        fig.suptitle(f"Training run (τ: {schedule}; dotted lines: epoch boundaries)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _crop(grids: list[np.ndarray], blank: int) -> tuple[slice, slice]:
    """Bounding box of the cells that are not ``blank`` in any of ``grids`` (whole canvas if none)."""
    used = np.zeros_like(grids[0], dtype=bool)
    for g in grids:
        used |= g != blank
    if not used.any():
        return slice(None), slice(None)
    rows, cols = np.flatnonzero(used.any(1)), np.flatnonzero(used.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _show_grid(ax: Axes, grid: np.ndarray, title: str) -> None:
    h, w = grid.shape
    ax.imshow(grid, cmap=CMAP, vmin=-0.5, vmax=len(ARC_COLOURS) - 0.5, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.5 if max(h, w) > 15 else 1)
    ax.tick_params(which="both", bottom=False, left=False, labelbottom=False, labelleft=False)
    ax.set_title(f"{title} ({h}×{w})", fontsize="medium")


def _sample_arrays(sample: dict[str, Any], path: Path, i: int) -> tuple[np.ndarray, ...]:
    try:
        arrays = tuple(np.asarray(sample[k]) for k in GRID_KEYS)
    except (KeyError, TypeError, ValueError) as e:
        raise PlotError(f"{path}: sample {i} is malformed ({e!r})") from None
    if any(a.ndim != 2 or a.shape != arrays[0].shape for a in arrays):
        raise PlotError(f"{path}: sample {i} grids must be 2-D and of one shape")
    return arrays


def plot_grids(path: Path, out: Path) -> None:
    """Input / prediction / target of up to four samples of ``val_grids.json``."""
    try:
        data = read_val_grids(path)
        samples = data["samples"][:MAX_GRID_ROWS]
    except json.JSONDecodeError as e:
        raise PlotError(f"{path}: malformed validation grids ({e.msg})") from None
    except ValueError as e:
        raise PlotError(f"{path}: {e}") from None
    if not samples:
        raise PlotError(f"{path}: no samples")
    fig, axes = plt.subplots(len(samples), 3, figsize=(10, 3.6 * len(samples)), squeeze=False)
    for i, (sample, row) in enumerate(zip(samples, axes)):
        inp, pred, target, hard = _sample_arrays(sample, path, i)
        _show_grid(row[0], inp[_crop([inp], PAD)], "input")
        box = _crop([pred, target], OUTSIDE)
        p, t, hd = pred[box], target[box], hard[box].astype(bool)
        _show_grid(row[1], p, "prediction")
        _show_grid(row[2], t, "target")
        for y, x in zip(*np.nonzero(p != t)):
            # Inset so the outline sits inside the cell, above the grid lines.
            cell = Rectangle((x - 0.42, y - 0.42), 0.84, 0.84, fill=False, ec="red", lw=2.5)
            row[1].add_patch(cell).set_zorder(4)
        ys, xs = np.nonzero(hd)
        row[1].scatter(
            xs,
            ys,
            marker="x",
            s=18,
            c="white",
            linewidths=1.2,
            zorder=3,
            path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")],
        )
        dp, dt = decode_grid(pred), decode_grid(target)
        exact = dp.shape == dt.shape and bool(np.array_equal(dp, dt))
        verdict = "exact match" if exact else f"wrong ({int((p != t).sum())} cells differ)"
        row[0].annotate(
            f"{sample.get('task_id', '?')}: {verdict}",
            (0, 1.2),
            xycoords="axes fraction",
            fontsize="large",
            fontweight="bold",
            color="green" if exact else "firebrick",
        )
    header = f"Validation grids, step {data.get('step', '?')}, epoch {data.get('epoch', '?')}"
    tau = data.get("tau")
    header += f", τ = {tau:g}" if isinstance(tau, (int, float)) else ""
    fig.suptitle(f"{header}\nred outline: wrong cell · ×: hard cell (q[target] < τ)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes the run's PNGs into ``out_dir`` (default ``run_dir``) and returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: run directory not found")
    records = load_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "training_curves.png"]
    plot_curves(records, written[0])
    if (run_dir / VAL_GRIDS_FILE).is_file():
        written.append(out / "val_grids.png")
        plot_grids(run_dir / VAL_GRIDS_FILE, written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwenrl.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="training run directory (holds metrics.jsonl)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: run_dir)"
    )
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
