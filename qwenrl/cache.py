"""The prompt-embedding cache (the contract in docs/cache.md).

Qwen's forward pass over a task prompt is the most expensive part of a training step. The cache
keeps one embedding per prompt key across batches, so Qwen recomputes a key only when its cached
value is missing or stale. The key index, step stamps, LRU order and statistics live in C++
(``qwenrl._C.EmbeddingCacheIndex``, behind a mutex, thread-safe); the embedding slab is a
[capacity, dim] tensor on the cache's device, gathered and written with torch ops under the same
mutex. One step of the trainer::

    plan = cache.plan(keys, step)                     # keys: [B] prompt ids
    fresh = qwen(prompts[plan.compute_keys])          # [U, dim], with grad, U <= B
    cache.write(plan, fresh, step)                    # stores detached copies
    emb = cache.gather(plan, fresh)                   # [B, dim]: fresh rows keep their graph

or in one call: ``emb = cache.fetch(keys, step, lambda k: qwen(prompts[k]))``.

Rules (the Python oracle in tests/cache_oracle.py implements the same ones):

* Freshness: an entry written at step s is fresh at step t while t - s < refresh_every.
  ``refresh_every=0`` disables caching (every key is computed on every plan; an expired entry
  counts as a stale refresh); ``refresh_every=-1`` never expires (frozen Qwen).
* Duplicates: a key that appears several times in one batch is computed once; ``compute_keys``
  lists the keys to compute in order of first appearance.
* Statistics count distinct keys per plan: each distinct key is one lookup and exactly one of a
  hit (fresh value cached), a miss (key absent, or planned earlier but never written) or a stale
  refresh (value present but expired), so ``lookups = hits + misses + stale_refreshes`` and
  ``hit_rate = hits / lookups`` is the share of Qwen encodings saved. The further rows of a
  repeated key count as ``duplicates`` (rows = lookups + duplicates). ``evictions`` counts LRU
  evictions (``invalidate`` is not one).
* Slots (deterministic): a plan first moves the batch's cached keys to the most-recently-used
  end in order of first appearance, then gives each new key the top of the free-slot stack
  (initially 0, 1, 2, ...; ``invalidate(keys)`` pushes freed slots in the given order), or, when
  none is free, the slot of the least recently used entry. So eviction never touches a key of
  the current plan, and a batch with more distinct keys than ``capacity`` is a ``ValueError``
  that changes nothing. Writes and reads do not change the LRU order.
* A key that needs computing has no readable value until its ``write``; ``read`` and ``write``
  check that every slot still belongs to the plan's key and raise :class:`StalePlanError`
  (writing nothing) when a later plan or ``invalidate`` took it.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qwenrl._ext import require_extension

__all__ = ["CachePlan", "CacheStats", "EmbeddingCache", "StalePlanError", "as_keys", "check_values"]

STAT_NAMES = ("hits", "misses", "stale_refreshes", "evictions", "duplicates")
_cache_ids = itertools.count(1)


class StalePlanError(RuntimeError):
    """A plan's slot no longer holds its key's value (evicted, invalidated, or not yet written)."""


@dataclass(frozen=True, eq=False)
class CachePlan:
    """What one batch needs: which rows to compute, and where every row lives in the slab.

    All tensors are on the CPU. B = batch size, U = number of distinct keys to compute.
    """

    keys: Tensor  # [B] int64, the batch's keys
    slots: Tensor  # [B] int64, slab row of each batch row
    compute_mask: Tensor  # [B] bool, True where the row's key is in compute_keys
    compute_index: Tensor  # [B] int64, position of the row's key in compute_keys, -1 if cached
    compute_keys: Tensor  # [U] int64, distinct keys to compute, in order of first appearance
    compute_slots: Tensor  # [U] int64, slab row of each compute key
    step: int  # the step the plan was made at
    cache_id: int  # which cache made it (plans are not transferable)

    @property
    def batch_size(self) -> int:
        return int(self.keys.shape[0])

    @property
    def num_compute(self) -> int:
        """U: how many distinct keys the caller must encode before write()/gather()."""
        return int(self.compute_keys.shape[0])


@dataclass(frozen=True)
class CacheStats:
    """Cumulative counters (see the module docstring for what each one counts)."""

    hits: int = 0
    misses: int = 0
    stale_refreshes: int = 0
    evictions: int = 0
    duplicates: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses + self.stale_refreshes

    @property
    def hit_rate(self) -> float:
        """hits / lookups (0.0 before the first lookup)."""
        return self.hits / self.lookups if self.lookups else 0.0

    def to_dict(self) -> dict[str, float]:
        """The counters plus ``lookups`` and ``hit_rate``, e.g. for a metrics log."""
        out: dict[str, float] = {name: getattr(self, name) for name in STAT_NAMES}
        out["lookups"] = self.lookups
        out["hit_rate"] = self.hit_rate
        return out


def as_keys(keys: Tensor | Sequence[int]) -> Tensor:
    """Keys as a [B] int64 CPU tensor (a CUDA tensor costs one host sync); TypeError otherwise."""
    if not isinstance(keys, Tensor):
        keys = torch.as_tensor(keys)
        if keys.numel() == 0:
            keys = keys.long()
    if keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
        raise TypeError(f"keys must be integers (int64 preferred), got {keys.dtype}")
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D [B], got shape {tuple(keys.shape)}")
    return keys.to(device="cpu", dtype=torch.int64).contiguous()


def check_values(
    values: Any, rows: int, dim: int, dtype: torch.dtype, device: torch.device, what: str
) -> None:
    """Raises TypeError/ValueError unless values is a [rows, dim] tensor of dtype on device."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{what}: fresh_values must be a Tensor, got {type(values).__name__}")
    if values.dtype != dtype:
        raise TypeError(
            f"{what}: fresh_values must be {dtype} (the cache's dtype), got {values.dtype}"
        )
    if values.device != device:
        raise ValueError(
            f"{what}: fresh_values must be on {device} (the cache's device), got {values.device}"
        )
    if tuple(values.shape) != (rows, dim):
        raise ValueError(
            f"{what}: fresh_values must have shape [{rows}, {dim}] (one row per "
            f"plan.compute_keys), got {list(values.shape)}"
        )


def _step(step: int) -> int:
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {type(step).__name__}") from None


class EmbeddingCache:
    """LRU cache of prompt embeddings with step-based expiry (thread-safe).

    Args:
        capacity: how many keys the slab holds (>= 1); also the most distinct keys one batch
            may have.
        dim: embedding width.
        refresh_every: an entry written at step s is fresh while step - s < refresh_every;
            0 disables caching, -1 never expires.
        dtype, device: of the slab, and of the values written to and read from it.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        refresh_every: int = 10,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        ext = require_extension("EmbeddingCache")
        capacity, dim, refresh_every = int(capacity), int(dim), int(refresh_every)
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be >= 1, got {capacity} and {dim}")
        if refresh_every < -1:
            raise ValueError(f"refresh_every must be >= -1 (-1: never expire), got {refresh_every}")
        slab = torch.zeros(capacity, dim, dtype=dtype, device=device)  # [capacity, dim]
        self._index = ext.EmbeddingCacheIndex(slab, refresh_every)
        self._dim = dim
        self._dtype = dtype
        self._device = slab.device
        self._id = next(_cache_ids)

    @property
    def capacity(self) -> int:
        return self._index.capacity

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def refresh_every(self) -> int:
        return self._index.refresh_every

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def plan(self, keys: Tensor | Sequence[int], step: int) -> CachePlan:
        """Looks up keys [B] at step; returns which rows must be computed and where rows live.

        Raises ValueError (changing nothing) when keys has more distinct values than capacity.
        """
        keys = as_keys(keys)
        step = _step(step)
        slots, mask, index, ckeys, cslots = self._index.plan(keys, step)
        return CachePlan(keys, slots, mask, index, ckeys, cslots, step, self._id)

    def write(self, plan: CachePlan, fresh_values: Tensor | None, step: int | None = None) -> None:
        """Stores detached copies of fresh_values [U, dim] (rows of plan.compute_keys).

        step defaults to plan.step. fresh_values may be None when U = 0. Raises TypeError /
        ValueError for a wrong dtype, device or shape, and StalePlanError (writing nothing) when
        a later plan or invalidate() took one of the plan's slots.
        """
        self._check_plan(plan)
        step = plan.step if step is None else _step(step)
        if fresh_values is None and plan.num_compute == 0:
            return
        check_values(fresh_values, plan.num_compute, self._dim, self._dtype, self._device, "write")
        bad = self._index.write(plan.compute_keys, plan.compute_slots, fresh_values, step)
        if bad >= 0:
            raise StalePlanError(
                f"write: key {int(plan.compute_keys[bad])} no longer owns slot "
                f"{int(plan.compute_slots[bad])} (a later plan evicted it or invalidate() "
                "dropped it); nothing was written: plan again"
            )

    def read(self, plan: CachePlan) -> Tensor:
        """The batch's embeddings [B, dim] from the slab (no graph: cached values are detached).

        Every row must hold a written value: for rows in plan.compute_mask, write() first (or
        use gather()). Raises StalePlanError when a row's slot no longer holds its key's value.
        """
        self._check_plan(plan)
        return self._read(plan, skip=None)

    def gather(self, plan: CachePlan, fresh_values: Tensor | None) -> Tensor:
        """The batch's embeddings [B, dim]: computed rows from fresh_values, the rest cached.

        fresh_values [U, dim] holds the rows of plan.compute_keys (None when U = 0). Computed
        rows are ``fresh_values.index_select(0, compute_index)``, so gradients flow back to
        whatever produced fresh_values (Qwen, on recompute steps); cached rows come from the
        slab, detached. Works before or after write(); only the cached rows are read.
        """
        self._check_plan(plan)
        if plan.num_compute == 0:
            if fresh_values is not None:
                check_values(fresh_values, 0, self._dim, self._dtype, self._device, "gather")
            return self._read(plan, skip=None)
        check_values(fresh_values, plan.num_compute, self._dim, self._dtype, self._device, "gather")
        device = self._device
        index = plan.compute_index.to(device, non_blocking=True).clamp(min=0)  # [B]
        computed = fresh_values.index_select(0, index)  # [B, dim], differentiable
        if bool(plan.compute_mask.all()):
            return computed
        cached = self._read(plan, skip=plan.compute_mask)  # [B, dim], computed rows unused
        mask = plan.compute_mask.to(device, non_blocking=True).unsqueeze(1)  # [B, 1]
        return torch.where(mask, computed, cached)

    def fetch(
        self, keys: Tensor | Sequence[int], step: int, encode: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """plan + encode + write + gather: embeddings [B, dim] for keys [B] at step.

        encode(compute_keys [U] int64 CPU) -> [U, dim] is called only when U > 0.
        """
        plan = self.plan(keys, step)
        fresh = encode(plan.compute_keys) if plan.num_compute else None
        self.write(plan, fresh, step)
        return self.gather(plan, fresh)

    @property
    def stats(self) -> CacheStats:
        return CacheStats(*self._index.stats())

    def reset_stats(self) -> None:
        self._index.reset_stats()

    def invalidate(self, keys: Tensor | Sequence[int] | None = None) -> int:
        """Drops every entry (keys=None) or the given keys; returns how many were dropped.

        Statistics are kept (see reset_stats()).
        """
        if keys is None:
            return self._index.invalidate_all()
        return self._index.invalidate(as_keys(keys))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: entries in LRU order, stamps, slots, the
        free-slot stack, statistics and the values (on the cache's device)."""
        keys, slots, stamps, has_value, values, free_slots, stats = self._index.export_state()
        return {
            "capacity": self.capacity,
            "dim": self._dim,
            "refresh_every": self.refresh_every,
            "keys": keys,  # [N] least to most recently used
            "slots": slots,  # [N]
            "stamps": stamps,  # [N] step each value was written at
            "has_value": has_value,  # [N] bool, False for planned but unwritten keys
            "values": values,  # [N, dim]
            "free_slots": free_slots,  # [capacity - N], bottom to top of the stack
            "stats": dict(zip(STAT_NAMES, stats.tolist())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state_dict() (from this class or the oracle). capacity and dim must match
        (ValueError); values move to this cache's device and must have its dtype (TypeError).
        refresh_every stays this cache's own (it is configuration, not state)."""
        if (state["capacity"], state["dim"]) != (self.capacity, self._dim):
            raise ValueError(
                f"load_state_dict: state is for capacity={state['capacity']}, dim={state['dim']}; "
                f"this cache has capacity={self.capacity}, dim={self._dim}"
            )
        values = state["values"]
        if values.dtype != self._dtype:
            raise TypeError(
                f"load_state_dict: values are {values.dtype}, the cache stores {self._dtype}"
            )
        stats = torch.tensor([int(state["stats"][name]) for name in STAT_NAMES], dtype=torch.int64)
        self._index.import_state(
            as_keys(state["keys"]),
            as_keys(state["slots"]),
            as_keys(state["stamps"]),
            state["has_value"].to("cpu", torch.bool),
            values.to(self._device),
            as_keys(state["free_slots"]),
            stats,
        )

    def __len__(self) -> int:
        """Entries holding a slot (planned-but-unwritten keys included)."""
        return self._index.size()

    def __contains__(self, key: object) -> bool:
        try:
            key = operator.index(key)  # type: ignore[arg-type]
        except TypeError:
            return False
        return self._index.contains(key)

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache(capacity={self.capacity}, dim={self._dim}, "
            f"refresh_every={self.refresh_every}, dtype={self._dtype}, device={self._device}, "
            f"len={len(self)})"
        )

    def _check_plan(self, plan: CachePlan) -> None:
        if not isinstance(plan, CachePlan):
            raise TypeError(f"expected a CachePlan from plan(), got {type(plan).__name__}")
        if plan.cache_id != self._id:
            raise ValueError("the plan was made by another EmbeddingCache")

    def _read(self, plan: CachePlan, skip: Tensor | None) -> Tensor:
        bad, rows = self._index.read(plan.keys, plan.slots, skip)
        if bad >= 0:
            raise StalePlanError(
                f"read: row {bad} (key {int(plan.keys[bad])}, slot {int(plan.slots[bad])}) has no "
                "value for its key: write() the plan's computed rows first, or plan again if a "
                "later plan or invalidate() took the slot"
            )
        return rows
