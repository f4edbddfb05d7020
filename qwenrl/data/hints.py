"""What a task's demonstration pairs say about the query's output, before any learning:
its shape (:func:`output_shape_hint`) and, cell by cell, the colours that similar cells became
(:func:`colour_votes`), and the smallest per-cell rule they all agree on
(:func:`qwenrl.data.rules.rule_prediction`). :func:`demo_hints` packs them for the agent
(:class:`DemoHints`).

All three are read off the demonstrations only, never off the query's output, and all are plain
rules: what the agent learns is how far to trust them, which carries over to unseen tasks in a
way that task-specific habits do not.

Why: a randomly initialised (or small) Qwen cannot tell the agent reliably how big the output
is, and an agent left to guess learns the training tasks' size habits from absolute canvas
positions; on the evaluation tasks, whose grids are larger, it then cuts outputs short and
scores below a plain copy of the input (bench/RESULTS.md, the default run without hints).

:func:`output_shape_hint` tries, in order (every demonstration must agree):

1. ``same``: every output has its input's shape → the query's shape.
2. ``fixed``: every output has one shape → that shape.
3. ``ratio``: out = in × (a/b, c/d), directly or transposed → the query scaled alike
   (only when the result is whole and fits the canvas).
4. per side: each of height and width is "same as the input" or "fixed".

No rule → ``None``. On ARC-AGI-1 the rules give the right shape for 369 of the 419 evaluation
test queries and never a wrong one; the other 50 get ``None``.

Where no rule implies a shape, :func:`output_shape_guess` guesses one: each side the largest
that side of the demonstrations' outputs. The agent sees a guessed shape as such (its own cell
state, :mod:`qwenrl.models.agent`), so it learns how far to trust it apart from an implied one.
Why a guess at all: with nothing implied, the agent learned to predict no output at all, and
those 50 queries scored 0.017 cell accuracy. The guess is rarely right (5 of the 50), but it
covers the whole output for 22 of them and 67% of their output cells in all.

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
from qwenrl.data.rules import rule_prediction

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


def output_shape_guess(demos: Sequence[Pair]) -> Shape | None:
    """A guess at the output's shape for when :func:`output_shape_hint` implies none: each side
    the largest that side of the demonstrations' outputs (``None`` without demonstrations)."""
    if not demos:
        return None
    return max(o.shape[0] for _, o in demos), max(o.shape[1] for _, o in demos)


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
    votes = np.zeros((q.size, NUM_COLOURS), dtype=np.float32)
    level = np.zeros(q.size, dtype=np.int64)
    same = [(i, o) for i, o in demos if i.shape == o.shape]
    if same:
        d_in = np.concatenate([np.ravel(i) for i, _ in same]).astype(np.int64)
        d_out = np.concatenate([np.ravel(o) for _, o in same]).astype(np.int64)
        d_key = np.concatenate([neighbourhood_keys(i).ravel() for i, _ in same])
        # Each level as a table of counts (what it matches on → output colour) and, per query
        # cell, its row in that table or -1; the neighbourhood level overrides the colour one.
        for lv, (table, rows) in enumerate(
            (
                _count_table(d_in, d_out, q.ravel()),
                _count_table(d_key, d_out, neighbourhood_keys(q).ravel()),
            ),
            start=1,
        ):
            found = rows >= 0
            counts = table[rows[found]]
            votes[found] = counts / counts.sum(1, keepdims=True)
            level[found] = lv
    return votes.reshape(*q.shape, NUM_COLOURS), level.reshape(q.shape)


def _count_table(
    match: np.ndarray, out: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Counts [K, 10] of output colours per distinct ``match`` value (K of them), and for each
    ``query`` value its row there (-1 when no demonstration cell had that value)."""
    values, inverse = np.unique(match, return_inverse=True)
    table = np.zeros((len(values), NUM_COLOURS), dtype=np.float32)
    np.add.at(table, (inverse, out), 1.0)
    rows = np.searchsorted(values, query).clip(max=len(values) - 1)
    return table, np.where(values[rows] == query, rows, -1)


# --- what the agent receives -------------------------------------------------------------------


NO_RULE = -1  # DemoHints.rule where no rule predicts a colour


class DemoHints(NamedTuple):
    """The hints of one sample (unbatched) or a batch (leading B), as tensors.

    shape [2] / [B, 2] int64: the implied output (h, w), or the guessed one where
    ``guessed``; (0, 0) = none ·
    votes [30, 30, 10] / [B, 30, 30, 10] float32: :func:`colour_votes` on the canvas (zero
    beyond the query) · level [30, 30] / [B, 30, 30] int64: their level (0 beyond the query) ·
    rule [30, 30] / [B, 30, 30] int64: the colour :func:`~qwenrl.data.rules.rule_prediction`
    gives each output cell, :data:`NO_RULE` where there is none (beyond its output, or no rule) ·
    guessed [] / [B] bool: ``shape`` is :func:`output_shape_guess`'s, not implied.
    """

    shape: torch.Tensor
    votes: torch.Tensor
    level: torch.Tensor
    rule: torch.Tensor
    guessed: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DemoHints:
        return DemoHints(*(t.to(device, non_blocking=non_blocking) for t in self))

    @staticmethod
    def empty(batch: int, device: torch.device | str = "cpu") -> DemoHints:
        """Hints that say nothing: no shape, no votes, no rule."""
        return DemoHints(
            torch.zeros(batch, 2, dtype=torch.long, device=device),
            torch.zeros(batch, CANVAS, CANVAS, NUM_COLOURS, device=device),
            torch.zeros(batch, CANVAS, CANVAS, dtype=torch.long, device=device),
            torch.full((batch, CANVAS, CANVAS), NO_RULE, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.bool, device=device),
        )

    @staticmethod
    def stack(hints: Sequence[DemoHints]) -> DemoHints:
        return DemoHints(*(torch.stack(ts) for ts in zip(*hints, strict=True)))


_COMPUTE = object()


def demo_hints(
    demos: Sequence[Pair], query: np.ndarray, rule: np.ndarray | None | object = _COMPUTE
) -> DemoHints:
    """The hints for one query, on the canvas (see :class:`DemoHints`).

    ``rule``: :func:`~qwenrl.data.rules.rule_prediction` for these demonstrations and query
    when the caller already has it (``None``: no rule); computed here when not given.
    """
    h, w = query.shape
    if rule is _COMPUTE:
        rule = rule_prediction(demos, query)
    canvas_rule = torch.full((CANVAS, CANVAS), NO_RULE, dtype=torch.long)
    if rule is not None:
        if rule.ndim != 2 or max(rule.shape) > CANVAS:
            raise ValueError(
                f"rule must be an output grid within {CANVAS}×{CANVAS}, got {rule.shape}"
            )
        canvas_rule[: rule.shape[0], : rule.shape[1]] = torch.from_numpy(rule.astype(np.int64))
    votes, level = colour_votes(demos, query)
    canvas_votes = torch.zeros(CANVAS, CANVAS, NUM_COLOURS)
    canvas_votes[:h, :w] = torch.from_numpy(votes)
    canvas_level = torch.zeros(CANVAS, CANVAS, dtype=torch.long)
    canvas_level[:h, :w] = torch.from_numpy(level)
    implied = output_shape_hint(demos, (h, w))
    guess = None if implied else output_shape_guess(demos)
    return DemoHints(
        torch.tensor(implied or guess or (0, 0), dtype=torch.long),
        canvas_votes,
        canvas_level,
        canvas_rule,
        torch.tensor(guess is not None),
    )
