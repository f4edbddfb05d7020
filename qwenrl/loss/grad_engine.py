"""What the in-place weight-gradient mode reads of autograd's internals, all in one place.

:class:`~qwenrl.loss.linear_function.LinearEFEFunction` may add the weight gradient straight
into ``weight.grad`` during the backward instead of returning a [V, D] buffer for autograd to
add. That is only right when autograd itself would accumulate into ``.grad`` in this pass, and
when no tensor hook on the weight expects to see the gradient. Both questions need private
torch API; they are asked here and nowhere else, and ``tests/loss/test_linear_loss.py`` checks
that torch still answers them as this module expects, so a torch upgrade that changes them
fails a test instead of silently switching modes.

Without ``torch._C._will_engine_execute_node`` (a torch that dropped it) the mode is off: every
backward returns a fresh gradient, and :data:`IN_PLACE_AVAILABLE` says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
# False on a torch without the engine query: gradients are then always fresh buffers.
IN_PLACE_AVAILABLE = _will_execute is not None


def has_tensor_hooks(t: Tensor) -> bool:
    """``t.register_hook`` hooks exist (they must see the gradient, so it cannot skip them)."""
    return bool(t._backward_hooks)


def writable_grad(weight: Tensor) -> Tensor | None:
    """``weight.grad``, if a backward may add the weight gradient straight into it; else None.

    That is the case for a plain float32 leaf whose ``.grad`` already exists as a dense,
    contiguous float32 tensor of its shape (a previous step's gradient kept by
    ``zero_grad(set_to_none=False)``, or the micro-batches of gradient accumulation), and that
    has no tensor hooks (they would see the gradient only through ``.grad``).
    """
    if not IN_PLACE_AVAILABLE:
        return None
    if type(weight) not in (Tensor, torch.nn.Parameter) or not weight.is_leaf:
        return None
    if not weight.requires_grad or weight.dtype != torch.float32 or has_tensor_hooks(weight):
        return None
    g = weight.grad
    if (
        type(g) is not Tensor
        or g.layout != torch.strided
        or g.shape != weight.shape
        or g.device != weight.device
        or g.requires_grad
        or not g.is_contiguous()
    ):
        return None
    return g


def engine_accumulates(weight: Tensor) -> bool:
    """Inside a backward: will autograd accumulate into ``weight.grad`` in this pass? Not under
    ``torch.autograd.grad`` (the gradient is returned, ``.grad`` untouched), not for a
    ``backward(inputs=...)`` without the weight, not with ``create_graph=True``."""
    if not IN_PLACE_AVAILABLE or torch.is_grad_enabled():
        return False
    try:
        node = torch.autograd.graph.get_gradient_edge(weight).node
        return bool(_will_execute(node))
    except RuntimeError:  # torch.autograd.grad() over a leaf: the engine runs no such node
        return False
