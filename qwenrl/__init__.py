"""qwenrl: a grid-reasoning agent trained with a fused expected-free-energy loss.

Library entry points: :func:`efe_loss` / :class:`EFELoss` (the fused loss),
:func:`linear_efe_loss` / :class:`LinearEFELoss` (the same loss on a linear layer's output, e.g.
a language model's head, without materialising the logits) and :class:`EmbeddingCache` (the C++
prompt-embedding cache).
"""

from qwenrl.loss import EFELoss, LinearEFELoss, efe_loss, efe_loss_reference, linear_efe_loss

__version__ = "0.1.0"

__all__ = [
    "EFELoss",
    "EmbeddingCache",
    "LinearEFELoss",
    "efe_loss",
    "efe_loss_reference",
    "linear_efe_loss",
    "__version__",
]


def __getattr__(name: str):
    # The cache imports the C++ extension; keep `import qwenrl` cheap and always working.
    if name == "EmbeddingCache":
        from qwenrl.cache import EmbeddingCache

        return EmbeddingCache
    raise AttributeError(f"module 'qwenrl' has no attribute {name!r}")
