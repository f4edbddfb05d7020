"""The smallest per-cell rule the demonstrations agree on, and what it predicts for the query.

Many ARC tasks whose output has its input's shape colour each output cell by a function of a
few things about the same input cell: its colour, a neighbour's, the colours in its row, its
mirror image's colour, the size of its object, the first colour met looking left, ... Others
tile the input, or scale each input cell up to a block, and colour each output cell by what
the input cell it comes from is and where in its tile or block it sits (:func:`output_layout`,
:func:`layout_features`). This module describes every cell by :data:`FEATURES`
(:func:`cell_features`; plus :data:`PLACE_FEATURES` when tiling or scaling) and searches the
subsets of one or two features, and the three-feature subsets that include the cell's own
colour, for a *rule*: a lookup table from the subset's values to an
output colour that

1. is consistent: no two demonstration cells with the same values became different colours;
2. covers the query: every query cell's values were seen in a demonstration.

Among the rules found, the one predicted back best leave-one-out (each demonstration pair from
the others' table: how often the rule would have been right on a pair it had not seen) wins,
then the one with fewer features, then the first in :data:`FEATURES` order (tiling before
scaling). :func:`rule_prediction` returns its output grid, or ``None`` when no rule exists (the
outputs are not whole multiples of their inputs alike, nothing consistent covers the query).

The search only considers minimal rules: a superset of a consistent subset predicts the same
colours wherever it covers (its table refines the subset's), and a superset of a subset that
misses a query cell misses it too, so neither can rank higher. On ARC-AGI-1's evaluation set
the rule alone predicts 12 of the 419 test outputs exactly (10 of them same-shape) and is wrong
on one more; it finds nothing for the other 406 (bench/RESULTS.md).

It reads the demonstrations and the query input only, like the other hints
(:mod:`qwenrl.data.hints`); what the agent learns is how far to trust it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from qwenrl.data.grids import CANVAS, NUM_COLOURS, Pair

BORDER = NUM_COLOURS  # a neighbour or ray beyond the grid
MAX_RULE_FEATURES = 3
_COMPONENT_CAP = 12  # object sizes above this are one value

_NEIGHBOURS = {  # name → (dy, dx) into the grid padded by one cell of BORDER
    "n": (0, 1), "s": (2, 1), "w": (1, 0), "e": (1, 2),
    "nw": (0, 0), "ne": (0, 2), "sw": (2, 0), "se": (2, 2),
}  # fmt: skip
_RAYS = {"ray_n": (0, False), "ray_s": (0, True), "ray_w": (1, False), "ray_e": (1, True)}

FEATURES: tuple[str, ...] = (
    "colour",  # the cell's colour
    *_NEIGHBOURS,  # a neighbour's colour (BORDER beyond the grid)
    "row_mod2", "col_mod2", "row_mod3", "col_mod3",  # position patterns
    "mirror_h", "mirror_v",  # the colour of the cell mirrored left-right / top-bottom
    "row_colours", "col_colours",  # the set of colours in the cell's row / column (a mask)
    "same_neighbours",  # how many of the 8 neighbours share the cell's colour
    "object_size", "object_touches_border",  # its 4-connected same-colour component
    *_RAYS,  # the first non-background colour looking up/down/left/right (BORDER: none)
    "between_h", "between_v",  # that colour when both rays along the row/column meet it
    "is_background",  # the cell has the grid's most common colour
)  # fmt: skip


def cell_features(grid: np.ndarray) -> np.ndarray:
    """[h, w] colours → [h * w, len(FEATURES)] int64 (each value >= 0), row-major."""
    g = np.asarray(grid, dtype=np.int64)
    h, w = g.shape
    padded = np.pad(g, 1, constant_values=BORDER)
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
    background = np.bincount(g.ravel(), minlength=NUM_COLOURS).argmax()
    masks = 1 << g
    size, touches = _components(g)
    f = {"colour": g}
    for name, (dy, dx) in _NEIGHBOURS.items():
        f[name] = padded[dy : dy + h, dx : dx + w]
    f |= {
        "row_mod2": rows % 2, "col_mod2": cols % 2, "row_mod3": rows % 3, "col_mod3": cols % 3,
        "mirror_h": g[:, ::-1], "mirror_v": g[::-1, :],
        "row_colours": np.bitwise_or.reduce(masks, axis=1, keepdims=True),
        "col_colours": np.bitwise_or.reduce(masks, axis=0, keepdims=True),
        "same_neighbours": sum(
            (padded[dy : dy + h, dx : dx + w] == g).astype(np.int64)
            for dy, dx in _NEIGHBOURS.values()
        ),
        "object_size": size, "object_touches_border": touches,
    }  # fmt: skip
    for name, (axis, reverse) in _RAYS.items():
        f[name] = _first_seen(g, background, axis, reverse)
    f["between_h"] = np.where(f["ray_w"] == f["ray_e"], f["ray_w"], BORDER + 1)
    f["between_v"] = np.where(f["ray_n"] == f["ray_s"], f["ray_n"], BORDER + 1)
    f["is_background"] = g == background
    return np.stack([np.broadcast_to(f[n], (h, w)).ravel() for n in FEATURES], 1).astype(np.int64)


def _first_seen(g: np.ndarray, background: int, axis: int, reverse: bool) -> np.ndarray:
    """For each cell, the first non-background colour strictly before it along ``axis``
    (after it when ``reverse``), BORDER when there is none."""
    x = np.moveaxis(g, axis, 0)
    if reverse:
        x = x[::-1]
    out = np.full_like(x, BORDER)
    last = np.full(x.shape[1], BORDER, dtype=np.int64)
    for i in range(x.shape[0]):
        out[i] = last
        last = np.where(x[i] != background, x[i], last)
    if reverse:
        out = out[::-1]
    return np.moveaxis(out, 0, axis)


def _components(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: the size (capped) of its 4-connected same-colour component, and whether that
    component touches the grid's border (0/1)."""
    h, w = g.shape
    label = np.arange(h * w).reshape(h, w)
    while True:  # each cell takes the smallest label among its same-colour neighbours
        new = label.copy()
        for a, b, la, lb in (
            (g[1:], g[:-1], new[1:], label[:-1]),
            (g[:-1], g[1:], new[:-1], label[1:]),
            (g[:, 1:], g[:, :-1], new[:, 1:], label[:, :-1]),
            (g[:, :-1], g[:, 1:], new[:, :-1], label[:, 1:]),
        ):
            np.minimum(la, np.where(a == b, lb, la), out=la)
        if np.array_equal(new, label):
            break
        label = new
    sizes = np.bincount(label.ravel(), minlength=h * w)
    edge = np.zeros(h * w, dtype=bool)
    edge[np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]])] = True
    return np.minimum(sizes[label], _COMPONENT_CAP), edge[label].astype(np.int64)


def candidate_subsets(size: int, num_features: int = len(FEATURES)) -> list[tuple[int, ...]]:
    """The feature subsets (column indices, ascending) of ``size`` the search may try, in its
    order: all of them up to two features; the largest all read the cell's own colour (column
    0), which keeps the search to about 900 subsets."""
    subsets = itertools.combinations(range(num_features), size)
    return [s for s in subsets if size < MAX_RULE_FEATURES or s[0] == 0]


LAYOUTS = ("same", "tile", "scale")  # how an output cell finds the input cell it reads
PLACE_FEATURES = ("place_row", "place_col")  # where in its tile / block the output cell is


def output_layout(demos: Sequence[Pair]) -> tuple[int, int] | None:
    """``(a, b)`` when every demonstration's output is its input scaled by the same whole
    factors (``(1, 1)``: the same shape), else ``None``."""
    factors = set()
    for i, o in demos:
        (h, w), (oh, ow) = i.shape, o.shape
        if oh % h or ow % w:
            return None
        factors.add((oh // h, ow // w))
    return factors.pop() if len(factors) == 1 else None


def layout_features(grid: np.ndarray, factors: tuple[int, int], layout: str) -> np.ndarray:
    """Features of each cell of the output that ``grid`` maps to, row-major: with ``"same"``
    the cell's own (:func:`cell_features`); with ``"tile"`` (the output is the input repeated
    a × b times) and ``"scale"`` (each input cell becomes an a × b block) the features of the
    input cell it reads, then its tile's / its place in the block's row and column."""
    x = cell_features(grid)
    if layout == "same":
        return x
    (h, w), (a, b) = grid.shape, factors
    rows, cols = np.arange(a * h)[:, None], np.arange(b * w)[None, :]
    if layout == "tile":
        source, place = (rows % h) * w + cols % w, (rows // h, cols // w)
    else:
        source, place = (rows // a) * w + cols // b, (rows % a, cols % b)
    extra = [np.broadcast_to(p, source.shape).ravel() for p in place]
    return np.column_stack([x[source.ravel()], *extra])


def rule_prediction(demos: Sequence[Pair], query: np.ndarray) -> np.ndarray | None:
    """The output grid the best rule (module docstring) predicts for ``query``, or ``None``.
    Only when every demonstration's output is its input scaled by the same whole factors
    (most often 1: the same shape)."""
    factors = output_layout(demos) if demos else None
    if factors is None:
        return None
    shape = (query.shape[0] * factors[0], query.shape[1] * factors[1])
    if max(shape) > CANVAS:
        return None
    y = [np.ravel(o).astype(np.int64) for _, o in demos]
    best = None
    for layout in ("same",) if factors == (1, 1) else LAYOUTS[1:]:
        feats = [layout_features(i, factors, layout) for i, _ in demos]
        found = _search(feats, y, layout_features(query, factors, layout))
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    return None if best is None else best[1].reshape(shape)


def _search(
    feats: list[np.ndarray], outputs: list[np.ndarray], query: np.ndarray
) -> tuple[tuple[int, int], np.ndarray] | None:
    """The best rule's rank and its colours for the ``query`` cells, or ``None``: ``feats``
    [cells, F] and ``outputs`` [cells] per demonstration, ``query`` [cells, F]."""
    y = np.concatenate(outputs)
    pair_of = np.repeat(np.arange(len(feats)), [len(f) for f in feats])
    # Each feature's values renumbered 0..k-1 over the demonstrations and the query, so that a
    # subset's key is a small dense number and its table a bincount.
    codes, cards = _dense_codes(np.concatenate([*feats, query]))
    n = len(y)

    best: tuple[tuple[int, int], np.ndarray] | None = None
    # Subsets that cover the query but are inconsistent: only their supersets are searched.
    open_: set[tuple[int, ...]] = {()}
    for size in range(1, MAX_RULE_FEATURES + 1):
        grown: set[tuple[int, ...]] = set()
        for subset in candidate_subsets(size, query.shape[1]):
            if any(sub not in open_ for sub in itertools.combinations(subset, size - 1)):
                continue  # not minimal, or a smaller subset already misses a query cell
            key, count = codes[:, subset[0]], int(cards[subset[0]])
            for f in subset[1:]:
                key, count = key * cards[f] + codes[:, f], count * int(cards[f])
            seen = np.zeros(count, dtype=bool)
            seen[key[:n]] = True
            if not seen[key[n:]].all():
                continue  # misses a query cell
            table = np.bincount(key[:n] * NUM_COLOURS + y, minlength=count * NUM_COLOURS)
            table = table.reshape(count, NUM_COLOURS)
            if ((table > 0).sum(1) > 1).any():
                grown.add(subset)  # inconsistent: a larger subset may resolve it
                continue
            rank = (-_held_out_hits(key[:n], pair_of, len(feats)), size)
            if best is None or rank < best[0]:
                best = (rank, table.argmax(1)[key[n:]])
        if not grown:
            break
        open_ = grown
    return best


def _dense_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[cells, features] values → the same, each column renumbered 0..k-1, and the k's."""
    codes = np.empty_like(x)
    cards = np.empty(x.shape[1], dtype=np.int64)
    for f in range(x.shape[1]):
        values, codes[:, f] = np.unique(x[:, f], return_inverse=True)
        cards[f] = len(values)
    return codes, cards


def _held_out_hits(key: np.ndarray, pair_of: np.ndarray, n: int) -> int:
    """How many demonstration pairs a consistent rule predicts from the other pairs' cells
    (with one pair only, none). A consistent rule predicts a covered pair correctly, so a hit
    is a pair whose every value occurs in another pair."""
    if n < 2:
        return 0
    hits = 0
    for j in range(n):
        mine = pair_of == j
        hits += bool(np.isin(key[mine], key[~mine]).all())
    return hits
