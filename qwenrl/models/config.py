"""``ModelConfig`` and :class:`QwenRLModels`, the four modules the trainer optimises.

Defaults are sized for a ~5 minute CPU training run (2 cores): a default step at batch 16 is
well under a second (agent ≈0.69M parameters, tiny Qwen ≈75k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from qwenrl.data.grids import NUM_CLASSES
from qwenrl.models.agent import GridAgent
from qwenrl.models.encoder import QwenPromptEncoder, TinyQwenConfig
from qwenrl.models.policy import PromptRefiner, RefinementPolicy


@dataclass
class ModelConfig:
    """Sizes of every model; ``dim`` is shared by the prompt embedding and the agent."""

    dim: int = 128
    agent_layers: int = 3
    agent_heads: int = 4
    agent_ffn_mult: int = 4
    patch: int = 2
    dropout: float = 0.0
    prompt_dropout: float = 0.0
    num_classes: int = NUM_CLASSES
    refiner_depth: int = 2  # 0: the refiner is the identity
    num_actions: int = 4  # 1: one fixed action, nothing for the RL policy to choose
    hints: bool = True  # False: the agent never sees the demonstration hints
    rule_hint: bool = True  # False: the agent never sees the hints' rule (qwenrl.data.rules)
    shape_guess: bool = True  # False: the agent never sees a guessed shape (no shape there)
    reward_scale: float = 5.0
    entropy_coef: float = 0.01
    baseline_momentum: float = 0.9
    qwen_path: str | None = None
    max_length: int = 1024
    tiny_qwen: TinyQwenConfig = field(default_factory=TinyQwenConfig)

    def to_dict(self) -> dict:
        """Plain dict (for checkpoints and logs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["tiny_qwen"] = TinyQwenConfig(**d.get("tiny_qwen", {}))
        return cls(**d)


class QwenRLModels(nn.Module):
    """Encoder (Qwen), refiner (``policy_refined``), RL policy (``policy_rl``) and agent.

    One module so that ``.to(device)``, ``.train()`` and ``state_dict()`` cover all of them.
    Parameters split over two optimizers: :meth:`main_param_groups` (everything trained by the
    main loss) and :meth:`rl_parameters` (the RL action head, trained by
    ``RefinementPolicy.update``); the two sets are disjoint.

    :attr:`RENAMED` maps the state-dict keys of earlier checkpoints to today's:
    ``load_state_dict`` renames them itself (a pre-hook of ``RefinementPolicy``); readers of
    sharded (DCP) checkpoints, which look tensors up by name, need the map spelled out.
    """

    RENAMED: ClassVar[dict[str, str]] = {
        f"policy.{old}": f"policy.{new}" for old, new in RefinementPolicy.RENAMED.items()
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = QwenPromptEncoder(
            config.dim,
            qwen_path=config.qwen_path,
            tiny=config.tiny_qwen,
            max_length=config.max_length,
        )
        self.refiner = PromptRefiner(config.dim, depth=config.refiner_depth)
        self.policy = RefinementPolicy(
            config.dim,
            config.num_actions,
            reward_scale=config.reward_scale,
            entropy_coef=config.entropy_coef,
            baseline_momentum=config.baseline_momentum,
        )
        self.agent = GridAgent(
            dim=config.dim,
            layers=config.agent_layers,
            heads=config.agent_heads,
            ffn_mult=config.agent_ffn_mult,
            patch=config.patch,
            dropout=config.dropout,
            num_classes=config.num_classes,
            prompt_dropout=config.prompt_dropout,
            use_hints=config.hints,
            use_rule=config.rule_hint,
            use_guess=config.shape_guess,
        )

    def load_weights(self, weights: dict[str, torch.Tensor], where: str) -> None:
        """``load_state_dict(weights)``, or a ``ValueError`` naming ``where`` (a checkpoint, an
        export) and the parameters it lacks, has beyond these models or holds in another shape:
        e.g. weights saved before a part of the model existed, or grew, which this version
        cannot run without."""
        own = self.state_dict()
        renamed = {new for old, new in self.RENAMED.items() if old in weights}
        missing = sorted(own.keys() - weights.keys() - renamed)
        extra = sorted(weights.keys() - own.keys() - self.RENAMED.keys())
        reshaped = [
            f"{name} (saved {list(weights[name].shape)}, here {list(own[name].shape)})"
            for name in sorted(own.keys() & weights.keys())
            if weights[name].shape != own[name].shape
        ]
        if missing or extra or reshaped:
            raise ValueError(
                f"{where}: its weights do not fit this version's models (missing: "
                f"{', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'}; "
                f"other shapes: {', '.join(reshaped) or 'none'}); it was saved by another "
                "version: train a new run"
            )
        self.load_state_dict(weights)

    def main_param_groups(self, agent_lr: float, qwen_lr: float) -> list[dict]:
        """Optimizer groups: Qwen at ``qwen_lr``; projection, refiner, steering, agent at
        ``agent_lr``."""
        return [
            {"params": list(self.encoder.qwen.parameters()), "lr": qwen_lr, "name": "qwen"},
            {
                "params": list(self.encoder.proj.parameters())
                + list(self.refiner.parameters())
                + self.policy.steering_parameters()
                + list(self.agent.parameters()),
                "lr": agent_lr,
                "name": "agent",
            },
        ]

    def rl_parameters(self) -> list[nn.Parameter]:
        """Parameters of the RL optimizer."""
        return self.policy.policy_parameters()

    def condition(
        self, prompt: torch.Tensor, *, greedy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt embeddings [B, dim] → (conditioned [B, dim], refined.detach() [B, dim],
        action [B]): refine, pick an action on the detached refinement, steer.

        Keep the returned detached refinement and action for ``policy.update`` after the main
        optimizer step.
        """
        refined = self.refiner.apply(prompt)
        refined_detached = refined.detach()
        action, _ = self.policy.act(refined_detached, greedy=greedy)
        return self.policy.steer(refined, action), refined_detached, action
