"""TRL's trainers with qwenrl's kernels: ``use_qwenrl(trainer, **options)``.

TRL (1.16) never materialises a causal LM's logits in training. Two entry points do that work,
and :func:`use_qwenrl` takes over both for the trainer (or model) it is given:

* ``trl.trainer.utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)``
  replaces ``model.forward`` (an instance attribute) with its ``_fused_forward``: a call with
  ``fused_lm_head=True`` runs the backbone, projects the positions whose next-token label is
  not -100 through the LM head in tiles (``trl.kernels.ChunkedLogProbFunction``) and returns a
  ``FusedCausalLMOutput`` (``loss``, per-token ``log_probs``, ``entropy``, ``is_top1``,
  ``label_mask``, ...). ``SFTTrainer.compute_loss`` computes its loss as
  ``-log_probs.sum() / num_tokens`` and its ``entropy`` / ``mean_token_accuracy`` metrics from
  ``entropy`` / ``is_top1``; ``GRPOTrainer._get_per_token_logps_and_entropies`` reads
  ``log_probs`` and ``entropy`` for its policy loss. :func:`use_qwenrl` replaces TRL's
  ``_fused_forward`` with one that computes the same fields with
  :func:`qwenrl.linear_efe_loss` (``reduction='none', return_per_token=True``) on the
  backbone's hidden states and ``lm_head.weight``, with the settings TRL gave its head (the
  temperature, the model's logit scale, the fp32 head, the fields asked for), read from the
  forward it replaces. Calls without ``fused_lm_head`` (generation, evaluation with logits)
  are TRL's, hence the model's own.
* ``trl.trainer.distillation_trainer._chunked_divergence_loss``, the module function that
  ``DistillationTrainer._compute_loss`` calls on the student's and teacher's hidden states
  and LM head weights (a generalized JSD, ``trl.kernels.ChunkedDivergenceFunction``). For the
  trainers given to :func:`use_qwenrl` only, that call goes to ``linear_efe_loss(student
  hidden, student weight, ..., teacher_hidden=..., teacher_weight=...)``: the forward
  KL(teacher ‖ student), TRL's ``beta=0``. (The module function is replaced once by a
  dispatcher that calls TRL's own function for every other trainer.)

What the per-token fields hold. In the default cross-entropy mode (``tau=0, easy_weight=1``)
the per-token loss of ``linear_efe_loss`` *is* ``-log p(label)``: ``log_probs`` is minus that
loss, differentiable (its backward runs the chunks again, as TRL's does), so every TRL loss
built from it (SFT's NLL and DFT, GRPO's clipped ratios and KL to the reference model) is
computed from qwenrl's numbers and reproduces TRL's. ``entropy`` and ``is_top1`` come from the
same pass and carry no gradient. With EFE options (``tau``/``easy_weight`` that weight tokens,
and any other loss option of :class:`~qwenrl.loss.EFEOptions`) the token loss is no longer ``-log p``:
the output's ``loss`` is the EFE loss (its sum over tokens divided by ``num_items_in_batch``,
or by the number of tokens, as TRL's), and during ``SFTTrainer.compute_loss`` the
``log_probs`` field carries minus the per-token EFE loss, so that SFT's loss is the EFE loss
with TRL's normalisation and gradient accumulation; elsewhere ``log_probs`` holds the true
log-probabilities, detached.

Refused with a clear error rather than silently computed otherwise: models with
``final_logit_softcapping`` (Gemma 2/3: qwenrl's loss has no softcap); the fields
``log_sum_sq_probs`` and ``mean_logits`` (``KTOTrainer``); EFE options with ``GRPOTrainer``
(its policy loss is built from log-probabilities: use ``linear_efe_loss(..., row_weight=
advantages)`` in a loss of your own for an EFE-shaped policy gradient); GRPO's entropy bonus
(``entropy_coef``, ``use_adaptive_entropy``: it needs a differentiable per-token entropy);
``SFTTrainer`` with a ``compute_loss_func`` or a label smoother (their loss does not come from
the fused head; use qwenrl's own smoothing option instead), or ``loss_type='dft'`` with EFE
options; ``DistillationTrainer`` with ``beta != 0``; DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

try:
    import trl
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "qwenrl.integrations.trl needs TRL: pip install 'qwenrl[trl]'"
        f" ({type(error).__name__}: {error})"
    ) from error

from qwenrl.integrations.trl._options import (
    _DIVERGENCE_OPTIONS,
    _LOSS_AS_LOG_PROBS,
    LOSS_DEFAULTS,
    OPTIONS,
    check_options,
    is_cross_entropy,
)
from qwenrl.integrations.trl.divergence import _install_divergence_dispatch, divergence_loss
from qwenrl.integrations.trl.head import _take_over_head, token_losses, trl_fused_head_settings
from qwenrl.loss import hf

__all__ = [
    "LOSS_DEFAULTS",
    "OPTIONS",
    "divergence_loss",
    "token_losses",
    "trl_fused_head_settings",
    "use_qwenrl",
]


def _wrap_method(trainer: Any, name: str, context: Callable[[], Any]) -> None:
    """``trainer.<name>`` (the class's method, wrapped at most once) runs inside
    ``context()``; a second call of use_qwenrl replaces the context."""
    original = getattr(type(trainer), name).__get__(trainer)

    @functools.wraps(original)
    def method(*args: Any, **kwargs: Any) -> Any:
        with context():
            return original(*args, **kwargs)

    setattr(trainer, name, method)


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value: Any):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model TRL patched: a PEFT model's base model (as TRL's trainers pick it)."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def _refuse_zero3() -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "use_qwenrl: DeepSpeed ZeRO-3 shards lm_head.weight, which qwenrl's chunked loss "
            "reads directly (also in its backward); use FSDP or ZeRO-2"
        )


def _use_in_sft(trainer: Any, options: dict[str, Any]) -> None:
    args = trainer.args
    if trainer.compute_loss_func is not None:
        raise ValueError(
            "use_qwenrl: this SFTTrainer has a compute_loss_func, which computes the loss from "
            "the full logits of a second forward; drop it (use_qwenrl's options choose the loss)"
        )
    if getattr(trainer, "label_smoother", None) is not None:
        raise ValueError(
            "use_qwenrl: this SFTTrainer has a label smoother (the SFTConfig's smoothing "
            "factor), which computes the loss from the full logits; set that factor to 0 and "
            "pass qwenrl's own smoothing option (ε, an EFEOptions field) to use_qwenrl"
        )
    if getattr(args, "loss_type", "nll") == "dft" and not is_cross_entropy(options):
        raise ValueError(
            "use_qwenrl: SFTConfig.loss_type='dft' weights -log p by p, a cross-entropy "
            "objective; EFE options replace the token loss. Use one or the other"
        )
    _take_over_head(_unwrapped(trainer.model), options, add=False)
    _wrap_method(trainer, "compute_loss", lambda: _set(_LOSS_AS_LOG_PROBS, True))


def _use_in_grpo(trainer: Any, options: dict[str, Any]) -> None:
    if not is_cross_entropy(options):
        raise ValueError(
            f"use_qwenrl: {type(trainer).__name__} builds its policy loss from the "
            "per-token log-probabilities, so only the default cross-entropy mode applies "
            f"(got {options}); for an EFE-shaped policy gradient call "
            "qwenrl.linear_efe_loss(hidden, weight, target, row_weight=advantages, tau=...) "
            "in a loss of your own"
        )
    if getattr(trainer, "_entropy_bonus_enabled", False):
        raise NotImplementedError(
            "use_qwenrl: GRPO's entropy bonus (entropy_coef / use_adaptive_entropy) needs a "
            "differentiable per-token entropy; qwenrl's per-token entropy carries no gradient"
        )
    _take_over_head(_unwrapped(trainer.model), options, add=False)
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None and trl_fused_head_settings(_unwrapped(ref_model).forward):
        _take_over_head(_unwrapped(ref_model), options, add=False)


def _use_in_distillation(trainer: Any, options: dict[str, Any]) -> None:
    if trainer.beta != 0.0:
        raise NotImplementedError(
            f"use_qwenrl: DistillationTrainer with beta={trainer.beta}; qwenrl's distillation "
            "loss is the forward KL(teacher || student), TRL's beta=0.0 "
            "(DistillationConfig(beta=0.0))"
        )
    _install_divergence_dispatch()
    _wrap_method(trainer, "_compute_loss", lambda: _set(_DIVERGENCE_OPTIONS, dict(options)))


def use_qwenrl(trainer_or_model: Any, **options: Any) -> Any:
    """Makes a TRL trainer (or a model) compute its per-token outputs and loss with qwenrl's
    kernels: :func:`qwenrl.linear_efe_loss` on the hidden states and ``lm_head.weight``.

    ``use_qwenrl(trainer)`` after building the trainer, before ``trainer.train()``:

    * ``SFTTrainer``: its loss, ``entropy`` and ``mean_token_accuracy`` come from qwenrl's
      pass (one forward per micro-batch, as TRL's); with EFE options the loss is the EFE loss.
    * ``GRPOTrainer``: the per-token log-probabilities and entropies of its policy loss (and
      of its reference model) come from qwenrl's pass; cross-entropy mode only.
    * ``DistillationTrainer``: its divergence is ``linear_efe_loss`` with the teacher's
      hidden states and head (``beta=0``, the forward KL).

    ``use_qwenrl(model)`` gives a causal LM the fused head by itself:
    ``model(input_ids, labels=labels, fused_lm_head=True)`` returns a TRL
    ``FusedCausalLMOutput`` (loss, log_probs, entropy, is_top1, label_mask) computed by qwenrl.
    A TRL trainer built afterwards replaces that head with its own; the model then raises at
    its first training step (call ``use_qwenrl(trainer)`` instead).

    Args:
        trainer_or_model: a ``trl.SFTTrainer``, ``trl.GRPOTrainer`` or
            ``trl.DistillationTrainer``, or a transformers causal LM.
        options: the loss options of :func:`qwenrl.linear_efe_loss` (``LOSS_DEFAULTS``:
            :class:`~qwenrl.loss.EFEOptions`' caller fields but ``ignore_index``,
            ``reduction`` and ``log_target``; default: cross-entropy, ``tau=0,
            easy_weight=1``, which reproduces TRL's numbers), and ``chunk_size``,
            ``backend``, ``weight_grad_in_place`` (how :func:`qwenrl.linear_efe_loss` runs).
            Anything else is a ``TypeError``. Calling again replaces the options.

    Returns:
        ``trainer_or_model``.
    """
    options = check_options(options)
    if isinstance(trainer_or_model, nn.Module):
        model = trainer_or_model
        _take_over_head(model, options, add=True)
        hf.guard_decoder(model, "qwenrl.integrations.trl.use_qwenrl(model)")
        return model
    trainer = trainer_or_model
    _refuse_zero3()
    # Subclasses first: each trainer's own path (TRL's trainers do not derive one another).
    if isinstance(trainer, trl.SFTTrainer):
        _use_in_sft(trainer, options)
    elif isinstance(trainer, trl.GRPOTrainer):
        _use_in_grpo(trainer, options)
    elif isinstance(trainer, trl.DistillationTrainer):
        _use_in_distillation(trainer, options)
    else:
        raise TypeError(
            f"use_qwenrl: {type(trainer).__name__} is not a supported TRL trainer "
            "(SFTTrainer, GRPOTrainer, DistillationTrainer) nor a model"
        )
    trainer._qwenrl_options = options
    return trainer
