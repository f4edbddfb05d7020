"""A pure-Python EmbeddingCache: the oracle the C++ index is tested against (and benchmarked).

It follows the rules in qwenrl/cache.py's docstring with plain dicts and an OrderedDict for the
LRU order, one step at a time, so that it can be read against the rules line by line. It shares
only the plain data types (CachePlan, CacheStats, StalePlanError), the input checks and
``fetch`` (plan + encode + write + gather, calling this class's own methods) with qwenrl.cache,
so that results compare field by field; slot assignment is the same by design. Not
thread-safe.
"""

from __future__ import annotations

import itertools
import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qwenrl.cache import (
    STAT_NAMES,
    CachePlan,
    CacheStats,
    EmbeddingCache,
    StalePlanError,
    as_keys,
    check_values,
)

_oracle_ids = itertools.count(-1, -1)  # negative: never equal to a C++-backed cache's id


class OracleEmbeddingCache:
    """Same constructor, methods and results as qwenrl.EmbeddingCache."""

    def __init__(self, capacity, dim, refresh_every=10, dtype=torch.float32, device="cpu"):
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be >= 1, got {capacity} and {dim}")
        if refresh_every < -1:
            raise ValueError(f"refresh_every must be >= -1, got {refresh_every}")
        self.capacity, self.dim, self.refresh_every = capacity, dim, refresh_every
        self.dtype = dtype
        self._slab = torch.zeros(capacity, dim, dtype=dtype, device=device)  # [capacity, dim]
        self.device = self._slab.device
        self._id = next(_oracle_ids)
        self._counts = dict.fromkeys(STAT_NAMES, 0)
        self._clear()

    def _clear(self) -> None:
        self._lru: OrderedDict[int, int] = OrderedDict()  # key -> slot, least recent first
        self._stamp: dict[int, int] = {}  # key -> step its value was written at
        self._has_value: dict[int, bool] = {}  # key -> a value was written
        self._free = list(range(self.capacity - 1, -1, -1))  # stack: pop() gives slot 0 first

    def _fresh(self, stamp: int, step: int) -> bool:
        if self.refresh_every == -1:
            return True
        return self.refresh_every > 0 and step - stamp < self.refresh_every

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        key, slot = self._lru.popitem(last=False)
        del self._stamp[key], self._has_value[key]
        self._counts["evictions"] += 1
        return slot

    def plan(self, keys: Tensor | Sequence[int], step: int) -> CachePlan:
        keys = as_keys(keys)
        step = operator.index(step)
        rows = keys.tolist()
        unique = list(dict.fromkeys(rows))
        if len(unique) > self.capacity:
            raise ValueError(f"{len(unique)} distinct keys, capacity {self.capacity}")
        slot_of: dict[int, int] = {}
        compute: set[int] = set()
        for key in unique:  # cached keys first: they become most recent, safe from eviction
            if key not in self._lru:
                continue
            self._lru.move_to_end(key)
            slot_of[key] = self._lru[key]
            if not self._has_value[key]:
                self._counts["misses"] += 1
                compute.add(key)
            elif self._fresh(self._stamp[key], step):
                self._counts["hits"] += 1
            else:
                self._counts["stale_refreshes"] += 1
                self._has_value[key] = False
                compute.add(key)
        for key in unique:
            if key in slot_of:
                continue
            slot = self._take_slot()
            self._lru[key] = slot
            self._stamp[key], self._has_value[key] = step, False
            slot_of[key] = slot
            compute.add(key)
            self._counts["misses"] += 1
        self._counts["duplicates"] += len(rows) - len(unique)

        compute_keys = [key for key in unique if key in compute]
        position = {key: i for i, key in enumerate(compute_keys)}
        return CachePlan(
            keys=keys,
            slots=torch.tensor([slot_of[k] for k in rows], dtype=torch.int64),
            compute_mask=torch.tensor([k in compute for k in rows], dtype=torch.bool),
            compute_index=torch.tensor([position.get(k, -1) for k in rows], dtype=torch.int64),
            compute_keys=torch.tensor(compute_keys, dtype=torch.int64),
            compute_slots=torch.tensor([slot_of[k] for k in compute_keys], dtype=torch.int64),
            step=step,
            cache_id=self._id,
        )

    def _owns(self, slot: int, key: int) -> bool:
        return self._lru.get(key) == slot

    def _check_plan(self, plan: CachePlan) -> None:
        if not isinstance(plan, CachePlan):
            raise TypeError(f"expected a CachePlan, got {type(plan).__name__}")
        if plan.cache_id != self._id:
            raise ValueError("the plan was made by another cache")

    def write(self, plan: CachePlan, fresh_values: Tensor | None, step: int | None = None) -> None:
        self._check_plan(plan)
        step = plan.step if step is None else operator.index(step)
        if fresh_values is None and plan.num_compute == 0:
            return
        check_values(fresh_values, plan.num_compute, self.dim, self.dtype, self.device, "write")
        pairs = list(zip(plan.compute_keys.tolist(), plan.compute_slots.tolist()))
        for key, slot in pairs:
            if not self._owns(slot, key):
                raise StalePlanError(f"write: key {key} no longer owns slot {slot}")
        with torch.no_grad():
            self._slab.index_copy_(0, plan.compute_slots.to(self.device), fresh_values.detach())
        for key, _ in pairs:
            self._stamp[key], self._has_value[key] = step, True

    def _read(self, plan: CachePlan, skip: Tensor | None) -> Tensor:
        skipped = [False] * plan.batch_size if skip is None else skip.tolist()
        for row, (key, slot) in enumerate(zip(plan.keys.tolist(), plan.slots.tolist())):
            if skipped[row]:
                continue
            if not self._owns(slot, key) or not self._has_value[key]:
                raise StalePlanError(f"read: row {row} (key {key}, slot {slot}) has no value")
        return self._slab.index_select(0, plan.slots.to(self.device))

    def read(self, plan: CachePlan) -> Tensor:
        self._check_plan(plan)
        return self._read(plan, None)

    def gather(self, plan: CachePlan, fresh_values: Tensor | None) -> Tensor:
        self._check_plan(plan)
        if plan.num_compute == 0:
            if fresh_values is not None:
                check_values(fresh_values, 0, self.dim, self.dtype, self.device, "gather")
            return self._read(plan, None)
        check_values(fresh_values, plan.num_compute, self.dim, self.dtype, self.device, "gather")
        index = plan.compute_index.clamp(min=0).to(self.device)
        computed = fresh_values.index_select(0, index)
        if bool(plan.compute_mask.all()):
            return computed
        cached = self._read(plan, plan.compute_mask)
        return torch.where(plan.compute_mask.to(self.device).unsqueeze(1), computed, cached)

    # plan + encode + write + gather: the same composition, over this class's methods.
    fetch = EmbeddingCache.fetch

    @property
    def stats(self) -> CacheStats:
        return CacheStats(**self._counts)

    def reset_stats(self) -> None:
        self._counts = dict.fromkeys(STAT_NAMES, 0)

    def invalidate(self, keys: Tensor | Sequence[int] | None = None) -> int:
        if keys is None:
            dropped = len(self._lru)
            self._clear()
            return dropped
        dropped = 0
        for key in as_keys(keys).tolist():
            if key in self._lru:
                self._free.append(self._lru.pop(key))
                del self._stamp[key], self._has_value[key]
                dropped += 1
        return dropped

    def state_dict(self) -> dict[str, Any]:
        keys = list(self._lru)
        slots = torch.tensor([self._lru[k] for k in keys], dtype=torch.int64)
        return {
            "capacity": self.capacity,
            "dim": self.dim,
            "refresh_every": self.refresh_every,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "slots": slots,
            "stamps": torch.tensor([self._stamp[k] for k in keys], dtype=torch.int64),
            "has_value": torch.tensor([self._has_value[k] for k in keys], dtype=torch.bool),
            "values": self._slab.index_select(0, slots.to(self.device)),
            "free_slots": torch.tensor(self._free, dtype=torch.int64),
            "stats": dict(self._counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["capacity"], state["dim"]) != (self.capacity, self.dim):
            raise ValueError("capacity/dim mismatch")
        if state["values"].dtype != self.dtype:
            raise TypeError("dtype mismatch")
        keys, slots = state["keys"].tolist(), state["slots"].tolist()
        free = state["free_slots"].tolist()
        if sorted(slots + free) != list(range(self.capacity)) or len(set(keys)) != len(keys):
            raise ValueError("inconsistent state")
        self._clear()
        self._free = free
        for key, slot, stamp, ok in zip(
            keys, slots, state["stamps"].tolist(), state["has_value"].tolist()
        ):
            self._lru[key], self._stamp[key], self._has_value[key] = slot, stamp, ok
        self._counts = {name: int(state["stats"][name]) for name in STAT_NAMES}
        if keys:
            with torch.no_grad():
                self._slab.index_copy_(
                    0, state["slots"].to(self.device), state["values"].to(self.device)
                )

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        try:
            return operator.index(key) in self._lru  # type: ignore[arg-type]
        except TypeError:
            return False
