"""ARC's two attempts by voting over augmentations.

A query is predicted under ``K`` augmentations of the whole task (aug ids ``0..K-1`` of
:class:`qwenrl.data.Augmentation`: the eight D8 transforms with the colours unchanged first,
then the same eight under colour permutation 1, 2, ...; id 0 is the identity). For each, the
agent predicts under the RL policy's two likeliest actions, and each predicted grid is mapped
back to the task's frame with :meth:`Augmentation.invert`. Identical grids pool their votes,
each vote weighted by the policy's probability of its action; the two grids with the most
votes are the attempts, ties going to the grid seen first (earlier augmentation, then likelier
action). With ``K = 1`` the attempts are the two likeliest actions' predictions on the task as
it is, which is how the trainer's validation picks them.

Cell accuracy scores one canvas per query, and it votes per cell (:func:`cell_vote`): each
augmentation's cell probabilities under its likeliest action, mapped back to the task's frame
and averaged inside the output shape the hints give. Whole grids rarely agree where the agent
is wrong, single cells more often: on the default run's 419 evaluation queries, 8
augmentations raise cell accuracy from 0.792 to 0.794 (16, with colour permutations, to
0.794 as well: 0.7939 against 0.7943).

A prediction sees only the task's demonstration pairs and the query's input: the functions here
take no output grid. The scheme follows the ARChitects' ARC Prize 2024 solution (Franzen,
Disselhoff and Hartmann, "The LLM ARChitect", 2024) and TRM (Jolicoeur-Martineau, "Less is
More: Recursive Reasoning with Tiny Networks", arXiv:2510.04871), which score ARC by
majority vote over D8 × colour augmentations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from qwenrl.data import (
    CANVAS,
    NUM_COLOURS,
    PAD,
    Augmentation,
    DemoHints,
    d8_invert,
    decode_grid,
    demo_hints,
    grid_to_canvas,
    pairs_to_text,
    rule_prediction,
)
from qwenrl.data.grids import Pair
from qwenrl.models import QwenRLModels

ATTEMPTS = 2  # ARC scores a query as solved when one of two attempted grids is exact


class AugmentedQuery(NamedTuple):
    """One query under K augmentations, ready for the models.

    prompts: K prompt texts · query [K, 30, 30] int64 · hints: :class:`DemoHints` with a
    leading K · augmentations: the K :class:`Augmentation` objects (to map predictions back).
    """

    prompts: list[str]
    query: torch.Tensor
    hints: DemoHints
    augmentations: list[Augmentation]


def augment_query(
    demos: Sequence[Pair], query_input: np.ndarray, aug_ids: Sequence[int], aug_seed: int = 0
) -> AugmentedQuery:
    """The demonstrations and the query input [h, w] under each of ``aug_ids``, laid out as the
    dataset lays out a sample (prompt text, query canvas, hints; :mod:`qwenrl.data.dataset`)."""
    if not demos:
        raise ValueError("a query needs at least one demonstration pair")
    if not aug_ids:
        raise ValueError("aug_ids is empty: at least one augmentation (0 = identity) is needed")
    prompts, queries, hints, augs = [], [], [], []
    rule = rule_prediction(demos, np.asarray(query_input))  # in the task's frame, as the dataset
    for aug_id in aug_ids:
        aug = Augmentation.from_id(int(aug_id), aug_seed)
        aug_demos = [(aug.apply(i), aug.apply(o)) for i, o in demos]
        aug_query = aug.apply(np.asarray(query_input))
        prompts.append(pairs_to_text(aug_demos))
        queries.append(grid_to_canvas(aug_query, PAD))
        hints.append(demo_hints(aug_demos, aug_query, None if rule is None else aug.apply(rule)))
        augs.append(aug)
    return AugmentedQuery(prompts, torch.stack(queries), DemoHints.stack(hints), augs)


def _grid_key(grid: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return tuple(grid.shape), np.ascontiguousarray(grid, dtype=np.int64).tobytes()


def rank_candidates(
    candidates: Iterable[tuple[np.ndarray, float]], k: int = ATTEMPTS
) -> list[tuple[np.ndarray, float]]:
    """Pool identical grids' votes and return the ``k`` best ``(grid, votes)``, most votes first.

    Ties go to the grid seen first. Grids that cannot be an ARC answer (no cells, or a token
    beyond the colours 0..9) rank after every valid grid, so they fill an attempt only when
    fewer than ``k`` valid grids were predicted.
    """
    pooled: dict[tuple[tuple[int, ...], bytes], list] = {}
    for order, (grid, weight) in enumerate(candidates):
        grid = np.asarray(grid)
        entry = pooled.setdefault(_grid_key(grid), [grid, 0.0, order])
        entry[1] += float(weight)

    def valid(grid: np.ndarray) -> bool:
        return grid.size > 0 and int(grid.min()) >= 0 and int(grid.max()) < NUM_COLOURS

    ranked = sorted(pooled.values(), key=lambda e: (not valid(e[0]), -e[1], e[2]))
    return [(grid, votes) for grid, votes, _ in ranked[:k]]


@dataclass
class Prediction:
    """What :func:`predict` returns for one query.

    attempts: at most two grids [h, w] in the task's frame, best first · votes: their pooled
    vote weights · canvas [900] int64: the per-cell prediction that cell accuracy scores
    (:func:`cell_vote`; with K = 1 the argmax on the task as it is under the likeliest action,
    as in the trainer's validation).
    """

    attempts: list[np.ndarray]
    votes: list[float]
    canvas: torch.Tensor


def cell_vote(
    probs: torch.Tensor, augmentations: Sequence[Augmentation], shape: Sequence[int]
) -> torch.Tensor:
    """Per-cell vote over augmentations: [K, 900, C] cell probabilities on the CPU, one row per
    augmentation (each under its likeliest action), → canvas [900] int64 in the task's frame.

    Inside the output ``shape`` (h, w) in the task's frame (the hints' implied or guessed
    shape), each augmentation's probabilities are mapped back (the colour channels
    un-permuted, :func:`~qwenrl.data.d8_invert` on the transformed h × w region) and averaged,
    and each cell takes the likeliest class; beyond it, and everywhere when ``shape`` is
    (0, 0), the canvas is augmentation 0's argmax (which must be the identity).
    """
    if len(augmentations) != probs.shape[0]:
        raise ValueError(
            f"{probs.shape[0]} probability rows for {len(augmentations)} augmentations"
        )
    if augmentations[0] != Augmentation.from_id(0):
        raise ValueError("augmentation 0 must be the identity (aug id 0)")
    canvas = probs[0].argmax(-1).reshape(CANVAS, CANVAS)
    h, w = (int(x) for x in shape)
    if h <= 0 or w <= 0 or len(augmentations) == 1:
        return canvas.reshape(-1)
    grids = probs.reshape(probs.shape[0], CANVAS, CANVAS, -1).numpy()
    mean = np.zeros((h, w, grids.shape[-1]))
    for aug, grid in zip(augmentations, grids, strict=True):
        region = grid[:w, :h] if aug.d8 % 2 else grid[:h, :w]  # odd: a quarter turn
        colours = [*aug.colours, *range(NUM_COLOURS, grid.shape[-1])]  # OUTSIDE, PAD stay
        mean += d8_invert(region[..., colours], aug.d8)
    canvas[:h, :w] = torch.from_numpy(mean.argmax(-1))
    return canvas.reshape(-1)


@torch.no_grad()
def predict(
    models: QwenRLModels,
    demos: Sequence[Pair],
    query_input: np.ndarray,
    *,
    vote_transforms: int = 1,
    aug_seed: int = 0,
    prompt_offset: torch.Tensor | None = None,
) -> Prediction:
    """Predict one query under ``vote_transforms`` augmentations and vote (module docstring).

    Args:
        models: the trained models, in eval mode (dropout off).
        demos: the task's demonstration pairs (input, output) [h, w] each.
        query_input: the query's input grid [h, w].
        vote_transforms: K, the augmentations voted over (aug ids 0..K-1).
        aug_seed: seed of the colour permutations (the run's seed).
        prompt_offset: [dim] added to every prompt embedding (the task's embedding learned by
            test-time training, :mod:`qwenrl.eval.ttt`); ``None`` = none.
    """
    if vote_transforms < 1:
        raise ValueError(f"vote_transforms must be >= 1, got {vote_transforms}")
    device = models.encoder.device
    aq = augment_query(demos, query_input, range(vote_transforms), aug_seed)
    k = len(aq.prompts)
    prompt = models.encoder.encode(aq.prompts).float()  # [K, dim]
    if prompt_offset is not None:
        prompt = prompt + prompt_offset.to(prompt)
    refined = models.refiner.apply(prompt)  # [K, dim]
    probs = models.policy.distribution(refined).probs  # [K, A]
    n_actions = min(ATTEMPTS, probs.shape[-1])
    ranked = probs.argsort(-1, descending=True)[:, :n_actions]  # [K, a]
    # One agent call for every (action rank, augmentation), rank-major: row r * K + i.
    actions = ranked.T.reshape(-1)  # [a·K]
    cond = models.policy.steer(refined.repeat(n_actions, 1), actions)
    query = aq.query.to(device).repeat(n_actions, 1, 1)
    hints = DemoHints(*(t.repeat(n_actions, *[1] * (t.dim() - 1)) for t in aq.hints.to(device)))
    logits = models.agent(query, cond, hints)  # [a·K, 900, C]
    tokens = logits.argmax(-1).cpu()
    weights = probs.gather(1, ranked).T.reshape(-1).cpu()  # [a·K], π(action | prompt)
    candidates = []
    for i in range(k):  # augmentation-major, so ties favour earlier augmentations
        for r in range(n_actions):
            row = r * k + i
            candidates.append((aq.augmentations[i].invert(decode_grid(tokens[row])), weights[row]))
    best = rank_candidates(candidates)
    # The likeliest action's rows (r = 0) vote per cell, inside the hints' output shape.
    canvas = cell_vote(logits[:k].float().softmax(-1).cpu(), aq.augmentations, aq.hints.shape[0])
    return Prediction([g for g, _ in best], [v for _, v in best], canvas)
