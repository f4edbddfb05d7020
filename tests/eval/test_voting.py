"""Augmentation voting: candidate ranking, the augmented layout, mapping predictions back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenrl.data import ArcDataset, ArcTask, Augmentation
from qwenrl.eval.voting import augment_query, predict, rank_candidates
from qwenrl.models import ModelConfig, QwenRLModels


def _grid(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def test_rank_candidates_pools_votes_and_breaks_ties_by_order():
    a, b, c = _grid([1, 2]), _grid([2, 1]), _grid([1], [2])  # c: a's cells, another shape
    ranked = rank_candidates([(a, 0.5), (b, 0.25), (c, 0.5), (b, 0.5), (a.copy(), 0.25)])
    assert [v for _, v in ranked] == [0.75, 0.75]  # exact in binary: a true tie
    np.testing.assert_array_equal(ranked[0][0], a)  # a tie: a was seen first
    np.testing.assert_array_equal(ranked[1][0], b)
    assert len(rank_candidates([(c, 1.0)])) == 1
    assert rank_candidates([(a, 0.1), (c, 0.9)], k=1)[0][1] == pytest.approx(0.9)


def test_rank_candidates_puts_impossible_grids_last():
    empty, stray, good = np.zeros((0, 0), dtype=np.int64), _grid([1, 10]), _grid([3])
    ranked = rank_candidates([(empty, 5.0), (stray, 4.0), (good, 0.1)])
    np.testing.assert_array_equal(ranked[0][0], good)
    assert ranked[1][0].shape == (0, 0)  # the likelier impossible grid fills the second attempt


def _task(seed: int, same: bool = True) -> ArcTask:
    rng = np.random.default_rng(seed)

    def pair(h: int, w: int):
        g = rng.integers(0, 10, size=(h, w))
        return g, (g.copy() if same else np.fliplr(g).copy())

    return ArcTask(id=f"t{seed}", train=(pair(3, 4), pair(4, 2), pair(2, 5)), test=(pair(3, 5),))


def test_augment_query_matches_the_dataset_layout():
    task = _task(0)
    ds = ArcDataset([task], split="val", augment=True, num_colour_perms=3, aug_seed=4)
    aug_ids = [0, 5, 13, 22]
    aq = augment_query(task.train, task.test[0][0], aug_ids, aug_seed=4)
    for row, aug_id in enumerate(aug_ids):
        s = ds[ds.index(0, aug_id)]
        assert aq.prompts[row] == s.prompt
        assert torch.equal(aq.query[row], s.query)
        for got, want in zip(aq.hints, s.hints, strict=True):
            assert torch.equal(got[row], want)
        assert aq.augmentations[row] == Augmentation.from_id(aug_id, 4)
    with pytest.raises(ValueError, match="^a query needs at least one demonstration pair$"):
        augment_query([], task.test[0][0], [0])
    with pytest.raises(ValueError, match=r"^aug_ids is empty: at least one augmentation \(0 ="):
        augment_query(task.train, task.test[0][0], [])


@pytest.fixture(scope="module")
def fresh_models() -> QwenRLModels:
    torch.manual_seed(0)
    return QwenRLModels(ModelConfig(dim=32, agent_layers=1, max_length=256)).eval()


def test_predictions_are_mapped_back_before_they_vote(fresh_models: QwenRLModels):
    # An untrained agent copies the query (its copy prior), so under every augmentation it
    # predicts the augmented query; mapped back, all 2·K candidates are the query itself.
    task = _task(1)
    query = task.test[0][0]
    for k in (1, 8, 16):
        pred = predict(fresh_models, task.train, query, vote_transforms=k)
        assert len(pred.attempts) == 1, "every augmentation must vote for the same grid"
        np.testing.assert_array_equal(pred.attempts[0], query)
        probs = 1.0 / fresh_models.config.num_actions  # the initial policy is uniform
        assert pred.votes[0] == pytest.approx(k * 2 * probs)
        assert pred.canvas.shape == (900,)
    with pytest.raises(ValueError, match="vote_transforms"):
        predict(fresh_models, task.train, query, vote_transforms=0)


def test_prompt_offset_reaches_the_prediction(fresh_models: QwenRLModels):
    task = _task(2)
    seen: list[torch.Tensor] = []
    hook = fresh_models.refiner.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        predict(fresh_models, task.train, task.test[0][0], vote_transforms=2)
        offset = torch.randn(fresh_models.config.dim)
        predict(fresh_models, task.train, task.test[0][0], vote_transforms=2, prompt_offset=offset)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[1], seen[0] + offset)  # [K, dim] + [dim]


class _ScriptedModels:
    """Stand-in for QwenRLModels with a scripted policy and agent, to check the vote itself.

    Prompt i (augmentation i) gets the action distribution ``probs[i]``; under action a the
    agent predicts ``grids[a]`` as seen through augmentation i, so every augmentation, mapped
    back, proposes grids[a]. The prompt embedding carries i, the steering carries (i, a).
    """

    def __init__(self, probs: list[list[float]], grids: list[np.ndarray], augs):
        from types import SimpleNamespace

        from qwenrl.data import OUTSIDE, grid_to_canvas

        self.probs = torch.tensor(probs, dtype=torch.float64)
        self.canvases = [
            [grid_to_canvas(aug.apply(g), OUTSIDE).reshape(-1) for g in grids] for aug in augs
        ]
        k = len(probs)
        self.encoder = SimpleNamespace(
            device=torch.device("cpu"), encode=lambda prompts: torch.arange(k)[:, None].float()
        )
        self.refiner = SimpleNamespace(apply=lambda prompt: prompt)
        self.policy = SimpleNamespace(
            distribution=lambda refined: torch.distributions.Categorical(
                probs=self.probs[refined[:, 0].long()]
            ),
            steer=lambda refined, actions: torch.stack([refined[:, 0].long(), actions], 1),
        )
        self.agent = self._agent

    def _agent(self, query, cond, hints):
        tokens = torch.stack([self.canvases[i][a] for i, a in cond.tolist()])  # [N, 900]
        return torch.nn.functional.one_hot(tokens, 12).float()


def test_votes_are_each_augmentations_policy_probabilities_and_ties_go_to_it_first():
    """Aug 0 votes 0.5 for grid A and 0.375 for B; aug 1 votes 0.375 for C and 0.3125 for A.
    A wins with 0.8125; B and C tie at 0.375 (exact in binary) and B, proposed by aug 0 (its
    second action), beats C, proposed by aug 1 (its first): augmentation first, then action."""
    probs = [[0.5, 0.375, 0.0625, 0.0625], [0.3125, 0.25, 0.375, 0.0625]]
    a, b, c, d = _grid([1, 2, 3]), _grid([4], [5]), _grid([6, 6], [7, 8]), _grid([9])
    augs = [Augmentation.from_id(i, 0) for i in range(2)]
    assert augs[0].d8 == 0 and augs[1].d8 != 0  # the second one really transforms
    models = _ScriptedModels(probs, [a, b, c, d], augs)
    task = _task(3)
    pred = predict(models, task.train, task.test[0][0], vote_transforms=2)
    np.testing.assert_array_equal(pred.attempts[0], a)
    np.testing.assert_array_equal(pred.attempts[1], b)
    assert pred.votes == [0.8125, 0.375]
    # the canvas the cell accuracy scores, with one augmentation: as it is, likeliest action
    one = predict(_ScriptedModels(probs[:1], [a, b, c, d], augs[:1]), task.train,
                  task.test[0][0], vote_transforms=1)  # fmt: skip
    np.testing.assert_array_equal(one.canvas.numpy(), models.canvases[0][0].numpy())


def _one_hot_canvas(grid: np.ndarray, aug: Augmentation) -> torch.Tensor:
    """[900, 12] one-hot probabilities of ``grid`` as seen through ``aug``, OUTSIDE beyond it."""
    from qwenrl.data import OUTSIDE, grid_to_canvas

    tokens = grid_to_canvas(aug.apply(grid), OUTSIDE).reshape(-1)
    return torch.nn.functional.one_hot(tokens, 12).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_vote_maps_each_augmentation_back_and_takes_the_majority(seed: int):
    """Three augmentations (transposing and colour-permuting ones among them) each see a grid
    in their own frame; mapped back, each cell takes the colour two of the three agree on,
    inside the output shape only; beyond it the canvas is augmentation 0's."""
    from qwenrl.eval.voting import cell_vote

    rng = np.random.default_rng(seed)
    h, w = 3 + seed, 5
    truth = rng.integers(0, 10, size=(h, w))
    augs = [Augmentation.from_id(i, seed) for i in (0, 8 * 2 + 1 + 2 * seed, 4 + seed)]
    assert any(a.d8 % 2 for a in augs) and any(a.colours != tuple(range(10)) for a in augs)
    wrong = [np.where(rng.random((h, w)) < 0.5, (truth + 1 + k) % 10, truth) for k in range(3)]
    for k in range(3):  # every cell: at most one augmentation is wrong
        others = [j for j in range(3) if j != k]
        wrong[k] = np.where(np.any([wrong[j] != truth for j in others], 0), truth, wrong[k])
    probs = torch.stack([_one_hot_canvas(g, aug) for g, aug in zip(wrong, augs, strict=True)])
    probs[0].view(30, 30, 12)[h:, :] = 0  # beyond the shape: aug 0's own (here colour 0)
    canvas = cell_vote(probs, augs, (h, w)).view(30, 30)
    np.testing.assert_array_equal(canvas[:h, :w].numpy(), truth)
    assert (canvas[h:] == 0).all() and (canvas[:h, w:] == 10).all()
    # no shape, or one augmentation: augmentation 0's argmax everywhere
    for got in (cell_vote(probs, augs, (0, 0)), cell_vote(probs[:1], augs[:1], (h, w))):
        torch.testing.assert_close(got, probs[0].argmax(-1))
    with pytest.raises(ValueError, match="3 probability rows for 2 augmentations"):
        cell_vote(probs, augs[:2], (h, w))
    with pytest.raises(ValueError, match="^augmentation 0 must be the identity"):
        cell_vote(probs, augs[::-1], (h, w))


@pytest.mark.parametrize("shape", [(1, 4), (3, 1), (2, 2)])
def test_cell_vote_averages_two_augmentations_over_thin_outputs(shape: tuple[int, int]):
    """Two augmentations: the second is sure of the right colours where the first leans 0.6 to
    a wrong one, so the average (0.7 against 0.3) is right everywhere inside the shape; one-row
    and one-column outputs vote too."""
    from qwenrl.eval.voting import cell_vote

    h, w = shape
    truth = np.arange(h * w).reshape(h, w) % 9 + 1
    augs = [Augmentation.from_id(0), Augmentation.from_id(8 + 3, 0)]
    first = 0.6 * _one_hot_canvas(truth % 9 + 1, augs[0]) + 0.4 * _one_hot_canvas(truth, augs[0])
    probs = torch.stack([first, _one_hot_canvas(truth, augs[1])])
    canvas = cell_vote(probs, augs, shape).view(30, 30)
    np.testing.assert_array_equal(canvas[:h, :w].numpy(), truth)
    alone = cell_vote(probs[:1], augs[:1], shape).view(30, 30)
    np.testing.assert_array_equal(alone[:h, :w].numpy(), truth % 9 + 1)
