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
``entropy_weight``, ``label_smoothing``, ``z_loss``) the token loss is no longer ``-log p``:
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
``SFTTrainer`` with a ``compute_loss_func`` or ``label_smoothing_factor`` (their loss does not
come from the fused head; use the ``label_smoothing`` option instead), or ``loss_type='dft'``
with EFE options; ``DistillationTrainer`` with ``beta != 0``; DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:
    import trl
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "qwenrl.integrations.trl needs TRL: pip install 'qwenrl[trl]'"
        f" ({type(error).__name__}: {error})"
    ) from error

from qwenrl.loss import hf
from qwenrl.loss.dispatch import BACKENDS
from qwenrl.loss.linear import linear_efe_loss
from qwenrl.loss.options import EFEOptions

__all__ = ["OPTIONS", "divergence_loss", "use_qwenrl"]

# The options of the token loss; the defaults are cross-entropy, so TRL's numbers come out.
LOSS_DEFAULTS = {
    "tau": 0.0,
    "easy_weight": 1.0,
    "entropy_weight": 0.0,
    "label_smoothing": 0.0,
    "z_loss": 0.0,
}
# Every option use_qwenrl accepts: the loss's, and how linear_efe_loss runs.
OPTIONS = (*LOSS_DEFAULTS, "chunk_size", "backend")
# The FusedCausalLMOutput fields qwenrl's pass computes (log_probs always).
FIELDS = ("log_probs", "entropy", "is_top1")
# What use_qwenrl reads off TRL's _fused_forward (the variables of its closure).
_TRL_SETTINGS = (
    "original_forward",
    "temperature",
    "cast_lm_head_to_fp32",
    "outputs",
    "final_logit_softcapping",
    "logit_scale",
    "backbone_attr",
    "text_config",
)
# Set while SFTTrainer.compute_loss runs: the log_probs field then carries minus the
# per-token loss (the EFE loss, with EFE options).
_LOSS_AS_LOG_PROBS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "qwenrl_loss_as_log_probs", default=False
)
# The options of the DistillationTrainer whose _compute_loss is running, if it uses qwenrl.
_DIVERGENCE_OPTIONS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "qwenrl_divergence_options", default=None
)


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over the cross-entropy defaults, after a clear error for an unknown name
    or a bad value (now, not at the first step)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"use_qwenrl: unknown option(s) {unknown}; the options are {list(OPTIONS)} "
            "(the loss options of qwenrl.linear_efe_loss; the tensors, the reduction and the "
            "per-token outputs are set by the integration)"
        )
    merged = {**LOSS_DEFAULTS, **options}
    EFEOptions(**{name: merged[name] for name in LOSS_DEFAULTS})  # checks the values
    chunk_size = merged.get("chunk_size")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"use_qwenrl: chunk_size must be a positive int or None, got {chunk_size!r}"
        )
    if merged.get("backend", "auto") not in BACKENDS:
        raise ValueError(
            f"use_qwenrl: backend must be one of {BACKENDS}, got {merged['backend']!r}"
        )
    return merged


def is_cross_entropy(options: dict[str, Any]) -> bool:
    """Whether the per-token loss is exactly ``-log p(label)``."""
    return (
        float(options["easy_weight"]) == 1.0
        and float(options["entropy_weight"]) == 0.0
        and float(options["label_smoothing"]) == 0.0
        and float(options["z_loss"]) == 0.0
    )


@dataclass
class _Head:
    """One model's fused head: TRL's settings and the qwenrl options."""

    trl_forward: Callable[..., Any]  # the TRL _fused_forward replaced (its non-fused path)
    temperature: float
    cast_lm_head_to_fp32: bool
    outputs: tuple[str, ...]
    logit_scale: float
    backbone_attr: str
    text_config: Any
    options: dict[str, Any]
    forward: Callable[..., Any] | None = None  # ours


# --- the fused LM head ------------------------------------------------------------------


def trl_fused_head_settings(forward: Any) -> dict[str, Any] | None:
    """The settings of TRL's fused LM head if ``forward`` is its ``_fused_forward`` (the
    variables of its closure: temperature, outputs, ...), else None."""
    function = getattr(forward, "__func__", None)
    code = getattr(function, "__code__", None)
    if code is None or code.co_name != "_fused_forward":
        return None
    if not code.co_filename.endswith(os.path.join("trl", "trainer", "utils.py")):
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in function.__closure__ or ())))
    missing = [name for name in _TRL_SETTINGS if name not in cells]
    if missing:
        raise RuntimeError(
            f"use_qwenrl: the fused LM head of TRL {trl.__version__} "
            f"(trl.trainer.utils.add_fused_lm_head) has no {missing}: this integration reads "
            "the settings of TRL 1.16's; install trl 1.16 (pip install 'qwenrl[trl]')"
        )
    return {name: cells[name] for name in _TRL_SETTINGS}


def _take_over_head(model: nn.Module, options: dict[str, Any], *, add: bool) -> _Head:
    """Replaces TRL's fused LM head of ``model`` with qwenrl's (``add``: first adds TRL's,
    asking for every field qwenrl computes, when the model has none)."""
    head: _Head | None = getattr(model, "_qwenrl_trl_head", None)
    if head is not None and model.forward is head.forward:  # ours already: new options
        head.options = options
        return head
    settings = trl_fused_head_settings(model.forward)
    softcap = (settings or {}).get("final_logit_softcapping")
    if settings is None:
        if not add:
            raise TypeError(
                f"use_qwenrl: {type(model).__name__} has no TRL fused LM head "
                "(trl.trainer.utils.add_fused_lm_head); is this the model of a TRL trainer?"
            )
        # Checked before TRL's head is added, so that a refused model is left as it was.
        softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"use_qwenrl: {type(model).__name__} caps its logits (final_logit_softcapping="
            f"{softcap}); qwenrl's loss is the softmax of hidden @ weight.T + bias, without a "
            "softcap"
        )
    if settings is None:
        trl_utils.add_fused_lm_head(model, outputs=FIELDS)
        settings = trl_fused_head_settings(model.forward)
    unsupported = [name for name in settings["outputs"] if name not in FIELDS]
    if unsupported:
        raise NotImplementedError(
            f"use_qwenrl: the trainer asks the fused LM head for {unsupported}; qwenrl's "
            f"pass computes {list(FIELDS)} (KTOTrainer's mean_logits, for one, is not among "
            "them)"
        )
    head = _Head(
        trl_forward=model.forward,
        temperature=float(settings["temperature"]),
        cast_lm_head_to_fp32=bool(settings["cast_lm_head_to_fp32"]),
        outputs=tuple(settings["outputs"]),
        logit_scale=float(settings["logit_scale"]),
        backbone_attr=settings["backbone_attr"],
        text_config=settings["text_config"],
        options=options,
    )

    # The class's signature: generate() validates its model kwargs against it (as TRL's).
    @functools.wraps(type(model).forward)
    def forward(
        self: nn.Module,
        *args: Any,
        fused_lm_head: bool = False,
        labels: Tensor | None = None,
        shift_labels: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        with hf.routed(self):  # the decoder guard of qwenrl.loss.hf lets these calls through
            if not fused_lm_head:
                return head.trl_forward(
                    *args,
                    labels=labels,
                    shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch,
                    **kwargs,
                )
            return _fused_forward(
                self, head, args, kwargs, labels, shift_labels, num_items_in_batch
            )

    forward._qwenrl_forward = True  # what qwenrl.loss.hf's decoder guard recognises
    head.forward = types.MethodType(forward, model)
    model.forward = head.forward
    model._qwenrl_trl_head = head
    return head


def _fused_forward(
    model: nn.Module,
    head: _Head,
    args: tuple,
    kwargs: dict[str, Any],
    labels: Tensor | None,
    shift_labels: Tensor | None,
    num_items_in_batch: Tensor | int | None,
) -> Any:
    """TRL's ``_fused_forward`` (trl/trainer/utils.py) with qwenrl's pass in place of
    ``ChunkedLogProbFunction``: the same backbone call, label shift and output."""
    kwargs["use_cache"] = False
    if getattr(head.text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_outputs = getattr(model, head.backbone_attr)(*args, **kwargs)
    hidden = backbone_outputs.last_hidden_state
    if shift_labels is None:
        if labels is None:
            raise ValueError("use_qwenrl: a call with fused_lm_head=True needs labels")
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    lm_head = model.get_output_embeddings()
    weight, bias = _full(lm_head.weight), _full(lm_head.bias)
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    mask = labels != -100
    row_loss, per_token = token_losses(
        hidden[mask],
        weight,
        bias,
        labels[mask],
        scale=head.logit_scale / head.temperature,
        fp32=head.cast_lm_head_to_fp32,
        options=head.options,
    )

    def scatter(values: Tensor) -> Tensor:
        # masked_scatter keeps an all-masked micro-batch connected to the model (a zero).
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    if is_cross_entropy(head.options) or _LOSS_AS_LOG_PROBS.get():
        log_probs = scatter(-row_loss)
    else:
        log_probs = scatter(per_token["logprob"])
    entropy = scatter(per_token["entropy"]) if "entropy" in head.outputs else None
    is_top1 = scatter(per_token["correct"]) if "is_top1" in head.outputs else None
    if num_items_in_batch is None:
        denominator = mask.sum().clamp(min=1)
    elif isinstance(num_items_in_batch, Tensor):
        denominator = num_items_in_batch.to(row_loss.device)
    else:
        denominator = num_items_in_batch
    loss = row_loss.sum() / denominator

    aux_loss = None
    if kwargs.get("output_router_logits"):  # MoE: as TRL's head
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        config = head.text_config
        aux_loss = load_balancing_loss_func(
            backbone_outputs.router_logits,
            getattr(config, "num_experts", None) or model.num_experts,
            getattr(config, "num_experts_per_tok", None) or model.num_experts_per_tok,
            kwargs.get("attention_mask"),
        )
        loss = loss + getattr(config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=entropy,
        is_top1=is_top1,
        label_mask=mask,
        aux_loss=aux_loss,
    )


def token_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    scale: float = 1.0,
    fp32: bool = False,
    options: dict[str, Any],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [N] (differentiable) and per-token outputs of ``linear_efe_loss`` on the
    logits ``scale · (hidden @ weight.T + bias)`` for valid ``labels`` [N].

    The scale (the model's logit scale over the temperature) goes on ``hidden`` and ``bias``;
    the head runs in the autocast dtype when autocast is on (as TRL's), in float32 with
    ``fp32``, else in the weight's dtype.
    """
    device_type = hidden.device.type
    if fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    if hidden.shape[0] == 0:  # no valid token: a zero still connected to the model
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0 + (0.0 if bias is None else bias.sum() * 0.0)
        row_loss = zero.float().expand(0)
        empty = row_loss.detach()
        return row_loss, {
            "logprob": empty,
            "entropy": empty,
            "correct": empty.bool(),
            "lse": empty,
        }
    with torch.autocast(device_type, enabled=False):
        row_loss, per_token = linear_efe_loss(
            hidden,
            weight,
            labels,
            bias=bias,
            reduction="none",
            return_per_token=True,
            **options,
        )
    return row_loss, per_token


def _full(param: Tensor | None) -> Tensor | None:
    """FSDP2's DTensor parameters gathered once (as TRL's head does)."""
    if param is not None and hasattr(param, "full_tensor"):
        return param.full_tensor()
    return param


# --- the distillation divergence ----------------------------------------------------------


def divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Tensor | int | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    options: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``trl.trainer.distillation_trainer._chunked_divergence_loss`` computed by
    :func:`qwenrl.linear_efe_loss` with the teacher's hidden states and head: the same
    arguments and results (the loss, the sum of the student's per-token entropy, the number of
    valid positions). ``beta`` must be 0, the forward KL(teacher ‖ student); in the default
    cross-entropy mode the loss is TRL's. ``options``: :data:`OPTIONS` (checked)."""
    options = check_options(options or {})
    if beta != 0.0:
        raise NotImplementedError(
            f"use_qwenrl: DistillationTrainer with beta={beta}; qwenrl's distillation loss is "
            "the forward KL(teacher || student), TRL's beta=0.0"
        )
    if student_final_logit_softcapping is not None or teacher_final_logit_softcapping is not None:
        raise NotImplementedError(
            "use_qwenrl: the student or the teacher caps its logits (final_logit_softcapping); "
            "qwenrl's loss has no softcap"
        )
    student_weight, student_bias = _full(student_lm_head_weight), _full(student_lm_head_bias)
    teacher_weight, teacher_bias = _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.size(-1))[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1))[valid]
    h_s, student_bias = _scaled(h_s, student_bias, student_logit_scale / temperature)
    h_t, teacher_bias = _scaled(h_t, teacher_bias, teacher_logit_scale / temperature)
    h_s = h_s.to(student_weight.dtype)
    h_t = h_t.to(teacher_weight.dtype)
    if h_s.shape[0] == 0:
        loss, entropy_sum = h_s.sum() * 0.0, h_s.new_zeros((), dtype=torch.float32)
    else:
        # The teacher's softmax is the target; every row passed is valid (target None). The
        # temperature is folded into both hidden states above: TRL's divergence has no T².
        loss, per_token = linear_efe_loss(
            h_s,
            student_weight,
            None,
            bias=student_bias,
            teacher_hidden=h_t,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            reduction="sum",
            return_per_token=True,
            **options,
        )
        entropy_sum = per_token["entropy"].sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy_sum, n_valid


def _scaled(hidden: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


def _install_divergence_dispatch() -> None:
    """Replaces ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (once) by a
    dispatcher: qwenrl's :func:`divergence_loss` while a trainer given to :func:`use_qwenrl`
    computes its loss, TRL's own function otherwise."""
    from trl.trainer import distillation_trainer

    current = distillation_trainer._chunked_divergence_loss
    if getattr(current, "_qwenrl_dispatch", False):
        return

    @functools.wraps(current)
    def dispatch(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        options = _DIVERGENCE_OPTIONS.get()
        if options is None:
            return current(*args, **kwargs)
        return divergence_loss(*args, options=options, **kwargs)

    dispatch._qwenrl_dispatch = True
    dispatch._trl_function = current
    distillation_trainer._chunked_divergence_loss = dispatch


# --- the trainers -----------------------------------------------------------------------


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
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ValueError(
            "use_qwenrl: SFTConfig.label_smoothing_factor makes SFTTrainer compute the loss from "
            "the full logits; set it to 0 and pass use_qwenrl(trainer, label_smoothing=...)"
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
        options: the loss options of :func:`qwenrl.linear_efe_loss`: ``tau``,
            ``easy_weight``, ``entropy_weight``, ``label_smoothing``, ``z_loss`` (default:
            cross-entropy, ``tau=0, easy_weight=1``, which reproduces TRL's numbers), and
            ``chunk_size``, ``backend``. Anything else is a ``TypeError``. Calling again
            replaces the options.

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
