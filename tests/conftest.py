"""Shared pytest fixtures, grouped by the module they serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Environment settings shared with bench/ (compiler caches, Triton interpreter, extension
# requirement) are in the repository's root conftest.py.

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


# --- train, eval: an ARC folder for tiny runs (the run's config: tiny_run.tiny_config) -------


@pytest.fixture(scope="session")
def arc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ARC folder of synthetic tasks (``tiny_run.write_arc_tasks``): 12 in training/ (seed
    1) and 3 in evaluation/ (seed 2). Runs only read it."""
    from tiny_run import write_arc_tasks

    root = tmp_path_factory.mktemp("arc")
    write_arc_tasks(root / "training", 12, seed=1)
    write_arc_tasks(root / "evaluation", 3, seed=2)
    return root
