"""A tiny random Qwen3 causal LM built from its config (no hub download), for the Hugging Face
and TRL integration tests."""

from __future__ import annotations

from typing import Any

import torch


def tiny_qwen3(vocab: int, hidden: int, seed: int = 0, **config: Any):
    """A 2-layer ``Qwen3ForCausalLM`` of width ``hidden`` (4 heads of ``hidden // 4``, 2 KV
    heads, an MLP twice as wide), seeded; ``config`` overrides or adds Qwen3Config fields."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    return Qwen3ForCausalLM(Qwen3Config(**{**fields, **config}))
