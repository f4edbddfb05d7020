"""Test-time training: it fits the task's demonstrations, on a copy, and only on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenrl.data import OUTSIDE, PAD, ArcDataset, ArcTask, collate, grid_to_canvas, pairs_to_text
from qwenrl.data.grids import NUM_CLASSES
from qwenrl.eval import ttt
from qwenrl.eval.ttt import TTTConfig, adapt_to_task
from qwenrl.loss import EFELoss
from qwenrl.models import ModelConfig, QwenRLModels
from qwenrl.models.agent import GridAgent


def _flip_task(seed: int, n_train: int = 3) -> ArcTask:
    rng = np.random.default_rng(seed)

    def pair():
        g = rng.integers(0, 10, size=(3, 4))
        return g, np.fliplr(g).copy()

    return ArcTask(id=f"flip{seed}", train=tuple(pair() for _ in range(n_train)), test=(pair(),))


@pytest.fixture
def models() -> QwenRLModels:
    torch.manual_seed(0)
    return QwenRLModels(ModelConfig(dim=32, agent_layers=1, max_length=256)).eval()


def _demo_loss(models: QwenRLModels, task: ArcTask, offset: torch.Tensor) -> float:
    """Mean EFE loss over every leave-one-out demonstration sample, under 8 augmentations."""
    ds = ArcDataset(
        [task.demonstrations_only()], split="ttt", leave_one_out=True, num_colour_perms=1
    )
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        prompt = models.encoder.encode(batch.prompts).float() + offset
        refined = models.refiner.apply(prompt)
        action = models.policy.distribution(refined).probs.argmax(-1)
        logits = models.agent(batch.query, models.policy.steer(refined, action), batch.hints)
        return float(EFELoss(tau=0.3)(logits, batch.target.view(len(batch), -1)))


def test_ttt_fits_the_demonstrations_on_a_copy(models: QwenRLModels):
    task = _flip_task(0)
    before = {k: v.clone() for k, v in models.state_dict().items()}
    zero = torch.zeros(models.config.dim)
    loss_before = _demo_loss(models, task, zero)
    tuned, offset = adapt_to_task(models, task.train, TTTConfig(steps=30, lr=1e-3, seed=1))
    assert tuned is not models and tuned.encoder is models.encoder  # Qwen shared, not copied
    for k, v in models.state_dict().items():
        assert torch.equal(v, before[k]), f"test-time training changed the original's {k}"
    assert _demo_loss(tuned, task, offset) < 0.7 * loss_before
    assert offset.shape == (models.config.dim,) and offset.abs().sum() > 0
    assert not offset.requires_grad
    assert not any(m.training for m in (tuned.agent, tuned.refiner, tuned.policy))


def test_ttt_is_deterministic_given_its_seeds(models: QwenRLModels):
    task = _flip_task(1)
    cfg = TTTConfig(steps=3, seed=5)
    a = adapt_to_task(models, task.train, cfg, task_seed=2)[1]
    b = adapt_to_task(models, task.train, cfg, task_seed=2)[1]
    c = adapt_to_task(models, task.train, cfg, task_seed=3)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ttt_without_steps_or_leave_one_out_samples_returns_the_models(models: QwenRLModels):
    for demos, steps in ((_flip_task(2).train, 0), (_flip_task(3, n_train=1).train, 5)):
        tuned, offset = adapt_to_task(models, demos, TTTConfig(steps=steps))
        assert tuned is models and not offset.any()


def test_ttt_config_rejects_bad_values():
    bad_values = (
        {"steps": -1},
        {"batch_size": 0},
        {"lr": 0.0},
        {"num_colour_perms": 0},
        {"stop_after": -1},
    )
    for bad in bad_values:
        with pytest.raises(ValueError, match="^test-time training (needs|lr must be)"):
            TTTConfig(**bad)
    # the smallest valid values are accepted
    smallest = TTTConfig(steps=0, batch_size=1, num_colour_perms=1, lr=1e-9)
    assert (smallest.batch_size, smallest.num_colour_perms) == (1, 1)


def test_ttt_batch_size_is_the_number_of_samples_per_step(models: QwenRLModels, monkeypatch):
    sizes = []
    real_collate = ttt.collate

    def recording_collate(samples):
        sizes.append(len(samples))
        return real_collate(samples)

    monkeypatch.setattr(ttt, "collate", recording_collate)
    task = _flip_task(4)
    adapt_to_task(models, task.train, TTTConfig(steps=2, batch_size=1, seed=1))
    adapt_to_task(models, task.train, TTTConfig(steps=3, batch_size=5, seed=1))
    assert sizes == [1, 1, 5, 5, 5]


def test_ttt_seed_chooses_the_augmentations(models: QwenRLModels, monkeypatch):
    """cfg.seed seeds the colour permutations (the dataset's aug_seed), not only the draws:
    the same sample indices under two seeds give different prompts."""
    prompts: dict[int, list[str]] = {}
    real_collate = ttt.collate
    seed = {"now": 0}

    def recording_collate(samples):
        prompts.setdefault(seed["now"], []).extend(s.prompt for s in samples)
        return real_collate(samples)

    monkeypatch.setattr(ttt, "collate", recording_collate)
    real_rng = np.random.default_rng

    def same_draws(seed):  # TTT's draws ([seed, 3, task_seed]) fixed; the augmentations' not
        return real_rng(0) if isinstance(seed, list) and seed[1:2] == [3] else real_rng(seed)

    monkeypatch.setattr(np.random, "default_rng", same_draws)
    task = _few_colour_task(7)
    for seed["now"] in (1, 2, 1):
        adapt_to_task(models, task.train, TTTConfig(steps=2, num_colour_perms=4, seed=seed["now"]))
    assert len(prompts[1]) == 2 * 2 * 8  # seed 1 ran twice: the same prompts both times
    assert prompts[1][:16] == prompts[1][16:]
    assert prompts[1][:16] != prompts[2]


def test_one_ttt_step_is_a_hand_written_adamw_step_from_zeroed_gradients(
    models: QwenRLModels, monkeypatch
):
    """AdamW's first step from a fresh state, without weight decay, is
    p ← p − lr · g / (|g| + eps): checked on every trained tensor with the gradient the step
    saw. The trained set is the agent, the refiner, the steering vectors and the prompt offset
    (never Qwen). A gradient left on the original models changes nothing (zeroed first)."""
    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            group = self.param_groups[0]
            seen.append([(p, p.detach().clone(), p.grad.detach().clone()) for p in group["params"]])
            out = super().step(closure)
            for p in group["params"]:  # poison: a step that does not zero it first shows NaN
                p.grad.fill_(float("nan"))
            return out

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    lr, demos = 3e-3, _flip_task(4).train
    tuned, offset = adapt_to_task(models, demos, TTTConfig(steps=1, lr=lr, seed=2))
    step = seen[0]
    trained = {id(p) for p, _, _ in step}
    expected = [*tuned.agent.parameters(), *tuned.refiner.parameters(), tuned.policy.steering]
    assert all(id(p) in trained for p in expected) and len(step) == len(expected) + 1
    assert not trained & {id(p) for p in models.encoder.parameters()}
    for p, before, g in step:
        want = before - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    assert offset.abs().min() > 0.5 * lr and tuned.policy.steering.ne(models.policy.steering).any()

    three_steps, offset3 = adapt_to_task(models, demos, TTTConfig(steps=3, lr=lr, seed=2))
    assert offset3.isfinite().all()
    assert all(p.isfinite().all() for p in three_steps.agent.parameters())

    for p in models.parameters():  # a gradient left over from elsewhere
        p.grad = torch.ones_like(p)
    again, offset_again = adapt_to_task(models, demos, TTTConfig(steps=1, lr=lr, seed=2))
    assert torch.equal(offset_again, offset)
    for a, b in zip(again.agent.parameters(), tuned.agent.parameters()):
        assert torch.equal(a, b)


def test_ttt_settings_reach_the_loss_and_change_the_result(models: QwenRLModels, monkeypatch):
    import qwenrl.eval.ttt as ttt

    made = []
    real = ttt.EFELoss
    monkeypatch.setattr(ttt, "EFELoss", lambda **kw: made.append(kw) or real(**kw))
    demos = _flip_task(5).train
    base = adapt_to_task(models, demos, TTTConfig(steps=2, lr=1e-3, tau=0.45, easy_weight=0.2))
    assert made[-1] == {"tau": 0.45, "easy_weight": 0.2}
    other_lr = adapt_to_task(models, demos, TTTConfig(steps=2, lr=2e-3, tau=0.45, easy_weight=0.2))
    assert not torch.allclose(base[1], other_lr[1])
    for name, p in base[0].agent.named_parameters():
        if not torch.equal(p, dict(other_lr[0].agent.named_parameters())[name]):
            break
    else:
        pytest.fail("a different lr left the agent unchanged")


def _few_colour_task(seed: int) -> ArcTask:
    rng = np.random.default_rng(seed)

    def pair():
        g = rng.integers(0, 3, size=(3, 4))  # colours 0, 1, 2 only
        return g, np.fliplr(g).copy()

    return ArcTask(id=f"few{seed}", train=tuple(pair() for _ in range(3)), test=(pair(),))


def test_ttt_feeds_embedding_plus_offset_and_trains_the_two_likeliest_actions(
    models: QwenRLModels, monkeypatch
):
    """With a zero prompt embedding the refiner's input is the offset itself: at the second
    step, the offset the first step made (added, not subtracted). Every trained action is one
    of the two likeliest for its prompt. Augmentations are drawn: D8 × the configured colour
    permutations (one: the task's own colours; more: others too)."""
    import qwenrl.eval.ttt as ttt

    dim = models.config.dim
    monkeypatch.setattr(models.encoder, "encode", lambda prompts: torch.zeros(len(prompts), dim))
    refiner_inputs, offsets_before, prompts, picked = [], [], [], []

    class SpyAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            offsets_before.append(self.param_groups[0]["params"][-1].detach().clone())
            return super().step(closure)

    real_copy = ttt.tuned_copy

    def spying_copy(m):
        tuned = real_copy(m)
        apply, steer = tuned.refiner.apply, tuned.policy.steer

        def record_apply(prompt):
            refiner_inputs.append(prompt.detach().clone())
            return apply(prompt)

        def record_steer(refined, action):
            top2 = tuned.policy.distribution(refined).probs.argsort(-1, descending=True)[:, :2]
            picked.append((top2 == action[:, None]).any(-1))
            return steer(refined, action)

        tuned.refiner.apply, tuned.policy.steer = record_apply, record_steer
        return tuned

    real_collate = ttt.collate

    def recording_collate(samples):
        prompts.extend(s.prompt for s in samples)
        return real_collate(samples)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    monkeypatch.setattr(ttt, "tuned_copy", spying_copy)
    monkeypatch.setattr(ttt, "collate", recording_collate)
    task = _few_colour_task(6)
    cfg = TTTConfig(steps=4, lr=1e-2, num_colour_perms=1, stop_after=0, seed=3)
    adapt_to_task(models, task.train, cfg)
    assert len(refiner_inputs) == 4 and not refiner_inputs[0].any()
    for inputs, offset in zip(refiner_inputs[1:], offsets_before[1:]):
        assert offset.abs().sum() > 0
        torch.testing.assert_close(inputs, offset.expand_as(inputs))
    assert torch.cat(picked).all() and len(torch.cat(picked)) == 4 * 8
    # one colour permutation: D8 only, so the prompts hold the task's colours, in many layouts
    assert set("".join(prompts)) & set("3456789") == set()
    assert len(set(prompts)) > len(task.train)  # augmented, not the three plain prompts
    prompts.clear()
    adapt_to_task(models, task.train, TTTConfig(steps=4, num_colour_perms=4, seed=3))
    assert set("".join(prompts)) & set("3456789")  # other colour permutations drawn


def test_ttt_without_augmentation_trains_on_the_pairs_as_they_are(models, monkeypatch):
    """augment=False: the samples are the n leave-one-out pairs, untransformed; a batch larger
    than n holds each of them once."""
    batches = []
    real_collate = ttt.collate

    def recording_collate(samples):
        batches.append([(s.prompt, s.query.clone()) for s in samples])
        return real_collate(samples)

    monkeypatch.setattr(ttt, "collate", recording_collate)
    task = _flip_task(8)
    adapt_to_task(models, task.train, TTTConfig(steps=2, batch_size=8, augment=False, stop_after=0))
    expected = {
        pairs_to_text([p for i, p in enumerate(task.train) if i != j]): grid_to_canvas(x, PAD)
        for j, (x, _) in enumerate(task.train)
    }
    assert len(batches) == 2
    for batch in batches:
        assert sorted(prompt for prompt, _ in batch) == sorted(expected)
        for prompt, query in batch:
            assert torch.equal(query, expected[prompt])


def test_ttt_batches_hold_distinct_samples_and_cover_a_pass(models, monkeypatch):
    keys = []
    real_collate = ttt.collate

    def recording_collate(samples):
        keys.append([(s.prompt, s.query.numpy().tobytes()) for s in samples])
        return real_collate(samples)

    monkeypatch.setattr(ttt, "collate", recording_collate)
    task = _flip_task(9)  # 3 pairs × 8 D8 transforms = 24 samples
    adapt_to_task(models, task.train, TTTConfig(steps=6, batch_size=4, num_colour_perms=1))
    assert all(len(set(batch)) == 4 for batch in keys)
    assert len({k for batch in keys for k in batch}) == 24  # six batches of four: one pass


def test_ttt_stops_after_consecutive_exact_batches(models, monkeypatch):
    """Every output is the same grid, and the agent is made to predict exactly it: training
    ends after ``stop_after`` steps, or runs all ``steps`` with ``stop_after=0``."""
    rng = np.random.default_rng(3)
    out = rng.integers(0, 10, size=(2, 3))
    task = ArcTask(
        id="const", train=tuple((rng.integers(0, 10, size=(2, 3)), out) for _ in range(3)), test=()
    )
    exact = torch.nn.functional.one_hot(grid_to_canvas(out, OUTSIDE).view(-1), NUM_CLASSES)

    def oracle(self, query, prompt, hints=None):
        return 10.0 * exact.float().expand(len(query), -1, -1) + 0 * prompt.sum()

    steps = []
    monkeypatch.setattr(GridAgent, "forward", oracle)
    monkeypatch.setattr(
        ttt.torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1), raising=True
    )
    for stop_after, want in ((2, 2), (0, 5)):
        steps.clear()
        adapt_to_task(models, task.train, TTTConfig(steps=5, augment=False, stop_after=stop_after))
        assert len(steps) == want


def test_a_runs_ttt_settings_carry_every_ttt_field_and_the_late_loss():
    from qwenrl.train.config import TrainConfig, ttt_config

    cfg = TrainConfig(ttt_steps=7, ttt_lr=0.02, ttt_batch_size=3, ttt_augment=False,
                      ttt_stop_after=5, tau_end=0.45, easy_weight=0.25, seed=9)  # fmt: skip
    got = ttt_config(cfg)
    carried = (got.steps, got.lr, got.batch_size, got.augment, got.stop_after)
    assert carried == (7, 0.02, 3, False, 5)
    assert (got.tau, got.easy_weight, got.seed) == (0.45, 0.25, 9)
    # the run's defaults are test-time training's own
    default = ttt_config(TrainConfig())
    for name in ("steps", "lr", "batch_size", "augment", "stop_after"):
        assert getattr(default, name) == getattr(TTTConfig(), name), name
