"""Test-time training: fit a copy of the models to one task's demonstrations before predicting it.

For a task with n ≥ 2 demonstration pairs, each pair j is a query with the other n − 1 pairs as
prompt (leave-one-out), under random D8 × colour augmentations: the samples
:class:`qwenrl.data.ArcDataset` builds for training, from the task's
:meth:`~qwenrl.data.ArcTask.demonstrations_only`. ``steps`` optimizer steps on batches of them
fine-tune a copy of the agent, the refiner and the steering vectors, and the task's own prompt
embedding: an offset [dim] added to every prompt embedding of the task (zero at the start).
Qwen and its projection stay frozen and shared with the original (no copy of Qwen per task;
they run under ``no_grad`` here), so the cost of a step is one agent forward and backward.

Only the demonstration pairs are read: :func:`adapt_to_task` takes no test pair at all.
Per-task training on the evaluation tasks' demonstrations is where the public ablations of
HRM and TRM find most of their ARC score (ARC Prize, "The Hidden Drivers of HRM's Performance
on ARC-AGI", 2025; Jolicoeur-Martineau, arXiv:2510.04871); the ARChitects fine-tune per task
likewise.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qwenrl.data import ArcDataset, ArcTask, Sample, collate
from qwenrl.data.grids import Pair
from qwenrl.loss import EFELoss
from qwenrl.models import QwenRLModels


@dataclass(frozen=True)
class TTTConfig:
    """Test-time training settings (``steps = 0``: none).

    ``augment=False`` trains on the demonstrations as they are (leave-one-out only), which fits
    a task in far fewer steps than under D8 × colour augmentation (``docs/evaluation.md``).
    ``stop_after``: training ends early once that many consecutive batches came out exact,
    every cell of every sample (0: always ``steps`` steps).
    """

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 8
    augment: bool = True
    num_colour_perms: int = 2  # with augment: augmentations drawn from 8 × num_colour_perms
    tau: float = 0.3  # the EFE loss's hard-cell threshold (the trainer's late τ)
    easy_weight: float = 0.5
    stop_after: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.steps < 0
            or self.batch_size < 1
            or self.num_colour_perms < 1
            or self.stop_after < 0
        ):
            raise ValueError(
                "test-time training needs steps >= 0, batch_size >= 1, num_colour_perms >= 1 "
                f"and stop_after >= 0, got {self.steps}, {self.batch_size}, "
                f"{self.num_colour_perms} and {self.stop_after}"
            )
        if not self.lr > 0:
            raise ValueError(f"test-time training lr must be > 0, got {self.lr}")


def tuned_copy(models: QwenRLModels) -> QwenRLModels:
    """A copy of ``models`` whose encoder (Qwen + projection) is the original's, shared."""
    return copy.deepcopy(models, memo={id(models.encoder): models.encoder})


def adapt_to_task(
    models: QwenRLModels,
    demos: Sequence[Pair],
    cfg: TTTConfig,
    *,
    task_seed: int = 0,
) -> tuple[QwenRLModels, torch.Tensor]:
    """Fine-tune a copy of ``models`` on the demonstrations (module docstring).

    Args:
        models: the trained models, in eval mode; left unchanged.
        demos: the task's demonstration pairs (input, output) [h, w] each.
        cfg: steps, learning rate, batch size, augmentations, loss settings.
        task_seed: mixed with ``cfg.seed`` into the sample draws (e.g. the task's index).

    Returns:
        ``(tuned, prompt_offset)``: the fine-tuned copy in eval mode and the task's prompt
        offset [dim], to pass to :func:`qwenrl.eval.voting.predict`. With ``cfg.steps == 0`` or
        fewer than two demonstrations (no leave-one-out sample exists) ``models`` itself and a
        zero offset.
    """
    device = models.encoder.device
    offset = torch.zeros(models.config.dim, device=device)
    ds = ArcDataset(
        [ArcTask(id="ttt", train=tuple(demos), test=())],
        split="ttt",
        leave_one_out=True,
        augment=cfg.augment,
        num_colour_perms=cfg.num_colour_perms,
        aug_seed=cfg.seed,
    )
    if cfg.steps == 0 or len(ds) == 0:
        return models, offset
    tuned = tuned_copy(models)
    for part in (tuned.refiner, tuned.policy, tuned.agent):
        part.eval()  # no dropout, no prompt dropout: fit the model that will predict
    offset.requires_grad_(True)
    params = [
        *tuned.refiner.parameters(),
        *tuned.policy.steering_parameters(),
        *tuned.agent.parameters(),
    ]
    optimizer = torch.optim.AdamW([*params, offset], lr=cfg.lr, weight_decay=0.0)
    criterion = EFELoss(tau=cfg.tau, easy_weight=cfg.easy_weight)
    rng = np.random.default_rng([cfg.seed, 3, task_seed])
    # A task has n (· 8 · num_colour_perms with augment) samples; each is built, and its prompt
    # encoded, once (Qwen is frozen here), however often it is drawn. Batches walk through
    # shuffled passes over them: no sample twice in a batch, none left out of a pass.
    samples: dict[int, Sample] = {}
    embeddings: dict[int, torch.Tensor] = {}  # prompt key → frozen embedding [dim]
    order: list[int] = []
    exact_run = 0  # consecutive batches predicted exactly
    with torch.enable_grad():
        for _ in range(cfg.steps):
            drawn = []
            while len(drawn) < min(cfg.batch_size, len(ds)):
                if not order:
                    order = [int(i) for i in rng.permutation(len(ds)) if i not in drawn]
                drawn.append(order.pop())
            for i in drawn:
                if i not in samples:
                    samples[i] = ds[i]
            batch = collate([samples[i] for i in drawn]).to(device)
            missing = [i for i, k in enumerate(batch.keys.tolist()) if k not in embeddings]
            if missing:
                with torch.no_grad():
                    fresh = tuned.encoder.encode([batch.prompts[i] for i in missing]).float()
                for i, row in zip(missing, fresh):
                    embeddings[int(batch.keys[i])] = row
            prompt = torch.stack([embeddings[k] for k in batch.keys.tolist()]) + offset
            refined = tuned.refiner.apply(prompt)
            # Train both attempts' actions: each sample under one of the two likeliest.
            ranked = tuned.policy.distribution(refined).probs.argsort(-1, descending=True)
            pick = torch.from_numpy(rng.integers(min(2, ranked.shape[-1]), size=len(batch)))
            action = ranked.gather(1, pick.to(device)[:, None]).squeeze(1)
            logits = tuned.agent(batch.query, tuned.policy.steer(refined, action), batch.hints)
            target = batch.target.view(len(batch), -1)
            loss = criterion(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cfg.stop_after:
                exact = bool((logits.detach().argmax(-1) == target).all())
                exact_run = exact_run + 1 if exact else 0
                if exact_run >= cfg.stop_after:
                    break
    return tuned, offset.detach()
