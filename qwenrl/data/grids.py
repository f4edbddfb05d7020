"""Grids on the 30×30 canvas: token vocabulary, prompt text, decoding and scoring.

Token vocabulary of the canvas (``NUM_CLASSES = 12``):

* ``0``–``9``: ARC colours.
* ``OUTSIDE = 10``: a *target* cell beyond the output grid. Predicting it is how the agent
  predicts the output's size.
* ``PAD = 11``: a *query* cell beyond the input grid. It never appears in targets.

Decoding rule (:func:`decode_grid`): the predicted height is the run of non-OUTSIDE cells going
down column 0 from the top-left corner, the predicted width the run going right along row 0;
the grid is the top-left ``height × width`` rectangle. Cells inside it keep whatever token was
predicted, so a stray OUTSIDE/PAD inside the rectangle makes the grid wrong rather than being
silently repaired.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

CANVAS = 30
NUM_COLOURS = 10
OUTSIDE = 10
PAD = 11
NUM_CLASSES = 12

Grid = np.ndarray  # [h, w] integer colours 0..9
Pair = tuple[np.ndarray, np.ndarray]  # (input grid, output grid)


def grid_to_canvas(grid: np.ndarray, fill: int) -> torch.Tensor:
    """Place ``grid`` [h, w] at the top-left of a [30, 30] long tensor filled with ``fill``."""
    h, w = grid.shape
    if h > CANVAS or w > CANVAS:
        raise ValueError(f"grid of shape {grid.shape} does not fit the {CANVAS}×{CANVAS} canvas")
    canvas = torch.full((CANVAS, CANVAS), fill, dtype=torch.long)
    # np.array copies: a flipped view can carry negative strides, which torch rejects.
    canvas[:h, :w] = torch.from_numpy(np.array(grid, dtype=np.int64))
    return canvas


def decode_grid(canvas: torch.Tensor | np.ndarray) -> np.ndarray:
    """Crop a predicted [30, 30] (or [900]) token canvas back to a grid (see module docstring).

    Returns an int64 array [h, w]; [0, 0] when the top-left cell itself is OUTSIDE.
    """
    c = canvas.detach().cpu().numpy() if isinstance(canvas, torch.Tensor) else np.asarray(canvas)
    c = c.reshape(CANVAS, CANVAS)
    outside_col = np.flatnonzero(c[:, 0] == OUTSIDE)
    outside_row = np.flatnonzero(c[0, :] == OUTSIDE)
    h = int(outside_col[0]) if outside_col.size else CANVAS
    w = int(outside_row[0]) if outside_row.size else CANVAS
    if h == 0 or w == 0:
        return np.zeros((0, 0), dtype=np.int64)
    return c[:h, :w].astype(np.int64)


def decode_logits(logits: torch.Tensor) -> list[np.ndarray]:
    """Greedy decoding: agent logits [B, 900, C] → B grids (argmax, then :func:`decode_grid`)."""
    preds = logits.detach().argmax(dim=-1).cpu()
    return [decode_grid(p) for p in preds]


def exact_match(attempts: Sequence[np.ndarray], target: np.ndarray) -> bool:
    """ARC scoring: True when one of at most two attempted grids equals ``target`` exactly.

    Shape and every cell must match. No attempts scores False; more than two is an error,
    because ARC only allows two.
    """
    if len(attempts) > 2:
        raise ValueError(f"ARC allows at most 2 attempts, got {len(attempts)}")
    target = np.asarray(target)
    return any(
        np.asarray(a).shape == target.shape and bool(np.array_equal(a, target)) for a in attempts
    )


def cell_accuracy(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_outside: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fraction of correctly predicted cells.

    Args:
        pred: predicted tokens [B, 30, 30] or [B, 900] (argmax of the logits).
        target: target tokens, same shape.
        ignore_outside: count only the target grid's own cells (target != OUTSIDE). With False
            every canvas cell counts, which is what the loss sees but is inflated by the easy
            OUTSIDE border.
        reduction: ``"mean"`` → 0-dim tensor over all counted cells of the batch; ``"none"`` →
            [B] per-sample accuracy (usable as a per-sample reward).
    """
    pred = pred.reshape(pred.shape[0], -1)
    target = target.reshape(target.shape[0], -1)
    correct = (pred == target).float()
    if ignore_outside:
        counted = (target != OUTSIDE).float()
    else:
        counted = torch.ones_like(correct)
    if reduction == "none":
        return (correct * counted).sum(1) / counted.sum(1).clamp(min=1.0)
    if reduction == "mean":
        return (correct * counted).sum() / counted.sum().clamp(min=1.0)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def grid_to_text(grid: np.ndarray) -> str:
    """Rows of digits joined by newlines, e.g. ``[[0, 1], [2, 3]]`` → ``"01\\n23"``."""
    return "\n".join("".join(str(int(v)) for v in row) for row in grid)


def pairs_to_text(pairs: Sequence[Pair]) -> str:
    """Serialise demonstration pairs as the prompt text.

    Each pair is ``"I\\n<input rows>\\nO\\n<output rows>\\n"``; pairs are concatenated. Digits,
    ``I``, ``O`` and newline are the only characters, one token each for the grid tokenizer.
    """
    return "".join(f"I\n{grid_to_text(i)}\nO\n{grid_to_text(o)}\n" for i, o in pairs)
