"""The fused expected-free-energy loss (``docs/loss.md``).

* :mod:`qwenrl.loss.efe`: the public API, :func:`efe_loss` and :class:`EFELoss`.
* :mod:`qwenrl.loss.options`: :class:`EFEOptions`, the options of one call.
* :mod:`qwenrl.loss.dispatch`: which backend runs and the calling convention they share.
* :mod:`qwenrl.loss.compile`: the ``torch.compile`` custom op.
* :mod:`qwenrl.loss.linear`: :func:`linear_efe_loss`, the loss of a linear layer's output
  (a language model's head) without materialising the logits; its chunk loop
  (:mod:`~qwenrl.loss.chunks`), autograd (:mod:`~qwenrl.loss.linear_function`,
  :mod:`~qwenrl.loss.grad_engine`), custom ops (:mod:`~qwenrl.loss.linear_op`) and
  distillation from a teacher's hidden states (:mod:`~qwenrl.loss.distill`).
* :mod:`qwenrl.loss.hf`: the Hugging Face integration (a causal LM's loss without its logits).
* :mod:`qwenrl.loss.reference`: the math in plain PyTorch, the spec every kernel is tested on.
"""

from qwenrl.loss.dispatch import BACKENDS, BackendUnavailableError, resolve_backend
from qwenrl.loss.efe import EFEFunction, EFELoss, efe_loss
from qwenrl.loss.linear import LinearEFEFunction, LinearEFELoss, linear_efe_loss
from qwenrl.loss.options import EFEOptions
from qwenrl.loss.reference import efe_loss_reference, stats_from_sums

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "EFEFunction",
    "EFELoss",
    "EFEOptions",
    "LinearEFEFunction",
    "LinearEFELoss",
    "efe_loss",
    "efe_loss_reference",
    "linear_efe_loss",
    "resolve_backend",
    "stats_from_sums",
]
