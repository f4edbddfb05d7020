"""D8 × colour-permutation augmentation of ARC grids.

An augmentation id packs both parts: ``aug_id = perm_id * 8 + d8``.

* ``d8`` in 0..7: rotate counter-clockwise by ``d8 % 4`` quarter turns, then, for ``d8 >= 4``,
  mirror left-right. The eight results are the dihedral group of the square.
* ``perm_id``: colour permutation number ``perm_id`` of a seeded stream. Colour 0 (background)
  always stays 0; colours 1..9 are permuted by ``numpy.random.default_rng([seed, perm_id])``.
  ``perm_id = 0`` is the identity, so ``aug_id = 0`` leaves a grid unchanged.

The same :class:`Augmentation` is applied to every grid of a sample (prompt pairs, query
input and target), which keeps the task's rule intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

NUM_D8 = 8


def d8_apply(grid: np.ndarray, d8: int) -> np.ndarray:
    """Apply dihedral transform ``d8`` (0..7) to a [h, w] grid."""
    if not 0 <= d8 < NUM_D8:
        raise ValueError(f"d8 must be in 0..7, got {d8}")
    out = np.rot90(grid, d8 % 4)
    if d8 >= 4:
        out = np.fliplr(out)
    return out.copy()  # a fresh array, never a strided view


def d8_invert(grid: np.ndarray, d8: int) -> np.ndarray:
    """Undo :func:`d8_apply`: ``d8_invert(d8_apply(g, k), k) == g``."""
    if not 0 <= d8 < NUM_D8:
        raise ValueError(f"d8 must be in 0..7, got {d8}")
    out = np.fliplr(grid) if d8 >= 4 else grid
    return np.rot90(out, -(d8 % 4)).copy()


@lru_cache(maxsize=4096)
def _colour_perm(perm_id: int, seed: int) -> tuple[int, ...]:
    if perm_id == 0:
        return tuple(range(10))
    rest = np.random.default_rng([seed, perm_id]).permutation(9) + 1
    return (0, *(int(c) for c in rest))


def colour_permutation(perm_id: int, seed: int = 0) -> np.ndarray:
    """Permutation [10] of colours with 0 fixed; ``perm_id = 0`` is the identity."""
    if perm_id < 0:
        raise ValueError(f"perm_id must be >= 0, got {perm_id}")
    return np.array(_colour_perm(perm_id, seed), dtype=np.int64)


@dataclass(frozen=True)
class Augmentation:
    """One D8 transform plus one colour permutation, applied identically to every grid."""

    d8: int
    colours: tuple[int, ...]  # colours[c] = new colour of colour c; colours[0] == 0

    @classmethod
    def from_id(cls, aug_id: int, seed: int = 0) -> Augmentation:
        """Decode ``aug_id = perm_id * 8 + d8`` (see module docstring)."""
        if aug_id < 0:
            raise ValueError(f"aug_id must be >= 0, got {aug_id}")
        perm_id, d8 = divmod(aug_id, NUM_D8)
        return cls(d8=d8, colours=_colour_perm(perm_id, seed))

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """Augment a [h, w] colour grid (result [h, w] or [w, h])."""
        return d8_apply(np.asarray(self.colours, dtype=np.int64)[grid], self.d8)

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """Map an augmented grid (e.g. a decoded prediction) back to the original frame.

        Tokens outside 0..9 (a stray OUTSIDE/PAD in a prediction) are kept as they are.
        """
        inverse = np.arange(16, dtype=np.int64)
        inverse[np.asarray(self.colours)] = np.arange(10)
        return d8_invert(inverse[np.asarray(grid, dtype=np.int64)], self.d8)
