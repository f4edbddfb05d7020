"""Test-time training: it fits the task's demonstrations, on a copy, and only on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenrl.data import ArcDataset, ArcTask, collate
from qwenrl.loss import EFELoss
from qwenrl.models import ModelConfig, QwenRLModels
from qwenrl.ttt import TTTConfig, adapt_to_task


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
    for bad in ({"steps": -1}, {"batch_size": 0}, {"lr": 0.0}, {"num_colour_perms": 0}):
        with pytest.raises(ValueError, match="test-time training"):
            TTTConfig(**bad)
