"""TRL's fused LM head, computed by :func:`qwenrl.linear_efe_loss`: what
:func:`~qwenrl.integrations.trl.use_qwenrl` puts in place of ``add_fused_lm_head``'s
``_fused_forward``."""

from __future__ import annotations

import functools
import os
import types
from typing import Any

import torch
import trl
from torch import Tensor, nn
from trl.trainer import utils as trl_utils
from trl.trainer.utils import FusedCausalLMOutput

from qwenrl.integrations.trl._options import (
    _LOSS_AS_LOG_PROBS,
    _TRL_SETTINGS,
    FIELDS,
    _Head,
    is_cross_entropy,
)
from qwenrl.loss import hf
from qwenrl.loss.linear import linear_efe_loss


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
