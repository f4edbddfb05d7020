"""A batch sampler that reuses a working set of prompt keys, so cached embeddings get reused.

Steps are grouped in *windows* of ``refresh_every`` steps (1 step when ``refresh_every <= 0``).
Each window has a working set of ``working_set`` prompt keys = (prompt, aug_id): the prompts
are the next chunk of a per-epoch permutation of all prompts, each with a random augmentation.
Every batch of the window draws its ``batch_size`` samples from those keys (distinct keys while
``batch_size <= working_set``). With the default ``working_set = 4 * batch_size`` and
``refresh_every = 10``, Qwen encodes 4B prompts per 10 steps instead of 10B: the embedding
cache's 2–3× saving.

An epoch is one pass over all prompts: ``ceil(num_prompts / (working_set * world_size))``
windows. Everything is a pure function of ``(seed, step, rank)``: :meth:`batch` needs no
state, so resuming is exact from the step count alone (:meth:`state_dict` stores it). Under
data parallelism each rank takes its own chunk of the same permutation, so ranks see disjoint
prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from qwenrl.data.dataset import ArcDataset


class WorkingSetSampler:
    """Batch sampler over an :class:`ArcDataset`; yields lists of flat dataset indices.

    Usable as ``DataLoader(ds, batch_sampler=sampler, collate_fn=collate)``; iteration runs
    from the current step to the end of its epoch. Since DataLoader workers fetch ahead, the
    trainer should resume from its own step count with ``load_state_dict`` /
    :meth:`set_step`, or call :meth:`batch` directly.
    """

    def __init__(
        self,
        dataset: ArcDataset,
        batch_size: int,
        *,
        working_set: int | None = None,
        refresh_every: int = 10,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if dataset.num_prompts == 0:
            raise ValueError("dataset has no prompts")
        self.dataset = dataset
        self.batch_size = batch_size
        self.refresh_every = refresh_every
        self.window = max(refresh_every, 1)
        wanted = working_set if working_set is not None else 4 * batch_size
        if wanted < 1:
            raise ValueError(f"working_set must be >= 1, got {wanted}")
        self.working_set_size = min(wanted, dataset.num_prompts)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.windows_per_epoch = math.ceil(
            dataset.num_prompts / (self.working_set_size * world_size)
        )
        self.step = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.windows_per_epoch * self.window

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, 0, epoch])
            self._perm = rng.permutation(self.dataset.num_prompts)
            self._perm_epoch = epoch
        return self._perm

    def working_set(self, step: int) -> list[tuple[int, int]]:
        """The (prompt, aug_id) keys of the window containing ``step``."""
        w = step // self.window
        epoch, chunk = divmod(w, self.windows_per_epoch)
        perm = self._permutation(epoch)
        size = self.working_set_size
        start = (chunk * self.world_size + self.rank) * size
        # The last chunk of an epoch wraps to the permutation's start, so every window has a
        # full working set.
        prompts = perm[(start + np.arange(size)) % len(perm)]
        augs = np.random.default_rng([self.seed, 1, w, self.rank]).integers(
            self.dataset.num_augmentations, size=size
        )
        return [(int(p), int(a)) for p, a in zip(prompts, augs)]

    def batch(self, step: int) -> list[int]:
        """Flat dataset indices [batch_size] of the batch at ``step`` (pure function)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        keys = self.working_set(step)
        rng = np.random.default_rng([self.seed, 2, step, self.rank])
        n = len(keys)
        reps = math.ceil(self.batch_size / n)
        slots = np.concatenate([rng.permutation(n) for _ in range(reps)])[: self.batch_size]
        out = []
        for slot in slots:
            prompt, aug_id = keys[slot]
            items = self.dataset.prompt_items(prompt)
            item = items[int(rng.integers(len(items)))]
            out.append(self.dataset.index(item, aug_id))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        end = (self.step // self.steps_per_epoch + 1) * self.steps_per_epoch
        while self.step < end:
            step = self.step
            self.step += 1
            yield self.batch(step)

    def set_step(self, step: int) -> None:
        """Continue from ``step`` (the number of batches already consumed)."""
        self.step = int(step)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "working_set": self.working_set_size,
            "refresh_every": self.refresh_every,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_prompts": self.dataset.num_prompts,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["step"]``; the configuration must match, else batches would differ."""
        mine = self.state_dict()
        diff = {k: (state[k], mine[k]) for k in mine if k != "step" and state.get(k) != mine[k]}
        if diff:
            raise ValueError(
                f"sampler configuration differs from the checkpoint (saved, now): {diff}"
            )
        self.set_step(state["step"])
