"""qwenrl: a grid-reasoning agent trained with a fused expected-free-energy loss.

Library entry points: :func:`efe_loss` / :class:`EFELoss` (the fused loss) and
:class:`EmbeddingCache` (the C++ prompt-embedding cache).
"""

from qwenrl.loss import EFELoss, efe_loss, efe_loss_reference

__version__ = "0.1.0"

__all__ = ["EFELoss", "EmbeddingCache", "efe_loss", "efe_loss_reference", "__version__"]


def __getattr__(name: str):
    # The cache imports the C++ extension; keep `import qwenrl` cheap and always working.
    if name == "EmbeddingCache":
        from qwenrl.cache import EmbeddingCache

        return EmbeddingCache
    raise AttributeError(f"module 'qwenrl' has no attribute {name!r}")
