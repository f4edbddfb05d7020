"""``policy_refined`` (:class:`PromptRefiner`) and ``policy_rl`` (:class:`RefinementPolicy`).

The gradient path of the main loss is Qwen → encoder projection → ``PromptRefiner.apply`` →
``RefinementPolicy.steer`` → agent. The RL policy only *chooses* the steering action: it reads
the refined prompt detached, and its REINFORCE loss builds a fresh graph from detached inputs,
so its update runs after the main backward and optimizer step and never backpropagates through
the main graph, which that backward has already freed (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Categorical


class PromptRefiner(nn.Module):
    """Differentiable refinement of the prompt embedding: ``depth`` pre-norm residual MLPs and a
    final LayerNorm; ``depth = 0`` is the identity (no parameters: the ablation without a refiner).

    ``apply(prompt)`` [B, dim] → [B, dim]. It must never run without autograd while training:
    every gradient that reaches Qwen passes through it, so a ``no_grad`` here freezes Qwen
    (``Qwen_grad: 0``). In train mode a call with grad disabled raises ``RuntimeError``; in
    eval mode it is allowed.

    ``apply(fn)`` with a callable keeps ``nn.Module.apply``'s meaning, so ``model.apply(init)``
    on a parent module still recurses through the refiner.
    """

    def __init__(self, dim: int, hidden: int | None = None, depth: int = 2) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim) if depth else nn.Identity()

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [B, dim] → refined [B, dim]."""
        if self.training and not torch.is_grad_enabled():
            raise RuntimeError(
                "PromptRefiner ran in train mode with autograd disabled (torch.no_grad / "
                "inference_mode): Qwen would get no gradient. Call .eval() for inference."
            )
        x = prompt
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)

    def apply(  # type: ignore[override]
        self, prompt_or_fn: torch.Tensor | Callable[[nn.Module], None]
    ) -> torch.Tensor | PromptRefiner:
        """Refine a prompt [B, dim] → [B, dim]; with a callable, ``nn.Module.apply``."""
        if callable(prompt_or_fn) and not isinstance(prompt_or_fn, torch.Tensor):
            return super().apply(prompt_or_fn)
        return self(prompt_or_fn)


class Steering(nn.Module):
    """The K steering vectors ``vectors`` [K, dim]: ``forward(refined, action)`` adds vector
    ``action[i]`` to row i of the refined prompt.

    A module of its own so that the parameters the main loss trains (these) and those the RL
    optimizer trains (``RefinementPolicy.head``) live in different modules: the trainer's DDP /
    FSDP root registers this one and not the head (``qwenrl.train.step.StepForward``).
    """

    def __init__(self, num_actions: int, dim: int, init_std: float = 0.1) -> None:
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(num_actions, dim) * init_std)

    def forward(self, refined: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """refined [B, dim], action [B] int64 → refined + vectors[action] [B, dim]."""
        return refined + self.vectors[action].to(refined.dtype)


class RefinementPolicy(nn.Module):
    """Discrete steering of the refined prompt, trained with REINFORCE and a running baseline.

    Action a ∈ {0..K-1} adds steering vector ``a`` to the refined prompt (:meth:`steer`). The
    action head reads the refined prompt *detached*; its last layer starts at zero so the first
    policy is uniform. Steering vectors start small and distinct so actions differ from step 0.

    Parameter ownership (two optimizers must not share a tensor):

    * :meth:`policy_parameters` — the action head; trained only by :meth:`update` (RL optimizer).
    * :meth:`steering_parameters` — the steering vectors (``steerer``, a :class:`Steering`;
      :attr:`steering` is its parameter); they get gradients from the MAIN loss through
      :meth:`steer`, so they belong to the main optimizer. (``update`` zeroes only its own
      optimizer's gradients.)

    Reward: ``scaled = reward * reward_scale``; advantage = scaled − baseline (an exponential
    moving average of the mean scaled reward, a buffer saved in the state_dict);
    ``loss = −mean(advantage · log π(a)) − entropy_coef · mean(H(π))``.

    Checkpoints written before the steering vectors moved into ``steerer`` name them
    ``steering``: ``load_state_dict`` renames such keys (:attr:`RENAMED`) before loading.
    """

    # State-dict keys of earlier versions → today's, relative to the policy.
    RENAMED: ClassVar[dict[str, str]] = {"steering": "steerer.vectors"}

    def __init__(
        self,
        dim: int,
        num_actions: int = 4,
        hidden: int | None = None,
        *,
        reward_scale: float = 5.0,
        entropy_coef: float = 0.01,
        baseline_momentum: float = 0.9,
        steer_init_std: float = 0.1,
    ) -> None:
        super().__init__()
        hidden = hidden or dim
        self.num_actions = num_actions
        self.reward_scale = reward_scale
        self.entropy_coef = entropy_coef
        self.baseline_momentum = baseline_momentum
        self.head = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_actions)
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.steerer = Steering(num_actions, dim, steer_init_std)
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        self.register_load_state_dict_pre_hook(_rename_earlier_keys)

    @property
    def steering(self) -> nn.Parameter:
        """The steering vectors [num_actions, dim] (``steerer.vectors``; read-only)."""
        return self.steerer.vectors

    def policy_parameters(self) -> list[nn.Parameter]:
        """Parameters for the RL optimizer (the action head)."""
        return list(self.head.parameters())

    def steering_parameters(self) -> list[nn.Parameter]:
        """Parameters for the main optimizer (the steering vectors)."""
        return [self.steerer.vectors]

    def distribution(self, refined: torch.Tensor) -> Categorical:
        """π(· | refined) from refined prompts [B, dim]; always detached from the main graph.

        The input is cast to the action head's dtype: the refinement may come from an autocast
        (bf16/fp16) region or from bf16 FSDP compute, while the head keeps fp32 parameters.
        """
        x = refined.detach().to(self.head[1].weight.dtype)
        return Categorical(logits=self.head(x).float())

    @torch.no_grad()
    def act(
        self,
        refined: torch.Tensor,
        *,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (or, with ``greedy``, take the argmax) actions [B] and their log-probs [B].

        ``generator`` makes sampling independent of the global RNG (e.g. reproducible across
        data-parallel layouts). Builds no graph: the policy gradient comes from
        :meth:`reinforce_loss`'s fresh log-probs.
        """
        dist = self.distribution(refined)
        if greedy:
            action = dist.probs.argmax(-1)
        else:
            action = torch.multinomial(dist.probs, 1, generator=generator).squeeze(-1)
        return action, dist.log_prob(action)

    def log_prob(self, refined: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log π(action | refined) [B], differentiable w.r.t. the action head only."""
        return self.distribution(refined).log_prob(action)

    def entropy(self, refined: torch.Tensor) -> torch.Tensor:
        """Entropy of π(· | refined) [B]."""
        return self.distribution(refined).entropy()

    def steer(self, refined: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Conditioned prompt [B, dim] = refined [B, dim] + steering[action]; differentiable in
        ``refined`` (→ Qwen) and the steering vectors."""
        return self.steerer(refined, action)

    def reinforce_loss(
        self, refined: torch.Tensor, action: torch.Tensor, reward: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """REINFORCE loss (0-dim) on a graph of its own, and detached stats.

        Args:
            refined: refined prompts [B, dim] (detached here whatever the caller passes).
            action: actions taken [B] int64.
            reward: raw rewards [B] (e.g. per-sample cell accuracy in [0, 1]).
        """
        dist = self.distribution(refined)
        scaled = reward.detach().float().to(refined.device) * self.reward_scale
        # Before the first update the batch's own mean is the baseline (torch.where: no sync).
        baseline = torch.where(self.baseline_ready, self.baseline, scaled.mean())
        advantage = scaled - baseline
        entropy = dist.entropy()
        loss = -(advantage * dist.log_prob(action)).mean() - self.entropy_coef * entropy.mean()
        stats = {
            "rl_loss": loss.detach(),
            "reward": reward.detach().float().mean(),
            "scaled_reward": scaled.mean(),
            "advantage": advantage.mean(),
            "entropy": entropy.detach().mean(),
        }
        return loss, stats

    def update(
        self,
        optimizer: torch.optim.Optimizer,
        refined: torch.Tensor,
        action: torch.Tensor,
        reward: torch.Tensor,
        *,
        average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One RL step: zero_grad → backward → step on ``optimizer``, then move the baseline.

        Call it after the main loss's backward and optimizer step; it never touches the main
        graph. ``average`` (data parallel) averages a tensor in place across processes: it is
        applied to the policy gradients and to the batch's mean scaled reward, so every rank
        takes the same step and keeps the same baseline. Returns detached 0-dim tensors
        (``rl_loss``, ``reward``, ``scaled_reward``, ``advantage``, ``entropy``, ``baseline``);
        ``.item()`` them when logging.
        """
        loss, stats = self.reinforce_loss(refined, action, reward)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if average is not None:
            for p in self.policy_parameters():
                if p.grad is not None:
                    average(p.grad)
        optimizer.step()
        with torch.no_grad():
            mean = stats["scaled_reward"].clone()
            if average is not None:
                average(mean)
            m = self.baseline_momentum
            moved = self.baseline * m + (1.0 - m) * mean
            self.baseline.copy_(torch.where(self.baseline_ready, moved, mean))
            self.baseline_ready.fill_(True)
        stats["baseline"] = self.baseline.detach().clone()
        return stats


def _rename_earlier_keys(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """``load_state_dict`` pre-hook of :class:`RefinementPolicy`: an earlier checkpoint's keys
    (``RENAMED``) under their current names, unless the current name is there too."""
    for old, new in RefinementPolicy.RENAMED.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
