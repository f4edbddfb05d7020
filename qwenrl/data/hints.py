"""What a task's demonstration pairs say about the query's output, before any learning:
its shape (:func:`output_shape_hint`) and, cell by cell, the colours that similar cells became
(:func:`colour_votes`). :func:`demo_hints` packs both for the agent (:class:`DemoHints`).

Both are read off the demonstrations only, never off the query's output, and both are plain
rules: what the agent learns is how far to trust them, which carries over to unseen tasks in a
way that task-specific habits do not.

Why: a randomly initialised (or small) Qwen cannot tell the agent reliably how big the output
is, and an agent left to guess learns the training tasks' size habits from absolute canvas
positions; on the evaluation tasks, whose grids are larger, it then cuts outputs short
(validation cell accuracy fell below a plain copy of the input and kept falling).

:func:`output_shape_hint` tries, in order (every demonstration must agree):

1. ``same``: every output has its input's shape → the query's shape.
2. ``fixed``: every output has one shape → that shape.
3. ``ratio``: out = in × (a/b, c/d), directly or transposed → the query scaled alike
   (only when the result is whole and fits the canvas).
4. per side: each of height and width is "same as the input" or "fixed".

No rule → ``None`` (the agent then falls back to what it learned). On ARC-AGI-1 the rules give
the right shape for 369 of the 419 evaluation test queries and never a wrong one; the other 50
get ``None``.

:func:`colour_votes` (docstring there) is a nearest-neighbour rule over 3×3 neighbourhoods. On
the evaluation test queries whose output has the input's shape, its argmax gets 83.9% of the
cells right, a copy of the input 81.6%.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from qwenrl.data.grids import CANVAS, NUM_COLOURS, Pair

Shape = tuple[int, int]


def output_shape_hint(demos: Sequence[Pair], query_shape: Shape) -> Shape | None:
    """The output shape the demonstrations imply for an input of ``query_shape``, or ``None``."""
    if not demos:
        return None
    ins = [tuple(i.shape) for i, _ in demos]
    outs = [tuple(o.shape) for _, o in demos]
    if ins == outs:
        return tuple(query_shape)
    if len(set(outs)) == 1:
        return outs[0]
    for transposed in (False, True):
        ratios = {
            (Fraction(oh, ih), Fraction(ow, iw))
            for (ih, iw), (oh, ow) in zip(
                [(w, h) if transposed else (h, w) for h, w in ins], outs, strict=True
            )
        }
        if len(ratios) == 1:
            fh, fw = ratios.pop()
            qh, qw = query_shape[::-1] if transposed else query_shape
            h, w = fh * qh, fw * qw
            if h.denominator == w.denominator == 1 and 1 <= h <= CANVAS and 1 <= w <= CANVAS:
                return int(h), int(w)
    sides = []
    for d in (0, 1):
        if all(i[d] == o[d] for i, o in zip(ins, outs, strict=True)):
            sides.append(query_shape[d])
        elif len({o[d] for o in outs}) == 1:
            sides.append(outs[0][d])
        else:
            return None
    return sides[0], sides[1]


# --- per-cell colour votes ------------------------------------------------------------------

BORDER = NUM_COLOURS  # the neighbourhood value of a position beyond the grid
_BASE = NUM_COLOURS + 1


def neighbourhood_keys(grid: np.ndarray) -> np.ndarray:
    """[h, w] colours → [h, w] int64: each cell's 3×3 neighbourhood (beyond the grid = BORDER)
    as one base-11 number."""
    g = np.pad(np.asarray(grid, dtype=np.int64), 1, constant_values=BORDER)
    h, w = grid.shape
    keys = np.zeros((h, w), dtype=np.int64)
    for dy in range(3):
        for dx in range(3):
            keys = keys * _BASE + g[dy : dy + h, dx : dx + w]
    return keys


def colour_votes(demos: Sequence[Pair], query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the demonstrations did to cells like each query cell.

    Only demonstrations whose output has its input's shape take part (cell i of the input
    became cell i of the output). For a query cell, the votes are the colours that the
    demonstration cells with the same 3×3 neighbourhood became (``level`` 2); when no
    demonstration cell has that neighbourhood, the colours that demonstration cells of the
    same colour became (``level`` 1); when no demonstration cell has that colour either, none
    (``level`` 0, all-zero votes).

    Returns ``votes`` [h, w, 10] float32 (each row sums to 1, or 0 at level 0) and ``level``
    [h, w] int64.
    """
    q = np.asarray(query, dtype=np.int64)
    h, w = q.shape
    votes = np.zeros((h, w, NUM_COLOURS), dtype=np.float32)
    level = np.zeros((h, w), dtype=np.int64)
    same = [(np.asarray(i), np.asarray(o)) for i, o in demos if i.shape == o.shape]
    if not same:
        return votes, level
    d_in = np.concatenate([i.ravel() for i, _ in same]).astype(np.int64)
    d_out = np.concatenate([o.ravel() for _, o in same]).astype(np.int64)
    d_key = np.concatenate([neighbourhood_keys(i).ravel() for i, _ in same])

    # Colour level: counts [10, 10] of (input colour → output colour).
    by_colour = np.zeros((NUM_COLOURS, NUM_COLOURS), dtype=np.float32)
    np.add.at(by_colour, (d_in, d_out), 1.0)
    seen = by_colour.sum(1) > 0
    flat_q = q.ravel()
    colour_rows = by_colour[flat_q]
    votes_flat = votes.reshape(-1, NUM_COLOURS)
    has_colour = seen[flat_q]
    votes_flat[has_colour] = colour_rows[has_colour] / colour_rows[has_colour].sum(1, keepdims=True)
    level.ravel()[has_colour] = 1

    # Neighbourhood level: counts of (key, output colour), looked up by sorted search.
    pair = d_key * NUM_COLOURS + d_out
    uniq, counts = np.unique(pair, return_counts=True)
    u_key, u_out = uniq // NUM_COLOURS, uniq % NUM_COLOURS
    keys, starts = np.unique(u_key, return_index=True)
    q_key = neighbourhood_keys(q).ravel()
    pos = np.searchsorted(keys, q_key).clip(max=len(keys) - 1)
    hit = keys[pos] == q_key
    if hit.any():
        ends = np.append(starts[1:], len(u_key))
        nb = np.zeros((int(hit.sum()), NUM_COLOURS), dtype=np.float32)
        for row, k in enumerate(pos[hit]):
            sl = slice(starts[k], ends[k])
            nb[row, u_out[sl]] = counts[sl]
        votes_flat[hit] = nb / nb.sum(1, keepdims=True)
        level.ravel()[hit] = 2
    return votes, level


# --- what the agent receives -------------------------------------------------------------------


class DemoHints(NamedTuple):
    """The hints of one sample (unbatched) or a batch (leading B), as tensors.

    shape [2] / [B, 2] int64: the implied output (h, w), (0, 0) = none ·
    votes [30, 30, 10] / [B, 30, 30, 10] float32: :func:`colour_votes` on the canvas (zero
    beyond the query) · level [30, 30] / [B, 30, 30] int64: their level (0 beyond the query).
    """

    shape: torch.Tensor
    votes: torch.Tensor
    level: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DemoHints:
        return DemoHints(*(t.to(device, non_blocking=non_blocking) for t in self))

    @staticmethod
    def empty(batch: int, device: torch.device | str = "cpu") -> DemoHints:
        """Hints that say nothing: no implied shape, no votes."""
        return DemoHints(
            torch.zeros(batch, 2, dtype=torch.long, device=device),
            torch.zeros(batch, CANVAS, CANVAS, NUM_COLOURS, device=device),
            torch.zeros(batch, CANVAS, CANVAS, dtype=torch.long, device=device),
        )

    @staticmethod
    def stack(hints: Sequence[DemoHints]) -> DemoHints:
        return DemoHints(*(torch.stack(ts) for ts in zip(*hints, strict=True)))


def demo_hints(demos: Sequence[Pair], query: np.ndarray) -> DemoHints:
    """Both hints for one query, on the canvas (see :class:`DemoHints`)."""
    h, w = query.shape
    votes, level = colour_votes(demos, query)
    canvas_votes = torch.zeros(CANVAS, CANVAS, NUM_COLOURS)
    canvas_votes[:h, :w] = torch.from_numpy(votes)
    canvas_level = torch.zeros(CANVAS, CANVAS, dtype=torch.long)
    canvas_level[:h, :w] = torch.from_numpy(level)
    shape = output_shape_hint(demos, (h, w)) or (0, 0)
    return DemoHints(torch.tensor(shape, dtype=torch.long), canvas_votes, canvas_level)
