"""Shared pytest fixtures, grouped by the module they serve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Compiler caches (torch.compile, Triton) stay inside the checkout, not in system folders.
_CACHE = Path(__file__).resolve().parents[1] / ".cache"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_CACHE / "triton"))
# Triton reads TRITON_INTERPRET once, when it is first imported, and other test modules import
# it indirectly (transformers does) before tests/test_loss_triton.py is collected: set it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# --- models: a tiny Qwen checkpoint on disk -------------------------------------------------


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 + grid tokenizer saved with ``save_pretrained`` (seed 0, dim 32).

    Tests load it through the real ``qwen_path`` code path, as a user's checkpoint would be.
    """
    from qwenrl.models import QwenPromptEncoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen")
    QwenPromptEncoder(32).save_pretrained(path)
    return path
