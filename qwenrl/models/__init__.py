"""Models: the Qwen prompt encoder, the refiner, the RL policy and the agent."""

from qwenrl.models.agent import GridAgent, patchify, unpatchify
from qwenrl.models.config import ModelConfig, QwenRLModels
from qwenrl.models.encoder import (
    QwenPromptEncoder,
    TinyQwenConfig,
    build_grid_tokenizer,
    length_buckets,
    load_qwen_checkpoint,
)
from qwenrl.models.policy import PromptRefiner, RefinementPolicy, Steering

__all__ = [
    "GridAgent",
    "ModelConfig",
    "PromptRefiner",
    "QwenPromptEncoder",
    "QwenRLModels",
    "RefinementPolicy",
    "Steering",
    "TinyQwenConfig",
    "build_grid_tokenizer",
    "length_buckets",
    "load_qwen_checkpoint",
    "patchify",
    "unpatchify",
]
