"""Hugging Face drop-in: a causal LM's training loss through :func:`qwenrl.linear_efe_loss`.

A transformers causal LM (``Qwen3ForCausalLM`` and the others built the same way) computes
``logits = lm_head(last_hidden_state)`` for every position and then its loss, so the logits
([B, T, V], float32 in the loss) dominate training memory at an LLM vocabulary. Two ways to
train without them:

* :func:`apply_linear_efe` patches one model: a forward with ``labels`` in training mode
  returns the loss of ``linear_efe_loss(hidden, lm_head.weight, shifted labels)`` and
  ``logits=None``. Everything else (generation, eval, calls without labels) is unchanged.
* :func:`linear_efe_compute_loss` returns a ``compute_loss_func`` for ``transformers.Trainer``;
  it patches the model so that its training-mode outputs carry the last hidden state instead
  of logits, and computes the loss from it.

Both run the model's own ``forward`` with ``logits_to_keep`` set to no positions (so its head
computes [B, 0, V] logits) and read the last hidden state off the decoder with a forward hook:
model-specific code (caches, masks, deprecated arguments) is never copied. The labels are
shifted and the loss normalised as transformers' ``ForCausalLMLoss`` does: the mean over the
valid tokens, or their sum divided by ``num_items_in_batch`` when the Trainer passes it
(gradient accumulation). With ``tau=0, easy_weight=1`` the loss is cross-entropy.

A trainer that computes the loss without calling the patched forward would silently train with
its own loss instead. TRL's trainers do: ``trl.trainer.utils.add_fused_lm_head`` replaces
``model.forward`` with a fused LM head whose ``fused_lm_head=True`` calls run the decoder
directly, and ``DistillationTrainer`` calls the decoder itself. So a patched model refuses
both, with an error that points to :func:`qwenrl.integrations.trl.use_qwenrl` (which makes
those paths compute with qwenrl): the patched forward raises on ``fused_lm_head=True``, and a
forward pre-hook on the decoder raises when the decoder runs a training step (training mode,
gradients on) outside a qwenrl forward while ``model.forward`` is no longer one, i.e. after
something (TRL's ``add_fused_lm_head``) replaced the patch (:func:`guard_decoder`,
:func:`routed`). A caller who runs the decoder itself while the patch is in place (for hidden
states of its own) is not refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwenrl.loss.linear import linear_efe_loss

# What a patch decides itself: the tensors, the reduction (from num_items_in_batch), class
# labels (so no log_target), the stats (kept in model.linear_efe_stats), and what only a
# direct call has (per-row weights, per-token outputs, a teacher).
_SET_BY_THE_PATCH = {
    "bias",
    "hard_mask",
    "reduction",
    "log_target",
    "return_stats",
    "row_weight",
    "return_per_token",
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
    "temperature",
}
# The options a causal LM patch accepts: every other keyword of linear_efe_loss.
_OPTION_NAMES = tuple(
    name
    for name, p in inspect.signature(linear_efe_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in _SET_BY_THE_PATCH
)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(
            f"unknown linear_efe_loss option(s) {sorted(unknown)}; expected some of "
            f"{list(_OPTION_NAMES)}"
        )
    return dict(options)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The decoder (whose output is the last hidden state) and the LM head of ``model``."""
    decoder = (
        model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or decoder is None:
        raise TypeError(
            f"{type(model).__name__} has no decoder + nn.Linear LM head "
            "(get_decoder() / get_output_embeddings()); linear_efe_loss cannot replace its loss"
        )
    return decoder, head


def causal_lm_loss(
    hidden: Tensor,
    head: nn.Linear,
    labels: Tensor | None,
    *,
    shift_labels: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token EFE loss of a causal LM from its last hidden state, and the loss's stats.

    Args:
        hidden: [B, T, D] last hidden state. head: the LM head (weight [V, D], optional bias).
        labels: [B, T] token ids (``ignore_index`` where not scored), shifted here as
            transformers does: position t predicts labels[t + 1]. Or give ``shift_labels``.
        num_items_in_batch: when given, the loss is the sum over valid tokens divided by it
            (transformers' gradient-accumulation normalisation); else the mean.
        options: :func:`linear_efe_loss` options (``tau``, ``easy_weight``, ...).
    """
    ignore_index = options.get("ignore_index", -100)
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss, stats = linear_efe_loss(
        hidden,
        head.weight,
        shift_labels,
        bias=head.bias,
        reduction=reduction,
        return_stats=True,
        **options,
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, stats


def _run_without_logits(model: nn.Module, original: Callable, args, kwargs) -> tuple[Any, Tensor]:
    """Runs the model's own forward with its head on no positions; returns (its output, the
    decoder's last hidden state [B, T, D])."""
    decoder, head = _parts(model)
    captured: list[Tensor] = []

    def grab(_module, _inputs, output):
        captured.append(output[0])  # ModelOutput or tuple: the last hidden state comes first

    handle = decoder.register_forward_hook(grab)
    try:
        no_positions = torch.empty(0, dtype=torch.long, device=head.weight.device)
        out = original(*args, labels=None, logits_to_keep=no_positions, **kwargs)
    finally:
        handle.remove()
    return out, captured[-1]


def _replace(out: Any, **fields: Any) -> Any:
    """``out`` (a ModelOutput, or a tuple when return_dict=False) with some fields replaced."""
    if isinstance(out, tuple):  # (logits, ...): the loss goes first, the empty logits away
        return (fields["loss"], *out[1:]) if "loss" in fields else out[1:]
    values = {k: v for k, v in out.items()}
    values.update(fields)
    return type(out)(**values)


def apply_linear_efe(model: nn.Module, **options: Any) -> nn.Module:
    """Makes ``model`` (a transformers causal LM instance, e.g. ``Qwen3ForCausalLM``) compute
    its training loss with :func:`qwenrl.linear_efe_loss`, without materialising the logits.

    After the call, ``model(input_ids, labels=labels)`` in training mode returns the loss of
    the next-token EFE objective and ``logits=None``; the loss's stats (mask_ratio, accuracy,
    risk, entropy, n_valid) of the last such call are in ``model.linear_efe_stats``. In eval
    mode, or without labels, the model's own forward runs unchanged. Calling it again replaces
    the options. Returns the model.

    Args:
        model: a transformers ``*ForCausalLM`` with ``get_decoder()`` and an ``nn.Linear``
            head whose forward accepts ``logits_to_keep``.
        options: the options of :func:`qwenrl.linear_efe_loss` (``tau``, ``easy_weight``,
            ...): every keyword but the tensors, ``reduction``, ``log_target`` and
            ``return_stats``, which the patch sets (``_OPTION_NAMES``). ``tau=0,
            easy_weight=1`` is cross-entropy.
    """
    options = _check_options(options)

    def with_loss(out: Any, hidden: Tensor, labels: Tensor, kwargs: dict) -> Any:
        loss, model.linear_efe_stats = causal_lm_loss(
            hidden,
            _parts(model)[1],  # this call's head: resize_token_embeddings() replaces it
            labels,
            shift_labels=kwargs.get("shift_labels"),
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            **options,
        )
        return _replace(out, loss=loss, logits=None)

    _patch_forward(model, with_labels=True, run=with_loss)
    return model


def _patch_forward(model: nn.Module, *, with_labels: bool, run: Callable[..., Any]) -> None:
    """What both patchers share. Checks the model now (not at the first step), keeps its own
    forward (patching twice replaces the patch instead of stacking), and routes a
    training-mode call that keeps every position, with labels (``with_labels``) or without,
    to ``run(output, last_hidden_state, labels, kwargs)`` after running the model with its head
    on no positions. Every other call (eval, generation, the other kind) is the model's own."""
    _parts(model)
    original = getattr(model, "_linear_efe_original_forward", None) or model.forward
    model._linear_efe_original_forward = original
    model.linear_efe_stats = None
    patcher = "apply_linear_efe" if with_labels else "linear_efe_compute_loss"
    guard_decoder(model, f"qwenrl.loss.hf.{patcher}")

    @functools.wraps(original)
    def forward(*args: Any, labels: Tensor | None = None, logits_to_keep: Any = 0, **kwargs: Any):
        if kwargs.get("fused_lm_head"):
            raise RuntimeError(
                f"qwenrl.loss.hf.{patcher}: this model was called with fused_lm_head=True, the "
                "fused LM head a TRL trainer adds (trl.trainer.utils.add_fused_lm_head), which "
                f"computes the loss itself; {patcher} cannot serve that call. With a TRL "
                "trainer, call qwenrl.integrations.trl.use_qwenrl(trainer, **options) after "
                f"building it, instead of {patcher}."
            )
        with routed(model):
            ours = (labels is not None) == with_labels and model.training
            if not (ours and _keeps_all(logits_to_keep)):
                return original(*args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
            out, hidden = _run_without_logits(model, original, args, kwargs)
            return run(out, hidden, labels, kwargs)

    forward._qwenrl_forward = True
    model.forward = forward


@contextlib.contextmanager
def routed(model: nn.Module) -> Iterator[None]:
    """Marks the decoder calls made inside the block as going through a qwenrl forward, which
    the guard of :func:`guard_decoder` lets through (calls nest)."""
    model._qwenrl_routed = getattr(model, "_qwenrl_routed", 0) + 1
    try:
        yield
    finally:
        model._qwenrl_routed -= 1


def guard_decoder(model: nn.Module, patched_by: str) -> None:
    """Makes ``model``'s decoder raise when it runs a training step (``model.training`` and
    gradients enabled) outside a qwenrl forward (:func:`routed`) while ``model.forward`` is no
    longer a qwenrl forward (one marked ``_qwenrl_forward``): then something replaced the patch
    and calls the decoder around it, as TRL's fused LM head does, and the qwenrl loss that
    ``patched_by`` installed would be silently skipped. Evaluation, generation and no-grad
    calls (TRL's metrics, a reference model) pass, and so does a direct decoder call while the
    patch is in place. Installed once per model; ``patched_by`` (the last patcher's name) goes
    into the message."""
    decoder, _ = _parts(model)
    model._qwenrl_patched_by = patched_by
    if getattr(model, "_qwenrl_decoder_guard", None) is not None:
        return

    def check(_module: nn.Module, _args: Any) -> None:
        if not (model.training and torch.is_grad_enabled()):
            return
        if getattr(model, "_qwenrl_routed", 0) or getattr(model.forward, "_qwenrl_forward", False):
            return
        raise RuntimeError(_bypass_message(model))

    model._qwenrl_decoder_guard = decoder.register_forward_pre_hook(check)


def _bypass_message(model: nn.Module) -> str:
    forward = getattr(model.forward, "__func__", model.forward)
    code = getattr(forward, "__code__", None)
    where = f"{code.co_name} of {code.co_filename}" if code is not None else repr(forward)
    by_trl = code is not None and "trl" in code.co_filename.replace("\\", "/").split("/")
    return (
        f"{model._qwenrl_patched_by} patched this {type(model).__name__}, but its forward was "
        f"replaced ({where}) and its decoder ran a training step around the patch"
        + (
            ": TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) computes the loss "
            "without it"
            if by_trl
            else ""
        )
        + ", so the qwenrl loss would be silently skipped. With a TRL trainer, call "
        "qwenrl.integrations.trl.use_qwenrl(trainer, **options) after building the trainer."
    )


def _keeps_all(logits_to_keep: Any) -> bool:
    """Whether the caller asked for every position (the only case a training loss uses)."""
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def linear_efe_compute_loss(model: nn.Module, **options: Any) -> Callable[..., Tensor]:
    """A ``compute_loss_func`` for ``transformers.Trainer`` that trains ``model`` with
    :func:`qwenrl.linear_efe_loss` without materialising its logits.

    ``Trainer(model, ..., compute_loss_func=linear_efe_compute_loss(model, tau=0.3))``: the
    Trainer then calls the model without labels and the returned function with its outputs and
    the labels. For that to skip the logits, this patches ``model`` so that in training mode a
    forward without labels returns ``logits=None`` and the decoder's last hidden state as
    ``outputs["last_hidden_state"]``; eval mode and generation are unchanged.

    Args:
        model: as for :func:`apply_linear_efe`. options: as for :func:`apply_linear_efe`.

    Returns:
        ``compute_loss(outputs, labels, num_items_in_batch=None) -> loss``; the stats of the
        last call are in ``model.linear_efe_stats``.
    """
    options = _check_options(options)

    def with_hidden_state(out: Any, hidden: Tensor, _labels: None, _kwargs: dict) -> Any:
        if isinstance(out, tuple):
            raise ValueError(
                "linear_efe_compute_loss: the model was called with return_dict=False; its "
                "outputs must be a ModelOutput to carry the last hidden state to the loss"
            )
        out = _replace(out, logits=None)
        out["last_hidden_state"] = hidden
        return out

    _patch_forward(model, with_labels=False, run=with_hidden_state)

    def compute_loss(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        hidden = outputs["last_hidden_state"] if "last_hidden_state" in outputs else None
        if hidden is None:
            raise ValueError(
                "linear_efe_compute_loss: the outputs carry no last_hidden_state; was the "
                "model called in training mode, without labels and with logits_to_keep=0?"
            )
        # The head of this call, not of the patch's creation: resize_token_embeddings()
        # replaces it with a new module.
        _, head = _parts(model)
        loss, model.linear_efe_stats = causal_lm_loss(
            hidden, head, labels, num_items_in_batch=num_items_in_batch, **options
        )
        return loss

    return compute_loss
